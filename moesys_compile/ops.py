"""Canonical MoE operators (``torch.ops.moesys.*``).

Every MoE layer the frontend recognises is expressed with these ops, so that tracing keeps each
one as a single graph node and the passes can rewrite them. Each op has a CPU implementation
(plain torch), a fake implementation (shapes only, for FakeTensor propagation and export) and an
autograd formula. ``kernels/`` adds device-specific implementations of the same ops.

Shape legend:  T tokens · D model dim · F expert hidden dim · H up-projection rows (2F for
SwiGLU, F otherwise) · E experts · K top-k · N = T*K routed slots.

Op boundaries (``decompose_moe`` splits ``moe_experts`` along them):

    route(logits_TE, ...)            -> weights_TK, ids_TK, scores_TE
    moe_experts(x_TD, ids_TK, weights_TK, w_up_EHD, w_down_EDF, ...) -> y_TD
        == unpermute(grouped_mlp(permute(x_TD, ids_TK, E)...), order_N, weights_TK)
    permute(x_TD, ids_TK, E)         -> x_ND (sorted by expert, stable), counts_E, order_N
    grouped_mlp(x_ND, counts_E, w_up_EHD, w_down_EDF, activation) -> y_ND
    unpermute(y_ND, order_N, weights_TK) -> y_TD      (top-k weighted sum fused in)

``order_N[n]`` is the flat slot index ``t*K + k`` of the n-th expert-sorted row, so
``x_ND[n] == x_TD[order_N[n] // K]``. With a capacity, dropped slots carry weight 0 and are
moved past the last expert's rows (``counts_E`` counts only kept rows).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("swiglu", "geglu", "gelu", "silu", "relu")
SCORE_FUNCS = ("softmax", "sigmoid")


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not supported; use one of {ACTIVATIONS}")


def is_gated(activation: str) -> bool:
    return activation in ("swiglu", "geglu")


def up_rows(ffn_dim: int, activation: str) -> int:
    """Rows H of the up projection for an expert hidden size F."""
    return 2 * ffn_dim if is_gated(activation) else ffn_dim


def apply_activation(h_NH: Tensor, activation: str) -> Tensor:
    if activation == "swiglu":
        gate, up = h_NH.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "geglu":
        gate, up = h_NH.chunk(2, dim=-1)
        return F.gelu(gate) * up
    if activation == "gelu":
        return F.gelu(h_NH)
    if activation == "silu":
        return F.silu(h_NH)
    if activation == "relu":
        return F.relu(h_NH)
    check_activation(activation)
    raise AssertionError("unreachable")


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """GShard capacity per expert: ceil(factor * T * K / E), at least 1 when there are tokens."""
    if capacity_factor <= 0:
        return num_tokens * top_k
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts)) if num_tokens else 0


# ---------------------------------------------------------------------------------------------
# route
# ---------------------------------------------------------------------------------------------


def score_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """Router scores are computed in at least fp32 (bf16 logits are upcast, fp64 stays fp64)."""
    return torch.promote_types(logits_dtype, torch.float32)


def route_reference(
    logits_TE: Tensor,
    top_k: int,
    score_func: str = "softmax",
    renormalize: bool = True,
    bias_E: Optional[Tensor] = None,
    n_groups: int = 1,
    topk_groups: int = 1,
    routed_scaling: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable torch routing: scores -> (group-limited) top-k -> renormalize -> scale.

    The bias (DeepSeek-V3 correction bias) only steers the choice; weights come from unbiased
    scores. Group-limited top-k ranks groups by the sum of their two best biased scores.
    """
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"score_func {score_func!r} is not supported; use one of {SCORE_FUNCS}")
    num_experts = logits_TE.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k ({top_k}) must be in [1, num_experts ({num_experts})]")
    logits_TE = logits_TE.to(score_dtype(logits_TE.dtype))
    scores_TE = logits_TE.softmax(-1) if score_func == "softmax" else logits_TE.sigmoid()
    choice_TE = scores_TE.detach()
    if bias_E is not None:
        choice_TE = choice_TE + bias_E.detach().to(choice_TE.dtype)
    if n_groups > 1:
        if num_experts % n_groups:
            raise ValueError(f"num_experts ({num_experts}) is not divisible by n_groups ({n_groups})")
        per_group = num_experts // n_groups
        grouped_TGe = choice_TE.view(-1, n_groups, per_group)
        group_scores_TG = grouped_TGe.topk(min(2, per_group), dim=-1).values.sum(-1)
        keep_groups_TG = group_scores_TG.topk(topk_groups, dim=-1).indices
        group_mask_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, keep_groups_TG, True)
        expert_mask_TE = group_mask_TG.unsqueeze(-1).expand_as(grouped_TGe).reshape_as(choice_TE)
        choice_TE = choice_TE.masked_fill(~expert_mask_TE, float("-inf"))
    ids_TK = choice_TE.topk(top_k, dim=-1).indices
    weights_TK = scores_TE.gather(1, ids_TK)
    if renormalize:
        weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
    if routed_scaling != 1.0:
        weights_TK = weights_TK * routed_scaling
    return weights_TK, ids_TK, scores_TE


