"""Autograd registration for the custom ops, first order only.

The ops' backward steps are themselves custom ops (or torch code on tensors saved without a graph),
so they carry no gradient of their own. A second backward through them, after
``torch.autograd.grad(..., create_graph=True)`` (a gradient penalty), must not come out quietly
short of the terms it misses, nor as torch's advice to register an autograd formula: with
``create_graph=True`` each gradient an op returns passes through ``_FirstOrderOnly``, whose own
backward refuses by the op's name. A first-order backward is untouched.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from moesys_compile.errors import SecondOrderGradientError


class _FirstOrderOnly(torch.autograd.Function):
    @staticmethod
    def forward(grad: torch.Tensor, op_name: str) -> torch.Tensor:
        return grad.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.op_name = inputs[1]

    @staticmethod
    def backward(ctx, _grad):
        raise SecondOrderGradientError(
            f"a gradient of a gradient reached {ctx.op_name}, whose backward is differentiable once only; "
            f"second-order gradients (create_graph=True and a second backward, torch.func.hessian) are "
            f"not supported through the MoE ops: use a first-order method, or keep the penalised part "
            f"out of the compiled program")


def _first_order_only(op_name: str, grads: Any) -> Any:
    if isinstance(grads, torch.Tensor):
        return _FirstOrderOnly.apply(grads, op_name) if grads.requires_grad else grads
    if isinstance(grads, (tuple, list)):
        return type(grads)(_first_order_only(op_name, g) for g in grads)
    return grads


def register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    """``op.register_autograd(backward, setup_context=...)`` with a second backward refused by
    name (see the module docstring)."""
    op_name = getattr(op, "_qualname", None) or getattr(op, "__name__", repr(op))

    def first_order_backward(ctx, *grads):
        result = backward(ctx, *grads)
        return _first_order_only(op_name, result) if torch.is_grad_enabled() else result

    first_order_backward.__name__ = getattr(backward, "__name__", "backward")
    op.register_autograd(first_order_backward, setup_context=setup_context)
