"""Canonical MoE operators (``torch.ops.moesys.*``).

Every MoE layer the frontend recognises is expressed with these ops, so that tracing keeps each
one as a single graph node and the passes can rewrite them. Each op has a CPU implementation
(plain torch), a fake implementation (shapes only, for FakeTensor propagation and export) and an
autograd formula; a formula that needs the host (``group_bounds``) calls a backward op
(``grouped_mlp_backward``), so that AOT autograd (``torch.compile``) can trace it. ``kernels/``
adds device-specific implementations of the same ops. The ops live in ``routing.py`` (route,
load_balancing_loss) and ``experts.py`` (permute, grouped_mlp, unpermute, moe_experts);
``activations.py`` holds the helpers they share.

Shape legend:  T tokens · D model dim · F expert hidden dim · H up-projection rows (2F for
SwiGLU, F otherwise) · E experts · K top-k · N = T*K routed slots.

Op boundaries (``decompose_moe`` splits ``moe_experts`` along them):

    route(logits_TE, ...)            -> weights_TK, ids_TK, scores_TE
    moe_experts(x_TD, ids_TK, weights_TK, w_up_EHD, w_down_EDF, ...) -> y_TD
        == unpermute(grouped_mlp(permute(x_TD, ids_TK, E)...), order_N, weights_TK)
    permute(x_TD, ids_TK, E)         -> x_ND (sorted by expert, stable), counts_E, order_N
    grouped_mlp(x_ND, counts_E, w_up_EHD, w_down_EDF, activation, b_up_EH, b_down_ED, keep_NF) -> y_ND
                                     (expert biases optional: None for bias-free experts; keep_NF:
                                     dropout between the projections, expert_dropout_keep's mask)
    unpermute(y_ND, order_N, weights_TK) -> y_TD      (top-k weighted sum fused in)

``order_N[n]`` is the flat slot index ``t*K + k`` of the n-th expert-sorted row, so
``x_ND[n] == x_TD[order_N[n] // K]``. With a capacity, dropped slots carry weight 0 and are
moved past the last expert's rows (``counts_E`` counts only kept rows).
"""

from moesys_compile.ops.activations import (ACTIVATIONS, TRITON_ACTIVATIONS, apply_activation, check_activation,
                                            clamped_swiglu, expert_capacity, has_triton_kernel, is_gated,
                                            softcapped_swiglu, up_rows)
from moesys_compile.ops.routing import (SCORE_FUNCS, load_balancing_loss, load_balancing_loss_reference,
                                        route, route_reference, score_dtype)
from moesys_compile.ops.experts import (activation_backward, expert_dropout_keep, group_bounds, grouped_mlp,
                                        grouped_mlp_reference, moe_experts, moe_experts_decomposed, moe_experts_reference, permute,
                                        permute_reference, sort_slots_reference, unpermute, unpermute_reference)


__all__ = ["ACTIVATIONS", "SCORE_FUNCS", "TRITON_ACTIVATIONS", "activation_backward", "apply_activation",
           "check_activation", "clamped_swiglu", "expert_capacity", "expert_dropout_keep", "group_bounds", "grouped_mlp",
           "grouped_mlp_reference", "has_triton_kernel", "is_gated", "load_balancing_loss",
           "load_balancing_loss_reference", "moe_experts", "moe_experts_decomposed", "moe_experts_reference", "permute",
           "permute_reference", "route", "route_reference", "score_dtype", "softcapped_swiglu", "sort_slots_reference",
           "unpermute", "unpermute_reference", "up_rows"]
