"""Structural recognizers on hand-written MoE blocks (no transformers needed): what they replace,
what they leave and why, and that the canonical form computes what the block computed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import moesys_compile as mc
from moesys_compile.frontend import canonicalize, is_canonical_moe
from moesys_compile.frontend.recognizers import CanonicalMoEBlock

D, FF, E, K = 16, 24, 4, 2


class SoftmaxRouter(nn.Module):
    """Plain top-k router with a parameter called ``proj`` (not ``weight``) and a logits output."""

    def __init__(self, temperature: float = 1.0, renorm: bool = True):
        super().__init__()
        self.proj = nn.Linear(D, E, bias=False)
        self.temperature, self.renorm = temperature, renorm

    def forward(self, x_TD):
        logits_TE = self.proj(x_TD)
        probs_TE = (logits_TE / self.temperature).softmax(-1)
        weights_TK, ids_TK = probs_TE.topk(K, dim=-1)
        if self.renorm:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        return ids_TK, weights_TK, logits_TE       # an order no HF router uses


class StackedExperts(nn.Module):
    def __init__(self, gated: bool = True, bias: bool = False):
        super().__init__()
        rows = 2 * FF if gated else FF
        self.w_in = nn.Parameter(torch.randn(E, D, rows) / D ** 0.5)      # [E, D, H]: transposed layout
        self.w_out = nn.Parameter(torch.randn(E, FF, D) / FF ** 0.5)      # [E, F, D]: transposed layout
        self.b_in = nn.Parameter(torch.zeros(E, rows)) if bias else None
        self.gated = gated

    def forward(self, x_TD, ids_TK, weights_TK):
        y_TD = torch.zeros_like(x_TD)
        for k in range(ids_TK.shape[1]):
            h_TH = torch.einsum("td,tdh->th", x_TD, self.w_in[ids_TK[:, k]])
            if self.b_in is not None:
                h_TH = h_TH + self.b_in[ids_TK[:, k]]
            if self.gated:
                gate, up = h_TH.chunk(2, dim=-1)
                a_TF = F.silu(gate) * up
            else:
                a_TF = F.gelu(h_TH)
            y_TD = y_TD + weights_TK[:, k, None] * torch.einsum("tf,tfd->td", a_TF, self.w_out[ids_TK[:, k]])
        return y_TD


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w3 = nn.Linear(D, FF, bias=False), nn.Linear(D, FF, bias=False)
        self.w2 = nn.Linear(FF, D, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ListExperts(nn.ModuleList):
    def __init__(self):
        super().__init__(Expert() for _ in range(E))


class SparseBlock(nn.Module):
    """A user's MoE block: router -> experts (+ optionally a scale the canonical form lacks)."""

    def __init__(self, router=None, experts=None, scale: float = 1.0):
        super().__init__()
        self.gate = router or SoftmaxRouter()
        self.experts = experts if experts is not None else StackedExperts()
        self.scale = scale

    def forward(self, x_BSD):
        x_TD = x_BSD.reshape(-1, D)
        ids_TK, weights_TK, _ = self.gate(x_TD)
        if isinstance(self.experts, nn.ModuleList):
            y_TD = torch.zeros_like(x_TD)
            for k in range(K):
                for e, expert in enumerate(self.experts):
                    mask_T1 = (ids_TK[:, k] == e).unsqueeze(-1).to(x_TD.dtype)
                    y_TD = y_TD + mask_T1 * weights_TK[:, k, None] * expert(x_TD)
        else:
            y_TD = self.experts(x_TD, ids_TK, weights_TK)
        return (self.scale * y_TD).reshape(x_BSD.shape)


class Net(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.inp = nn.Linear(8, D)
        self.block = block
        self.out = nn.Linear(D, 8)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.block(h))


def _x():
    return torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(7))


def _check_compiles_equal(net: Net) -> mc.Program:
    x = _x()
    ref = net(x)
    names = [n for n, _ in net.named_parameters()]
    params = [p for _, p in net.named_parameters()]
    program = mc.compile(net, mc.Plan(), example_inputs=(x,))
    torch.testing.assert_close(program(x), ref, rtol=1e-5, atol=1e-6)
    assert [n for n, _ in net.named_parameters()] == names             # state_dict names unchanged
    assert all(a is b for a, b in zip(params, (p for _, p in net.named_parameters())))   # nothing copied
    return program


