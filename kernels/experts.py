"""Expert MLP ops: the grouped MLP over expert-sorted rows, and the fused dispatch -> experts ->
combine that reads tokens in place and writes the weighted top-k sum.

Shape legend: T tokens · D model dim · F expert hidden · H up rows (2F gated, F otherwise) ·
E experts · K top-k · N = T*K rows (expert-sorted slots).

    grouped_mlp(x_ND, counts_E, w_up_EHD, w_down_EDF, activation, save_h, impl, b_up_EH, b_down_ED)
        -> y_ND, h_NH
    fused_experts(x_TD, order_N, counts_E, weights_TK, w_up_EHD, w_down_EDF, activation, save_h, impl,
                  b_up_EH, b_down_ED)
        -> y_TD, h_NH     == unpermute(grouped_mlp(permute(x_TD, ...)), order_N, weights_TK)

Their backward is the op ``experts_backward`` (one node for AOT autograd under ``torch.compile``).
``h_NH`` is the up projection before the activation, returned so that backward needs no second
up GEMM (it is [0, H] with ``save_h=False``, for inference). Rows past sum(counts_E) (dropped
slots) produce zeros and get zero gradients. ``impl``: "triton" (``kernels/grouped_mlp.py`` and
``grouped_mlp_backward.py``), "torch" (``kernels/experts_torch.py``: torch.mm per expert,
everything else in a reused workspace) or "auto" (Triton on CUDA, torch elsewhere). Expert biases
(``b_up_EH`` [E, H], ``b_down_ED`` [E, D], optional) and activations outside
``ops.TRITON_ACTIVATIONS`` (gpt-oss's clamped SwiGLU) run on the torch path only: "auto" picks it
for them, "triton" refuses them.

    >>> import torch, moesys_compile.kernels
    >>> x, w_up, w_down = torch.randn(6, 8), torch.randn(4, 32, 8), torch.randn(4, 8, 16)
    >>> ids = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3], [0, 3], [3, 2]])
    >>> counts, order = torch.ops.moesys_kernels.sort_slots(ids, 4)
    >>> y, h = torch.ops.moesys_kernels.fused_experts(x, order, counts, torch.rand(6, 2), w_up, w_down)
    >>> tuple(y.shape), tuple(h.shape)
    ((6, 8), (12, 32))
"""

import functools
from typing import Optional

import torch
from torch import Tensor

from moesys_compile.kernels._triton import resolve_impl
from moesys_compile.kernels.experts_torch import (BUFFERED_ACTIVATIONS, GATHER_ROWS, block_target,
                                                  experts_backward_torch, experts_forward_torch)
from moesys_compile.kernels.grouped_mlp import experts_forward_triton
from moesys_compile.kernels.grouped_mlp_backward import experts_backward_triton
from moesys_compile.ops import check_activation, has_triton_kernel
from moesys_compile.ops.checks import check_experts_args
from moesys_compile.ops.autocast import follow_autocast
from moesys_compile.ops.first_order import register_autograd
from moesys_compile.ops.experts import backward_op_outputs, grads_from_op


@functools.lru_cache(maxsize=256)   # one formula per expert shape: every MoE layer of a model asks for it
def forward_scratch_bytes(num_rows, dim: int, ffn: int, rows_h: int, element_size: int, fused: bool,
                          save_h: bool, impl: str, threads: int, activation: str = "swiglu"):
    """Bytes a forward call allocates besides its outputs, at most (``num_rows``: N, an int or a
    sympy expression; ``impl``: "triton", "torch", or "any" for the larger of the two; ``threads``:
    the intra-op threads of the call). Triton: a_NF and, fused, the weighted slot rows. torch: the
    blocks in flight (at most N rows over all threads, at most twice ``block_target`` per thread),
    and, fused, the slot rows, the gather buffer and two int64 row indices (kept for the next call
    when the forward keeps h, i.e. when training). An activation outside ``BUFFERED_ACTIVATIONS`` runs
    as its reference function: a few [rows, F] temporaries per block (six counted). Memoized: the
    arguments are hashable (ints, strings, a sympy expression) and the result is immutable."""
    import sympy
    rows = sympy.sympify(num_rows)
    triton = (rows * ffn + (rows * dim if fused else 0)) * element_size
    per_row = (dim if fused else 0) + (rows_h if not save_h else 2 * ffn)
    per_row += 0 if activation in BUFFERED_ACTIVATIONS else 6 * ffn
    torch_path = sympy.Min(rows, threads * 2 * block_target(ffn)) * per_row * element_size
    if fused:
        gather = sympy.Min(rows, GATHER_ROWS) * dim * element_size
        # kept buffers (save_h) coexist; per-call ones are freed before the gather buffer is made
        torch_path = torch_path + gather if save_h else sympy.Max(torch_path, gather)
        torch_path += rows * dim * element_size + rows * 16
    return {"triton": triton, "torch": torch_path}.get(impl, sympy.Max(triton, torch_path))


