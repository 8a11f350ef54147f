"""Rough edges found by the third documentation/CLI sweep: flags that were accepted and did the
wrong thing (``--clip -1``, ``--ckpt-every -1``, budgets of a fraction of a byte), errors that named
a Plan field or the wrong culprit instead of what the user typed, and README statements that had
drifted from the code. Tiny models, one step at most."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

import moesys_compile as mc
from moesys_compile import PlanError, infer, kernels, train
from moesys_compile.cli import _inspect_parser, main as cli_main
from moesys_compile.models.spec import load_model
from moesys_compile.passes import PIPELINES
from moesys_compile.plan import Plan, parse_bytes

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
TRAIN = ["--model", "tiny-moe", "--override", "n_layers=1", "--batch-size", "2", "--seq-len", "8", "--log-every", "0"]


@pytest.fixture
def no_launch(monkeypatch):
    """Run ``train.main`` in this process as rank 0 of one; launching ranks fails the test."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(train, "launch", lambda *a, **k: pytest.fail("ranks were launched"))


def error_of(capsys, entry, argv) -> str:
    assert entry(argv) == 2
    return capsys.readouterr().err


# -- 1. --clip ---------------------------------------------------------------------------------------


def test_train_refuses_a_negative_clip_before_any_step(no_launch, monkeypatch, capsys):
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("the model was built before the check"))
    assert "--clip (-1.0) must be >= 0 (0: off)" in error_of(capsys, train.main, TRAIN + ["--clip", "-1"])


@pytest.mark.parametrize("max_norm", [-1.0, float("nan"), float("inf")])
def test_clip_grad_norm_refuses_a_negative_or_non_finite_max_norm(max_norm):
    model = mc.models.build("tiny-moe", n_layers=1)
    ids = torch.randint(0, 256, (2, 8))
    program = mc.compile(model, Plan(mode="train"), example_inputs=(ids,))
    program(ids).sum().backward()
    grads = [p.grad.clone() for p in program.parameters() if p.grad is not None]
    with pytest.raises(ValueError, match=r"max_norm \(.*\) must be a finite number >= 0"):
        program.clip_grad_norm_(max_norm)
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, [p for p in program.parameters() if p.grad is not None]))


# -- 2. --config that no longer fits a directory's weights ------------------------------------------


@pytest.fixture(scope="module")
def olmoe_dir(tmp_path_factory):
    from moesys_compile.models.hf import build_hf
    path = tmp_path_factory.mktemp("hf") / "olmoe6"
    build_hf("olmoe", num_experts=6, num_hidden_layers=1).save_pretrained(path)
    return str(path)


def test_an_override_that_breaks_a_directory_is_named_and_transformers_report_is_held(olmoe_dir, capfd):
    assert cli_main(["inspect", olmoe_dir, "--config", "num_experts=3", "--after", "capture"]) == 2
    err = capfd.readouterr().err
    assert "--config num_experts=3 changes config.json's num_experts (6)" in err and "drop the override" in err
    assert "save the directory again" not in err
    assert "MISMATCH" not in err and "LOAD REPORT" not in err


def test_a_streamed_directory_that_an_override_breaks_names_the_override(olmoe_dir, capsys):
    err = error_of(capsys, infer.main, [olmoe_dir, "--config", "num_experts=3", "--budget", "1MiB", "--no-compare",
                                        "--max-new-tokens", "0"])
    assert re.search(r"holds 6 tensor\(s\) 'mlp\.experts\.\*\.[\w.]+' for 'model\.layers\.0\.mlp\.experts\.\w+', "
                     r"which stacks 3 experts", err)
    assert "--config num_experts=3 changes config.json's num_experts (6), the likely cause: drop the override" in err


# -- 3. --ckpt-every, --log-every ------------------------------------------------------------------


