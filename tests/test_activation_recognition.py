"""Expert activations are taken only when exact. Tanh-approximate GELU experts
(``nn.GELU(approximate="tanh")``, a gated ``F.gelu(g, approximate="tanh") * u``, transformers'
``gelu_pytorch_tanh``) compile to ``gelu_tanh`` / ``geglu_tanh`` and equal eager, outputs and
gradients; experts whose activation is only near one of ours (quick GELU, Mish, a leaky ReLU, SiLU
with a beta) stay traced code with the reason, in bf16 too, whose rounding hides the difference
until the probe repeats in float32."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moesys_compile as mc
from moesys_compile import ops
from moesys_compile.frontend.recognizers import CanonicalMoEBlock, canonicalize

D, FF, E, K = 12, 20, 4, 2
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def listed_experts(act: nn.Module) -> nn.ModuleList:
    return nn.ModuleList(nn.Sequential(nn.Linear(D, FF, bias=False), act, nn.Linear(FF, D, bias=False))
                         for _ in range(E))


class StackedGatedExperts(nn.Module):
    """[E, 2F, D] gate/up halves and [E, D, F] down, gathered per token; ``gate_fn(g) * u``."""

    def __init__(self, gate_fn):
        super().__init__()
        self.w_up = nn.Parameter(torch.randn(E, 2 * FF, D) * 0.3)
        self.w_down = nn.Parameter(torch.randn(E, D, FF) * 0.3)
        self.gate_fn = gate_fn

    def forward(self, x_TD, ids_TK, weights_TK):
        y_TD = torch.zeros_like(x_TD)
        for k in range(K):
            gate, up = torch.einsum("td,thd->th", x_TD, self.w_up[ids_TK[:, k]]).chunk(2, dim=-1)
            y_TD = y_TD + weights_TK[:, k, None] * torch.einsum("tf,tdf->td", self.gate_fn(gate) * up,
                                                                self.w_down[ids_TK[:, k]])
        return y_TD


class Block(nn.Module):
    """softmax top-k (renormalised) over a Linear router, then listed or stacked experts."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.router = nn.Linear(D, E, bias=False)
        self.experts, self.top_k = experts, K

    def forward(self, x_BSD):
        x_TD = x_BSD.reshape(-1, D)
        weights_TK, ids_TK = self.router(x_TD).softmax(-1).topk(K, dim=-1)
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        if not isinstance(self.experts, nn.ModuleList):
            return self.experts(x_TD, ids_TK, weights_TK).reshape(x_BSD.shape)
        y_TD = torch.zeros_like(x_TD)
        for e, expert in enumerate(self.experts):
            tokens, slots = torch.where(ids_TK == e)
            y_TD = y_TD.index_add(0, tokens, expert(x_TD[tokens]) * weights_TK[tokens, slots, None])
        return y_TD.reshape(x_BSD.shape)


class Net(nn.Module):
    def __init__(self, experts: nn.Module):
        super().__init__()
        self.inp = nn.Linear(6, D)
        self.block = Block(experts)
        self.out = nn.Linear(D, 6)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.block(h))


def _x(dtype=torch.float32):
    # 3x: the experts' pre-activations reach |x| ~ 1..4, where exact and tanh GELU differ by up to 5e-4
    return (3 * torch.randn(2, 8, 6, generator=torch.Generator().manual_seed(5))).to(dtype)


def compiled_equals_eager(net: nn.Module, x: torch.Tensor, tol: float) -> mc.Program:
    """Compile ``net`` for training; its outputs and every gradient equal an eager copy's."""
    eager = copy.deepcopy(net)
    program = mc.compile(net, mc.Plan(mode="train"), example_inputs=(x,))
    got, want = program(x), eager(x)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    got.float().square().sum().backward()
    want.float().square().sum().backward()
    for (name, p), (_, q) in zip(net.named_parameters(), eager.named_parameters()):
        assert q.grad is not None and q.grad.abs().sum() > 0, f"{name}: no eager gradient, the check proves nothing"
        torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
    return program


