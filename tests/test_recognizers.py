"""Structural recognizers on hand-written MoE blocks (no transformers needed): what they replace,
what they leave and why, and that the canonical form computes what the block computed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moesys_compile as mc
from moesys_compile.frontend import canonicalize, is_canonical_moe
from moesys_compile.frontend.recognizers import CanonicalMoEBlock, CanonicalRoutedExperts
from moesys_compile.frontend.recognizers.routed_experts import CALLERS_ROUTING, recognize_routed_experts
from moesys_compile.frontend.recognizers.structure import take_left

sys.path.insert(0, str(Path(__file__).parent))
from blocks import SwiGLUExpert  # noqa: E402

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


def Expert() -> nn.Module:
    return SwiGLUExpert(D, FF)


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
    assert program.context.capture == "fx"      # the canonical block traces symbolically (no export fallback)
    torch.testing.assert_close(program(x), ref, rtol=1e-5, atol=1e-6)
    assert [n for n, _ in net.named_parameters()] == names             # state_dict names unchanged
    assert all(a is b for a, b in zip(params, (p for _, p in net.named_parameters())))   # nothing copied
    return program


def _check_gradients_equal(program: mc.Program, net: Net, eager: Net) -> None:
    """Every parameter's gradient of a loss on the program's output equals eager's (``eager``: a
    copy of ``net`` before compiling)."""
    x = _x()
    program(x).square().sum().backward()
    eager(x).square().sum().backward()
    for (name, p), (_, q) in zip(net.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


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
    _check_gradients_equal(program, net, eager)


def test_block_with_extra_math_stays_traced_code_around_its_canonical_experts():
    """The block doubles the experts' sum, which no canonical form does: the block is left with the
    probe's difference, and its experts module, called with the routing, is canonicalized alone."""
    net = Net(SparseBlock(scale=2.0))
    program = _check_compiles_equal(net)
    (report,) = program.context.blocks
    assert (report.path, report.action, report.details["router"]) == ("block.experts", "replaced", CALLERS_ROUTING)
    assert "left as it is" in report.reason and "closest max abs diff" in report.reason
    assert not isinstance(net.block, CanonicalMoEBlock) and isinstance(net.block.experts, CanonicalRoutedExperts)


class BlockScaledBlock(SparseBlock):
    """Its router returns unscaled weights and the block multiplies the experts' sum by its own
    ``routed_scaling_factor`` (Beam's layout)."""

    def __init__(self, routed_scaling_factor: float, applied: float):
        super().__init__(scale=applied)
        self.routed_scaling_factor = routed_scaling_factor


def test_a_routed_scaling_the_block_applies_after_its_router_is_in_the_routing_rule():
    net = Net(BlockScaledBlock(routed_scaling_factor=2.5, applied=2.5))
    program = _check_compiles_equal(net)
    (report,) = program.context.blocks
    assert (report.action, report.details["router"]) == ("replaced", "softmax-top2-renorm-x2.5")


def test_a_block_scaling_attribute_its_forward_does_not_apply_is_not_taken():
    (report,) = canonicalize(Net(BlockScaledBlock(routed_scaling_factor=2.5, applied=3.0)))
    assert report.path == "block.experts" and "closest max abs diff" in report.reason   # the block: left


