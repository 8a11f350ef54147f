"""Canonical routing ops: ``moesys.route`` (scores -> top-k) and ``moesys.load_balancing_loss``."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from moesys_compile.ops.autocast import follow_autocast
from moesys_compile.ops.checks import SCORE_FUNCS, check_balance_args, check_route_args
from moesys_compile.ops.first_order import register_autograd


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
    topk: Optional[Callable[[Tensor, int], tuple[Tensor, Tensor]]] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable torch routing: scores -> (group-limited) top-k -> renormalize -> scale.

    The bias (DeepSeek-V3 correction bias) only steers the choice; weights come from unbiased
    scores. Group-limited top-k ranks groups by the sum of their two best biased scores.
    ``topk(x, k)``: (values, indices) of the k largest along the last dim, ``torch.topk`` unless
    given (a reference with another rule for exact ties passes its own).
    """
    topk = topk or (lambda x, k: x.topk(k, dim=-1))
    check_route_args(logits_TE, top_k, score_func, bias_E, n_groups, topk_groups)
    num_experts = logits_TE.shape[-1]
    logits_TE = logits_TE.to(score_dtype(logits_TE.dtype))
    scores_TE = logits_TE.softmax(-1) if score_func == "softmax" else logits_TE.sigmoid()
    choice_TE = scores_TE.detach()
    if bias_E is not None:
        choice_TE = choice_TE + bias_E.detach().to(choice_TE.dtype)
    if n_groups > 1:
        per_group = num_experts // n_groups
        grouped_TGe = choice_TE.view(-1, n_groups, per_group)
        group_scores_TG = topk(grouped_TGe, min(2, per_group))[0].sum(-1)
        keep_groups_TG = topk(group_scores_TG, topk_groups)[1]
        group_mask_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, keep_groups_TG, True)
        expert_mask_TE = group_mask_TG.unsqueeze(-1).expand_as(grouped_TGe).reshape_as(choice_TE)
        choice_TE = choice_TE.masked_fill(~expert_mask_TE, float("-inf"))
    ids_TK = topk(choice_TE, top_k)[1]
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


register_autograd(route, _route_backward, setup_context=_route_setup)


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
    check_balance_args(scores_TE, ids_TK)
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


register_autograd(load_balancing_loss, _lbl_backward, setup_context=_lbl_setup)


# torch.autocast: expert matmuls in the autocast dtype, the rest on their inputs as they come
follow_autocast("moesys::route", cast=False)
follow_autocast("moesys::load_balancing_loss", cast=False)
