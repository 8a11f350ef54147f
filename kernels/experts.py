"""Expert MLP ops: the grouped MLP over expert-sorted rows, and the fused dispatch -> experts ->
combine that reads tokens in place and writes the weighted top-k sum.

Shape legend: T tokens · D model dim · F expert hidden · H up rows (2F gated, F otherwise) ·
E experts · K top-k · N = T*K rows (expert-sorted slots).

    grouped_mlp(x_ND, counts_E, w_up_EHD, w_down_EDF, activation, save_h, impl) -> y_ND, h_NH
    fused_experts(x_TD, order_N, counts_E, weights_TK, w_up_EHD, w_down_EDF, activation, save_h, impl)
        -> y_TD, h_NH     == unpermute(grouped_mlp(permute(x_TD, ...)), order_N, weights_TK)

``h_NH`` is the up projection before the activation, returned so that backward needs no second
up GEMM (it is [0, H] with ``save_h=False``, for inference). Rows past sum(counts_E) (dropped
slots) produce zeros and get zero gradients. ``impl``: "triton" (``kernels/grouped_mlp.py``),
"torch" (below: one GEMM per expert through torch.mm, activation kept in cache-sized pieces) or
"auto" (Triton on CUDA, torch elsewhere).

    >>> import torch, moesys_compile.kernels
    >>> x, w_up, w_down = torch.randn(6, 8), torch.randn(4, 32, 8), torch.randn(4, 8, 16)
    >>> ids = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3], [0, 0], [3, 3]]).clamp(max=3)
    >>> counts, order = torch.ops.moesys_kernels.sort_slots(ids, 4)
    >>> y, h = torch.ops.moesys_kernels.fused_experts(x, order, counts, torch.rand(6, 2), w_up, w_down)
    >>> tuple(y.shape), tuple(h.shape)
    ((6, 8), (12, 32))
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from moesys_compile.kernels._triton import resolve_impl
from moesys_compile.kernels.grouped_mlp import check_experts_args, experts_backward_triton, experts_forward_triton
from moesys_compile.ops import _group_bounds, check_activation, is_gated

# ---------------------------------------------------------------------------------------------
# torch path
# ---------------------------------------------------------------------------------------------


def _act(h: Tensor, activation: str) -> Tensor:
    if is_gated(activation):
        ffn = h.shape[1] // 2
        gate, up = h[:, :ffn], h[:, ffn:]
        a = F.silu(gate) if activation == "swiglu" else F.gelu(gate)
        return a.mul_(up)
    if activation in ("silu", "gelu"):
        return F.silu(h) if activation == "silu" else F.gelu(h)
    return F.relu(h)


def _act_backward(h: Tensor, grad_a: Tensor, activation: str) -> Tensor:
    """grad_h from grad_a with aten's fused activation backward kernels (one pass each)."""
    def scalar_backward(grad, x):
        if activation in ("swiglu", "silu"):
            return torch.ops.aten.silu_backward(grad, x)
        if activation in ("geglu", "gelu"):
            return torch.ops.aten.gelu_backward(grad, x)
        return torch.ops.aten.threshold_backward(grad, x, 0)

    if not is_gated(activation):
        return scalar_backward(grad_a, h)
    ffn = h.shape[1] // 2
    gate, up = h[:, :ffn], h[:, ffn:]
    grad_h = torch.empty_like(h)
    grad_h[:, :ffn] = scalar_backward(grad_a * up, gate)
    torch.mul(grad_a, F.silu(gate) if activation == "swiglu" else F.gelu(gate), out=grad_h[:, ffn:])
    return grad_h