class InputWeightedBlock(nn.Module):
    """Each routed slot's expert runs on weight x token (Llama 4's order, which differs from
    weight x expert(token)); returns [tokens, D] and the router logits, as Llama 4 does."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = StackedExperts()
        self.top_k = K

    def forward(self, x_BSD):
        x_TD = x_BSD.reshape(-1, D)
        logits_TE = self.gate(x_TD)
        weights_TK, ids_TK = logits_TE.sigmoid().topk(self.top_k, dim=-1)
        y_TD = torch.zeros_like(x_TD)
        for k in range(K):
            slot_TD = x_TD * weights_TK[:, k, None]
            y_TD = y_TD + self.experts(slot_TD, ids_TK[:, k:k + 1], torch.ones_like(x_TD[:, :1]))
        return y_TD, logits_TE


class TupleNet(Net):
    def forward(self, x):
        h = self.inp(x)
        y, logits = self.block(h)
        return self.out(h + y.view_as(h)), logits


def test_top_k_weights_on_the_experts_inputs_are_canonicalized():
    net = TupleNet(InputWeightedBlock())
    program = _check_compiles_equal(net)
    (report,) = program.context.blocks
    assert report.action == "replaced" and report.details["router"] == "sigmoid-top2"
    assert report.details["weights"] == "scale the experts' inputs"
    assert report.details["returns"] == "(output, router logits)"
    assert net.block.flat_output and net.block.extra_outputs == ("logits",)
    x = _x()
    (program(x)[0] ** 2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.block.parameters())


def test_biased_experts_are_canonicalized_with_their_bias():
    experts = StackedExperts(bias=True)
    with torch.no_grad():
        experts.b_in.normal_(generator=torch.Generator().manual_seed(3))    # a zero bias would prove nothing
    net = Net(SparseBlock(experts=experts))
    program = _check_compiles_equal(net)
    (report,) = program.context.blocks
    assert report.action == "replaced" and report.details["experts"].endswith("stacked views, up biases")
    assert net.block.expert_param_names == ["experts.w_in", "experts.w_out", "experts.b_in"]


def test_per_expert_scales_are_left_with_the_reason():
    experts = StackedExperts()
    experts.scale = nn.Parameter(torch.ones(E))          # an [E] parameter moe_experts has no place for
    (report,) = canonicalize(Net(SparseBlock(experts=experts)))
    assert report.action == "left" and "['scale'] besides the stacked weights" in report.reason


class WeightsFirstExperts(StackedExperts):
    """Experts called as ``experts(tokens, weights, ids)``."""

    def forward(self, x_TD, weights_TK, ids_TK):
        return super().forward(x_TD, ids_TK, weights_TK)


class CappedExperts(StackedExperts):
    """Experts that drop the slots past the first ``capacity`` of each expert (in slot order)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def forward(self, x_TD, ids_TK, weights_TK):
        one_hot_NE = F.one_hot(ids_TK.reshape(-1), E)
        place_N = (one_hot_NE.cumsum(0) * one_hot_NE).sum(-1) - 1
        return super().forward(x_TD, ids_TK, weights_TK * (place_N < self.capacity).view_as(weights_TK))


