"""Misuse a first-time user tries: a plan given as a string or a dict, example inputs given as a
dict of keywords or on the meta device, a train plan with fields only the ring reads, nonsense
model sizes, and the command line's --version, --out and factories. Each is refused up front,
naming the field or argument and the fix, or does what was meant."""

from __future__ import annotations

import copy

import re
import sys

import numpy as np
import pytest
import torch
from torch import nn

import moesys_compile as mc
from moesys_compile.cli import main as cli_main


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.moe = mc.nn.MoE(dim=8, ffn_dim=6, num_experts=4, top_k=2)

    def forward(self, x):
        return self.moe(self.inp(x))


class DictNet(Net):
    """forward takes one dict of tensors (a batch)."""

    def forward(self, batch):
        return self.moe(self.inp(batch["features"]) * batch["scale"])


X = torch.randn(2, 3, 5)


# -- compile's arguments ---------------------------------------------------------------------------


def test_a_dict_of_forward_parameters_as_example_inputs_is_refused_naming_example_kwargs():
    with pytest.raises(mc.UntraceableModelError, match=r"example_inputs is a dict of Net.forward's parameters "
                                                       r"\('x'\); pass keyword inputs as example_kwargs"):
        mc.compile(Net(), mc.Plan(), example_inputs={"x": X})
    model = Net()
    program = mc.compile(model, mc.Plan(), example_kwargs={"x": X})
    torch.testing.assert_close(program(x=X), model(X))


@pytest.mark.parametrize("wrap", [lambda batch: (batch,), lambda batch: batch], ids=["in_a_tuple", "alone"])
def test_a_dict_that_forward_takes_as_one_argument_is_an_example_input(wrap):
    model = DictNet()
    batch = {"features": X, "scale": torch.tensor(2.0)}
    program = mc.compile(model, mc.Plan(), example_inputs=wrap(batch))
    torch.testing.assert_close(program(batch), model(batch))


@pytest.mark.parametrize("plan,fix", [("train", "mc.Plan(mode='train')"), ("plan.yaml", "mc.Plan.from_file('plan.yaml')"),
                                      (3, "mc.Plan(mode='train', ...)")])
def test_a_plan_that_is_not_a_plan_is_refused_with_the_constructor(plan, fix):
    with pytest.raises(mc.PlanError, match=r"plan must be a moesys_compile.Plan, not \w+ .*pass " + re.escape(fix)):
        mc.compile(Net(), plan, example_inputs=(X,))


def test_a_plan_given_as_a_dict_is_the_plan_of_those_fields():
    program = mc.compile(Net(), {"mode": "train", "capacity_factor": 0}, example_inputs=(X,))
    assert program.plan == mc.Plan(mode="train", capacity_factor=0)
    with pytest.raises(mc.PlanError, match=r"plan \(a dict\): unknown plan field\(s\) \['expert_paralel'\]"):
        mc.lower(Net(), {"expert_paralel": 2}, (X,))


def test_example_inputs_on_the_meta_device_are_refused():
    with pytest.raises(mc.UntraceableModelError, match=r"1 example input tensor\(s\) are on the meta device "
                                                       r"\(the first of shape \(2, 3, 5\)\).*give real tensors"):
        mc.compile(Net(), mc.Plan(), example_inputs=(torch.empty(2, 3, 5, device="meta"),))
    with pytest.raises(mc.UntraceableModelError, match="on the meta device"):
        mc.trace(Net(), (), {"x": torch.empty(2, 3, 5, device="meta")})


# -- plan fields a train plan would ignore ---------------------------------------------------------


@pytest.mark.parametrize("fields,named", [
    (dict(device_budget="1KiB"), "device_budget (1024)"),
    (dict(ring_slots=3), "ring_slots (3)"),
    (dict(weights="disk", offload_dir="/tmp/ring"), "weights ('disk')"),
    (dict(offload_dir="/tmp/ring"), "offload_dir ('/tmp/ring')"),
    (dict(weights_checkpoint="/tmp"), "weights_checkpoint ('/tmp')"),
    (dict(options={"typo_option": 1}), "options ({'typo_option': 1})"),
])
def test_a_train_plan_refuses_the_fields_only_ring_inference_reads(fields, named):
    with pytest.raises(mc.PlanError, match=re.escape(named) + r" applies to mode='infer' \(ring inference\), "
                                           r"and a train plan ignores it: drop"):
        mc.Plan(mode="train", **fields)
    assert mc.Plan(mode="infer", **{"device_budget": "1MiB", **fields}).mode == "infer"     # the ring reads it


