"""Deliberately naive, differentiable torch references for the kernels (the tests compare every
kernel's outputs and gradients against these). The canonical ops' references in
``moesys_compile.ops`` are reused as they are; what the kernels add on top is written here.

Shape legend: T tokens · D model dim · H up rows · F expert hidden · E experts · K top-k · N = T*K.
"""

import functools

import torch
from torch import Tensor

from moesys_compile.ops import (grouped_mlp_reference, load_balancing_loss_reference, permute_reference,  # noqa: F401
                                route_reference, unpermute_reference)


def route_topk_reference(logits_TE: Tensor, top_k: int, score_func: str = "softmax", renormalize: bool = True,
                         bias_E=None, n_groups: int = 1, topk_groups: int = 1, routed_scaling: float = 1.0,
                         topk=None):
    """(weights_TK, ids_TK, scores_TE, counts_E, score_sum_E) by the canonical routing, a one-hot
    count and a column sum (``topk``: as ``route_reference`` takes it)."""
    weights_TK, ids_TK, scores_TE = route_reference(logits_TE, top_k, score_func, renormalize, bias_E, n_groups,
                                                    topk_groups, routed_scaling, topk=topk)
    one_hot_TKE = torch.nn.functional.one_hot(ids_TK, logits_TE.shape[1])
    return weights_TK, ids_TK, scores_TE, one_hot_TKE.sum((0, 1)), scores_TE.sum(0)


def topk_lowest_index(x: Tensor, k: int):
    """torch.topk over the last dim with the Triton routing's tie rule: exact ties go to the lowest
    index and NaN counts as the largest value (a stable descending sort)."""
    values, indices = x.sort(dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


# what the Triton kernel returns on tied scores: every top-k (experts, a group's two best, groups)
# taken by ``topk_lowest_index``
route_topk_lowest_index_reference = functools.partial(route_topk_reference, topk=topk_lowest_index)


def sort_slots_reference(ids_TK: Tensor, num_experts: int, capacity: int = -1):
    """(counts_E, order_N) of the canonical permute, without moving any rows."""
    no_rows_T0 = torch.zeros((ids_TK.shape[0], 0), device=ids_TK.device)
    _, counts_E, order_N = permute_reference(no_rows_T0, ids_TK, num_experts, capacity)
    return counts_E, order_N


def fused_experts_reference(x_TD: Tensor, order_N: Tensor, counts_E: Tensor, weights_TK: Tensor, w_up_EHD: Tensor,
                            w_down_EDF: Tensor, activation: str = "swiglu", b_up_EH=None, b_down_ED=None) -> Tensor:
    """Gather rows in expert order, per-expert MLP loop, weighted scatter back: three naive steps."""
    x_ND = x_TD[order_N // weights_TK.shape[1]]
    y_ND = grouped_mlp_reference(x_ND, counts_E, w_up_EHD, w_down_EDF, activation, b_up_EH, b_down_ED)
    return unpermute_reference(y_ND, order_N, weights_TK)