class TokenHashBlock(nn.Module):
    """Routes by the token ids the model passes it (DeepSeek-V4's hash layers): its forward takes
    more than the hidden states, so the block stays traced code; its experts take the routing (by
    name here)."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.experts = experts
        self.token_weights = nn.Parameter(torch.rand(8, K) + 0.5)

    def forward(self, x_BSD, token_ids_BS):
        ids_TK = torch.stack([(token_ids_BS.reshape(-1) + k) % E for k in range(K)], dim=-1)
        weights_TK = self.token_weights[token_ids_BS.reshape(-1) % 8]
        return self.experts(x_BSD.reshape(-1, D), ids_TK=ids_TK, weights_TK=weights_TK).reshape(x_BSD.shape)


class TokenHashNet(Net):
    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.block(h, x.argmax(-1)))


def test_experts_called_with_routing_are_canonical_in_a_left_block_and_train_like_eager():
    torch.manual_seed(5)
    net, eager = (TokenHashNet(TokenHashBlock(WeightsFirstExperts())) for _ in range(2))
    eager.load_state_dict(net.state_dict())
    program = _check_compiles_equal(net)
    (report,) = program.context.blocks
    assert (report.path, report.kind, report.action) == ("block.experts", "WeightsFirstExperts", "replaced")
    assert "left as it is: no child scores tokens against 4 experts" in report.reason    # why the block was
    assert net.block.experts.expert_param_names == ["w_in", "w_out"]
    (again,) = _check_compiles_equal(net).context.blocks
    assert (again.path, again.action) == ("block.experts", "canonical")
    _check_gradients_equal(program, net, eager)


def test_experts_that_drop_past_a_capacity_are_left_with_the_reason():
    """16 probe tokens on 4 experts spread to about 8 slots each; crowded onto the same 2 experts,
    16 each, past the capacity of 14 the experts drop at."""
    net = TokenHashNet(TokenHashBlock(CappedExperts(capacity=14)))
    take_left()
    assert recognize_routed_experts(net.block.experts, "block.experts") is None
    assert "when many tokens choose the same expert" in take_left()["block.experts"][1]
    assert [(r.path, r.action) for r in canonicalize(net)] == [("block", "left")]   # the outermost left is reported


class HeadMix(nn.Module):
    """Not experts: per-head 3-D weights, and a forward of three tensors (tokens, a scale, a bias)."""

    def __init__(self):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(E, D, FF) / D ** 0.5)
        self.w_out = nn.Parameter(torch.randn(E, FF, D) / FF ** 0.5)

    def forward(self, x_TD, scale_T2, bias_T2):
        h_THF = torch.einsum("td,hdf->thf", x_TD, self.w_in).relu()
        return torch.einsum("thf,hfd->td", h_THF, self.w_out) * scale_T2.mean() + bias_T2.float().mean()


class HeadExperts(HeadMix):
    """The same, named like experts."""


class MixNet(Net):
    def forward(self, x):
        h_TD = self.inp(x).reshape(-1, D)
        return self.out(self.block(h_TD, torch.ones_like(h_TD[:, :2]), torch.zeros_like(h_TD[:, :2])))


def test_a_module_of_three_tensors_and_3d_weights_is_reported_only_when_named_like_experts():
    program = _check_compiles_equal(MixNet(HeadMix()))
    assert program.context.blocks == []
    (report,) = _check_compiles_equal(MixNet(HeadExperts())).context.blocks
    assert (report.path, report.action) == ("block", "left")
    assert "it cannot run as experts(tokens [T, D], ids [T, K], weights [T, K])" in report.reason


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


class LogitsRouter(nn.Module):
    """Returns only its logits and grouping facts (no [T, K] ids/weights), like JetMoE's gating:
    softmax over the top-k logits, which is softmax-renorm."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(D, E, bias=False)
        self.top_k = K

    def forward(self, x_TD):
        logits_TE = self.layer(x_TD).float()
        top_logits_TK, ids_TK = logits_TE.topk(self.top_k, dim=1)
        order_N = ids_TK.flatten().argsort(stable=True)
        return order_N, top_logits_TK.softmax(-1).flatten()[order_N], logits_TE


class ExpertWeight(nn.Module):
    def __init__(self, rows: int, cols: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, rows, cols) / cols ** 0.5)


class SplitBlock(nn.Module):
    """JetMoE-shaped: experts split over two children, an output bias of the block's own, and a
    stateless activation child."""

    def __init__(self):
        super().__init__()
        self.router = LogitsRouter()
        self.input_linear = ExpertWeight(2 * FF, D)
        self.output_linear = ExpertWeight(D, FF)
        self.bias = nn.Parameter(torch.randn(D))
        self.activation = nn.SiLU()

    def forward(self, x_BSD):
        x_TD = x_BSD.reshape(-1, D)
        order_N, gates_N, _ = self.router(x_TD)
        token_N = order_N // K
        ids_N = self.router.layer(x_TD).topk(K, dim=1)[1].flatten()[order_N]
        h_NH = torch.einsum("nd,nhd->nh", x_TD[token_N], self.input_linear.weight[ids_N])
        gate, up = h_NH.chunk(2, dim=-1)
        y_ND = torch.einsum("nf,ndf->nd", self.activation(gate) * up, self.output_linear.weight[ids_N])
        y_TD = torch.zeros_like(x_TD).index_add(0, token_N, y_ND * gates_N[:, None])
        return (y_TD + self.bias).reshape(x_BSD.shape)


