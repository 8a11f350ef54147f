"""Triton grouped expert MLP: the backward kernels (the forward ones, the tile scheduling and the
launcher are in ``grouped_mlp.py``).

Shape legend: T tokens · D model dim · F expert hidden · H up rows (2F gated, F otherwise) ·
E experts · K top-k · N rows (expert-sorted slots).

    _grouped_gemm_kernel  dA_NF = grad_y_rows @ W_down[e] (fp32), and grad_x = grad_h @ W_up[e]
                          with rows scattered back to their slots
    _act_bwd_kernel       grad_h_NH = act'(h) * (w * dA), the top-k weights' gradient <dA, a>
                          (one partial per column tile), and w * a (the operand of grad W_down)
    _weight_grad_kernel   dW[e] = P[rows of e]^T @ Q[rows of e], one program per (tile, expert)
"""

import torch
from torch import Tensor

from moesys_compile.kernels._triton import INTERPRET, check_triton, pow2, tl, triton
from moesys_compile.kernels.grouped_mlp import (_MIN_BLOCK_N, _act, _autotune, _common, _expert_tile,
                                                _grouped_gemm_kernel, _grouped_tile, _launch, _row_grid,
                                                rows_bucket)


@triton.jit
def _act_grad(x, KIND: tl.constexpr):
    if KIND == 0:
        s = tl.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    elif KIND == 1:
        return 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif KIND == 3:   # tanh GELU x sigmoid(2u) (see _act): s + x s (1 - s) 2u'
        s = tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
        return s + x * s * (1.0 - s) * 1.5957691216057308 * (1.0 + 0.134145 * x * x)
    else:
        return tl.where(x > 0.0, 1.0, 0.0)