@torch.library.custom_op("moesys::route", mutates_args=())
def route(
    logits_TE: Tensor,
    top_k: int,
    score_func: str = "softmax",
    renormalize: bool = True,
    bias_E: Optional[Tensor] = None,
    n_groups: int = 1,
    topk_groups: int = 1,
    routed_scaling: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    with torch.no_grad():
        weights_TK, ids_TK, scores_TE = route_reference(
            logits_TE, top_k, score_func, renormalize, bias_E, n_groups, topk_groups, routed_scaling
        )
    return weights_TK.contiguous(), ids_TK.contiguous(), scores_TE.contiguous()


@route.register_fake
def _route_fake(logits_TE, top_k, score_func="softmax", renormalize=True, bias_E=None, n_groups=1,
                topk_groups=1, routed_scaling=1.0):
    num_tokens, dtype = logits_TE.shape[0], score_dtype(logits_TE.dtype)
    weights_TK = logits_TE.new_empty((num_tokens, top_k), dtype=dtype)
    ids_TK = logits_TE.new_empty((num_tokens, top_k), dtype=torch.int64)
    scores_TE = logits_TE.new_empty(logits_TE.shape, dtype=dtype)
    return weights_TK, ids_TK, scores_TE


def _route_setup(ctx, inputs, output):
    logits_TE, top_k, score_func, renormalize, bias_E, n_groups, topk_groups, routed_scaling = inputs
    weights_TK, ids_TK, scores_TE = output
    ctx.save_for_backward(scores_TE, ids_TK, weights_TK)
    ctx.opts = (score_func, renormalize, routed_scaling, logits_TE.dtype)


def _route_backward(ctx, grad_weights_TK, grad_ids_TK, grad_scores_TE):
    scores_TE, ids_TK, weights_TK = ctx.saved_tensors
    score_func, renormalize, routed_scaling, logits_dtype = ctx.opts
    grad_scores_TE = torch.zeros_like(scores_TE) if grad_scores_TE is None else grad_scores_TE.to(scores_TE.dtype).clone()
    if grad_weights_TK is not None:
        g_TK = grad_weights_TK.to(scores_TE.dtype) * routed_scaling
        picked_TK = scores_TE.gather(1, ids_TK)
        if renormalize:
            denom_T1 = picked_TK.sum(-1, keepdim=True) + 1e-20
            normalized_TK = picked_TK / denom_T1
            g_TK = (g_TK - (g_TK * normalized_TK).sum(-1, keepdim=True)) / denom_T1
        grad_scores_TE.scatter_add_(1, ids_TK, g_TK)
    if score_func == "softmax":
        grad_logits_TE = scores_TE * (grad_scores_TE - (grad_scores_TE * scores_TE).sum(-1, keepdim=True))
    else:
        grad_logits_TE = grad_scores_TE * scores_TE * (1 - scores_TE)
    return grad_logits_TE.to(logits_dtype), None, None, None, None, None, None, None


route.register_autograd(_route_backward, setup_context=_route_setup)


# ---------------------------------------------------------------------------------------------
# permute
# ---------------------------------------------------------------------------------------------


def permute_reference(x_TD: Tensor, ids_TK: Tensor, num_experts: int, capacity: int = -1):
    """Sort the T*K routed slots by expert (stable). Slots beyond ``capacity`` per expert are
    dropped: they go last and are not counted."""
    top_k = ids_TK.shape[1]
    flat_ids_N = ids_TK.reshape(-1)
    if capacity >= 0:
        order_N = torch.argsort(flat_ids_N, stable=True)
        sorted_ids_N = flat_ids_N[order_N]
        counts_E = torch.bincount(flat_ids_N, minlength=num_experts)
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        rank_in_expert_N = torch.arange(flat_ids_N.numel(), device=x_TD.device) - starts_E[sorted_ids_N]
        dropped_N = rank_in_expert_N >= capacity
        # kept rows first (still expert-sorted), dropped rows after them
        key_N = sorted_ids_N + dropped_N.long() * num_experts
        order_N = order_N[torch.argsort(key_N, stable=True)]
        counts_E = counts_E.clamp(max=capacity)
    else:
        order_N = torch.argsort(flat_ids_N, stable=True)
        counts_E = torch.bincount(flat_ids_N, minlength=num_experts)
    x_ND = x_TD.index_select(0, order_N // top_k)
    return x_ND, counts_E, order_N


@torch.library.custom_op("moesys::permute", mutates_args=())
def permute(x_TD: Tensor, ids_TK: Tensor, num_experts: int, capacity: int = -1) -> tuple[Tensor, Tensor, Tensor]:
    return permute_reference(x_TD, ids_TK, num_experts, capacity)


@permute.register_fake
def _permute_fake(x_TD, ids_TK, num_experts, capacity=-1):
    num_slots = ids_TK.shape[0] * ids_TK.shape[1]
    return (
        x_TD.new_empty((num_slots, x_TD.shape[1])),
        ids_TK.new_empty((num_experts,), dtype=torch.int64),
        ids_TK.new_empty((num_slots,), dtype=torch.int64),
    )


def _permute_setup(ctx, inputs, output):
    x_TD, ids_TK, _, _ = inputs
    ctx.save_for_backward(output[2])
    ctx.num_tokens, ctx.top_k = x_TD.shape[0], ids_TK.shape[1]


def _permute_backward(ctx, grad_x_ND, grad_counts, grad_order):
    (order_N,) = ctx.saved_tensors
    grad_x_TD = grad_x_ND.new_zeros((ctx.num_tokens, grad_x_ND.shape[1]))
    grad_x_TD.index_add_(0, order_N // ctx.top_k, grad_x_ND)
    return grad_x_TD, None, None, None


permute.register_autograd(_permute_backward, setup_context=_permute_setup)


# ---------------------------------------------------------------------------------------------
# grouped_mlp
# ---------------------------------------------------------------------------------------------


def _group_bounds(counts_E: Tensor) -> list[tuple[int, int, int]]:
    """(expert, start, end) for every expert with rows; one host sync for the whole layer."""
    bounds, start = [], 0
    for expert, count in enumerate(counts_E.tolist()):
        if count:
            bounds.append((expert, start, start + count))
        start += count
    return bounds


def grouped_mlp_reference(x_ND: Tensor, counts_E: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor,
                          activation: str = "swiglu") -> Tensor:
    """Differentiable per-expert loop: rows of expert e go through act(x W_up[e]^T) W_down[e]^T.
    Rows past sum(counts_E) (dropped slots) produce zeros."""
    y_ND = x_ND.new_zeros((x_ND.shape[0], w_down_EDF.shape[1]))
    pieces = []
    for expert, start, end in _group_bounds(counts_E):
        h_nH = x_ND[start:end] @ w_up_EHD[expert].t()
        pieces.append((start, end, apply_activation(h_nH, activation) @ w_down_EDF[expert].t()))
    if not pieces:
        return y_ND + 0 * (w_up_EHD.sum() + w_down_EDF.sum())
    rows = torch.cat([p[2] for p in pieces])
    index = torch.cat([torch.arange(s, e, device=x_ND.device) for s, e, _ in pieces])
    return y_ND.index_copy(0, index, rows.to(y_ND.dtype))


@torch.library.custom_op("moesys::grouped_mlp", mutates_args=())
def grouped_mlp(x_ND: Tensor, counts_E: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor,
                activation: str = "swiglu") -> Tensor:
    check_activation(activation)
    y_ND = x_ND.new_zeros((x_ND.shape[0], w_down_EDF.shape[1]))
    for expert, start, end in _group_bounds(counts_E):
        h_nH = torch.mm(x_ND[start:end], w_up_EHD[expert].t())
        torch.mm(apply_activation(h_nH, activation), w_down_EDF[expert].t(), out=y_ND[start:end])
    return y_ND


@grouped_mlp.register_fake
def _grouped_mlp_fake(x_ND, counts_E, w_up_EHD, w_down_EDF, activation="swiglu"):
    return x_ND.new_empty((x_ND.shape[0], w_down_EDF.shape[1]))


def _grouped_mlp_setup(ctx, inputs, output):
    x_ND, counts_E, w_up_EHD, w_down_EDF, activation = inputs
    ctx.save_for_backward(x_ND, counts_E, w_up_EHD, w_down_EDF)
    ctx.activation = activation


def _activation_backward(h_nH: Tensor, grad_a: Tensor, activation: str) -> Tensor:
    with torch.enable_grad():
        h = h_nH.detach().requires_grad_(True)
        (grad_h,) = torch.autograd.grad(apply_activation(h, activation), h, grad_a)
    return grad_h


def _grouped_mlp_backward(ctx, grad_y_ND):
    x_ND, counts_E, w_up_EHD, w_down_EDF = ctx.saved_tensors
    grad_x_ND = torch.zeros_like(x_ND)
    grad_w_up = torch.zeros_like(w_up_EHD)
    grad_w_down = torch.zeros_like(w_down_EDF)
    for expert, start, end in _group_bounds(counts_E):
        x_nD, g_nD = x_ND[start:end], grad_y_ND[start:end]
        h_nH = x_nD @ w_up_EHD[expert].t()          # recomputed: cheaper than keeping T*K*H
        a_nF = apply_activation(h_nH, ctx.activation)
        grad_w_down[expert] = g_nD.t() @ a_nF
        grad_h_nH = _activation_backward(h_nH, g_nD @ w_down_EDF[expert], ctx.activation)
        grad_w_up[expert] = grad_h_nH.t() @ x_nD
        grad_x_ND[start:end] = grad_h_nH @ w_up_EHD[expert]
    return grad_x_ND, None, grad_w_up, grad_w_down, None


grouped_mlp.register_autograd(_grouped_mlp_backward, setup_context=_grouped_mlp_setup)


# ---------------------------------------------------------------------------------------------
# unpermute
# ---------------------------------------------------------------------------------------------


def unpermute_reference(y_ND: Tensor, order_N: Tensor, weights_TK: Tensor) -> Tensor:
    num_tokens, top_k = weights_TK.shape
    y_slots_ND = torch.zeros_like(y_ND).index_copy(0, order_N, y_ND)    # back to t*K+k order
    y_TKD = y_slots_ND.view(num_tokens, top_k, -1)
    return (y_TKD * weights_TK.to(y_ND.dtype).unsqueeze(-1)).sum(1)


@torch.library.custom_op("moesys::unpermute", mutates_args=())
def unpermute(y_ND: Tensor, order_N: Tensor, weights_TK: Tensor) -> Tensor:
    with torch.no_grad():
        return unpermute_reference(y_ND, order_N, weights_TK)


@unpermute.register_fake
def _unpermute_fake(y_ND, order_N, weights_TK):
    return y_ND.new_empty((weights_TK.shape[0], y_ND.shape[1]))


def _unpermute_setup(ctx, inputs, output):
    y_ND, order_N, weights_TK = inputs
    ctx.save_for_backward(y_ND, order_N, weights_TK)


def _unpermute_backward(ctx, grad_y_TD):
    y_ND, order_N, weights_TK = ctx.saved_tensors
    num_tokens, top_k = weights_TK.shape
    token_N = order_N // top_k
    slot_k_N = order_N % top_k
    weight_N = weights_TK[token_N, slot_k_N].to(grad_y_TD.dtype)
    grad_rows_ND = grad_y_TD.index_select(0, token_N)
    grad_y_ND = grad_rows_ND * weight_N.unsqueeze(-1)
    grad_weight_N = (grad_rows_ND * y_ND).sum(-1)
    grad_weights_TK = torch.zeros(num_tokens * top_k, dtype=grad_weight_N.dtype, device=grad_y_TD.device)
    grad_weights_TK.index_copy_(0, order_N, grad_weight_N)
    return grad_y_ND, None, grad_weights_TK.view(num_tokens, top_k).to(weights_TK.dtype)


unpermute.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


# ---------------------------------------------------------------------------------------------
# moe_experts: the canonical dispatch -> experts -> combine op
# ---------------------------------------------------------------------------------------------


def moe_experts_decomposed(x_TD, ids_TK, weights_TK, w_up_EHD, w_down_EDF, activation="swiglu",
                           capacity_factor=0.0):
    """The canonical op written with the decomposed ops (what ``decompose_moe`` emits)."""
    num_experts = w_up_EHD.shape[0]
    capacity = -1
    if capacity_factor > 0:
        capacity = expert_capacity(x_TD.shape[0], ids_TK.shape[1], num_experts, capacity_factor)
    x_ND, counts_E, order_N = torch.ops.moesys.permute(x_TD, ids_TK, num_experts, capacity)
    y_ND = torch.ops.moesys.grouped_mlp(x_ND, counts_E, w_up_EHD, w_down_EDF, activation)
    return torch.ops.moesys.unpermute(y_ND, order_N, weights_TK)


@torch.library.custom_op("moesys::moe_experts", mutates_args=())
def moe_experts(x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor,
                activation: str = "swiglu", capacity_factor: float = 0.0) -> Tensor:
    check_activation(activation)
    with torch.no_grad():
        return moe_experts_decomposed(x_TD, ids_TK, weights_TK, w_up_EHD, w_down_EDF, activation,
                                      capacity_factor)


@moe_experts.register_fake
def _moe_experts_fake(x_TD, ids_TK, weights_TK, w_up_EHD, w_down_EDF, activation="swiglu",
                      capacity_factor=0.0):
    return x_TD.new_empty((x_TD.shape[0], w_down_EDF.shape[1]))


def _moe_experts_setup(ctx, inputs, output):
    x_TD, ids_TK, weights_TK, w_up_EHD, w_down_EDF, activation, capacity_factor = inputs
    ctx.save_for_backward(x_TD, ids_TK, weights_TK, w_up_EHD, w_down_EDF)
    ctx.opts = (activation, capacity_factor)


def _moe_experts_backward(ctx, grad_y_TD):
    # Re-run the decomposed ops (each has its own backward) and differentiate through them.
    # Only eager use of the fused op pays for this; compiled programs run the decomposed graph.
    saved = ctx.saved_tensors
    with torch.enable_grad():
        x_TD, _, weights_TK, w_up_EHD, w_down_EDF = [
            t.detach().requires_grad_(t.is_floating_point()) for t in saved
        ]
        ids_TK = saved[1]
        y_TD = moe_experts_decomposed(x_TD, ids_TK, weights_TK, w_up_EHD, w_down_EDF, *ctx.opts)
        grads = torch.autograd.grad(y_TD, (x_TD, weights_TK, w_up_EHD, w_down_EDF), grad_y_TD,
                                    allow_unused=True)
    grad_x, grad_w, grad_up, grad_down = grads
    return grad_x, None, grad_w, grad_up, grad_down, None, None


moe_experts.register_autograd(_moe_experts_backward, setup_context=_moe_experts_setup)


def moe_experts_reference(x_TD, ids_TK, weights_TK, w_up_EHD, w_down_EDF, activation="swiglu",
                          capacity_factor=0.0):
    """Naive differentiable torch version of the whole canonical op, for tests."""
    num_experts = w_up_EHD.shape[0]
    capacity = -1
    if capacity_factor > 0:
        capacity = expert_capacity(x_TD.shape[0], ids_TK.shape[1], num_experts, capacity_factor)
    x_ND, counts_E, order_N = permute_reference(x_TD, ids_TK, num_experts, capacity)
    y_ND = grouped_mlp_reference(x_ND, counts_E, w_up_EHD, w_down_EDF, activation)
    return unpermute_reference(y_ND, order_N, weights_TK)


# ---------------------------------------------------------------------------------------------
# load_balancing_loss
# ---------------------------------------------------------------------------------------------


def load_balancing_loss_reference(scores_TE: Tensor, ids_TK: Tensor, coef: float) -> Tensor:
    """Switch/GShard auxiliary loss: coef * E * sum_e f_e * P_e, f_e the fraction of routed slots
    that chose expert e and P_e the mean router score of e."""
    num_tokens, num_experts = scores_TE.shape
    if num_tokens == 0:
        return scores_TE.sum() * 0
    counts_E = torch.zeros(num_experts, dtype=scores_TE.dtype, device=scores_TE.device)
    counts_E.scatter_add_(0, ids_TK.reshape(-1), torch.ones_like(ids_TK.reshape(-1), dtype=scores_TE.dtype))
    fraction_E = counts_E / ids_TK.numel()
    return coef * num_experts * (fraction_E * scores_TE.mean(0)).sum()


@torch.library.custom_op("moesys::load_balancing_loss", mutates_args=())
def load_balancing_loss(scores_TE: Tensor, ids_TK: Tensor, coef: float) -> Tensor:
    with torch.no_grad():
        return load_balancing_loss_reference(scores_TE, ids_TK, coef)


@load_balancing_loss.register_fake
def _load_balancing_loss_fake(scores_TE, ids_TK, coef):
    return scores_TE.new_empty(())


def _lbl_setup(ctx, inputs, output):
    scores_TE, ids_TK, coef = inputs
    ctx.save_for_backward(scores_TE, ids_TK)
    ctx.coef = coef


def _lbl_backward(ctx, grad_loss):
    scores_TE, ids_TK = ctx.saved_tensors
    num_tokens, num_experts = scores_TE.shape
    counts_E = torch.zeros(num_experts, dtype=scores_TE.dtype, device=scores_TE.device)
    counts_E.scatter_add_(0, ids_TK.reshape(-1), torch.ones_like(ids_TK.reshape(-1), dtype=scores_TE.dtype))
    scale = ctx.coef * num_experts / max(ids_TK.numel() * num_tokens, 1)
    grad_scores_TE = (grad_loss * scale * counts_E).expand(num_tokens, num_experts).contiguous()
    return grad_scores_TE, None, None


load_balancing_loss.register_autograd(_lbl_backward, setup_context=_lbl_setup)


CANONICAL_OPS = {
    "route": torch.ops.moesys.route.default,
    "moe_experts": torch.ops.moesys.moe_experts.default,
    "permute": torch.ops.moesys.permute.default,
    "grouped_mlp": torch.ops.moesys.grouped_mlp.default,
    "unpermute": torch.ops.moesys.unpermute.default,
    "load_balancing_loss": torch.ops.moesys.load_balancing_loss.default,
}
