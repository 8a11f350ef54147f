"""Triton grouped expert MLP: the backward kernels (the forward ones, the tile scheduling and the
launcher are in ``grouped_mlp.py``).

Shape legend: T tokens · D model dim · F expert hidden · H up rows (2F gated, F otherwise) ·
E experts · K top-k · N rows (expert-sorted slots).

    _down_bwd_kernel      grad_h_NH = act'(h) * (w * grad_y @ W_down[e]), the top-k weights'
                          gradient <grad_y @ W_down[e], a> (one partial per column tile), and
                          w * a (the operand of grad W_down)
    _grouped_gemm_kernel  grad_x = grad_h @ W_up[e], rows scattered back to their slots
    _weight_grad_kernel   dW[e] = P[rows of e]^T @ Q[rows of e], one program per (tile, expert)
"""

import torch
from torch import Tensor

from moesys_compile.kernels._triton import check_triton, pow2, tl, triton
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
def _down_bwd_kernel(
    grad_y_ptr, slots_ptr, scale_ptr, w_ptr, h_ptr, counts_ptr, starts_ptr, grad_h_ptr, part_ptr, wa_ptr,
    E, D, F, top_k, N, rows_key, stride_gy, stride_we, stride_wd, stride_wf, stride_h, stride_gh, stride_part,
    stride_wa,
    KIND: tl.constexpr, GATED: tl.constexpr, GATHER: tl.constexpr, SCALE: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    tile_m, tile_n = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_M) + E, tl.cdiv(F, BLOCK_N), GROUP_M)
    expert, m0, m_end = _expert_tile(counts_ptr, starts_ptr, E, tile_m, BLOCK_M, E_PAD)
    if expert >= E:
        return
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < m_end
    src = rows
    if GATHER:
        slots = tl.load(slots_ptr + rows, mask=row_ok, other=0)
        src = slots // top_k
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < F
    w_base = w_ptr + expert * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)  # grad_y @ W_down[e], before the top-k weight
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        g = tl.load(grad_y_ptr + src[:, None] * stride_gy + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_base + ks[:, None] * stride_wd + cols[None, :] * stride_wf,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            g = g.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(g, w, acc, input_precision=PRECISION)
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


_autotune(_down_bwd_kernel, ["D", "F", "rows_key"], reset_to_zero=["part_ptr"])
_autotune(_weight_grad_kernel, ["I", "J", "rows_key"])


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
    if num_rows:
        _launch(_down_bwd_kernel, _row_grid(num_rows, num_experts, ffn), x,
                grad_out, slots, scale, w_down_EDF, h_NH, counts_E, starts_E, grad_h_NH, part_NC, weighted_a_NF,
                num_experts, dim, ffn, top_k, num_rows, bucket, grad_out.stride(0), *w_down_EDF.stride(),
                h_NH.stride(0), grad_h_NH.stride(0), part_NC.stride(0) if fused else 0, weighted_a_NF.stride(0),
                GATHER=fused, SCALE=fused, E_PAD=e_pad, **common)
        _launch(_grouped_gemm_kernel, _row_grid(num_rows, num_experts, dim), x,
                grad_h_NH, w_up_EHD, grad_rows, counts_E, starts_E, slots, scale,
                num_experts, rows_h, dim, num_rows, bucket, grad_h_NH.stride(0), w_up_EHD.stride(0), w_up_EHD.stride(1),
                w_up_EHD.stride(2), grad_rows.stride(0),
                SCATTER=fused, SCALE=False, PRECISION=common["PRECISION"], UPCAST=common["UPCAST"], E_PAD=e_pad)
    # weight gradients: one program per (output tile, expert), tiles in ``_grouped_tile`` order;
    # experts without rows write zeros. Fused, their gathered operands (grad_y and x by slot) are
    # copied into expert order first (see _weight_grad_kernel).
    sources = slots_N // top_k if fused else None
    grad_y_rows = grad_out.index_select(0, sources) if fused else grad_out
    x_rows = x.index_select(0, sources) if fused else x
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