def experts_forward_torch(x: Tensor, counts_E: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor, activation: str,
                          slots_N=None, weights_TK=None, save_h: bool = True):
    """Same contract as ``experts_forward_triton``: one torch.mm per expert and projection; with
    ``slots_N`` the expert's token rows are gathered and its output rows index_add-ed, weighted."""
    fused = slots_N is not None
    num_rows = slots_N.numel() if fused else x.shape[0]
    h_NH = x.new_empty((num_rows if save_h else 0, w_up_EHD.shape[1]))
    if fused:
        tokens_N = slots_N // weights_TK.shape[1]
        scale_N = weights_TK.reshape(-1)[slots_N].to(x.dtype)
        out = x.new_zeros((weights_TK.shape[0], x.shape[1]))
    else:
        out = x.new_zeros((num_rows, x.shape[1]))
    for expert, start, end in _group_bounds(counts_E):
        x_n = x.index_select(0, tokens_N[start:end]) if fused else x[start:end]
        h_n = torch.mm(x_n, w_up_EHD[expert].t(), out=h_NH[start:end]) if save_h else x_n @ w_up_EHD[expert].t()
        a_n = _act(h_n, activation)
        if fused:
            y_n = torch.mm(a_n, w_down_EDF[expert].t()).mul_(scale_N[start:end, None])
            out.index_add_(0, tokens_N[start:end], y_n)
        else:
            torch.mm(a_n, w_down_EDF[expert].t(), out=out[start:end])
    return out, h_NH


def experts_backward_torch(grad_out: Tensor, x: Tensor, counts_E: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor,
                           h_NH: Tensor, activation: str, slots_N=None, weights_TK=None):
    fused = slots_N is not None
    num_rows = slots_N.numel() if fused else x.shape[0]
    grad_x = torch.zeros_like(x)
    grad_w_up = torch.zeros_like(w_up_EHD)
    grad_w_down = torch.zeros_like(w_down_EDF)
    if fused:
        tokens_N = slots_N // weights_TK.shape[1]
        scale_N = weights_TK.reshape(-1)[slots_N].to(x.dtype)
        grad_w_N = torch.zeros(num_rows, dtype=weights_TK.dtype, device=x.device)
    for expert, start, end in _group_bounds(counts_E):
        rows = slice(start, end)
        g_n = grad_out.index_select(0, tokens_N[rows]) if fused else grad_out[rows]
        x_n = x.index_select(0, tokens_N[rows]) if fused else x[rows]
        h_n = h_NH[rows] if h_NH.shape[0] else x_n @ w_up_EHD[expert].t()
        a_n = _act(h_n, activation)
        grad_a_n = torch.mm(g_n, w_down_EDF[expert])
        if fused:
            grad_w_N[rows] = (grad_a_n * a_n).sum(-1).to(grad_w_N.dtype)
            grad_a_n.mul_(scale_N[rows, None])
            g_n = g_n.mul_(scale_N[rows, None])
        torch.mm(g_n.t(), a_n, out=grad_w_down[expert])
        grad_h_n = _act_backward(h_n, grad_a_n, activation)
        torch.mm(grad_h_n.t(), x_n, out=grad_w_up[expert])
        if fused:
            grad_x.index_add_(0, tokens_N[rows], torch.mm(grad_h_n, w_up_EHD[expert]))
        else:
            torch.mm(grad_h_n, w_up_EHD[expert], out=grad_x[rows])
    if not fused:
        return grad_x, grad_w_up, grad_w_down, None
    grad_weights_N = torch.empty_like(grad_w_N)
    grad_weights_N[slots_N] = grad_w_N
    return grad_x, grad_w_up, grad_w_down, grad_weights_N.view(weights_TK.shape)


_FORWARD = {"triton": experts_forward_triton, "torch": experts_forward_torch}
_BACKWARD = {"triton": experts_backward_triton, "torch": experts_backward_torch}


def _backward(ctx, grad_out, x, counts_E, w_up_EHD, w_down_EDF, h_NH, slots_N=None, weights_TK=None):
    if grad_out is None:
        grad_out = torch.zeros(ctx.out_shape, dtype=x.dtype, device=x.device)
    num_rows = slots_N.numel() if slots_N is not None else x.shape[0]
    if h_NH.shape[0] != num_rows and ctx.impl == "triton":  # not saved (inference op): recompute once
        _, h_NH = experts_forward_triton(x, counts_E, w_up_EHD, w_down_EDF, ctx.activation, slots_N, weights_TK)
    return _BACKWARD[ctx.impl](grad_out, x, counts_E, w_up_EHD, w_down_EDF, h_NH, ctx.activation, slots_N,
                               weights_TK)


