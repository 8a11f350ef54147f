"""``moesys-compile inspect``: per-layer config lists refitted to a new layer count, quoted DOT ids,
a factory's own example sizes, GraphModule's reserved names, and flags checked before lowering."""

import sys
import types

import pydot
import pytest
import torch
from torch import nn

import moesys_compile as mc
from moesys_compile.cli import main
from moesys_compile.errors import UntraceableModelError
from moesys_compile.models.hf import fit_layer_lists

transformers = pytest.importorskip("transformers")
from moesys_compile.models.hf import build_hf, hf_config  # noqa: E402


def run_cli(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# 1. a layer count override refits the preset's per-layer lists

def test_fit_layer_lists_repeats_cuts_and_keeps_index_patterns():
    base = {"num_hidden_layers": 2, "layer_types": ["sliding", "full"], "mlp_only_layers": [0]}
    assert fit_layer_lists(base, {"num_hidden_layers": 3}) == {
        "num_hidden_layers": 3, "layer_types": ["sliding", "full", "sliding"], "mlp_only_layers": [0, 2]}
    assert fit_layer_lists(base, {"num_hidden_layers": 1}) == {
        "num_hidden_layers": 1, "layer_types": ["sliding"], "mlp_only_layers": [0]}
    # a list the user sets is theirs, also under its alias
    mine = {"num_hidden_layers": 1, "layer_types": ["full"]}
    assert fit_layer_lists(base, mine) == {**mine, "mlp_only_layers": [0]}
    assert fit_layer_lists({"layers_block_type": ["moe", "attn"]}, {"num_hidden_layers": 1, "layer_types": ["attn"]},
                           {"layer_types": "layers_block_type"}) == {"num_hidden_layers": 1, "layer_types": ["attn"]}


@pytest.mark.parametrize("family,field", [("gpt_oss", "layer_types"), ("qwen3_next", "layer_types"),
                                          ("granitemoehybrid", "layer_types"), ("lfm2_moe", "layer_types"),
                                          ("axk1", "mlp_layer_types"), ("kimi_linear", "mlp_layer_types"),
                                          ("nemotron_h", "layers_block_type")])
@pytest.mark.parametrize("layers", [1, 3])
def test_num_hidden_layers_refits_the_presets_lists(family, field, layers):
    config = hf_config(family, {"num_hidden_layers": layers})
    assert config.num_hidden_layers == layers
    assert len(getattr(config, field)) == layers


def test_build_hf_with_three_layers_runs():
    model = build_hf("gpt_oss", num_hidden_layers=3).eval()
    assert len(model.model.layers) == 3
    with torch.no_grad():
        assert model(torch.randint(0, 128, (2, 8)), use_cache=False).logits.shape == (2, 8, 128)


def test_invalid_config_is_one_line_naming_config(capsys):
    code, _, err = run_cli(capsys, "inspect", "hf:gpt_oss", "--config", "num_hidden_layers=3",
                           "layer_types=['full_attention']")
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "hf:gpt_oss: invalid config" in err and "--config" in err and "layer_types" in err


def test_inspect_one_layer_gpt_oss(capsys):
    code, out, err = run_cli(capsys, "inspect", "hf:gpt_oss", "--config", "num_hidden_layers=1", "--after", "capture")
    assert code == 0, err
    assert "model.layers.1" not in out and "after capture" in out


# 2. DOT keywords as node names

class KeywordNames(nn.Module):
    def __init__(self):
        super().__init__()
        self.node, self.edge, self.strict = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.strict(self.edge(self.node(x)))


@pytest.fixture
def user_module(monkeypatch):
    module = types.ModuleType("sweep2_models")
    module.keywords = lambda: (KeywordNames(), (torch.randn(2, 4, 8),))
    module.fixed = lambda: (KeywordNames(), (torch.randn(2, 4, 8),))
    module.graph_attr = lambda: (GraphAttr(), (torch.randn(2, 4, 8),))
    monkeypatch.setitem(sys.modules, "sweep2_models", module)
    return module


def test_dot_quotes_keyword_node_ids(capsys, user_module):
    code, out, err = run_cli(capsys, "inspect", "sweep2_models:keywords", "--after", "capture", "--format", "dot")
    assert code == 0, err
    graph = pydot.graph_from_dot_data(out)[0]
    names = {node.get_name() for node in graph.get_nodes()}
    assert {'"node"', '"edge"', '"strict"', '"x"', '"output"'} <= names
    assert len(graph.get_edges()) == 4


# 3. --batch / --seq and a factory's own example inputs

def test_fixed_example_keeps_its_sizes_and_says_so(capsys, user_module):
    code, out, err = run_cli(capsys, "inspect", "sweep2_models:fixed", "--batch", "8", "--seq", "3",
                             "--after", "capture")
    assert code == 0, err
    assert "B=2, S=4" in out and "B=8" not in out
    assert "--batch 8 and --seq 3 ignored" in err


def test_example_inputs_method_honours_batch_and_seq(capsys, user_module):
    class WithHook(KeywordNames):
        def example_inputs(self, batch, seq):
            return (torch.randn(batch, seq, 8),)
    user_module.hooked = lambda: (WithHook(), (torch.randn(2, 4, 8),))
    code, out, err = run_cli(capsys, "inspect", "sweep2_models:hooked", "--batch", "5", "--seq", "3",
                             "--after", "capture")
    assert code == 0, err
    assert "B=5, S=3" in out and "ignored" not in err


# 4. a submodule named like a GraphModule attribute

class GraphAttr(nn.Module):
    def __init__(self):
        super().__init__()
        self.graph = nn.Linear(8, 8)

    def forward(self, x):
        return self.graph(x)


def test_reserved_submodule_name_is_named_with_the_fix(capsys, user_module):
    code, _, err = run_cli(capsys, "inspect", "sweep2_models:graph_attr")
    assert code == 2
    assert "'graph' (submodule Linear)" in err and "rename" in err and "self.graph_proj" in err
    assert "data-dependent" not in err
    with pytest.raises(UntraceableModelError, match="'graph'"):
        mc.trace(GraphAttr(), (torch.randn(2, 4, 8),))


# 5. --after and --format svg are checked before lowering

def test_bad_after_fails_before_lowering(capsys, monkeypatch):
    monkeypatch.setattr("moesys_compile.api.lower", lambda *a, **k: pytest.fail("lowered before --after was checked"))
    code, _, err = run_cli(capsys, "inspect", "tiny-moe", "--after", "nosuch")
    assert code == 2 and "--after 'nosuch': no such stage" in err and "capture" in err


def test_svg_without_graphviz_fails_before_lowering(capsys, monkeypatch):
    monkeypatch.setattr("moesys_compile.report.shutil.which", lambda name: None)
    monkeypatch.setattr("moesys_compile.api.lower", lambda *a, **k: pytest.fail("lowered before dot was checked"))
    code, _, err = run_cli(capsys, "inspect", "tiny-moe", "--format", "svg")
    assert code == 2 and "Graphviz" in err