def test_tanh_gelu_activations_follow_their_formula_and_the_reference():
    h = torch.randn(7, 10, dtype=torch.float64) * 3
    tanh_gelu = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    torch.testing.assert_close(ops.apply_activation(h, "gelu_tanh"), tanh_gelu)
    gate, up = h.chunk(2, dim=-1)
    torch.testing.assert_close(ops.apply_activation(h, "geglu_tanh"), tanh_gelu[:, :5] * up)
    assert ops.is_gated("geglu_tanh") and not ops.is_gated("gelu_tanh") and ops.has_triton_kernel("gelu_tanh")
    for activation in ("gelu_tanh", "geglu_tanh"):
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(9, 6, generator=gen, dtype=torch.float64, requires_grad=True)
        w_up = torch.randn(4, ops.up_rows(5, activation), 6, generator=gen, dtype=torch.float64, requires_grad=True)
        w_down = torch.randn(4, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
        weights, ids, _ = ops.route_reference(torch.randn(9, 4, generator=gen, dtype=torch.float64), 2)
        y = torch.ops.moesys.moe_experts(x, ids, weights, w_up, w_down, activation)
        y_ref = ops.moe_experts_reference(x, ids, weights, w_up, w_down, activation)
        torch.testing.assert_close(y, y_ref)
        for got, want in zip(torch.autograd.grad(y.sum(), (x, w_up, w_down)),
                             torch.autograd.grad(y_ref.sum(), (x, w_up, w_down))):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("experts, activation", [
    (lambda: listed_experts(nn.GELU(approximate="tanh")), "gelu_tanh"),
    (lambda: StackedGatedExperts(lambda g: F.gelu(g, approximate="tanh")), "geglu_tanh"),
], ids=["listed-gelu", "stacked-gated"])
def test_tanh_gelu_experts_compile_to_their_activation_and_equal_eager(experts, activation):
    torch.manual_seed(0)
    program = compiled_equals_eager(Net(experts()), _x(), TOL[torch.float32])
    assert [(r.action, r.details["activation"]) for r in program.context.blocks] == [("replaced", activation)]


@pytest.mark.parametrize("approximate, activation", [("none", "gelu"), ("tanh", "gelu_tanh")])
def test_bf16_gelus_are_told_apart_in_float32_and_the_weights_come_back_as_they_were(approximate, activation):
    """bf16 rounds away the 5e-4 between the GELUs; the probe repeats with the block in float32."""
    torch.manual_seed(0)
    net = Net(listed_experts(nn.GELU(approximate=approximate))).to(torch.bfloat16)
    before = copy.deepcopy(net.state_dict())
    (report,) = canonicalize(net)
    assert (report.action, report.details["activation"]) == ("replaced", activation)
    assert isinstance(net.block, CanonicalMoEBlock)
    for name, tensor in net.state_dict().items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, before[name]), name


NEAR_MISSES = {
    "quick_gelu": (lambda: listed_experts(QuickGELU()), "activation module is QuickGELU()"),
    "mish": (lambda: listed_experts(nn.Mish()), "activation module is Mish()"),
    "leaky_relu": (lambda: listed_experts(nn.LeakyReLU(0.01)), "activation module is LeakyReLU(negative_slope=0.01)"),
    "gated_swish_beta": (lambda: StackedGatedExperts(lambda g: g * torch.sigmoid(1.1 * g)), "reproduces"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_experts_with_an_activation_near_ours_stay_traced_code_with_the_reason(name, dtype):
    experts, reason = NEAR_MISSES[name]
    torch.manual_seed(0)
    program = compiled_equals_eager(Net(experts()).to(dtype), _x(dtype), TOL[dtype])
    (report,) = program.context.blocks
    assert report.action == "left" and reason in report.reason, report.reason


def _scaled_hf(family: str, hidden_act: str) -> nn.Module:
    """A tiny model whose expert pre-activations reach |x| ~ 1..4 (at init they stay near 0, where
    every GELU agrees)."""
    from moesys_compile.models.hf import build_hf
    model = build_hf(family, hidden_act=hidden_act).train()
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("Experts"):
                module.gate_up_proj.mul_(30)
    return model


def _ids():
    return torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("hidden_act", ["gelu_pytorch_tanh", "gelu_new"])
def test_hf_tanh_gelu_experts_compile_to_geglu_tanh_and_equal_eager(hidden_act):
    pytest.importorskip("transformers")
    model = _scaled_hf("mixtral", hidden_act)
    eager = copy.deepcopy(model)
    program = mc.compile(model, mc.Plan(mode="train"), example_inputs=(_ids(),))
    assert {(r.action, r.details["activation"]) for r in program.context.blocks} == {("replaced", "geglu_tanh")}
    got, want = program(_ids()).logits, eager(_ids()).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.square().mean().backward()
    want.square().mean().backward()
    grads = dict(eager.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_hf_quick_gelu_experts_stay_the_models_code(dtype):
    pytest.importorskip("transformers")
    model = _scaled_hf("mixtral", "quick_gelu").eval().to(dtype)
    want = model(_ids()).logits
    reports = canonicalize(model)
    assert reports and all(r.action == "left" and "QuickGELUActivation()" in r.reason for r in reports)
    assert torch.equal(model(_ids()).logits, want)


def test_deepspeed_tanh_gelu_experts_are_canonicalized_exactly():
    layer = pytest.importorskip("deepspeed.moe.layer")
    torch.manual_seed(0)
    expert = nn.Sequential(nn.Linear(D, FF, bias=False), nn.GELU(approximate="tanh"), nn.Linear(FF, D, bias=False))
    moe = layer.MoE(D, expert, num_experts=E, k=2, drop_tokens=False, top2_2nd_expert_sampling=False)

    class DeepSpeedNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.moe = nn.Linear(6, D), moe

        def forward(self, x):
            return self.moe(self.inp(x))[0]

    program = compiled_equals_eager(DeepSpeedNet(), _x(), TOL[torch.float32])
    assert [(r.action, r.details["activation"]) for r in program.context.blocks] == [("replaced", "gelu_tanh")]