@triton.jit
def _act_bwd_kernel(
    dA_ptr, slots_ptr, scale_ptr, h_ptr, counts_ptr, starts_ptr, grad_h_ptr, part_ptr, wa_ptr,
    E, F, rows_key, stride_da, stride_h, stride_gh, stride_part, stride_wa,
    KIND: tl.constexpr, GATED: tl.constexpr, SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """From dA_NF = grad_y_rows @ W_down[e] (fp32, before the top-k weight) and the saved h: grad_h,
    the top-k weights' gradient partial of this column tile, and w * a. Elementwise over
    [BLOCK_M, BLOCK_N] tiles of the kept rows (rows past them, dropped slots, are left alone).

    A separate kernel rather than the epilogue of the dA GEMM: there the gate, up and activation
    tiles beside the fp32 accumulator cost the GEMM its large tiles. On an H200 at the Mixtral
    shape (T=32768) the fused kernel took 27 ms; the plain GEMM takes about 15 ms and this pass
    about 6."""
    kept = tl.load(starts_ptr + E - 1) + tl.load(counts_ptr + E - 1)
    tile_n = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < kept
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < F
    slots = rows
    if SCALE:
        slots = tl.load(slots_ptr + rows, mask=row_ok, other=0)
    acc = tl.load(dA_ptr + rows[:, None] * stride_da + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                  other=0.0)
    m = row_ok[:, None] & col_ok[None, :]
    gate = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :], mask=m, other=0.0).to(tl.float32)
    act_gate = _act(gate, KIND)
    if GATED:
        up = tl.load(h_ptr + rows[:, None] * stride_h + (cols + F)[None, :], mask=m, other=0.0).to(tl.float32)
        a = act_gate * up
    else:
        a = act_gate
    if SCALE:  # d loss / d weight of the slot: <grad_y @ W_down[e], a>, one partial per column tile
        tl.store(part_ptr + rows * stride_part + tile_n, tl.sum(tl.where(m, acc * a, 0.0), axis=1),
                 mask=row_ok)
        weight = tl.load(scale_ptr + slots, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        acc = acc * weight
        a = a * weight
    dtype = grad_h_ptr.dtype.element_ty
    # w * a once here, so that grad W_down = grad_y^T (w * a) is a plain grouped GEMM that neither
    # recomputes the activation nor rescales grad_y for each of its output tiles
    tl.store(wa_ptr + rows[:, None] * stride_wa + cols[None, :], a.to(dtype), mask=m)
    if GATED:
        tl.store(grad_h_ptr + rows[:, None] * stride_gh + cols[None, :], (acc * up * _act_grad(gate, KIND)).to(dtype),
                 mask=m)
        tl.store(grad_h_ptr + rows[:, None] * stride_gh + (cols + F)[None, :], (acc * act_gate).to(dtype), mask=m)
    else:
        tl.store(grad_h_ptr + rows[:, None] * stride_gh + cols[None, :], (acc * _act_grad(gate, KIND)).to(dtype),
                 mask=m)


@triton.jit
def _weight_grad_kernel(
    p_ptr, q_ptr, out_ptr, counts_ptr, starts_ptr,
    E, I, J, rows_key, stride_p, stride_q, stride_oe, stride_oi, stride_oj,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[e] = sum over rows n of expert e of P[n, :I]^T Q[n, :J]. Both operands are read as rows in
    expert order: a gather inside this reduction loop (a dependent load every step) halved the
    kernel's throughput on an H200, so the host wrapper gathers once beforehand."""
    expert = tl.program_id(1).to(tl.int64)     # int64 offsets: see _expert_tile
    start = tl.load(starts_ptr + expert)
    end = start + tl.load(counts_ptr + expert)
    tile_i, tile_j = _grouped_tile(tl.program_id(0), tl.cdiv(I, BLOCK_M), tl.cdiv(J, BLOCK_N), GROUP_M)
    offs_i = tile_i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tile_j * BLOCK_N + tl.arange(0, BLOCK_N)
    i_ok = offs_i < I
    j_ok = offs_j < J
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        r_ok = rows < end
        p = tl.load(p_ptr + rows[None, :] * stride_p + offs_i[:, None], mask=i_ok[:, None] & r_ok[None, :], other=0.0)
        q = tl.load(q_ptr + rows[:, None] * stride_q + offs_j[None, :], mask=r_ok[:, None] & j_ok[None, :], other=0.0)
        if UPCAST:
            p = p.to(tl.float32)
            q = q.to(tl.float32)
        acc = tl.dot(p, q, acc, input_precision=PRECISION)
    tl.store(out_ptr + expert * stride_oe + offs_i[:, None] * stride_oi + offs_j[None, :] * stride_oj,
             acc.to(out_ptr.dtype.element_ty), mask=i_ok[:, None] & j_ok[None, :])


def _elementwise_configs() -> list:
    """Tiles of ``_act_bwd_kernel`` (memory-bound: wide rows, no reduction loop). BLOCK_N stays at
    or above ``_MIN_BLOCK_N``, which sizes the partial sums."""
    shapes = [(64, 128, 4), (32, 256, 4), (64, 256, 8), (128, 128, 8), (16, 512, 4), (32, 128, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w) for m, n, w in shapes]


def _elementwise_untuned():
    return triton.Config({"BLOCK_M": 32, "BLOCK_N": 32} if INTERPRET else {"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4)


_autotune(_weight_grad_kernel, ["I", "J", "rows_key"])
# reset: each config writes the partials of its own column tiles, and they are summed afterwards
_autotune(_act_bwd_kernel, ["F", "rows_key"], reset_to_zero=["part_ptr"], configs=_elementwise_configs)


def experts_backward_triton(grad_out: Tensor, x: Tensor, counts_E: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor,
                            h_NH: Tensor, activation: str, slots_N=None, weights_TK=None):
    """Gradients of ``experts_forward_triton``: (grad_x, grad_w_up, grad_w_down, grad_weights_TK or None)."""
    fused = slots_N is not None
    check_triton(grad_out, x, h_NH)
    grad_out = grad_out.contiguous()
    x = x if x.stride(1) == 1 else x.contiguous()
    num_experts, rows_h, dim = w_up_EHD.shape
    ffn = w_down_EDF.shape[2]
    num_rows = h_NH.shape[0]
    top_k = weights_TK.shape[1] if fused else 1
    common = _common(x, activation)
    e_pad = pow2(num_experts, 2)
    starts_E = counts_E.cumsum(0) - counts_E
    bucket = rows_bucket(num_rows)
    scale = weights_TK.reshape(-1).contiguous() if fused else counts_E
    slots = slots_N if fused else counts_E
    grad_h_NH = torch.empty_like(h_NH)
    weighted_a_NF = torch.empty((num_rows, ffn), device=x.device, dtype=x.dtype)
    part_NC = torch.zeros((num_rows if fused else 0, triton.cdiv(ffn, _MIN_BLOCK_N)), device=x.device,
                          dtype=torch.float32)
    grad_w_down = torch.empty_like(w_down_EDF)
    grad_w_up = torch.empty_like(w_up_EHD)
    grad_rows = torch.zeros((num_rows, dim), device=x.device, dtype=x.dtype)
    # fused, grad_y and x rows are copied into expert order once: the GEMMs below then read plain
    # rows (a gather inside a reduction loop is a dependent load at every step; see _weight_grad_kernel)
    sources = slots_N // top_k if fused else None
    grad_y_rows = grad_out.index_select(0, sources) if fused else grad_out
    x_rows = x.index_select(0, sources) if fused else x
    if num_rows:
        dA_NF = torch.empty((num_rows, ffn), device=x.device, dtype=torch.float32)
        _launch(_grouped_gemm_kernel, _row_grid(num_rows, num_experts, ffn), x,
                grad_y_rows, w_down_EDF, dA_NF, counts_E, starts_E, slots, scale,
                num_experts, dim, ffn, num_rows, bucket, grad_y_rows.stride(0), *w_down_EDF.stride(), dA_NF.stride(0),
                SCATTER=False, SCALE=False, PRECISION=common["PRECISION"], UPCAST=common["UPCAST"], E_PAD=e_pad)
        _launch(_act_bwd_kernel, lambda meta: (triton.cdiv(num_rows, meta["BLOCK_M"]), triton.cdiv(ffn, meta["BLOCK_N"])),
                x, dA_NF, slots, scale, h_NH, counts_E, starts_E, grad_h_NH, part_NC, weighted_a_NF,
                num_experts, ffn, bucket, dA_NF.stride(0), h_NH.stride(0), grad_h_NH.stride(0),
                part_NC.stride(0) if fused else 0, weighted_a_NF.stride(0),
                untuned=_elementwise_untuned(), KIND=common["KIND"], GATED=common["GATED"], SCALE=fused)
        _launch(_grouped_gemm_kernel, _row_grid(num_rows, num_experts, dim), x,
                grad_h_NH, w_up_EHD, grad_rows, counts_E, starts_E, slots, scale,
                num_experts, rows_h, dim, num_rows, bucket, grad_h_NH.stride(0), w_up_EHD.stride(0), w_up_EHD.stride(1),
                w_up_EHD.stride(2), grad_rows.stride(0),
                SCATTER=fused, SCALE=False, PRECISION=common["PRECISION"], UPCAST=common["UPCAST"], E_PAD=e_pad)
    # weight gradients: one program per (output tile, expert), tiles in ``_grouped_tile`` order;
    # experts without rows write zeros
    wgrad = dict(PRECISION=common["PRECISION"], UPCAST=common["UPCAST"])
    _launch(_weight_grad_kernel,
            lambda meta: (triton.cdiv(dim, meta["BLOCK_M"]) * triton.cdiv(ffn, meta["BLOCK_N"]), num_experts), x,
            grad_y_rows, weighted_a_NF, grad_w_down, counts_E, starts_E,
            num_experts, dim, ffn, bucket, grad_y_rows.stride(0), weighted_a_NF.stride(0), *grad_w_down.stride(),
            **wgrad)
    _launch(_weight_grad_kernel,
            lambda meta: (triton.cdiv(rows_h, meta["BLOCK_M"]) * triton.cdiv(dim, meta["BLOCK_N"]), num_experts), x,
            grad_h_NH, x_rows, grad_w_up, counts_E, starts_E,
            num_experts, rows_h, dim, bucket, grad_h_NH.stride(0), x_rows.stride(0), *grad_w_up.stride(),
            **wgrad)
    if not fused:
        return grad_rows, grad_w_up, grad_w_down, None
    num_tokens = weights_TK.shape[0]
    grad_x = grad_rows.view(num_tokens, top_k, dim).sum(1) if top_k > 1 else grad_rows
    grad_w_N = torch.empty(num_rows, device=x.device, dtype=torch.float32)
    grad_w_N[slots_N] = part_NC.sum(1)     # rows past the kept ones (dropped slots) have 0 partials
    return grad_x, grad_w_up, grad_w_down, grad_w_N.view(weights_TK.shape).to(weights_TK.dtype)
