"""Dispatch and combine: routed slots into expert-sorted order and back.

Shape legend: T tokens · D model dim · E experts · K top-k · N = T*K routed slots.

    sort_slots(ids_TK, E, capacity, capacity_factor) -> counts_E, order_N
    permute(x_TD, ids_TK, E, capacity)               -> x_ND, counts_E, order_N
    unpermute(y_ND, order_N, weights_TK)             -> y_TD   (top-k weighted sum fused in)

Same semantics as ``torch.ops.moesys.permute`` / ``unpermute``: ``order_N[n]`` is the slot
``t*K + k`` of the n-th expert-sorted row, the sort is stable, and slots past ``capacity`` per
expert go after every kept row (ordered by expert) and are not counted. An id outside ``[0, E)``
raises an OpInputError (a ValueError) naming the slot on CPU and fails an asynchronous assert on CUDA.

The Triton sort is a counting sort, no comparison sort: one pass counts each block's slots per
expert, a cumulative sum over blocks gives every block its start inside each expert, and a second
pass places each slot at ``start[expert] + rank`` (its rank among equal ids in the block comes
from a BLOCK x BLOCK comparison) and, for ``permute``, copies its row of ``x_TD`` there.
"""

from typing import Optional

import torch
from torch import Tensor

from moesys_compile.kernels._triton import check_dtype, check_triton, pow2, resolve_impl, tl, triton
from moesys_compile.ops import expert_capacity, sort_slots_reference
from moesys_compile.ops.checks import check_capacity_factor, check_ids, check_unpermute_args
from moesys_compile.ops.autocast import follow_autocast
from moesys_compile.ops.first_order import register_autograd

# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


def _configs() -> list:
    """Slots per program for the sort (the rank comparison is BLOCK_N^2) and the row tile of the
    copies. Memory-bound; a fixed config (the per-block counts buffer depends on BLOCK_N)."""
    return [triton.Config({"BLOCK_N": 64, "BLOCK_D": 128}, num_warps=4)]