@pytest.mark.parametrize("flag,zero", [("--ckpt-every", "only at the end"), ("--log-every", "no step lines")])
def test_train_refuses_negative_step_intervals(no_launch, tmp_path, capsys, flag, zero):
    err = error_of(capsys, train.main, TRAIN + ["--ckpt-dir", str(tmp_path / "ckpt"), flag, "-1"])
    assert f"{flag} (-1) must be >= 0 (0: {zero})" in err
    assert not list((tmp_path / "ckpt").glob("step_*"))


def test_log_every_zero_prints_no_step_line_as_its_help_says(no_launch, capsys):
    assert "(0: no step lines)" in train.build_parser()._option_string_actions["--log-every"].help
    assert train.main(TRAIN + ["--steps", "2"]) == 0
    assert not re.search(r"^step ", capsys.readouterr().out, re.MULTILINE)


# -- 4. sizes and numbers in a plan -----------------------------------------------------------------


@pytest.mark.parametrize("budget,message", [
    (0.5, "device_budget (0.5) is not a whole number of bytes"),
    (1.9, "device_budget (1.9) is not a whole number of bytes"),
    ("1.5", "device_budget ('1.5') is not a whole number of bytes"),
    ("0.0001KiB", "device_budget ('0.0001KiB') is less than one byte"),
    (float("nan"), "device_budget (nan) must be a finite size"),
    (float("inf"), "device_budget (inf) must be a finite size"),
    ("1e400", "device_budget ('1e400') must be a finite size"),
])
def test_a_budget_that_is_no_whole_finite_byte_count_is_refused(budget, message):
    with pytest.raises(PlanError) as info:
        Plan(mode="infer", device_budget=budget)
    assert message in str(info.value)


@pytest.mark.parametrize("budget,value", [(1e9, 10**9), ("1e9", 10**9), ("2E3KiB", 2_048_000), ("0.5GiB", 2**29)])
def test_budgets_in_scientific_notation_and_whole_floats_are_sizes(budget, value):
    assert parse_bytes(budget) == value


