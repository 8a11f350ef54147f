"""Triton grouped expert MLP over variable-size groups: the forward kernels, and what the
backward kernels (``grouped_mlp_backward.py``) share with them.

Shape legend: T tokens · D model dim · F expert hidden · H up rows (2F gated, F otherwise) ·
E experts · K top-k · N rows (expert-sorted slots).

Each kernel runs over the rows of all experts at once (one launch, no host sync). The forward two:

    _up_act_kernel        a_NF = act(x_ND @ W_up[e]^T)      gate and up tiles in one program,
                                                            SwiGLU / GeGLU / GELU (exact or
                                                            tanh) / SiLU / ReLU
                                                            in the epilogue; h_NH kept for backward
    _grouped_gemm_kernel  c = scale * (a_NK @ B[e])         down projection (and, in backward,
                                                            grad_x = grad_h @ W_up[e]); rows
                                                            scattered to their slots

and the backward ones in ``grouped_mlp_backward.py`` (``_act_bwd_kernel``, ``_weight_grad_kernel``; the
backward's GEMMs over rows are this file's ``_grouped_gemm_kernel``).

With ``slots_N`` (the ``order_N`` of a sort) the kernels read x rows straight from x_TD
(``x_TD[slot // K]``) and write y rows to their slot, weighted: dispatch and combine are fused
into the GEMMs (the ScatterMoE idea), so no permuted copy of x or y is materialised.

Row tiles never straddle two experts: expert e owns ceil(count_e / BLOCK_M) tiles, and a program
finds its expert from a cumulative sum of those tile counts (E <= a few hundred, in registers).
There are ceil(N / BLOCK_M) + E row tiles, an upper bound; programs of the extra ones return at once.

The grid is one-dimensional and visits output tiles GROUP_M row tiles at a time, across every
column tile (``_grouped_tile``): programs that run together share their row and column operands in
L2. Row-major order (all row tiles of one column tile, then the next) rereads the whole row operand
from memory for every column tile, which made the large GEMMs memory-bound.
"""

import torch
from torch import Tensor

from moesys_compile.kernels._triton import (HAVE_TRITON, INTERPRET, check_dtype, check_triton, dot_precision,
                                            pow2, tl, triton, use_autotune)
from moesys_compile.ops import is_gated
from moesys_compile.ops.checks import check_experts_args

# activation kinds of the epilogues (gating is a separate flag)
_ACT_KIND = {"swiglu": 0, "silu": 0, "geglu": 1, "gelu": 1, "relu": 2, "geglu_tanh": 3, "gelu_tanh": 3}


def _configs() -> list:
    """Block sizes autotuned per shape on CUDA; they target Hopper/Ampere tensor cores (bf16 tiles
    of 64-256 with 3-4 stages). Configs that exceed shared memory for a dtype are skipped by the
    autotuner."""
    shapes = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
              (64, 64, 64, 4, 4), (64, 256, 64, 8, 3), (128, 128, 32, 4, 4), (256, 128, 64, 8, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": GROUP_M}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


def _untuned_config():
    """The one config run without autotuning: small tiles under the interpreter; on CUDA tiles that
    fit shared memory for every dtype (fp32 included)."""
    if INTERPRET:
        return triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=4)
    return triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": GROUP_M}, num_warps=4,
                         num_stages=3)


_MIN_BLOCK_N = 32  # smallest BLOCK_N of any config: sizes the per-column-tile partial sums
GROUP_M = 8        # row tiles per group of the tile order (``_grouped_tile``)