def _no_zero_grads(ctx, h_NH: Tensor) -> None:
    """h_NH is saved state, not a result: no gradient flows into it, and an unused output's
    gradient arrives as None instead of a materialised [N, H] tensor of zeros."""
    ctx.mark_non_differentiable(h_NH)
    ctx.set_materialize_grads(False)


_FORWARD = {"triton": experts_forward_triton, "torch": experts_forward_torch}


def _forward(impl: str, x, counts_E, w_up_EHD, w_down_EDF, activation, slots_N, weights_TK, save_h, b_up_EH,
             b_down_ED):
    biases = {} if impl == "triton" else dict(b_up_EH=b_up_EH, b_down_ED=b_down_ED)   # "triton": none (_resolve)
    return _FORWARD[impl](x, counts_E, w_up_EHD, w_down_EDF, activation, slots_N, weights_TK, save_h, **biases)


def _resolve(impl: str, x: Tensor, activation: str, b_up_EH, b_down_ED) -> str:
    """The implementation that runs: "auto" takes torch for what Triton does not implement
    (expert biases, an activation outside ``TRITON_ACTIVATIONS``); "triton" refuses it."""
    torch_only = b_up_EH is not None or b_down_ED is not None or not has_triton_kernel(activation)
    resolved = resolve_impl(impl, x)
    if resolved == "triton" and torch_only:
        if impl == "triton":
            raise ValueError(f"the Triton expert kernels take neither expert biases nor activation {activation!r}; "
                             f"use impl='torch' (Plan(kernels='auto') picks it for these experts)")
        return "torch"
    return resolved


def _check_biases(w_up_EHD: Tensor, w_down_EDF: Tensor, b_up_EH, b_down_ED) -> None:
    for name, bias, shape in (("b_up_EH", b_up_EH, w_up_EHD.shape[:2]),
                              ("b_down_ED", b_down_ED, w_down_EDF.shape[:2])):
        if bias is not None and (tuple(bias.shape) != tuple(shape) or bias.dtype != w_up_EHD.dtype):
            raise ValueError(f"{name} is {bias.dtype}{list(bias.shape)}; the experts need {w_up_EHD.dtype}"
                             f"{list(shape)}")


def _backward(grad_out, x, counts_E, w_up_EHD, w_down_EDF, h_NH, activation, impl, need_grad_x, slots_N=None,
              weights_TK=None, b_up_EH=None, b_down_ED=None):
    """(grad_x, grad_w_up, grad_w_down, grad_weights_TK or None, grad_b_up or None, grad_b_down or None)."""
    num_rows = slots_N.numel() if slots_N is not None else x.shape[0]
    if impl == "triton":
        if h_NH.shape[0] != num_rows:  # not saved (inference op): recompute once
            _, h_NH = experts_forward_triton(x, counts_E, w_up_EHD, w_down_EDF, activation, slots_N, weights_TK)
        grads = experts_backward_triton(grad_out, x, counts_E, w_up_EHD, w_down_EDF, h_NH, activation, slots_N,
                                        weights_TK)
        return (*grads, None, None)
    # the torch path skips grad_x's GEMMs when x needs no gradient (e.g. the first layer's input)
    return experts_backward_torch(grad_out, x, counts_E, w_up_EHD, w_down_EDF, h_NH, activation, slots_N,
                                  weights_TK, need_grad_x=need_grad_x, b_up_EH=b_up_EH, b_down_ED=b_down_ED)


def _returned_grads(impl, need_grad_x, weights_TK, b_up_EH, b_down_ED) -> tuple[bool, ...]:
    """Which of ``_backward``'s six gradients are tensors (the others are None)."""
    return (impl == "triton" or need_grad_x, True, True, weights_TK is not None, b_up_EH is not None,
            b_down_ED is not None)