def test_a_plan_file_reads_scientific_notation_and_names_itself_in_field_errors(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("mode: infer\ndevice_budget: 1e9\nbucket_mb: 1e2\n")       # YAML reads 1e9 as a string
    plan = Plan.from_file(path)
    assert (plan.device_budget, plan.bucket_mb) == (10**9, 100)
    path.write_text("mode: train\nworld_size: '2'\n")
    with pytest.raises(PlanError, match=rf"^{re.escape(str(path))}: world_size \('2'\) must be a positive integer"):
        Plan.from_file(path)


def test_options_that_are_no_mapping_are_refused_by_name(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("mode: infer\ndevice_budget: 1MiB\noptions: [progress]\n")
    with pytest.raises(PlanError, match=r"options \(\['progress'\]\) must be a mapping"):
        Plan.from_file(path)


# -- 5. a factory's parameters --------------------------------------------------------------------


def test_a_config_pair_a_factory_does_not_take_is_named_with_its_parameters(tmp_path, monkeypatch, capsys):
    (tmp_path / "sweep3_factory.py").write_text(
        "import moesys_compile as mc\n"
        "def factory(experts=4, top_k=2):\n"
        "    return mc.models.build('tiny-moe', n_layers=1, num_experts=experts, top_k=top_k)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    err = error_of(capsys, cli_main, ["inspect", "sweep3_factory:factory", "--config", "bogus=1"])
    assert "--config bogus: sweep3_factory:factory has no such parameter; its parameters: experts=4, top_k=2" in err
    assert load_model("sweep3_factory:factory", {"experts": 2}).model.config.num_experts == 2
    sys.modules.pop("sweep3_factory", None)


# -- 6. the flags typed, not the Plan fields -------------------------------------------------------


def test_infer_names_the_budget_and_slots_flags(capsys):
    err = error_of(capsys, infer.main, ["tiny-moe", "--config", "n_layers=1", "--budget", "1KiB", "--no-compare",
                                        "--max-new-tokens", "0"])
    assert "--budget (1024 bytes" in err and "raise --budget" in err and "Plan." not in err
    err = error_of(capsys, infer.main, ["tiny-moe", "--config", "n_layers=1", "--budget", "1KiB", "--slots", "3",
                                        "--no-compare", "--max-new-tokens", "0"])
    assert "3 slots x" in err and "raise --budget or lower --slots" in err


def test_name_flags_leaves_an_english_word_alone():
    from moesys_compile.cli import name_flags
    flags = {"device": "--device", "expert_parallel": "--ep"}
    assert name_flags("device (x) on the device (y)", flags) == "--device (x) on the device (y)"
    assert name_flags("a.num_experts (6) is not divisible by expert_parallel (4)", flags).endswith("by --ep (4)")


def test_train_ep_without_ranks_says_how_to_launch_them(no_launch, monkeypatch, capsys):
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("the model was built before the check"))
    err = error_of(capsys, train.main, TRAIN + ["--ep", "2", "--steps", "1"])
    assert "--ep 2 spreads each layer's experts over 2 ranks, and this run has 1; pass --nproc-per-node 2" in err


def test_a_flag_that_contradicts_the_plan_file_is_refused(no_launch, tmp_path, capsys):
    plan_file = tmp_path / "ep2.yaml"
    plan_file.write_text("mode: train\nexpert_parallel: 2\n")
    err = error_of(capsys, train.main, TRAIN + ["--plan", str(plan_file), "--ep", "1"])
    assert f"--ep 1 contradicts the plan file {plan_file}, which sets expert_parallel to 2" in err
    args = train.build_parser().parse_args(["--plan", str(plan_file), "--capacity-factor", "1.5"])
    assert train.make_plan(args, world=2).capacity_factor == 1.5          # a field the file leaves out


def test_inspect_names_only_the_bad_size(capsys):
    err = error_of(capsys, cli_main, ["inspect", "tiny-moe", "--batch", "0"])
    assert "--batch (0) must be >= 1" in err and "--seq" not in err


# -- 7. a training checkpoint given as MODEL --------------------------------------------------------


def test_a_training_checkpoint_given_as_model_says_to_pass_it_as_checkpoint(tmp_path, capsys):
    step = tmp_path / "ckpt" / "step_000001"
    step.mkdir(parents=True)
    (step / "meta.json").write_text("{}")
    (tmp_path / "ckpt" / "latest").write_text("step_000001")
    for given, what in ((tmp_path / "ckpt", "a training run's checkpoint root"),
                        (step, "one step's training checkpoint")):
        err = error_of(capsys, infer.main, [str(given), "--budget", "1MiB"])
        assert f"MODEL {str(given)!r} is {what}" in err
        assert f"moesys-compile infer MODEL --checkpoint {given}" in err and "--ckpt-dir" in err


# -- 8. classes in leaf_modules -----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_plan_with_leaf_classes_is_not_written_to_a_file(tmp_path, suffix):
    path = tmp_path / f"plan{suffix}"
    with pytest.raises(PlanError, match=r"leaf_modules holds the class\(es\) torch.nn.modules.linear.Linear, which a "
                                        r"plan file .* cannot hold; name those modules by their paths"):
        Plan(mode="train", leaf_modules=[torch.nn.Linear]).to_file(path)
    assert not path.exists()


def test_a_program_compiled_with_leaf_classes_saves_them_as_the_paths_they_named(tmp_path):
    """The checkpoint's plan file names each leaf class's modules by path: the same leaves, and
    a file that reads back as a plan."""
    from moesys_compile.models import build
    from moesys_compile.models.transformer import Attention

    model = build("tiny-moe")
    program = mc.compile(model, Plan(mode="train", leaf_modules=[Attention, "embed"]),
                         example_inputs=(torch.randint(0, 100, (2, 8)),))
    program.save(tmp_path / "ckpt")
    saved = Plan.from_file(tmp_path / "ckpt" / "plan.yaml")
    attention = [name for name, module in model.named_modules() if isinstance(module, Attention)]
    assert len(attention) == len(model.layers) and saved.leaf_modules == ("embed", *attention)
    assert program.plan.leaf_modules == (Attention, "embed")


# -- 9. kernels='triton' where Triton cannot run -----------------------------------------------------


def test_triton_kernels_that_cannot_run_warn_at_compile(monkeypatch):
    reason = "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (sweep3)"
    monkeypatch.setattr(kernels, "triton_unavailable", lambda device: reason)
    monkeypatch.setattr(importlib.import_module("moesys_compile.passes.lower_kernels"), "_WARNED", set())
    model = mc.models.build("tiny-moe", n_layers=1)
    ids = torch.randint(0, 256, (1, 8))
    with pytest.warns(UserWarning, match=r"Plan\(kernels='triton'\) on device 'cpu': Triton runs on CPU tensors only "
                                         r"under TRITON_INTERPRET=1 \(sweep3\), so the torch kernels run instead"):
        mc.compile(model, Plan(kernels="triton"), example_inputs=(ids,))


@pytest.mark.skipif(kernels.triton_unavailable("cpu") is not None, reason="Triton cannot run on CPU tensors here")
def test_triton_kernels_that_can_run_do_not_warn():
    model = mc.models.build("tiny-moe", n_layers=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mc.lower(model, Plan(kernels="triton"), (torch.randint(0, 256, (1, 8)),))
    assert not [w for w in caught if "kernels='triton'" in str(w.message)]


# -- 10. token ids of the tiny Hugging Face presets --------------------------------------------------


def test_every_tiny_preset_keeps_its_token_ids_inside_its_vocab():
    from moesys_compile.models.hf import FAMILIES, hf_config
    outside = {}
    for family in FAMILIES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = hf_config(family, {})
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(config, name, None)
            if any(isinstance(i, int) and not 0 <= i < config.vocab_size
                   for i in (value if isinstance(value, (list, tuple)) else [value])):
                outside[f"{family}.{name}"] = value
    assert not outside
    assert hf_config("olmoe", {"eos_token_id": 7}).eos_token_id == 7          # an override is kept


# -- 11. README and the benchmarks' records ---------------------------------------------------------


def test_readme_plan_fields_list_every_field():
    paragraph = README.split("`Plan` fields:", 1)[1].split("\n\n", 1)[0]
    assert [f.name for f in dataclasses.fields(Plan) if f"`{f.name}`" not in paragraph] == []


def test_readme_inspect_usage_lists_every_flag():
    parser = argparse.ArgumentParser()
    _inspect_parser(parser.add_subparsers())
    usage = README.split("## inspect", 1)[1].split("```", 2)[1]
    flags = [flag for flag in parser._subparsers._group_actions[0].choices["inspect"]._option_string_actions
             if flag.startswith("--") and flag != "--help"]
    assert [flag for flag in flags if flag not in usage] == []


def test_readme_compile_latency_gives_the_train_pipeline_as_list_passes_does():
    section = README.split("### Compile latency against depth", 1)[1].split("###", 1)[0]
    assert " → ".join(fn.__name__ for fn in PIPELINES["train"]) in " ".join(section.split())


def test_readme_says_hf_model_types_without_a_preset_are_full_size():
    assert re.search(r"`hf:<model_type>`[^.]*default config, which is full size", " ".join(README.split()))


def test_a_quick_benchmark_run_does_not_replace_the_committed_record():
    from benchmarks import _harness
    parser = _harness.parser("compile_latency", "test")
    assert _harness.results_path(parser.parse_args(["--quick"]), "compile_latency").endswith(
        "results/compile_latency.quick.json")
    assert _harness.results_path(parser.parse_args([]), "compile_latency").endswith("results/compile_latency.json")
    assert _harness.results_path(parser.parse_args(["--quick", "--json", "x.json"]), "compile_latency") == "x.json"