def test_split_experts_output_bias_and_a_logits_only_router_are_canonicalized():
    net = Net(SplitBlock())
    program = _check_compiles_equal(net)
    (report,) = program.context.blocks
    assert report.action == "replaced" and report.details["router"] == "softmax-top2-renorm"
    assert report.details["output_bias"] == "bias"
    assert net.block.expert_param_names == ["input_linear.weight", "output_linear.weight"]
    assert net.block.activation == "swiglu"        # the stateless SiLU child is computed, not adopted


class BiasArgRouter(nn.Module):
    """Takes a correction bias that lives on the block (MiniMax-M2), sigmoid scores, renormalised."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D))

    def forward(self, x_TD, correction_E):
        scores_TE = torch.sigmoid(F.linear(x_TD, self.weight).float())
        ids_TK = (scores_TE + correction_E).topk(K, dim=-1)[1]
        weights_TK = scores_TE.gather(1, ids_TK)
        return weights_TK / weights_TK.sum(-1, keepdim=True), ids_TK


class SharedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, FF, bias=False), nn.Linear(FF, D, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class BiasArgBlock(nn.Module):
    def __init__(self, average: bool = False):
        super().__init__()
        self.gate = BiasArgRouter()
        self.experts = StackedExperts()
        self.shared_experts = SharedMLP()
        self.register_buffer("e_score_correction_bias", torch.randn(E) * 0.1)
        self.average = average

    def forward(self, x_BSD):
        x_TD = x_BSD.reshape(-1, D)
        weights_TK, ids_TK = self.gate(x_TD, self.e_score_correction_bias)
        y_TD = self.experts(x_TD, ids_TK, weights_TK) + self.shared_experts(x_TD)
        return (y_TD / 2 if self.average else y_TD).reshape(x_BSD.shape)


@pytest.mark.parametrize("average", [False, True])
def test_router_taking_a_block_tensor_and_an_averaged_shared_expert(average):
    net = Net(BiasArgBlock(average))
    program = _check_compiles_equal(net)
    (report,) = program.context.blocks
    assert report.action == "replaced" and report.details["router"] == "sigmoid-top2-bias-renorm"
    assert report.details.get("output_scale") == (0.5 if average else None)
    assert net.block.router_spec.args == ("e_score_correction_bias",)


class Outer(nn.Module):
    """Looks like MoE to the name heuristic (it has ``experts``) but only its child is a block."""

    def __init__(self):
        super().__init__()
        self.experts = SparseBlock()
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        return self.proj(self.experts(x))


def test_a_module_holding_a_recognised_block_is_not_reported_as_left():
    reports = canonicalize(Net(Outer()))
    assert [(r.path, r.action) for r in reports] == [("block.experts", "replaced")]


@pytest.mark.parametrize("rows", [1, 5, 13])
def test_expert_linear_matches_its_reference_with_gradients(rows):
    from moesys_compile.frontend.recognizers.moa import expert_linear_reference

    gen = torch.Generator().manual_seed(rows)
    x_NI = torch.randn(rows, 6, generator=gen, requires_grad=True)
    w_EOI = torch.randn(E, 7, 6, generator=gen, requires_grad=True)
    ids_N = torch.randint(0, E, (rows,), generator=gen)
    y = torch.ops.moesys.expert_linear(x_NI, ids_N, w_EOI)
    want = expert_linear_reference(x_NI, ids_N, w_EOI)
    torch.testing.assert_close(y, want)
    grad_y = torch.randn(y.shape, generator=gen)
    got_grads = torch.autograd.grad(y, (x_NI, w_EOI), grad_y)
    want_grads = torch.autograd.grad(want, (x_NI, w_EOI), grad_y)
    for got, expected in zip(got_grads, want_grads):
        torch.testing.assert_close(got, expected)