@triton.jit
def _grouped_tile(pid, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """Program ``pid`` of a 1-D grid of tiles_m * tiles_n -> (row tile, column tile), in groups of
    GROUP_M row tiles: within a group the row tile changes fastest, then the column tile."""
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    local = pid % per_group
    return first_m + local % group_rows, local // group_rows


@triton.jit
def _act(x, KIND: tl.constexpr):
    if KIND == 0:
        return x * tl.sigmoid(x)
    elif KIND == 1:
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif KIND == 3:   # tanh GELU, u = sqrt(2/pi) (x + 0.044715 x^3): 0.5 x (1 + tanh(u)) = x sigmoid(2u)
        return x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
    else:
        return tl.maximum(x, 0.0)


@triton.jit
def _expert_tile(counts_ptr, starts_ptr, E, pid, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    """Row program ``pid`` -> (expert, its first row, end of that expert's rows); expert == E
    means the program has no work. ``starts_ptr`` holds the exclusive cumsum of the counts."""
    es = tl.arange(0, E_PAD)
    tiles = (tl.load(counts_ptr + es, mask=es < E, other=0) + BLOCK_M - 1) // BLOCK_M
    before = tl.cumsum(tiles, axis=0) <= pid          # experts whose tiles all come before pid
    expert = tl.sum(before.to(tl.int32), axis=0)
    first_tile = tl.sum(tl.where(before, tiles, 0), axis=0)
    safe = tl.minimum(expert, E - 1)
    start = tl.load(starts_ptr + safe)
    # int64 expert: expert * stride of a stacked weight passes 2**31 elements at DeepSeek-V3 sizes
    return expert.to(tl.int64), start + (pid - first_tile) * BLOCK_M, start + tl.load(counts_ptr + safe)


@triton.jit
def _up_act_kernel(
    x_ptr, slots_ptr, w_ptr, counts_ptr, starts_ptr, h_ptr, a_ptr,
    E, D, F, top_k, N, rows_key, stride_x, stride_we, stride_wh, stride_wd, stride_h, stride_a,
    KIND: tl.constexpr, GATED: tl.constexpr, GATHER: tl.constexpr, SAVE_H: tl.constexpr,
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
        src = tl.load(slots_ptr + rows, mask=row_ok, other=0) // top_k
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < F
    w_base = w_ptr + expert * stride_we
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        x = tl.load(x_ptr + src[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        w_gate = tl.load(w_base + cols[None, :] * stride_wh + ks[:, None] * stride_wd, mask=w_mask, other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w_gate = w_gate.to(tl.float32)
        acc_g = tl.dot(x, w_gate, acc_g, input_precision=PRECISION)
        if GATED:
            w_up = tl.load(w_base + (cols + F)[None, :] * stride_wh + ks[:, None] * stride_wd, mask=w_mask, other=0.0)
            if UPCAST:
                w_up = w_up.to(tl.float32)
            acc_u = tl.dot(x, w_up, acc_u, input_precision=PRECISION)
    out_mask = row_ok[:, None] & col_ok[None, :]
    dtype = a_ptr.dtype.element_ty
    # round h to the storage dtype first so that forward and backward (which reads h) agree
    gate = acc_g.to(dtype)
    if SAVE_H:
        tl.store(h_ptr + rows[:, None] * stride_h + cols[None, :], gate, mask=out_mask)
    a = _act(gate.to(tl.float32), KIND)
    if GATED:
        up = acc_u.to(dtype)
        if SAVE_H:
            tl.store(h_ptr + rows[:, None] * stride_h + (cols + F)[None, :], up, mask=out_mask)
        a = a * up.to(tl.float32)
    tl.store(a_ptr + rows[:, None] * stride_a + cols[None, :], a.to(dtype), mask=out_mask)


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, counts_ptr, starts_ptr, slots_ptr, scale_ptr,
    E, KD, NC, N, rows_key, stride_a, stride_be, stride_bk, stride_bn, stride_c,
    SCATTER: tl.constexpr, SCALE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """c[dst(n)] = scale[dst(n)] * a[n] @ B[e]; B[e][k, j] at b + e*stride_be + k*stride_bk + j*stride_bn."""
    tile_m, tile_n = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_M) + E, tl.cdiv(NC, BLOCK_N), GROUP_M)
    expert, m0, m_end = _expert_tile(counts_ptr, starts_ptr, E, tile_m, BLOCK_M, E_PAD)
    if expert >= E:
        return
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < m_end
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < NC
    b_base = b_ptr + expert * stride_be
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, KD, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < KD
        a = tl.load(a_ptr + rows[:, None] * stride_a + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_base + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    dst = rows
    if SCATTER:
        dst = tl.load(slots_ptr + rows, mask=row_ok, other=0)
    if SCALE:
        acc = acc * tl.load(scale_ptr + dst, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(c_ptr + dst[:, None] * stride_c + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


_TUNED: dict = {}   # kernel -> its autotuned version (natively on CUDA only)


def autotune_options() -> dict:
    """Keep each tuning's choice in Triton's on-disk cache where this Triton can (``cache_results``,
    Triton >= 3.2): a later process, such as a resumed training run, reuses it instead of timing
    every config again."""
    import inspect
    return {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def _autotune(kernel, key, reset_to_zero=None, configs=_configs) -> None:
    """Give ``kernel`` an autotuned version for ``_launch`` over ``configs()`` (the GEMM block
    sizes by default); none without Triton or under the interpreter, where the untuned config runs."""
    if HAVE_TRITON and not INTERPRET:
        _TUNED[kernel] = triton.autotune(configs=configs(), key=key, reset_to_zero=reset_to_zero,
                                         **autotune_options())(kernel)


# every kernel's ``rows_key`` argument is ``rows_bucket(N)``: read by the autotuner's key only
_autotune(_up_act_kernel, ["D", "F", "rows_key"])
_autotune(_grouped_gemm_kernel, ["KD", "NC", "rows_key"])


def _launch(kernel, grid, ref: Tensor, *args, untuned=None, **constexprs) -> None:
    """Autotuned on CUDA; the interpreter (and CUDA without tuning) runs ``untuned``, by default
    ``_untuned_config()``."""
    if use_autotune(ref) and kernel in _TUNED:
        _TUNED[kernel][grid](*args, **constexprs)
    else:
        kernel[grid](*args, **constexprs, **(untuned or _untuned_config()).all_kwargs())


# ---------------------------------------------------------------------------------------------
# host wrappers
# ---------------------------------------------------------------------------------------------


def _common(x: Tensor, activation: str) -> dict:
    # UPCAST: Triton's interpreter mishandles bf16 tl.dot; bf16 products are exact in fp32 anyway
    return dict(KIND=_ACT_KIND[activation], GATED=is_gated(activation),
                PRECISION="ieee" if INTERPRET else dot_precision(x.dtype), UPCAST=INTERPRET)


def _row_grid(num_rows: int, num_experts: int, cols: int):
    """One program per (row tile, column tile); ``_grouped_tile`` maps a program to its tile."""
    return lambda meta: ((triton.cdiv(num_rows, meta["BLOCK_M"]) + num_experts) * triton.cdiv(cols, meta["BLOCK_N"]),)


_ROW_BUCKETS = (2048, 32768)


def rows_bucket(num_rows: int) -> int:
    """The row count as the autotuner's key sees it: one of three buckets (up to 2048 rows, as in
    decoding; up to 32768; more), so that a shape is tuned again for a much larger batch, whose best
    tiles differ, but at most three times (tuning compiles and times every config: seconds per
    kernel on a GPU, at the first call of each bucket)."""
    return next((bound for bound in _ROW_BUCKETS if num_rows <= bound), 1 << 20)


def experts_forward_triton(x: Tensor, counts_E: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor, activation: str,
                           slots_N=None, weights_TK=None, save_h: bool = True):
    """Without ``slots_N``: x is x_ND (expert-sorted rows), returns (y_ND, h_NH).
    With ``slots_N`` (and ``weights_TK``): x is x_TD, rows are gathered on load and the output is
    the weighted top-k sum y_TD. h_NH is [0, H] when ``save_h`` is False."""
    fused = slots_N is not None
    check_experts_args(x, counts_E, w_up_EHD, w_down_EDF, activation, "x_TD" if fused else "x_ND")
    check_triton(x, counts_E, w_up_EHD, w_down_EDF)
    check_dtype("fused_experts" if fused else "grouped_mlp", "x_TD" if fused else "x_ND", x)
    x = x if x.stride(1) == 1 else x.contiguous()
    num_experts, rows_h, dim = w_up_EHD.shape
    ffn = w_down_EDF.shape[2]
    num_rows = slots_N.numel() if fused else x.shape[0]
    top_k = weights_TK.shape[1] if fused else 1
    common = _common(x, activation)
    e_pad = pow2(num_experts, 2)
    starts_E = counts_E.cumsum(0) - counts_E
    bucket = rows_bucket(num_rows)
    a_NF = torch.empty((num_rows, ffn), device=x.device, dtype=x.dtype)
    h_NH = torch.empty((num_rows if save_h else 0, rows_h), device=x.device, dtype=x.dtype)
    out = torch.zeros((num_rows, dim), device=x.device, dtype=x.dtype)  # dropped rows / slots stay 0
    if num_rows:
        _launch(_up_act_kernel, _row_grid(num_rows, num_experts, ffn), x,
                x, slots_N if fused else counts_E, w_up_EHD, counts_E, starts_E, h_NH if save_h else a_NF, a_NF,
                num_experts, dim, ffn, top_k, num_rows, bucket, x.stride(0), *w_up_EHD.stride(), h_NH.stride(0),
                a_NF.stride(0),
                GATHER=fused, SAVE_H=save_h, E_PAD=e_pad, **common)
        scale = weights_TK.reshape(-1).contiguous() if fused else a_NF
        _launch(_grouped_gemm_kernel, _row_grid(num_rows, num_experts, dim), x,
                a_NF, w_down_EDF, out, counts_E, starts_E, slots_N if fused else counts_E, scale,
                num_experts, ffn, dim, num_rows, bucket, a_NF.stride(0), w_down_EDF.stride(0), w_down_EDF.stride(2),
                w_down_EDF.stride(1), out.stride(0),
                SCATTER=fused, SCALE=fused, PRECISION=common["PRECISION"], UPCAST=common["UPCAST"], E_PAD=e_pad)
    if fused:  # out holds weighted rows in slot order t*K + k
        out = out.view(-1, top_k, dim).sum(1) if top_k > 1 else out
    return out, h_NH
