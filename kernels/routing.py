"""Fused routing: scores (softmax | sigmoid) -> optional bias and group-limited top-k -> top-k ->
renormalize -> scale, plus the per-expert statistics the load-balancing loss needs, in one pass
over the router logits.

Shape legend: T tokens · E experts · K top-k · G expert groups.

    route_topk(logits_TE, top_k, ...) -> weights_TK, ids_TK, scores_TE, counts_E, score_sum_E

``counts_E`` is how many of the T*K slots chose each expert (int64) and ``score_sum_E`` the sum of
each expert's scores over tokens; ``balance_loss(counts_E, score_sum_E, ids_TK, coef)`` turns them
into the Switch/GShard loss, equal to ``torch.ops.moesys.load_balancing_loss(scores_TE, ids_TK,
coef)`` without another pass over the scores. Semantics (bias only steers the choice, groups
ranked by the sum of their two best biased scores) are those of ``moesys_compile.ops.route``.

Ties: the Triton kernel breaks exact ties by the lowest expert (and group) index and counts NaN
as the largest score; a token's K experts are always distinct. The torch path calls torch.topk,
like the eager models it must equal, and torch.topk leaves the order of exact ties unspecified
(CPU and CUDA differ): on tied scores (a zero-initialised router, bf16 logits) the two paths can
choose different, equally-scored experts.

    >>> import torch, moesys_compile.kernels
    >>> w, ids, scores, counts, sums = torch.ops.moesys_kernels.route_topk(torch.randn(5, 8), 2)
    >>> int(counts.sum())
    10
"""

from typing import Optional

import torch
from torch import Tensor

from moesys_compile.kernels._triton import check_dtype, check_triton, pow2, resolve_impl, tl, triton
from moesys_compile.ops import route_reference, score_dtype
from moesys_compile.ops.checks import check_route_args
from moesys_compile.ops.autocast import follow_autocast
from moesys_compile.ops.first_order import register_autograd

# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