# ---------------------------------------------------------------------------------------------
# torch.library ops
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("moesys_kernels::experts_backward", mutates_args=())
def experts_backward(grad_out: Tensor, x: Tensor, counts_E: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor,
                     h_NH: Tensor, activation: str, impl: str, need_grad_x: bool, slots_N: Optional[Tensor] = None,
                     weights_TK: Optional[Tensor] = None, b_up_EH: Optional[Tensor] = None,
                     b_down_ED: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward of ``grouped_mlp`` (``slots_N`` None) and ``fused_experts`` as one op, so that
    tracers (AOT autograd under ``torch.compile``) see one node instead of its host syncs
    (``group_bounds``) and Triton launches. ``impl`` is resolved ("triton" | "torch"). Returns
    (grad_x, grad_w_up, grad_w_down, grad_weights_TK, grad_b_up, grad_b_down), a gradient that is
    not computed (``_returned_grads``) as an empty [0] tensor (``backward_op_outputs``)."""
    return backward_op_outputs(_backward(grad_out, x, counts_E, w_up_EHD, w_down_EDF, h_NH, activation, impl,
                                         need_grad_x, slots_N, weights_TK, b_up_EH, b_down_ED), x)


@experts_backward.register_fake
def _experts_backward_fake(grad_out, x, counts_E, w_up_EHD, w_down_EDF, h_NH, activation, impl, need_grad_x,
                           slots_N=None, weights_TK=None, b_up_EH=None, b_down_ED=None):
    # fresh contiguous grad_x and grad_weights_TK; the [E, ...] gradients are empty_like their parameter
    shaped = (x.new_empty(x.shape), torch.empty_like(w_up_EHD), torch.empty_like(w_down_EDF),
              None if weights_TK is None else weights_TK.new_empty(weights_TK.shape),
              None if b_up_EH is None else torch.empty_like(b_up_EH),
              None if b_down_ED is None else torch.empty_like(b_down_ED))
    returned = _returned_grads(impl, need_grad_x, weights_TK, b_up_EH, b_down_ED)
    return backward_op_outputs([t if kept else None for t, kept in zip(shaped, returned)], x)


def _call_backward(ctx, grad_out, x, counts_E, w_up_EHD, w_down_EDF, h_NH, b_up_EH, b_down_ED, slots_N=None,
                   weights_TK=None):
    """``experts_backward`` from an autograd formula: (grad_x, grad_w_up, grad_w_down, grad_weights_TK,
    grad_b_up, grad_b_down), None for a gradient not computed."""
    if grad_out is None:
        grad_out = torch.zeros(ctx.out_shape, dtype=x.dtype, device=x.device)
    need_grad_x = ctx.needs_input_grad[0]
    grads = experts_backward(grad_out, x, counts_E, w_up_EHD, w_down_EDF, h_NH, ctx.activation, ctx.impl,
                             need_grad_x, slots_N, weights_TK, b_up_EH, b_down_ED)
    return grads_from_op(grads, _returned_grads(ctx.impl, need_grad_x, weights_TK, b_up_EH, b_down_ED))


@torch.library.custom_op("moesys_kernels::grouped_mlp", mutates_args=())
def grouped_mlp(x_ND: Tensor, counts_E: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor, activation: str = "swiglu",
                save_h: bool = True, impl: str = "auto", b_up_EH: Optional[Tensor] = None,
                b_down_ED: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    check_activation(activation)
    check_experts_args(x_ND, counts_E, w_up_EHD, w_down_EDF, activation, "x_ND")
    _check_biases(w_up_EHD, w_down_EDF, b_up_EH, b_down_ED)
    return _forward(_resolve(impl, x_ND, activation, b_up_EH, b_down_ED), x_ND, counts_E, w_up_EHD, w_down_EDF,
                    activation, None, None, save_h, b_up_EH, b_down_ED)


@grouped_mlp.register_fake
def _grouped_mlp_fake(x_ND, counts_E, w_up_EHD, w_down_EDF, activation="swiglu", save_h=True, impl="auto",
                      b_up_EH=None, b_down_ED=None):
    rows = x_ND.shape[0] if save_h else 0
    return x_ND.new_empty((x_ND.shape[0], w_down_EDF.shape[1])), x_ND.new_empty((rows, w_up_EHD.shape[1]))


def _grouped_mlp_setup(ctx, inputs, output):
    x_ND, counts_E, w_up_EHD, w_down_EDF, activation, save_h, impl, b_up_EH, b_down_ED = inputs
    ctx.save_for_backward(x_ND, counts_E, w_up_EHD, w_down_EDF, output[1], b_up_EH, b_down_ED)
    ctx.activation, ctx.out_shape = activation, output[0].shape
    ctx.impl = _resolve(impl, x_ND, activation, b_up_EH, b_down_ED)
    _no_zero_grads(ctx, output[1])


def _grouped_mlp_backward(ctx, grad_y_ND, grad_h_NH):
    grad_x, grad_w_up, grad_w_down, _, grad_b_up, grad_b_down = _call_backward(ctx, grad_y_ND, *ctx.saved_tensors)
    return grad_x, None, grad_w_up, grad_w_down, None, None, None, grad_b_up, grad_b_down


register_autograd(grouped_mlp, _grouped_mlp_backward, setup_context=_grouped_mlp_setup)


@torch.library.custom_op("moesys_kernels::fused_experts", mutates_args=())
def fused_experts(x_TD: Tensor, order_N: Tensor, counts_E: Tensor, weights_TK: Tensor, w_up_EHD: Tensor,
                  w_down_EDF: Tensor, activation: str = "swiglu", save_h: bool = True, impl: str = "auto",
                  b_up_EH: Optional[Tensor] = None, b_down_ED: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    check_activation(activation)
    check_experts_args(x_TD, counts_E, w_up_EHD, w_down_EDF, activation, "x_TD")
    _check_biases(w_up_EHD, w_down_EDF, b_up_EH, b_down_ED)
    if weights_TK.dim() != 2 or weights_TK.shape[0] != x_TD.shape[0] or order_N.numel() != weights_TK.numel():
        raise ValueError(f"fused_experts: x_TD {tuple(x_TD.shape)}, weights_TK {tuple(weights_TK.shape)} and "
                         f"order_N {tuple(order_N.shape)} must agree on T and N = T*K")
    return _forward(_resolve(impl, x_TD, activation, b_up_EH, b_down_ED), x_TD, counts_E, w_up_EHD, w_down_EDF,
                    activation, order_N, weights_TK, save_h, b_up_EH, b_down_ED)


@fused_experts.register_fake
def _fused_experts_fake(x_TD, order_N, counts_E, weights_TK, w_up_EHD, w_down_EDF, activation="swiglu",
                        save_h=True, impl="auto", b_up_EH=None, b_down_ED=None):
    rows = order_N.shape[0] if save_h else 0
    return x_TD.new_empty((x_TD.shape[0], w_down_EDF.shape[1])), x_TD.new_empty((rows, w_up_EHD.shape[1]))


def _fused_experts_setup(ctx, inputs, output):
    x_TD, order_N, counts_E, weights_TK, w_up_EHD, w_down_EDF, activation, save_h, impl, b_up_EH, b_down_ED = inputs
    ctx.save_for_backward(x_TD, order_N, counts_E, weights_TK, w_up_EHD, w_down_EDF, output[1], b_up_EH, b_down_ED)
    ctx.activation, ctx.out_shape = activation, output[0].shape
    ctx.impl = _resolve(impl, x_TD, activation, b_up_EH, b_down_ED)
    _no_zero_grads(ctx, output[1])


def _fused_experts_backward(ctx, grad_y_TD, grad_h_NH):
    x_TD, order_N, counts_E, weights_TK, w_up_EHD, w_down_EDF, h_NH, b_up_EH, b_down_ED = ctx.saved_tensors
    grad_x, grad_w_up, grad_w_down, grad_weights, grad_b_up, grad_b_down = _call_backward(
        ctx, grad_y_TD, x_TD, counts_E, w_up_EHD, w_down_EDF, h_NH, b_up_EH, b_down_ED, order_N, weights_TK)
    return grad_x, None, None, grad_weights, grad_w_up, grad_w_down, None, None, None, grad_b_up, grad_b_down


register_autograd(fused_experts, _fused_experts_backward, setup_context=_fused_experts_setup)


# torch.autocast: expert matmuls in the autocast dtype, the rest on their inputs as they come
follow_autocast("moesys_kernels::grouped_mlp", cast=True)
follow_autocast("moesys_kernels::fused_experts", cast=True)