def test_options_are_refused_with_the_known_ones_where_no_ring_reads_them():
    for mode in ("train", "infer"):
        with pytest.raises(mc.PlanError, match=r"drop options \(only ring inference reads options: "
                                               r"progress, ring_workspace\)"):
            mc.Plan(mode=mode, options={"progress": True})


def test_leaf_modules_are_module_paths_or_classes():
    with pytest.raises(mc.PlanError, match=r"leaf_modules entry 3 must be a module path .* or an nn.Module class"):
        mc.Plan(leaf_modules=[3])
    assert mc.Plan(leaf_modules=["layers.0.router", nn.Linear]).leaf_modules == ("layers.0.router", nn.Linear)


# -- built-in model configs ------------------------------------------------------------------------


@pytest.mark.parametrize("override,message", [
    (dict(n_layers=-1), "ModelConfig.n_layers (-1) must be an integer >= 1"),
    (dict(n_heads=0), "ModelConfig.n_heads (0) must be an integer >= 1"),
    (dict(dim=-8), "ModelConfig.dim (-8) must be an integer >= 1"),
    (dict(dim=64.0), "ModelConfig.dim (64.0) must be an integer >= 1"),
    (dict(num_experts=-1), "ModelConfig.num_experts (-1) must be an integer >= 0"),
    (dict(moe_ffn_dim=0), "ModelConfig.moe_ffn_dim (0) must be an integer >= 1 or None (ffn_dim)"),
    (dict(norm_eps=0.0), "ModelConfig.norm_eps (0.0) must be a finite number > 0"),
    (dict(aux_loss_coef=-0.1), "ModelConfig.aux_loss_coef (-0.1) must be a finite number >= 0"),
])
def test_nonsense_model_sizes_are_refused_naming_the_field(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        mc.models.build("tiny-moe", **override)


# -- command line ----------------------------------------------------------------------------------


def test_version_is_printed(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"moesys-compile {mc.__version__}"


def test_out_that_is_a_file_or_cannot_be_made_is_refused_before_any_work(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("the user's file")
    for out, why in ((taken, "is a file, not a directory; pass a directory"),
                     (taken / "sub", "cannot create the directory")):
        assert cli_main(["inspect", "tiny-moe", "--config", "n_layers=1", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--out {str(out)!r}" in err and why in err
    assert taken.read_text() == "the user's file"


def test_out_directory_is_made_and_written(tmp_path, capsys):
    out = tmp_path / "a" / "b"
    for _ in range(2):     # the second run replaces the first's file
        assert cli_main(["inspect", "tiny-moe", "--config", "n_layers=1", "--after", "capture", "--out", str(out)]) == 0
    assert "after capture" in (out / "inspect.txt").read_text() and capsys.readouterr().err == ""


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "misuse_factories.py").write_text(
        "import torch, moesys_compile as mc\n"
        "not_a_factory = 3\n"
        "def pair_dict():\n"
        "    return mc.models.build('tiny-moe', n_layers=1), {'ids_BS': torch.randint(0, 256, (2, 7))}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "misuse_factories"
    sys.modules.pop("misuse_factories", None)


@pytest.mark.parametrize("attr,message", [
    ("not_a_factory", "misuse_factories:not_a_factory is int 3, not a factory: name a function or class"),
    ("pair_dict", "misuse_factories:pair_dict returned (model, dict): the example inputs are given to forward "
                  "positionally; return (model, (ids, ...))"),
])
def test_a_factory_that_cannot_give_a_model_and_inputs_is_named(factories, attr, message, capsys):
    assert cli_main(["inspect", f"{factories}:{attr}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_nonsense_config_on_the_command_line_is_refused(capsys):
    assert cli_main(["inspect", "tiny-moe", "--config", "n_layers=-1"]) == 2
    assert "ModelConfig.n_layers (-1) must be an integer >= 1" in capsys.readouterr().err


def test_plan_dtype_float32_is_applied_not_taken_for_unset():
    """``dtype=None`` (the default) keeps the model's dtype; an explicit "float32" casts a
    bfloat16 model's streamed weights in the ring, and is refused by a train plan, as
    "bfloat16" is on a float32 model."""
    from moesys_compile.infer import model_bytes

    model = mc.models.build("tiny-moe").eval()
    want = copy.deepcopy(model).to(torch.bfloat16).float()
    model.to(torch.bfloat16)
    ids = torch.randint(0, 256, (2, 8))
    assert mc.Plan().dtype is None and mc.Plan().torch_dtype is None
    program = mc.compile(model, mc.Plan(mode="infer", device_budget=2 * model_bytes(model), dtype="float32"),
                         example_inputs=(ids,))
    with torch.no_grad():
        out = program(ids)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, want(ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(mc.PlanError, match=r"dtype \('float32'\) is not applied in train mode.*bfloat16"):
        mc.compile(model, mc.Plan(mode="train", dtype="float32"), example_inputs=(ids,))


def test_a_padding_mask_of_another_length_and_a_missing_traced_input_name_the_fix():
    pytest.importorskip("transformers")
    from moesys_compile.models.hf import build_hf

    ids = torch.randint(0, 100, (2, 6))
    example = dict(input_ids=ids, attention_mask=torch.ones(2, 6, dtype=torch.long),
                   position_ids=torch.arange(6).expand(2, 6))
    program = mc.compile(build_hf("qwen3_moe").eval(), mc.Plan(mode="train"), example_kwargs=example)
    with pytest.raises(ValueError, match=r"attention_mask is \(2, 5\) but input_ids is \(2, 6\)"):
        program(ids, attention_mask=torch.ones(2, 5, dtype=torch.long), position_ids=example["position_ids"])
    with pytest.raises(TypeError, match=r"missing argument\(s\) \['position_ids'\], which the example gave.*compile "
                                        r"without them"):
        program(ids)


@pytest.mark.parametrize("field, value, message", [
    ("dim", 0, r"MoE dim \(0\) must be an int >= 1"),
    ("ffn_dim", 0, r"MoE ffn_dim \(0\) must be an int >= 1"),
    ("num_shared_experts", -1, r"MoE num_shared_experts \(-1\) must be an int >= 0"),
    ("top_k", 2.0, r"MoE top_k \(2.0\) must be an int in \[1, num_experts \(4\)\]"),
    ("score_func", "tanh", r"MoE score_func \('tanh'\) must be one of \['sigmoid', 'softmax'\]"),
    ("aux_loss_coef", -1.0, r"MoE aux_loss_coef \(-1.0\) must be a finite number >= 0"),
])
def test_moe_layer_arguments_are_refused_at_construction(field, value, message):
    arguments = dict(dim=8, ffn_dim=8, num_experts=4, top_k=2)
    with pytest.raises(ValueError, match=message):
        mc.nn.MoE(**{**arguments, field: value})
    assert mc.nn.MoE(**{**arguments, "num_experts": np.int64(4)}).num_experts == 4   # a config's numpy int


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_a_model_with_inference_tensors_is_refused_naming_the_first(mode):
    """Built or given a buffer under ``torch.inference_mode``: one line naming the tensor and the
    fix (capture failed in shape propagation: "cannot be saved for backward")."""
    model = mc.models.build("tiny-moe")
    with torch.inference_mode():
        model.rope_cos = model.rope_cos.clone()
    plan = mc.Plan(mode="infer", device_budget="400KiB") if mode == "infer" else mc.Plan(mode="train")
    with pytest.raises(TypeError, match=r"rope_cos of Transformer is an inference tensor \(made under torch\."
                                        r"inference_mode\), which a capture cannot use; build or load the model"):
        mc.compile(model, plan, example_inputs=(torch.randint(0, 256, (2, 8)),))