@triton.jit
def _count_slots_kernel(ids_ptr, part_ptr, N, E, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    ids = tl.load(ids_ptr + offs, mask=offs < N, other=0)
    ok = (offs < N) & (ids >= 0) & (ids < E)
    tl.atomic_add(part_ptr + pid * E + ids, tl.full((BLOCK_N,), 1, tl.int32), mask=ok)


@triton.jit
def _place_slots_kernel(ids_ptr, block_start_ptr, kept_start_ptr, drop_start_ptr, order_ptr,
                        x_ptr, x_sorted_ptr, N, E, D, capacity, top_k, stride_x, stride_xs,
                        GATHER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK_N)
    slots = pid * BLOCK_N + lanes
    ids = tl.load(ids_ptr + slots, mask=slots < N, other=-1)
    ok = (slots < N) & (ids >= 0) & (ids < E)  # an id outside [0, E) is neither counted nor placed
    earlier_same = (ids[:, None] == ids[None, :]) & (lanes[None, :] < lanes[:, None])
    rank = tl.sum(earlier_same.to(tl.int32), axis=1)
    id_safe = tl.where(ok, ids, 0)
    rank += tl.load(block_start_ptr + pid * E + id_safe, mask=ok, other=0).to(tl.int32)
    kept = (capacity < 0) | (rank < capacity)
    pos = tl.where(kept, tl.load(kept_start_ptr + id_safe, mask=ok, other=0) + rank,
                   tl.load(drop_start_ptr + id_safe, mask=ok, other=0) + rank - capacity)
    tl.store(order_ptr + pos, slots.to(tl.int64), mask=ok)
    if GATHER:
        tokens = slots // top_k
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            m = ok[:, None] & (cols < D)[None, :]
            row = tl.load(x_ptr + tokens[:, None] * stride_x + cols[None, :], mask=m)
            tl.store(x_sorted_ptr + pos[:, None] * stride_xs + cols[None, :], row, mask=m)


@triton.jit
def _gather_sum_kernel(src_ptr, inv_ptr, w_ptr, out_ptr, T, D, stride_src, stride_out,
                       K: tl.constexpr, HAS_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = sum_k w[t, k] * src[inv[t*K + k]]: the combine, and the backward of the dispatch."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = tokens < T
    m = t_ok[:, None] & (cols < D)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    for k in tl.static_range(K):
        rows = tl.load(inv_ptr + tokens * K + k, mask=t_ok, other=0)
        vals = tl.load(src_ptr + rows[:, None] * stride_src + cols[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_W:
            vals *= tl.load(w_ptr + tokens * K + k, mask=t_ok, other=0.0).to(tl.float32)[:, None]
        acc += vals
    tl.store(out_ptr + tokens[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _unpermute_bwd_kernel(grad_y_ptr, y_ptr, order_ptr, w_ptr, grad_ys_ptr, grad_w_ptr, N, D, top_k,
                          stride_gy, stride_y, stride_gys, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_ys[n] = w[slot] * grad_y[token]; grad_w[slot] = <grad_y[token], y[n]>, slot = order[n]."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rows < N
    slots = tl.load(order_ptr + rows, mask=ok, other=0)
    tokens = slots // top_k
    w = tl.load(w_ptr + slots, mask=ok, other=0.0).to(tl.float32)
    dot = tl.zeros((BLOCK_N,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = ok[:, None] & (cols < D)[None, :]
        g = tl.load(grad_y_ptr + tokens[:, None] * stride_gy + cols[None, :], mask=m, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rows[:, None] * stride_y + cols[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(grad_ys_ptr + rows[:, None] * stride_gys + cols[None, :],
                 (g * w[:, None]).to(grad_ys_ptr.dtype.element_ty), mask=m)
        dot += tl.sum(g * y, axis=1)
    tl.store(grad_w_ptr + slots, dot, mask=ok)


# ---------------------------------------------------------------------------------------------
# host side: Triton launches and torch paths
# ---------------------------------------------------------------------------------------------


def _capacity(ids_TK: Tensor, num_experts: int, capacity: int, capacity_factor: float) -> int:
    check_capacity_factor(capacity_factor)
    if capacity >= 0 and capacity_factor > 0:
        raise ValueError(f"give capacity ({capacity}) or capacity_factor ({capacity_factor}), not both")
    if capacity_factor > 0:
        return expert_capacity(ids_TK.shape[0], ids_TK.shape[1], num_experts, capacity_factor)
    return capacity


def sort_slots_triton(ids_TK: Tensor, num_experts: int, capacity: int = -1, x_TD: Optional[Tensor] = None):
    """Counting sort of the slots by expert; with ``x_TD`` also gathers the sorted rows.
    Returns (counts_E, order_N) or (x_ND, counts_E, order_N)."""
    check_ids(ids_TK, num_experts, x_TD)
    check_triton(ids_TK, *([x_TD] if x_TD is not None else []))
    meta = _configs()[0].all_kwargs()
    num_tokens, top_k = ids_TK.shape
    num_slots = num_tokens * top_k
    ids_N = ids_TK.reshape(-1).contiguous()
    n_blocks = triton.cdiv(num_slots, meta["BLOCK_N"])
    part_BE = torch.zeros((n_blocks, num_experts), device=ids_TK.device, dtype=torch.int32)
    order_N = torch.empty(num_slots, device=ids_TK.device, dtype=torch.int64)
    x_ND = None
    if x_TD is not None:
        check_dtype("permute", "x_TD", x_TD)   # the copy would run, but its backward (gather_sum) would not
        x_TD = x_TD if x_TD.stride(1) == 1 else x_TD.contiguous()
        x_ND = torch.empty((num_slots, x_TD.shape[1]), device=x_TD.device, dtype=x_TD.dtype)
    if n_blocks:
        _count_slots_kernel[(n_blocks,)](ids_N, part_BE, num_slots, num_experts, BLOCK_N=meta["BLOCK_N"])
    counts_E = part_BE.sum(0, dtype=torch.int64)
    block_start_BE = part_BE.cumsum(0) - part_BE
    kept_E = counts_E.clamp(max=capacity) if capacity >= 0 else counts_E
    kept_start_E = kept_E.cumsum(0) - kept_E
    dropped_E = counts_E - kept_E
    drop_start_E = kept_E.sum() + dropped_E.cumsum(0) - dropped_E
    if n_blocks:
        _place_slots_kernel[(n_blocks,)](
            ids_N, block_start_BE, kept_start_E, drop_start_E, order_N,
            x_TD if x_TD is not None else ids_N, x_ND if x_ND is not None else ids_N,
            num_slots, num_experts, x_TD.shape[1] if x_TD is not None else 0, capacity, top_k,
            x_TD.stride(0) if x_TD is not None else 0, x_ND.stride(0) if x_ND is not None else 0,
            GATHER=x_TD is not None, **meta)
    return (counts_E if capacity < 0 else kept_E, order_N) if x_TD is None else (x_ND, kept_E, order_N)


def sort_slots_torch(ids_TK: Tensor, num_experts: int, capacity: int = -1):
    """Stable argsort by expert; dropped slots (rank >= capacity) moved behind the kept ones."""
    check_ids(ids_TK, num_experts)
    return sort_slots_reference(ids_TK, num_experts, capacity)


def inverse_order(order_N: Tensor) -> Tensor:
    """inv_N[order_N[n]] = n: where each slot's row sits in the sorted order."""
    inv_N = torch.empty_like(order_N)
    inv_N[order_N] = torch.arange(order_N.numel(), device=order_N.device, dtype=order_N.dtype)
    return inv_N


def gather_sum_triton(src_ND: Tensor, order_N: Tensor, num_tokens: int, top_k: int,
                      weights_TK: Optional[Tensor] = None) -> Tensor:
    """y_TD[t] = sum_k weights[t, k] * src_ND[row of slot t*K+k]."""
    check_triton(src_ND, order_N)
    check_dtype("gather_sum (unpermute, permute backward)", "src_ND", src_ND)
    src_ND = src_ND if src_ND.stride(1) == 1 else src_ND.contiguous()
    out_TD = torch.empty((num_tokens, src_ND.shape[1]), device=src_ND.device, dtype=src_ND.dtype)
    block_d = min(128, pow2(src_ND.shape[1], 16))
    block_t = 32
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(src_ND.shape[1], block_d))
    if num_tokens and src_ND.shape[1]:
        _gather_sum_kernel[grid](
            src_ND, inverse_order(order_N), weights_TK.contiguous() if weights_TK is not None else src_ND, out_TD,
            num_tokens, src_ND.shape[1], src_ND.stride(0), out_TD.stride(0),
            K=top_k, HAS_W=weights_TK is not None, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)
    return out_TD


def unpermute_backward_triton(grad_y_TD: Tensor, y_ND: Tensor, order_N: Tensor, weights_TK: Tensor):
    check_triton(grad_y_TD, y_ND, order_N, weights_TK)
    grad_y_TD = grad_y_TD.contiguous()
    y_ND = y_ND if y_ND.stride(1) == 1 else y_ND.contiguous()
    num_slots, dim = y_ND.shape
    grad_y_ND = torch.empty_like(y_ND)
    grad_w_N = torch.zeros(num_slots, device=y_ND.device, dtype=torch.float32)
    meta = _configs()[0].all_kwargs()
    if num_slots:
        _unpermute_bwd_kernel[(triton.cdiv(num_slots, meta["BLOCK_N"]),)](
            grad_y_TD, y_ND, order_N, weights_TK.contiguous(), grad_y_ND, grad_w_N, num_slots, dim,
            weights_TK.shape[1], grad_y_TD.stride(0), y_ND.stride(0), grad_y_ND.stride(0), **meta)
    return grad_y_ND, grad_w_N.view(weights_TK.shape).to(weights_TK.dtype)


def unpermute_torch(y_ND: Tensor, order_N: Tensor, weights_TK: Tensor) -> Tensor:
    num_tokens, top_k = weights_TK.shape
    weight_N = weights_TK.reshape(-1)[order_N].to(y_ND.dtype)
    y_TD = y_ND.new_zeros((num_tokens, y_ND.shape[1]))
    return y_TD.index_add_(0, order_N // top_k, y_ND * weight_N[:, None])


def unpermute_backward_torch(grad_y_TD: Tensor, y_ND: Tensor, order_N: Tensor, weights_TK: Tensor):
    top_k = weights_TK.shape[1]
    grad_rows_ND = grad_y_TD.index_select(0, order_N // top_k)
    weight_N = weights_TK.reshape(-1)[order_N].to(grad_y_TD.dtype)
    grad_w_N = torch.empty(order_N.numel(), dtype=weights_TK.dtype, device=order_N.device)
    grad_w_N[order_N] = (grad_rows_ND * y_ND).sum(-1).to(weights_TK.dtype)
    return grad_rows_ND.mul_(weight_N[:, None]), grad_w_N.view(weights_TK.shape)


# ---------------------------------------------------------------------------------------------
# torch.library ops. The backward of each op is an op too (``impl`` resolved): AOT autograd
# (torch.compile) traces an autograd formula, and must not meet a Triton launch in it.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("moesys_kernels::permute_backward", mutates_args=())
def permute_backward(grad_x_ND: Tensor, order_N: Tensor, num_tokens: int, top_k: int, impl: str) -> Tensor:
    """grad_x_TD[t] = sum over k of the gradient row of slot t*K + k."""
    if impl == "triton":
        return gather_sum_triton(grad_x_ND, order_N, num_tokens, top_k)
    grad_x_TD = grad_x_ND.new_zeros((num_tokens, grad_x_ND.shape[1]))
    return grad_x_TD.index_add_(0, order_N // top_k, grad_x_ND)


@permute_backward.register_fake
def _permute_backward_fake(grad_x_ND, order_N, num_tokens, top_k, impl):
    return grad_x_ND.new_empty((num_tokens, grad_x_ND.shape[1]))


@torch.library.custom_op("moesys_kernels::unpermute_backward", mutates_args=())
def unpermute_backward(grad_y_TD: Tensor, y_ND: Tensor, order_N: Tensor, weights_TK: Tensor,
                       impl: str) -> tuple[Tensor, Tensor]:
    """(grad_y_ND, grad_weights_TK) of ``unpermute``."""
    run = unpermute_backward_triton if impl == "triton" else unpermute_backward_torch
    return run(grad_y_TD, y_ND, order_N, weights_TK)


@unpermute_backward.register_fake
def _unpermute_backward_fake(grad_y_TD, y_ND, order_N, weights_TK, impl):
    rows_dtype = y_ND.dtype if impl == "triton" else grad_y_TD.dtype   # what each path writes the rows in
    return y_ND.new_empty(y_ND.shape, dtype=rows_dtype), weights_TK.new_empty(weights_TK.shape)


@torch.library.custom_op("moesys_kernels::sort_slots", mutates_args=())
def sort_slots(ids_TK: Tensor, num_experts: int, capacity: int = -1, capacity_factor: float = 0.0,
               impl: str = "auto") -> tuple[Tensor, Tensor]:
    """Expert-sorted slot order without moving rows (for kernels that gather on load).
    ``capacity_factor > 0`` sets the capacity from the token count at run time."""
    capacity = _capacity(ids_TK, num_experts, capacity, capacity_factor)
    if resolve_impl(impl, ids_TK, torch.float32) == "triton":
        return sort_slots_triton(ids_TK, num_experts, capacity)
    return sort_slots_torch(ids_TK, num_experts, capacity)


@sort_slots.register_fake
def _sort_slots_fake(ids_TK, num_experts, capacity=-1, capacity_factor=0.0, impl="auto"):
    return (ids_TK.new_empty((num_experts,), dtype=torch.int64),
            ids_TK.new_empty((ids_TK.shape[0] * ids_TK.shape[1],), dtype=torch.int64))


@torch.library.custom_op("moesys_kernels::permute", mutates_args=())
def permute(x_TD: Tensor, ids_TK: Tensor, num_experts: int, capacity: int = -1,
            impl: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    if resolve_impl(impl, x_TD) == "triton":
        return sort_slots_triton(ids_TK, num_experts, capacity, x_TD)
    check_ids(ids_TK, num_experts, x_TD)
    counts_E, order_N = sort_slots_torch(ids_TK, num_experts, capacity)
    return x_TD.index_select(0, order_N // ids_TK.shape[1]), counts_E, order_N


@permute.register_fake
def _permute_fake(x_TD, ids_TK, num_experts, capacity=-1, impl="auto"):
    num_slots = ids_TK.shape[0] * ids_TK.shape[1]
    return (x_TD.new_empty((num_slots, x_TD.shape[1])), ids_TK.new_empty((num_experts,), dtype=torch.int64),
            ids_TK.new_empty((num_slots,), dtype=torch.int64))


def _permute_setup(ctx, inputs, output):
    x_TD, ids_TK, _, _, impl = inputs
    ctx.save_for_backward(output[2])
    ctx.num_tokens, ctx.top_k, ctx.impl = x_TD.shape[0], ids_TK.shape[1], resolve_impl(impl, x_TD)


def _permute_backward(ctx, grad_x_ND, grad_counts, grad_order):
    (order_N,) = ctx.saved_tensors
    return permute_backward(grad_x_ND, order_N, ctx.num_tokens, ctx.top_k, ctx.impl), None, None, None, None


register_autograd(permute, _permute_backward, setup_context=_permute_setup)


@torch.library.custom_op("moesys_kernels::unpermute", mutates_args=())
def unpermute(y_ND: Tensor, order_N: Tensor, weights_TK: Tensor, impl: str = "auto") -> Tensor:
    check_unpermute_args(y_ND, order_N, weights_TK)
    if resolve_impl(impl, y_ND) == "triton":
        return gather_sum_triton(y_ND, order_N, weights_TK.shape[0], weights_TK.shape[1], weights_TK)
    return unpermute_torch(y_ND, order_N, weights_TK)


@unpermute.register_fake
def _unpermute_fake(y_ND, order_N, weights_TK, impl="auto"):
    return y_ND.new_empty((weights_TK.shape[0], y_ND.shape[1]))


def _unpermute_setup(ctx, inputs, output):
    y_ND, order_N, weights_TK, impl = inputs
    ctx.save_for_backward(y_ND, order_N, weights_TK)
    ctx.impl = resolve_impl(impl, y_ND)


def _unpermute_backward(ctx, grad_y_TD):
    y_ND, order_N, weights_TK = ctx.saved_tensors
    grad_y_ND, grad_weights_TK = unpermute_backward(grad_y_TD, y_ND, order_N, weights_TK, ctx.impl)
    return grad_y_ND, None, grad_weights_TK, None


register_autograd(unpermute, _unpermute_backward, setup_context=_unpermute_setup)


# torch.autocast: expert matmuls in the autocast dtype, the rest on their inputs as they come
follow_autocast("moesys_kernels::sort_slots", cast=False)
follow_autocast("moesys_kernels::permute", cast=False)
follow_autocast("moesys_kernels::unpermute", cast=False)