# ---------------------------------------------------------------------------------------------
# torch.library ops
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("moesys_kernels::grouped_mlp", mutates_args=())
def grouped_mlp(x_ND: Tensor, counts_E: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor, activation: str = "swiglu",
                save_h: bool = True, impl: str = "auto") -> tuple[Tensor, Tensor]:
    check_activation(activation)
    check_experts_args(x_ND, counts_E, w_up_EHD, w_down_EDF, activation, "x_ND")
    run = _FORWARD[resolve_impl(impl, x_ND)]
    return run(x_ND, counts_E, w_up_EHD, w_down_EDF, activation, save_h=save_h)


@grouped_mlp.register_fake
def _grouped_mlp_fake(x_ND, counts_E, w_up_EHD, w_down_EDF, activation="swiglu", save_h=True, impl="auto"):
    rows = x_ND.shape[0] if save_h else 0
    return x_ND.new_empty((x_ND.shape[0], w_down_EDF.shape[1])), x_ND.new_empty((rows, w_up_EHD.shape[1]))


def _grouped_mlp_setup(ctx, inputs, output):
    x_ND, counts_E, w_up_EHD, w_down_EDF, activation, save_h, impl = inputs
    ctx.save_for_backward(x_ND, counts_E, w_up_EHD, w_down_EDF, output[1])
    ctx.activation, ctx.impl, ctx.out_shape = activation, resolve_impl(impl, x_ND), output[0].shape


def _grouped_mlp_backward(ctx, grad_y_ND, grad_h_NH):
    x_ND, counts_E, w_up_EHD, w_down_EDF, h_NH = ctx.saved_tensors
    grad_x, grad_w_up, grad_w_down, _ = _backward(ctx, grad_y_ND, x_ND, counts_E, w_up_EHD, w_down_EDF, h_NH)
    return grad_x, None, grad_w_up, grad_w_down, None, None, None


grouped_mlp.register_autograd(_grouped_mlp_backward, setup_context=_grouped_mlp_setup)


@torch.library.custom_op("moesys_kernels::fused_experts", mutates_args=())
def fused_experts(x_TD: Tensor, order_N: Tensor, counts_E: Tensor, weights_TK: Tensor, w_up_EHD: Tensor,
                  w_down_EDF: Tensor, activation: str = "swiglu", save_h: bool = True,
                  impl: str = "auto") -> tuple[Tensor, Tensor]:
    check_activation(activation)
    check_experts_args(x_TD, counts_E, w_up_EHD, w_down_EDF, activation, "x_TD")
    if weights_TK.dim() != 2 or weights_TK.shape[0] != x_TD.shape[0] or order_N.numel() != weights_TK.numel():
        raise ValueError(f"fused_experts: x_TD {tuple(x_TD.shape)}, weights_TK {tuple(weights_TK.shape)} and "
                         f"order_N {tuple(order_N.shape)} must agree on T and N = T*K")
    run = _FORWARD[resolve_impl(impl, x_TD)]
    return run(x_TD, counts_E, w_up_EHD, w_down_EDF, activation, order_N, weights_TK, save_h)


@fused_experts.register_fake
def _fused_experts_fake(x_TD, order_N, counts_E, weights_TK, w_up_EHD, w_down_EDF, activation="swiglu",
                        save_h=True, impl="auto"):
    rows = order_N.shape[0] if save_h else 0
    return x_TD.new_empty((x_TD.shape[0], w_down_EDF.shape[1])), x_TD.new_empty((rows, w_up_EHD.shape[1]))


def _fused_experts_setup(ctx, inputs, output):
    x_TD, order_N, counts_E, weights_TK, w_up_EHD, w_down_EDF, activation, save_h, impl = inputs
    ctx.save_for_backward(x_TD, order_N, counts_E, weights_TK, w_up_EHD, w_down_EDF, output[1])
    ctx.activation, ctx.impl, ctx.out_shape = activation, resolve_impl(impl, x_TD), output[0].shape


def _fused_experts_backward(ctx, grad_y_TD, grad_h_NH):
    x_TD, order_N, counts_E, weights_TK, w_up_EHD, w_down_EDF, h_NH = ctx.saved_tensors
    grad_x, grad_w_up, grad_w_down, grad_weights = _backward(ctx, grad_y_TD, x_TD, counts_E, w_up_EHD, w_down_EDF,
                                                             h_NH, order_N, weights_TK)
    return grad_x, None, None, grad_weights, grad_w_up, grad_w_down, None, None, None


fused_experts.register_autograd(_fused_experts_backward, setup_context=_fused_experts_setup)
