"""What compiling a deep model costs, by structure rather than by the clock: identical MoE layers
are probed once (and only identical ones share that probe), per-layer formulas and graph orders are
built once, an unchanged node is not printed to tell so, and the frontend's stages are timed."""

from __future__ import annotations

import copy
import json
import operator
import sys

import pytest
import torch
import torch.fx as fx

import moesys_compile as mc
from moesys_compile.frontend.canonicalize import structure_key


@pytest.fixture()
def probes(monkeypatch):
    """The number of block probes run so far (one per block the routed-block recognizer probes)."""
    hf = sys.modules["moesys_compile.frontend.recognizers.hf"]
    count = [0]
    probe_forms = hf._probe_forms

    def counted(*args, **kwargs):
        count[0] += 1
        return probe_forms(*args, **kwargs)
    monkeypatch.setattr(hf, "_probe_forms", counted)
    return count


def _qwen3(layers: int):
    pytest.importorskip("transformers")
    from moesys_compile.models.hf import build_hf
    return build_hf("qwen3_moe", num_hidden_layers=layers)


def test_identical_layers_of_a_model_in_memory_are_probed_once(probes):
    from moesys_compile.frontend.recognizers import canonicalize
    model = _qwen3(4)
    originals = [copy.deepcopy(layer.mlp) for layer in model.model.layers]
    own_weights = [layer.mlp.experts.gate_up_proj for layer in model.model.layers]
    reports = canonicalize(model)
    assert probes[0] == 1
    assert [(r.path, r.action) for r in reports] == [(f"model.layers.{i}.mlp", "replaced") for i in range(4)]
    x_BSD = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for layer, original, weight in zip(model.model.layers, originals, own_weights):
        assert layer.mlp.experts.gate_up_proj is weight          # each twin is built on its own block
        with torch.no_grad():
            torch.testing.assert_close(layer.mlp(x_BSD), original(x_BSD), rtol=1e-5, atol=1e-6)


def test_layers_that_differ_in_top_k_or_a_router_flag_are_probed_on_their_own(probes):
    from moesys_compile.frontend.recognizers import canonicalize
    model = _qwen3(4)
    model.model.layers[2].mlp.gate.top_k = 1
    model.model.layers[3].mlp.gate.norm_topk_prob = not model.config.norm_topk_prob
    reports = canonicalize(model)
    assert probes[0] == 3
    assert [r.details["top_k"] for r in reports] == [2, 2, 1, 2]
    rules = [layer.mlp.router_spec for layer in model.model.layers]
    assert rules[0].renormalize == model.config.norm_topk_prob and rules[3].renormalize != rules[0].renormalize


def test_the_structure_key_tells_config_values_hooks_and_tensor_attributes_apart():
    model = _qwen3(2)
    first, second = (layer.mlp for layer in model.model.layers)
    assert structure_key(first) == structure_key(second)

    second.experts.config = copy.deepcopy(first.experts.config)     # an equal config: still twins
    assert structure_key(first) == structure_key(second)
    second.experts.config.hidden_act = "gelu"
    assert structure_key(first) != structure_key(second)
    second.experts.config = first.experts.config

    def scaling_hook(scale):
        return lambda module, args, output: output * scale
    hooked = first.register_forward_hook(scaling_hook(1.0))
    second_hook = second.register_forward_hook(scaling_hook(1.0))
    assert structure_key(first) == structure_key(second)            # one factory, the same captured values
    second_hook.remove()
    second_hook = second.register_forward_hook(scaling_hook(2.0))
    assert structure_key(first) != structure_key(second)
    hooked.remove(), second_hook.remove()

    first.gate.scale, second.gate.scale = torch.tensor(1.0), torch.tensor(1.0)   # plain tensor attributes
    assert structure_key(first) == structure_key(second)
    second.gate.scale = torch.tensor(0.5)
    assert structure_key(first) != structure_key(second)
    second.gate.scale = first.gate.scale

    second.to(torch.float64)
    assert structure_key(first) != structure_key(second)


def test_the_expert_scratch_formula_is_built_once_per_shape(monkeypatch):
    import sympy
    from moesys_compile.kernels.experts import forward_scratch_bytes
    built = [0]
    smaller = sympy.Min

    def counted(*args):
        built[0] += 1
        return smaller(*args)
    monkeypatch.setattr(sympy, "Min", counted)
    rows = sympy.Symbol("rows_of_one_layer") * 2
    kwargs = dict(save_h=False, impl="any", threads=2, activation="swiglu")
    first = forward_scratch_bytes(rows, 64, 32, 64, 4, True, **kwargs)
    assert built[0] > 0
    once = built[0]
    assert forward_scratch_bytes(rows, 64, 32, 64, 4, True, **kwargs) == first
    assert built[0] == once


def test_state_reads_are_sunk_with_one_read_of_the_node_order(monkeypatch):
    ring_units = sys.modules["moesys_compile.passes.ring_units"]
    reads = [0]
    position = ring_units._position

    def counted(gm):
        reads[0] += 1
        return position(gm)
    monkeypatch.setattr(ring_units, "_position", counted)

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return ((x * self.w + self.b) * self.w + self.b) * self.w

    gm = fx.symbolic_trace(Tied())
    assert ring_units.sink_state_reads(gm) == 3          # w read by three nodes, b by two: one new read each
    assert reads[0] == 1
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            (user,) = node.users
            assert node.next is user
    torch.testing.assert_close(gm(torch.full((3,), 2.0)), Tied()(torch.full((3,), 2.0)))


class _Printed:
    """A constant argument that counts how often it is printed."""
    count = 0

    def __repr__(self) -> str:
        _Printed.count += 1
        return "_Printed()"


def test_an_unchanged_graph_is_told_without_printing_its_arguments():
    from moesys_compile.pipeline import graph_changed, graph_fingerprint
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_function(operator.add, (x, _Printed()))
    graph.output(y)
    gm = fx.GraphModule(torch.nn.Module(), graph)
    before = graph_fingerprint(gm)
    _Printed.count = 0
    assert not graph_changed(before, gm)
    assert _Printed.count == 0
    y.args = tuple(y.args)                               # new args, equal: no change
    assert not graph_changed(before, gm)
    y.args = (x, 1.0)
    assert graph_changed(before, gm)


def test_the_frontend_stages_are_timed_and_shown_by_inspect_json():
    from moesys_compile.report import Renderer
    model = mc.models.build("tiny-moe", n_layers=2)
    _, ctx = mc.lower(model, mc.Plan(), (torch.randint(0, 256, (2, 8)),))
    seconds = ctx.frontend_seconds
    assert set(seconds) == {"canonicalize", "capture", "annotate"}
    assert all(value > 0 for value in seconds.values())
    capture = ctx.snapshots[0]
    assert capture.stage == "capture" and capture.seconds == pytest.approx(sum(seconds.values()))
    shown = json.loads(Renderer(ctx, 2, 8).json())
    assert shown["frontend_seconds"] == pytest.approx(seconds)
    assert shown["snapshots"][0]["seconds"] > 0
