"""Capture and annotation: structure on small graphs, symbolic costs, the export fallback, and
the error for models neither tracer can take."""

import pytest
import sympy
import torch
from torch import nn

import moesys_compile as mc
from moesys_compile.frontend import B, S, canonicalize
from moesys_compile.ir import is_op


def _ids(batch=2, seq=8, vocab=256):
    return torch.randint(0, vocab, (batch, seq))


def test_each_moe_layer_is_one_canonical_node_with_its_router():
    model = mc.models.build("tiny-moe", n_layers=3)
    gm = mc.trace(model, (_ids(),))
    nodes = list(gm.graph.nodes)
    experts = [n for n in nodes if is_op(n, "moe_experts")]
    routes = [n for n in nodes if is_op(n, "route")]
    assert len(experts) == len(routes) == 3
    assert [n.meta["moesys"]["layer"] for n in experts] == [0, 1, 2]
    for route, expert in zip(routes, experts):      # routing feeds its own layer's experts
        assert route in {a.args[0] for a in expert.all_input_nodes if a.op == "call_function" and a.args}


def test_every_node_has_val_and_symbolic_cost():
    model = mc.models.build("tiny-moe", n_layers=2)
    gm = mc.trace(model, (_ids(3, 5),))
    for node in gm.graph.nodes:
        if node.op != "output":
            assert "val" in node.meta, node.name
        assert "cost" in node.meta["moesys"], node.name
    expert = next(n for n in gm.graph.nodes if is_op(n, "moe_experts"))
    flops = expert.meta["moesys"]["cost"].flops
    assert flops.free_symbols == {B, S}
    # T*K slots, each: 2*D*H up + 2*F*D down + H activation, D=64, F=64 (moe_ffn_dim), H=128, K=2
    assert sympy.simplify(flops - B * S * 2 * (2 * 64 * 128 + 2 * 64 * 64 + 128)) == 0
    attention = next(n for n in gm.graph.nodes if "scaled_dot_product" in str(n.target))
    assert attention.meta["moesys"]["cost"].flops.as_poly(S).degree() == 2


def test_cost_values_follow_batch_and_sequence():
    model = mc.models.build("tiny-gpt", n_layers=1)
    gm = mc.trace(model, (_ids(2, 8),))
    head = next(n for n in gm.graph.nodes if n.target == "lm_head")
    cost = head.meta["moesys"]["cost"]
    assert cost.evaluate(4, 10)["flops"] == 2 * 4 * 10 * 64 * 256
    assert cost.evaluate(4, 10)["param_bytes"] == 256 * 64 * 4
    assert cost.evaluate(1, 1)["activation_bytes"] == 256 * 4


def test_tied_weights_are_counted_once():
    model = mc.models.build("tiny-gpt", n_layers=1, tie_embeddings=True)
    gm = mc.trace(model, (_ids(),))
    total = sum(n.meta["moesys"]["cost"].evaluate(1, 1)["param_bytes"] for n in gm.graph.nodes)
    assert total == sum(p.numel() * 4 for p in model.parameters()) + sum(b.numel() * 4 for b in model.buffers())


class ShapeBranch(nn.Module):
    """fx cannot evaluate `if` on a traced size; torch.export can."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.moe = mc.nn.MoE(8, 16, num_experts=4, top_k=2)

    def forward(self, x):
        if x.shape[1] > 1:
            x = x + self.proj(x)
        return self.moe(x)


def test_export_fallback_keeps_canonical_ops_and_parameters():
    model = ShapeBranch()
    x = torch.randn(2, 5, 8)
    program = mc.compile(model, mc.Plan(), example_inputs=(x,))
    assert program.context.capture == "export"
    captured = program.context.snapshots[0].nodes
    assert sum(r.target == "moesys.moe_experts" for r in captured) == 1
    torch.testing.assert_close(program(x), model(x))
    other = torch.randn(3, 7, 8)                      # export captured batch and sequence as dynamic
    torch.testing.assert_close(program(other), model(other))
    model_params = {id(p) for p in model.parameters()}
    assert {id(p) for p in program.parameters()} <= model_params


class Router(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(8, 4)

    def forward(self, x):
        logits = self.gate(x)
        if logits.sum() > 0:           # data-dependent: neither fx nor export can capture this
            logits = logits * 2
        return logits


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = Router()

    def forward(self, x):
        return x + self.router(x).mean(-1, keepdim=True)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_untraceable_model_error_names_module_line_construct_and_fix(capsys):
    with pytest.raises(mc.UntraceableModelError) as info:
        mc.trace(DataDependent(), (torch.randn(2, 8),))
    assert "def forward" not in capsys.readouterr().err      # torch.export's dump of the graph it gave up on
    message = str(info.value)
    assert "'blocks.0.router'" in message
    assert "test_trace.py" in message and "if logits.sum() > 0" in message
    assert "control flow" in message
    assert "leaf_modules=['blocks.0.router']" in message


def test_leaf_module_makes_the_model_traceable():
    model = DataDependent()
    x = torch.randn(2, 8)
    leaves = [f"blocks.{i}.router" for i in range(3)]
    program = mc.compile(model, mc.Plan(leaf_modules=leaves), example_inputs=(x,))
    assert program.context.capture == "fx"
    assert {n.target for n in program.graph_module.graph.nodes if n.op == "call_module"} == set(leaves)
    torch.testing.assert_close(program(x), model(x))


def test_canonicalize_reports_canonical_blocks_and_leaves_unknown_moe_like_modules():
    class HomeMadeMoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(4, 2)
            self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

        def forward(self, x):
            return sum(e(x) for e in self.experts)

    model = nn.Sequential(mc.nn.MoE(4, 8, 4, 2), HomeMadeMoE())
    reports = {r.path: r for r in canonicalize(model)}
    assert reports["0"].action == "canonical" and reports["0"].details["num_experts"] == 4
    assert reports["1"].action == "left" and reports["1"].reason