def _configs(e_pad: int) -> list:
    """Tokens per program, so a program holds about 4K scores. Not autotuned: the partial
    statistics buffer has one row per program, so its shape depends on BLOCK_T."""
    block_t = max(1, min(64, 4096 // e_pad))
    return [triton.Config({"BLOCK_T": block_t}, num_warps=4 if e_pad >= 64 else 2)]


@triton.jit
def _first_max(key, avail, idx, NONE: tl.constexpr):
    """Per row, the lowest index ``idx`` among the ``avail`` columns holding the largest ``key``;
    NaN counts as larger than any number (as in torch.topk). ``NONE`` when no column is avail."""
    is_nan = key != key
    best = tl.max(tl.where(avail & (key == key), key, float("-inf")), axis=1)
    nan_left = tl.max((avail & is_nan).to(tl.int32), axis=1) > 0
    cand = avail & tl.where(nan_left[:, None], is_nan, key == best[:, None])
    return tl.min(tl.where(cand, idx[None, :], NONE), axis=1)


@triton.jit
def _value_at(x, idx, i):
    """x[row, i[row]] per row (NaN and -inf kept)."""
    return tl.sum(tl.where(idx[None, :] == i[:, None], x, 0.0), axis=1)


@triton.jit
def _route_fwd_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr, scores_ptr, part_counts_ptr, part_sums_ptr,
    T, E, stride_logits, routed_scaling, experts_per_group,
    K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    N_GROUPS: tl.constexpr, G_PAD: tl.constexpr, TOPK_GROUPS: tl.constexpr, GROUP_TOP2: tl.constexpr,
):
    """One program routes BLOCK_T tokens. Every pick (best expert, a group's two best, best group)
    is ``_first_max`` over the columns still available: exact ties go to the lowest expert (or
    group) index, NaN counts as the largest score, and a picked column leaves the available set,
    so a token's K experts are always distinct. torch.topk leaves the order of exact ties
    unspecified, so on tied scores the torch path may choose other, equally-scored experts."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    row_ok = rows < T
    col_ok = cols < E
    mask = row_ok[:, None] & col_ok[None, :]
    neg_inf = float("-inf")

    logits = tl.load(logits_ptr + rows[:, None] * stride_logits + cols[None, :], mask=mask, other=0.0)
    logits = tl.where(col_ok[None, :], logits.to(tl.float32), neg_inf)
    if SIGMOID:
        scores = tl.sigmoid(logits)
    else:
        num = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        scores = num / tl.sum(num, axis=1)[:, None]
    scores = tl.where(mask, scores, 0.0)
    tl.store(scores_ptr + rows[:, None] * E + cols[None, :], scores, mask=mask)

    # the choice: scores (+ bias), among the experts of the best groups
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    avail = tl.broadcast_to(col_ok[None, :], (BLOCK_T, E_PAD))
    if N_GROUPS > 1:
        group_of_col = cols // experts_per_group
        groups = tl.arange(0, G_PAD)
        group_scores = tl.zeros((BLOCK_T, G_PAD), tl.float32)
        for g in tl.static_range(N_GROUPS):
            in_group = avail & (group_of_col == g)[None, :]
            first = _first_max(choice, in_group, cols, E_PAD)
            best = _value_at(choice, cols, first)
            if GROUP_TOP2:
                second = _first_max(choice, in_group & (cols[None, :] != first[:, None]), cols, E_PAD)
                best += _value_at(choice, cols, second)
            group_scores = tl.where(groups[None, :] == g, best[:, None], group_scores)
        group_avail = tl.broadcast_to((groups < N_GROUPS)[None, :], (BLOCK_T, G_PAD))
        keep = tl.zeros((BLOCK_T, E_PAD), tl.int32)
        for _ in tl.static_range(TOPK_GROUPS):
            chosen = _first_max(group_scores, group_avail, groups, G_PAD)
            keep = tl.where(group_of_col[None, :] == chosen[:, None], 1, keep)
            group_avail = group_avail & (groups[None, :] != chosen[:, None])
        avail = avail & (keep != 0)

    # top-k by K exclusive picks; weights come from the unbiased scores
    ks = tl.arange(0, K_PAD)
    top_w = tl.zeros((BLOCK_T, K_PAD), tl.float32)
    top_i = tl.zeros((BLOCK_T, K_PAD), tl.int32)
    picked = tl.zeros((BLOCK_T, E_PAD), tl.int32)
    for k in tl.static_range(K):
        best = _first_max(choice, avail, cols, E_PAD)
        hit = cols[None, :] == best[:, None]
        w = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        top_w = tl.where(ks[None, :] == k, w[:, None], top_w)
        top_i = tl.where(ks[None, :] == k, best[:, None], top_i)
        picked = tl.where(hit, 1, picked)
        avail = avail & (cols[None, :] != best[:, None])
    if RENORMALIZE:
        top_w = top_w / (tl.sum(top_w, axis=1)[:, None] + 1e-20)
    top_w = top_w * routed_scaling
    kmask = row_ok[:, None] & (ks < K)[None, :]
    tl.store(weights_ptr + rows[:, None] * K + ks[None, :], top_w, mask=kmask)
    tl.store(ids_ptr + rows[:, None] * K + ks[None, :], top_i.to(tl.int64), mask=kmask)

    # per-program statistics, summed over programs on the host side (deterministic, no atomics)
    picked = tl.where(row_ok[:, None], picked, 0)
    tl.store(part_counts_ptr + pid * E + cols, tl.sum(picked, axis=0), mask=col_ok)
    tl.store(part_sums_ptr + pid * E + cols, tl.sum(scores, axis=0), mask=col_ok)


@triton.jit
def _route_bwd_kernel(
    scores_ptr, ids_ptr, grad_weights_ptr, grad_scores_ptr, grad_sums_ptr, grad_logits_ptr,
    T, E, routed_scaling,
    K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr,
    HAS_GRAD_WEIGHTS: tl.constexpr, HAS_GRAD_SCORES: tl.constexpr, HAS_GRAD_SUMS: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    row_ok = rows < T
    col_ok = cols < E
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * E + cols[None, :]

    s = tl.load(scores_ptr + offs, mask=mask, other=0.0)
    g = tl.zeros((BLOCK_T, E_PAD), tl.float32)
    if HAS_GRAD_SCORES:
        g += tl.load(grad_scores_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GRAD_SUMS:
        g += tl.load(grad_sums_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_GRAD_WEIGHTS:
        ks = tl.arange(0, K_PAD)
        kmask = row_ok[:, None] & (ks < K)[None, :]
        ids = tl.load(ids_ptr + rows[:, None] * K + ks[None, :], mask=kmask, other=0)
        gw = tl.load(grad_weights_ptr + rows[:, None] * K + ks[None, :], mask=kmask, other=0.0)
        gw = gw.to(tl.float32) * routed_scaling
        if RENORMALIZE:  # d/dp of p_k / sum(p)
            picked = tl.zeros((BLOCK_T, K_PAD), tl.float32)
            for k in tl.static_range(K):
                id_k = tl.sum(tl.where(ks[None, :] == k, ids, 0), axis=1)
                p = tl.sum(tl.where(cols[None, :] == id_k[:, None], s, 0.0), axis=1)
                picked = tl.where(ks[None, :] == k, p[:, None], picked)
            denom = tl.sum(picked, axis=1)[:, None] + 1e-20
            gw = (gw - tl.sum(gw * picked / denom, axis=1)[:, None]) / denom
        for k in tl.static_range(K):
            id_k = tl.sum(tl.where(ks[None, :] == k, ids, 0), axis=1)
            gw_k = tl.sum(tl.where(ks[None, :] == k, gw, 0.0), axis=1)
            g += tl.where(cols[None, :] == id_k[:, None], gw_k[:, None], 0.0)
    if SIGMOID:
        grad = g * s * (1.0 - s)
    else:
        grad = s * (g - tl.sum(g * s, axis=1)[:, None])
    tl.store(grad_logits_ptr + offs, grad.to(grad_logits_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------


def _launch_meta(num_experts: int, top_k: int, n_groups: int) -> dict:
    e_pad = pow2(num_experts, 2)
    return dict(K=top_k, K_PAD=pow2(top_k, 2), E_PAD=e_pad, G_PAD=pow2(n_groups, 2), **_configs(e_pad)[0].all_kwargs())


def route_triton(logits_TE, top_k, score_func="softmax", renormalize=True, bias_E=None, n_groups=1,
                 topk_groups=1, routed_scaling=1.0):
    """Launch the fused routing kernel; returns (weights_TK, ids_TK, scores_TE, counts_E, score_sum_E)."""
    check_route_args(logits_TE, top_k, score_func, bias_E, n_groups, topk_groups)
    check_triton(logits_TE, *([bias_E] if bias_E is not None else []))
    check_dtype("route_topk", "logits_TE", logits_TE)
    num_tokens, num_experts = logits_TE.shape
    logits_TE = logits_TE if logits_TE.stride(1) == 1 else logits_TE.contiguous()
    meta = _launch_meta(num_experts, top_k, n_groups)
    n_programs = triton.cdiv(num_tokens, meta["BLOCK_T"])
    f32 = dict(device=logits_TE.device, dtype=torch.float32)
    weights_TK = torch.empty((num_tokens, top_k), **f32)
    ids_TK = torch.empty((num_tokens, top_k), device=logits_TE.device, dtype=torch.int64)
    scores_TE = torch.empty((num_tokens, num_experts), **f32)
    part_counts = torch.empty((n_programs, num_experts), device=logits_TE.device, dtype=torch.int32)
    part_sums = torch.empty((n_programs, num_experts), **f32)
    if n_programs:
        bias = bias_E.to(torch.float32).contiguous() if bias_E is not None else scores_TE
        _route_fwd_kernel[(n_programs,)](
            logits_TE, bias, weights_TK, ids_TK, scores_TE, part_counts, part_sums,
            num_tokens, num_experts, logits_TE.stride(0), float(routed_scaling),
            max(1, num_experts // max(n_groups, 1)),
            SIGMOID=score_func == "sigmoid", RENORMALIZE=renormalize, HAS_BIAS=bias_E is not None,
            N_GROUPS=n_groups, TOPK_GROUPS=topk_groups, GROUP_TOP2=num_experts // max(n_groups, 1) >= 2, **meta)
    return weights_TK, ids_TK, scores_TE, part_counts.sum(0, dtype=torch.int64), part_sums.sum(0)


def route_backward_triton(scores_TE, ids_TK, grad_weights_TK, grad_scores_TE, grad_sums_E, score_func,
                          renormalize, routed_scaling, logits_dtype):
    check_triton(scores_TE)
    num_tokens, num_experts = scores_TE.shape
    top_k = ids_TK.shape[1]
    meta = _launch_meta(num_experts, top_k, 1)
    meta.pop("G_PAD")
    grad_logits_TE = torch.empty(scores_TE.shape, device=scores_TE.device, dtype=logits_dtype)
    n_programs = triton.cdiv(num_tokens, meta["BLOCK_T"])
    if n_programs:
        _route_bwd_kernel[(n_programs,)](
            scores_TE, ids_TK,
            *(t.contiguous() if t is not None else scores_TE for t in (grad_weights_TK, grad_scores_TE, grad_sums_E)),
            grad_logits_TE, num_tokens, num_experts, float(routed_scaling),
            SIGMOID=score_func == "sigmoid", RENORMALIZE=renormalize,
            HAS_GRAD_WEIGHTS=grad_weights_TK is not None, HAS_GRAD_SCORES=grad_scores_TE is not None,
            HAS_GRAD_SUMS=grad_sums_E is not None, **meta)
    return grad_logits_TE


def route_torch(logits_TE, top_k, score_func="softmax", renormalize=True, bias_E=None, n_groups=1,
                topk_groups=1, routed_scaling=1.0):
    """The torch path: the canonical routing (which checks the arguments) plus bincount and a column sum."""
    with torch.no_grad():
        weights_TK, ids_TK, scores_TE = route_reference(logits_TE, top_k, score_func, renormalize, bias_E,
                                                        n_groups, topk_groups, routed_scaling)
        counts_E = torch.bincount(ids_TK.reshape(-1), minlength=logits_TE.shape[1])
    return weights_TK.contiguous(), ids_TK.contiguous(), scores_TE.contiguous(), counts_E, scores_TE.sum(0)


def route_backward_torch(scores_TE, ids_TK, grad_weights_TK, grad_scores_TE, grad_sums_E, score_func,
                         renormalize, routed_scaling, logits_dtype):
    g_TE = torch.zeros_like(scores_TE) if grad_scores_TE is None else grad_scores_TE.to(scores_TE.dtype).clone()
    if grad_sums_E is not None:
        g_TE += grad_sums_E.to(scores_TE.dtype)
    if grad_weights_TK is not None:
        g_TK = grad_weights_TK.to(scores_TE.dtype) * routed_scaling
        if renormalize:
            picked_TK = scores_TE.gather(1, ids_TK)
            denom_T1 = picked_TK.sum(-1, keepdim=True) + 1e-20
            g_TK = (g_TK - (g_TK * picked_TK / denom_T1).sum(-1, keepdim=True)) / denom_T1
        g_TE.scatter_add_(1, ids_TK, g_TK)
    if score_func == "softmax":
        grad_TE = scores_TE * (g_TE - (g_TE * scores_TE).sum(-1, keepdim=True))
    else:
        grad_TE = g_TE * scores_TE * (1 - scores_TE)
    return grad_TE.to(logits_dtype)


# ---------------------------------------------------------------------------------------------
# torch.library ops
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("moesys_kernels::route_topk", mutates_args=())
def route_topk(logits_TE: Tensor, top_k: int, score_func: str = "softmax", renormalize: bool = True,
               bias_E: Optional[Tensor] = None, n_groups: int = 1, topk_groups: int = 1,
               routed_scaling: float = 1.0, impl: str = "auto") -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    run = route_triton if resolve_impl(impl, logits_TE) == "triton" else route_torch
    return run(logits_TE, top_k, score_func, renormalize, bias_E, n_groups, topk_groups, routed_scaling)


@route_topk.register_fake
def _route_topk_fake(logits_TE, top_k, score_func="softmax", renormalize=True, bias_E=None, n_groups=1,
                     topk_groups=1, routed_scaling=1.0, impl="auto"):
    num_tokens, num_experts = logits_TE.shape
    dtype = score_dtype(logits_TE.dtype)
    return (logits_TE.new_empty((num_tokens, top_k), dtype=dtype),
            logits_TE.new_empty((num_tokens, top_k), dtype=torch.int64),
            logits_TE.new_empty((num_tokens, num_experts), dtype=dtype),
            logits_TE.new_empty((num_experts,), dtype=torch.int64),
            logits_TE.new_empty((num_experts,), dtype=dtype))


def _route_topk_setup(ctx, inputs, output):
    logits_TE, top_k, score_func, renormalize, bias_E, n_groups, topk_groups, routed_scaling, impl = inputs
    _, ids_TK, scores_TE, _, _ = output
    ctx.save_for_backward(scores_TE, ids_TK)
    ctx.opts = (score_func, renormalize, routed_scaling, logits_TE.dtype)
    ctx.impl = resolve_impl(impl, logits_TE)
    ctx.set_materialize_grads(False)  # unused outputs (often scores_TE) send None, not zeros


@torch.library.custom_op("moesys_kernels::route_topk_backward", mutates_args=())
def route_topk_backward(scores_TE: Tensor, ids_TK: Tensor, grad_weights_TK: Optional[Tensor],
                        grad_scores_TE: Optional[Tensor], grad_sums_E: Optional[Tensor], score_func: str,
                        renormalize: bool, routed_scaling: float, logits_dtype: torch.dtype, impl: str) -> Tensor:
    """grad_logits_TE of ``route_topk`` (``impl`` resolved); an op, so that AOT autograd
    (torch.compile) sees one node, not a Triton launch. A None gradient: that output is unused."""
    run = route_backward_triton if impl == "triton" else route_backward_torch
    return run(scores_TE, ids_TK, grad_weights_TK, grad_scores_TE, grad_sums_E, score_func, renormalize,
               routed_scaling, logits_dtype)


@route_topk_backward.register_fake
def _route_topk_backward_fake(scores_TE, ids_TK, grad_weights_TK, grad_scores_TE, grad_sums_E, score_func,
                              renormalize, routed_scaling, logits_dtype, impl):
    return scores_TE.new_empty(scores_TE.shape, dtype=logits_dtype)


def _route_topk_backward(ctx, grad_weights_TK, grad_ids, grad_scores_TE, grad_counts, grad_sums_E):
    scores_TE, ids_TK = ctx.saved_tensors
    grad_logits_TE = route_topk_backward(scores_TE, ids_TK, grad_weights_TK, grad_scores_TE, grad_sums_E, *ctx.opts,
                                         ctx.impl)
    return grad_logits_TE, None, None, None, None, None, None, None, None


register_autograd(route_topk, _route_topk_backward, setup_context=_route_topk_setup)


@torch.library.custom_op("moesys_kernels::balance_loss", mutates_args=())
def balance_loss(counts_E: Tensor, score_sum_E: Tensor, ids_TK: Tensor, coef: float) -> Tensor:
    """coef * E * sum_e (counts_e / (T*K)) * (score_sum_e / T): the load-balancing loss from the
    statistics ``route_topk`` returns (``ids_TK`` only supplies T and K)."""
    num_tokens, top_k = ids_TK.shape
    if num_tokens == 0:
        return score_sum_E.sum() * 0
    scale = coef * counts_E.numel() / (num_tokens * top_k * num_tokens)
    return (counts_E.to(score_sum_E.dtype) * score_sum_E).sum() * scale


@balance_loss.register_fake
def _balance_loss_fake(counts_E, score_sum_E, ids_TK, coef):
    return score_sum_E.new_empty(())


def _balance_loss_setup(ctx, inputs, output):
    counts_E, score_sum_E, ids_TK, coef = inputs
    ctx.save_for_backward(counts_E)
    ctx.scale = coef * counts_E.numel() / max(ids_TK.shape[0] * ids_TK.shape[1] * ids_TK.shape[0], 1)
    ctx.dtype = score_sum_E.dtype


def _balance_loss_backward(ctx, grad_loss):
    (counts_E,) = ctx.saved_tensors
    return None, grad_loss * ctx.scale * counts_E.to(ctx.dtype), None, None


register_autograd(balance_loss, _balance_loss_backward, setup_context=_balance_loss_setup)


# torch.autocast: expert matmuls in the autocast dtype, the rest on their inputs as they come
follow_autocast("moesys_kernels::route_topk", cast=False)
follow_autocast("moesys_kernels::balance_loss", cast=False)