def test_stacked_transposed_experts_and_known_router_are_canonicalized():
    net = Net(SparseBlock())
    program = _check_compiles_equal(net)
    (report,) = program.context.blocks
    assert (report.path, report.action) == ("block", "replaced")
    assert report.details["router"] == "softmax-top2-renorm"
    assert report.details["experts"].endswith("stacked views")
    block = net.block
    assert isinstance(block, CanonicalMoEBlock) and is_canonical_moe(block)
    assert (block.num_experts, block.top_k, block.dim, block.ffn_dim) == (E, K, D, FF)
    assert block.experts_spec.transpose_up and block.experts_spec.transpose_down
    targets = [str(n.target) for n in program.graph_module.graph.nodes if n.op in ("call_function", "call_method")]
    assert any(t.startswith(("moesys.route", "moesys_kernels.route")) for t in targets)   # lowered or not
    own_code = [t for t in targets if not t.startswith("moesys")]
    assert not any("einsum" in t or "topk" in t for t in own_code)   # the block's own loops are gone


def test_a_second_compile_finds_the_blocks_canonical():
    net = Net(SparseBlock())
    _check_compiles_equal(net)
    block = net.block
    program = _check_compiles_equal(net)
    (report,) = program.context.blocks
    assert (report.action, report.kind, report.details["router"]) == ("canonical", "SparseBlock", "softmax-top2-renorm")
    assert net.block is block


def test_renormalisation_is_read_from_behaviour_not_attributes():
    net = Net(SparseBlock(router=SoftmaxRouter(renorm=False)))
    program = _check_compiles_equal(net)
    assert program.context.blocks[0].details["router"] == "softmax-top2"


def test_unusual_router_stays_traced_and_experts_are_canonical():
    net = Net(SparseBlock(router=SoftmaxRouter(temperature=0.7)))
    program = _check_compiles_equal(net)
    report = program.context.blocks[0]
    assert report.action == "replaced" and report.details["router"] == "own router 'gate' (traced)"
    targets = [str(n.target) for n in program.graph_module.graph.nodes if n.op in ("call_function", "call_method")]
    assert not any("moesys.route" in t for t in targets)
    assert any("topk" in t for t in targets)                     # the router's own code, traced


def test_per_expert_linears_are_stacked_and_gradients_reach_them():
    torch.manual_seed(3)
    net = Net(SparseBlock(experts=ListExperts()))
    eager = Net(SparseBlock(experts=ListExperts()))
    eager.load_state_dict(net.state_dict())
    program = _check_compiles_equal(net)
    report = program.context.blocks[0]
    assert report.details["experts"].startswith("swiglu, per-expert") and report.details["stack_copy_bytes"] > 0
    x = _x()
    program(x).square().sum().backward()
    eager(x).square().sum().backward()
    for (name, p), (_, q) in zip(net.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_block_with_extra_math_is_left_with_the_probe_difference():
    net = Net(SparseBlock(scale=2.0))
    reports = canonicalize(net)
    (report,) = reports
    assert report.action == "left" and "closest max abs diff" in report.reason
    assert not isinstance(net.block, CanonicalMoEBlock)


def test_biased_experts_are_left_with_the_reason():
    net = Net(SparseBlock(experts=StackedExperts(bias=True)))
    (report,) = canonicalize(net)
    assert report.action == "left" and "stacked 3-D" in report.reason


def test_recognising_does_not_move_the_global_rng():
    net = Net(SparseBlock())
    torch.manual_seed(11)
    canonicalize(net)
    after = torch.rand(3)
    torch.manual_seed(11)
    assert torch.equal(after, torch.rand(3))


def test_builtin_moe_is_still_reported_canonical():
    model = mc.models.build("tiny-moe")
    reports = canonicalize(model)
    assert [r.action for r in reports] == ["canonical", "canonical"]
