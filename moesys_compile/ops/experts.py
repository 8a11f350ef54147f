"""Canonical expert ops: ``moesys.permute``, ``moesys.grouped_mlp``, ``moesys.unpermute`` and the
composite ``moesys.moe_experts`` they decompose (see the package docstring for the boundaries)."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from moesys_compile.errors import OpInputError
from moesys_compile.ops.activations import apply_activation, expert_capacity
from moesys_compile.ops.autocast import follow_autocast
from moesys_compile.ops.checks import (check_capacity_factor, check_combine_weights, check_dropout_keep,
                                       check_experts_args, check_ids, check_unpermute_args)
from moesys_compile.ops.first_order import register_autograd


# ---------------------------------------------------------------------------------------------
# permute
# ---------------------------------------------------------------------------------------------


def sort_slots_reference(ids_TK: Tensor, num_experts: int, capacity: int = -1) -> tuple[Tensor, Tensor]:
    """(counts_E, order_N): the T*K routed slots sorted by expert (stable). Slots beyond
    ``capacity`` per expert are dropped: they go last and are not counted."""
    flat_ids_N = ids_TK.reshape(-1)
    counts_E = torch.bincount(flat_ids_N, minlength=num_experts)
    order_N = torch.argsort(flat_ids_N, stable=True)
    if capacity >= 0:
        sorted_ids_N = flat_ids_N[order_N]
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        rank_in_expert_N = torch.arange(flat_ids_N.numel(), device=ids_TK.device) - starts_E[sorted_ids_N]
        # kept rows first (still expert-sorted), dropped rows after them
        key_N = sorted_ids_N + (rank_in_expert_N >= capacity).long() * num_experts
        order_N = order_N[torch.argsort(key_N, stable=True)]
        counts_E = counts_E.clamp(max=capacity)
    return counts_E, order_N


def permute_reference(x_TD: Tensor, ids_TK: Tensor, num_experts: int, capacity: int = -1):
    """Rows of ``x_TD`` in the slot order of ``sort_slots_reference`` (one row per routed slot)."""
    counts_E, order_N = sort_slots_reference(ids_TK, num_experts, capacity)
    x_ND = x_TD.index_select(0, order_N // ids_TK.shape[1])
    return x_ND, counts_E, order_N


@torch.library.custom_op("moesys::permute", mutates_args=())
def permute(x_TD: Tensor, ids_TK: Tensor, num_experts: int, capacity: int = -1) -> tuple[Tensor, Tensor, Tensor]:
    check_ids(ids_TK, num_experts, x_TD)
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


def _permute_grad(grad_x_ND: Tensor, order_N: Tensor, num_tokens: int, top_k: int) -> Tensor:
    """grad_x_TD of ``permute``: each slot's gradient row added to its token's."""
    grad_x_TD = grad_x_ND.new_zeros((num_tokens, grad_x_ND.shape[1]))
    return grad_x_TD.index_add_(0, order_N // top_k, grad_x_ND)


def _permute_backward(ctx, grad_x_ND, grad_counts, grad_order):
    (order_N,) = ctx.saved_tensors
    return _permute_grad(grad_x_ND, order_N, ctx.num_tokens, ctx.top_k), None, None, None


register_autograd(permute, _permute_backward, setup_context=_permute_setup)


# ---------------------------------------------------------------------------------------------
# grouped_mlp
# ---------------------------------------------------------------------------------------------


def group_bounds(counts_E: Tensor, num_rows: Optional[int] = None) -> list[tuple[int, int, int]]:
    """(expert, start, end) for every expert with rows; one host sync for the whole layer. With
    ``num_rows``, counts that are negative or sum past the rows there are are refused."""
    bounds, start = [], 0
    counts = counts_E.tolist()
    if num_rows is not None and (sum(counts) > num_rows or min(counts, default=0) < 0):
        raise OpInputError(f"counts_E {counts} must be >= 0 and sum to at most the {num_rows} rows of x_ND")
    for expert, count in enumerate(counts):
        if count:
            bounds.append((expert, start, start + count))
        start += count
    return bounds


def _biased_mm(rows: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """rows @ weight^T (+ bias): one expert's projection."""
    return rows @ weight.t() if bias is None else torch.addmm(bias, rows, weight.t())


