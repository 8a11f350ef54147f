"""Gradients of gradients through a program: the MoE ops are differentiable once, so a second
backward (a gradient penalty) is refused by the op's name rather than coming out short of terms;
a first-order gradient taken with create_graph=True is the plain gradient."""

from __future__ import annotations

import pytest
import torch

import moesys_compile as mc


@pytest.mark.parametrize("kernels", ["torch", "auto"])
def test_a_gradient_penalty_is_refused_by_name(kernels):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    program = mc.compile(mc.nn.MoE(16, 32, 4, top_k=2), mc.Plan(mode="train", kernels=kernels), example_inputs=(x,))
    loss = program(x).square().sum() + program.aux_loss
    plain = torch.autograd.grad(loss, [x, *program.parameters()], retain_graph=True)
    graded = torch.autograd.grad(loss, [x, *program.parameters()], create_graph=True)
    for once, with_graph in zip(plain, graded):
        torch.testing.assert_close(with_graph, once, rtol=0, atol=0)
    penalty = sum(grad.square().sum() for grad in graded)
    with pytest.raises(mc.SecondOrderGradientError, match=r"a gradient of a gradient reached moesys\w*::\w+, whose "
                                                          r"backward is differentiable once only"):
        penalty.backward()