def _dropped(a_nF: Tensor, keep_NF: Optional[Tensor], start: int, end: int) -> Tensor:
    """The activation rows [start, end) after the experts' dropout (``keep_NF``: 0 or 1/(1-p))."""
    return a_nF if keep_NF is None else a_nF * keep_NF[start:end]


@torch.library.custom_op("moesys::expert_dropout_keep", mutates_args=())
def expert_dropout_keep(x: Tensor, rows_per_token: int, ffn: int, p: float) -> Tensor:
    """The dropout mask of the experts' activations ([x rows * rows_per_token, ffn], x's dtype):
    0 with probability ``p``, else 1/(1-p), drawn as ``F.dropout`` draws; all ones at p = 0 (eval mode:
    ``programs/train_mode.py`` sets p to 0 there). ``moe_experts`` takes one per routed slot
    (``rows_per_token`` = K); expert parallelism draws one per received row."""
    if not 0.0 <= p < 1.0:
        raise OpInputError(f"expert_dropout_keep: p = {p} must be in [0, 1) (p = 1 drops every activation)")
    keep = torch.ones((x.shape[0] * rows_per_token, ffn), dtype=x.dtype, device=x.device)
    # F.dropout's own draw: a dropout module on [rows, ffn] activations from the same random state draws this mask
    return torch.nn.functional.dropout(keep, p, training=True) if p > 0 else keep


@expert_dropout_keep.register_fake
def _expert_dropout_keep_fake(x, rows_per_token, ffn, p):
    return x.new_empty((x.shape[0] * rows_per_token, ffn))


register_autograd(expert_dropout_keep, lambda ctx, grad: (None, None, None, None),
                  setup_context=lambda ctx, inputs, output: None)


def grouped_mlp_reference(x_ND: Tensor, counts_E: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor,
                          activation: str = "swiglu", b_up_EH: Optional[Tensor] = None,
                          b_down_ED: Optional[Tensor] = None, keep_NF: Optional[Tensor] = None) -> Tensor:
    """Differentiable per-expert loop: rows of expert e go through
    (act(x W_up[e]^T + b_up[e]) * keep) W_down[e]^T + b_down[e] (biases and ``keep_NF``, the
    dropout between the projections, optional). Rows past sum(counts_E) (dropped slots) produce zeros."""
    y_ND = x_ND.new_zeros((x_ND.shape[0], w_down_EDF.shape[1]))
    pieces = []
    for expert, start, end in group_bounds(counts_E):
        h_nH = _biased_mm(x_ND[start:end], w_up_EHD[expert], None if b_up_EH is None else b_up_EH[expert])
        a_nF = _dropped(apply_activation(h_nH, activation), keep_NF, start, end)
        b_down_D = None if b_down_ED is None else b_down_ED[expert]
        pieces.append((start, end, _biased_mm(a_nF, w_down_EDF[expert], b_down_D)))
    if not pieces:
        untouched = sum(t.sum() for t in (w_up_EHD, w_down_EDF, b_up_EH, b_down_ED) if t is not None)
        return y_ND + 0 * untouched
    rows = torch.cat([p[2] for p in pieces])
    index = torch.cat([torch.arange(s, e, device=x_ND.device) for s, e, _ in pieces])
    return y_ND.index_copy(0, index, rows.to(y_ND.dtype))


@torch.library.custom_op("moesys::grouped_mlp", mutates_args=())
def grouped_mlp(x_ND: Tensor, counts_E: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor,
                activation: str = "swiglu", b_up_EH: Optional[Tensor] = None,
                b_down_ED: Optional[Tensor] = None, keep_NF: Optional[Tensor] = None) -> Tensor:
    check_experts_args(x_ND, counts_E, w_up_EHD, w_down_EDF, activation, "x_ND")
    check_dropout_keep(keep_NF, x_ND.shape[0], w_down_EDF.shape[2])
    y_ND = x_ND.new_zeros((x_ND.shape[0], w_down_EDF.shape[1]))
    for expert, start, end in group_bounds(counts_E, x_ND.shape[0]):
        h_nH = _biased_mm(x_ND[start:end], w_up_EHD[expert], None if b_up_EH is None else b_up_EH[expert])
        a_nF = _dropped(apply_activation(h_nH, activation), keep_NF, start, end)
        if b_down_ED is None:
            torch.mm(a_nF, w_down_EDF[expert].t(), out=y_ND[start:end])
        else:
            torch.addmm(b_down_ED[expert], a_nF, w_down_EDF[expert].t(), out=y_ND[start:end])
    return y_ND


@grouped_mlp.register_fake
def _grouped_mlp_fake(x_ND, counts_E, w_up_EHD, w_down_EDF, activation="swiglu", b_up_EH=None, b_down_ED=None,
                      keep_NF=None):
    return x_ND.new_empty((x_ND.shape[0], w_down_EDF.shape[1]))


def _grouped_mlp_setup(ctx, inputs, output):
    x_ND, counts_E, w_up_EHD, w_down_EDF, activation, b_up_EH, b_down_ED, keep_NF = inputs
    ctx.save_for_backward(x_ND, counts_E, w_up_EHD, w_down_EDF, b_up_EH, b_down_ED, keep_NF)
    ctx.activation = activation


# what the dispatcher excludes below autograd (inside an op's implementation)
_AUTOGRAD_KEYS = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
                  torch._C.DispatchKey.AutogradNestedTensor)


@contextlib.contextmanager
def _autograd_back_on():
    """Autograd recording inside an op's implementation (the backward ops run their activation's
    autograd formulas there); torch.utils.checkpoint lifts an exclusion the same way."""
    with contextlib.ExitStack() as stack:
        for key in _AUTOGRAD_KEYS:
            stack.enter_context(torch._C._SetExcludeDispatchKeyGuard(key, False))
        stack.enter_context(torch.enable_grad())
        yield


def activation_backward(h_nH: Tensor, grad_a: Tensor, activation: str) -> Tensor:
    """d act(h) / dh applied to ``grad_a``, by the activation's autograd formulas; also inside an
    op's implementation (``grouped_mlp_backward``, ``moesys_kernels.experts_backward``)."""
    with _autograd_back_on():
        h = h_nH.detach().requires_grad_(True)
        (grad_h,) = torch.autograd.grad(apply_activation(h, activation), h, grad_a)
    return grad_h


def backward_op_outputs(grads, like: Tensor) -> tuple[Tensor, ...]:
    """A backward op's outputs: a custom op returns no None, so a gradient that is not computed
    goes out as an empty [0] tensor (``grads_from_op`` turns it back into None)."""
    return tuple(like.new_empty(0) if g is None else g for g in grads)


def grads_from_op(grads, computed) -> tuple[Optional[Tensor], ...]:
    """A backward op's outputs for an autograd formula: None where ``computed`` is False."""
    return tuple(g if kept else None for g, kept in zip(grads, computed))


@torch.library.custom_op("moesys::grouped_mlp_backward", mutates_args=())
def grouped_mlp_backward(grad_y_ND: Tensor, x_ND: Tensor, counts_E: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor,
                         activation: str, b_up_EH: Optional[Tensor] = None, b_down_ED: Optional[Tensor] = None,
                         keep_NF: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_w_up, grad_w_down, grad_b_up, grad_b_down) of ``grouped_mlp``; an op, so that
    AOT autograd (``torch.compile``) does not trace ``group_bounds``' host sync. A missing bias's
    gradient is an empty [0] tensor (``backward_op_outputs``)."""
    grad_x_ND = torch.zeros_like(x_ND)
    grad_w_up = torch.zeros_like(w_up_EHD)
    grad_w_down = torch.zeros_like(w_down_EDF)
    grad_b_up = None if b_up_EH is None else torch.zeros_like(b_up_EH)
    grad_b_down = None if b_down_ED is None else torch.zeros_like(b_down_ED)
    for expert, start, end in group_bounds(counts_E):
        x_nD, g_nD = x_ND[start:end], grad_y_ND[start:end]
        # h recomputed: cheaper than keeping T*K*H
        h_nH = _biased_mm(x_nD, w_up_EHD[expert], None if b_up_EH is None else b_up_EH[expert])
        a_nF = _dropped(apply_activation(h_nH, activation), keep_NF, start, end)
        grad_w_down[expert] = g_nD.t() @ a_nF
        grad_h_nH = activation_backward(h_nH, _dropped(g_nD @ w_down_EDF[expert], keep_NF, start, end), activation)
        grad_w_up[expert] = grad_h_nH.t() @ x_nD
        grad_x_ND[start:end] = grad_h_nH @ w_up_EHD[expert]
        if grad_b_up is not None:
            grad_b_up[expert] = grad_h_nH.sum(0)
        if grad_b_down is not None:
            grad_b_down[expert] = g_nD.sum(0)
    return backward_op_outputs((grad_x_ND, grad_w_up, grad_w_down, grad_b_up, grad_b_down), x_ND)


@grouped_mlp_backward.register_fake
def _grouped_mlp_backward_fake(grad_y_ND, x_ND, counts_E, w_up_EHD, w_down_EDF, activation, b_up_EH=None,
                               b_down_ED=None, keep_NF=None):
    like = (x_ND, w_up_EHD, w_down_EDF, b_up_EH, b_down_ED)
    return backward_op_outputs([None if t is None else torch.empty_like(t) for t in like], x_ND)


def _grouped_mlp_grads(grad_y_ND, x_ND, counts_E, w_up_EHD, w_down_EDF, activation, b_up_EH, b_down_ED,
                       keep_NF=None):
    """(grad_x, grad_w_up, grad_w_down, grad_b_up or None, grad_b_down or None) of ``grouped_mlp``."""
    grads = torch.ops.moesys.grouped_mlp_backward(grad_y_ND, x_ND, counts_E, w_up_EHD, w_down_EDF, activation,
                                                  b_up_EH, b_down_ED, keep_NF)
    return grads_from_op(grads, (True, True, True, b_up_EH is not None, b_down_ED is not None))


def _grouped_mlp_backward(ctx, grad_y_ND):
    x_ND, counts_E, w_up_EHD, w_down_EDF, b_up_EH, b_down_ED, keep_NF = ctx.saved_tensors
    grad_x_ND, grad_w_up, grad_w_down, grad_b_up, grad_b_down = _grouped_mlp_grads(
        grad_y_ND, x_ND, counts_E, w_up_EHD, w_down_EDF, ctx.activation, b_up_EH, b_down_ED, keep_NF)
    return grad_x_ND, None, grad_w_up, grad_w_down, None, grad_b_up, grad_b_down, None


register_autograd(grouped_mlp, _grouped_mlp_backward, setup_context=_grouped_mlp_setup)


# ---------------------------------------------------------------------------------------------
# unpermute
# ---------------------------------------------------------------------------------------------


def unpermute_reference(y_ND: Tensor, order_N: Tensor, weights_TK: Tensor) -> Tensor:
    num_tokens, top_k = weights_TK.shape
    y_slots_ND = torch.zeros_like(y_ND).index_copy(0, order_N, y_ND)    # back to t*K+k order
    y_TKD = y_slots_ND.view(num_tokens, top_k, y_ND.shape[1])  # explicit D: T may be 0
    return (y_TKD * weights_TK.to(y_ND.dtype).unsqueeze(-1)).sum(1)


@torch.library.custom_op("moesys::unpermute", mutates_args=())
def unpermute(y_ND: Tensor, order_N: Tensor, weights_TK: Tensor) -> Tensor:
    check_unpermute_args(y_ND, order_N, weights_TK)
    with torch.no_grad():
        return unpermute_reference(y_ND, order_N, weights_TK)


@unpermute.register_fake
def _unpermute_fake(y_ND, order_N, weights_TK):
    return y_ND.new_empty((weights_TK.shape[0], y_ND.shape[1]))


def _unpermute_setup(ctx, inputs, output):
    y_ND, order_N, weights_TK = inputs
    ctx.save_for_backward(y_ND, order_N, weights_TK)


def _unpermute_grads(grad_y_TD: Tensor, y_ND: Tensor, order_N: Tensor, weights_TK: Tensor):
    """(grad_y_ND, grad_weights_TK) of ``unpermute``."""
    num_tokens, top_k = weights_TK.shape
    token_N = order_N // top_k
    slot_k_N = order_N % top_k
    weight_N = weights_TK[token_N, slot_k_N].to(grad_y_TD.dtype)
    grad_rows_ND = grad_y_TD.index_select(0, token_N)
    grad_y_ND = grad_rows_ND * weight_N.unsqueeze(-1)
    grad_weight_N = (grad_rows_ND * y_ND).sum(-1)
    grad_weights_TK = torch.zeros(num_tokens * top_k, dtype=grad_weight_N.dtype, device=grad_y_TD.device)
    grad_weights_TK.index_copy_(0, order_N, grad_weight_N)
    return grad_y_ND, grad_weights_TK.view(num_tokens, top_k).to(weights_TK.dtype)


def _unpermute_backward(ctx, grad_y_TD):
    grad_y_ND, grad_weights_TK = _unpermute_grads(grad_y_TD, *ctx.saved_tensors)
    return grad_y_ND, None, grad_weights_TK


register_autograd(unpermute, _unpermute_backward, setup_context=_unpermute_setup)


# ---------------------------------------------------------------------------------------------
# moe_experts: the canonical dispatch -> experts -> combine op
# ---------------------------------------------------------------------------------------------


def _capacity(x_TD: Tensor, ids_TK: Tensor, num_experts: int, capacity_factor: float) -> int:
    """``permute``'s capacity for ``moe_experts``' capacity factor (-1: dropless)."""
    if capacity_factor > 0:
        return expert_capacity(x_TD.shape[0], ids_TK.shape[1], num_experts, capacity_factor)
    return -1


def _composed(ops, x_TD, ids_TK, weights_TK, w_up_EHD, w_down_EDF, activation, capacity_factor, b_up_EH=None,
              b_down_ED=None, keep_NF=None):
    """permute -> grouped_mlp -> unpermute with ``ops`` = (permute, grouped_mlp, unpermute)."""
    permute_op, grouped_mlp_op, unpermute_op = ops
    num_experts = w_up_EHD.shape[0]
    x_ND, counts_E, order_N = permute_op(x_TD, ids_TK, num_experts,
                                         _capacity(x_TD, ids_TK, num_experts, capacity_factor))
    y_ND = grouped_mlp_op(x_ND, counts_E, w_up_EHD, w_down_EDF, activation, b_up_EH, b_down_ED, keep_NF)
    return unpermute_op(y_ND, order_N, weights_TK)


def moe_experts_decomposed(x_TD, ids_TK, weights_TK, w_up_EHD, w_down_EDF, activation="swiglu",
                           capacity_factor=0.0, b_up_EH=None, b_down_ED=None, keep_NF=None):
    """The canonical op written with the decomposed ops (what ``decompose_moe`` emits)."""
    ops = (torch.ops.moesys.permute, torch.ops.moesys.grouped_mlp, torch.ops.moesys.unpermute)
    return _composed(ops, x_TD, ids_TK, weights_TK, w_up_EHD, w_down_EDF, activation, capacity_factor, b_up_EH,
                     b_down_ED, keep_NF)


@torch.library.custom_op("moesys::moe_experts", mutates_args=())
def moe_experts(x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor,
                activation: str = "swiglu", capacity_factor: float = 0.0, b_up_EH: Optional[Tensor] = None,
                b_down_ED: Optional[Tensor] = None, keep_NF: Optional[Tensor] = None) -> Tensor:
    """``keep_NF``: dropout between the experts' projections, one row per routed slot in
    expert-sorted order (``expert_dropout_keep(x_TD, K, F, p)``; the rows are exchangeable)."""
    check_experts_args(x_TD, None, w_up_EHD, w_down_EDF, activation, "x_TD")
    check_ids(ids_TK, w_up_EHD.shape[0], x_TD, id_range=False)   # permute checks the range
    check_combine_weights(weights_TK, ids_TK)
    check_capacity_factor(capacity_factor)
    check_dropout_keep(keep_NF, ids_TK.numel(), w_down_EDF.shape[2])
    with torch.no_grad():
        return moe_experts_decomposed(x_TD, ids_TK, weights_TK, w_up_EHD, w_down_EDF, activation,
                                      capacity_factor, b_up_EH, b_down_ED, keep_NF)


@moe_experts.register_fake
def _moe_experts_fake(x_TD, ids_TK, weights_TK, w_up_EHD, w_down_EDF, activation="swiglu",
                      capacity_factor=0.0, b_up_EH=None, b_down_ED=None, keep_NF=None):
    return x_TD.new_empty((x_TD.shape[0], w_down_EDF.shape[1]))


def _moe_experts_setup(ctx, inputs, output):
    x_TD, ids_TK, weights_TK, w_up_EHD, w_down_EDF, activation, capacity_factor, b_up_EH, b_down_ED, keep_NF = inputs
    ctx.save_for_backward(x_TD, ids_TK, weights_TK, w_up_EHD, w_down_EDF, b_up_EH, b_down_ED, keep_NF)
    ctx.opts = (activation, capacity_factor)


def _moe_experts_backward(ctx, grad_y_TD):
    """The decomposed ops' backward formulas chained by hand, after re-running their forward for
    x_ND and y_ND. No nested autograd: AOT autograd (``torch.compile`` of a model) traces this. Only
    eager use of the fused op pays for the re-run; compiled programs run the decomposed graph."""
    x_TD, ids_TK, weights_TK, w_up_EHD, w_down_EDF, b_up_EH, b_down_ED, keep_NF = ctx.saved_tensors
    activation, capacity_factor = ctx.opts
    num_experts = w_up_EHD.shape[0]
    x_ND, counts_E, order_N = torch.ops.moesys.permute(x_TD, ids_TK, num_experts,
                                                       _capacity(x_TD, ids_TK, num_experts, capacity_factor))
    y_ND = torch.ops.moesys.grouped_mlp(x_ND, counts_E, w_up_EHD, w_down_EDF, activation, b_up_EH, b_down_ED,
                                        keep_NF)
    grad_y_ND, grad_w = _unpermute_grads(grad_y_TD, y_ND, order_N, weights_TK)
    grad_x_ND, grad_up, grad_down, grad_b_up, grad_b_down = _grouped_mlp_grads(
        grad_y_ND, x_ND, counts_E, w_up_EHD, w_down_EDF, activation, b_up_EH, b_down_ED, keep_NF)
    grad_x = _permute_grad(grad_x_ND, order_N, x_TD.shape[0], ids_TK.shape[1])
    return grad_x, None, grad_w, grad_up, grad_down, None, None, grad_b_up, grad_b_down, None


register_autograd(moe_experts, _moe_experts_backward, setup_context=_moe_experts_setup)


def moe_experts_reference(x_TD, ids_TK, weights_TK, w_up_EHD, w_down_EDF, activation="swiglu",
                          capacity_factor=0.0, b_up_EH=None, b_down_ED=None, keep_NF=None):
    """Naive differentiable torch version of the whole canonical op, for tests."""
    ops = (permute_reference, grouped_mlp_reference, unpermute_reference)
    return _composed(ops, x_TD, ids_TK, weights_TK, w_up_EHD, w_down_EDF, activation, capacity_factor, b_up_EH,
                     b_down_ED, keep_NF)


# torch.autocast: expert matmuls in the autocast dtype, the rest on their inputs as they come
follow_autocast("moesys::permute", cast=False)
follow_autocast("moesys::grouped_mlp", cast=True)
follow_autocast("moesys::unpermute", cast=False)
follow_autocast("moesys::moe_experts", cast=True)
