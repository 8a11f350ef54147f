"""`moesys-compile inspect` in every format, through the real console entry point."""

import json
import shutil
import subprocess
import sys

import pytest

import moesys_compile as mc
from moesys_compile.cli import main


def run_cli(*args, capsys):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_text_lists_nodes_shapes_layers_costs_and_moe_layers(capsys):
    code, out, _ = run_cli("inspect", "tiny-moe", "--config", "n_layers=2", "--batch", "4", "--seq", "32",
                           capsys=capsys)
    assert code == 0
    assert "MoE layers found:" in out and "layers.1.ffn" in out and "num_experts=4" in out
    assert "pipeline (train): capture" in out
    assert "moesys.moe_experts" in out and "float32[B*S, 64]" in out
    assert "256*B*S**2" in out                   # attention flops, quadratic in S
    assert "per-layer totals at B=4, S=32" in out


def test_json_is_machine_readable(capsys):
    code, out, _ = run_cli("inspect", "tiny-gpt", "--format", "json", "--after", "capture", capsys=capsys)
    record = json.loads(out)
    assert record["moe_layers"] == [] and record["snapshots"][0]["stage"] == "capture"
    head = next(n for n in record["snapshots"][0]["nodes"] if n["name"] == "lm_head")
    assert head["flops"] == "32768*B*S" and head["flops_value"] == 32768 * 2 * 16
    assert {row["layer"] for row in record["snapshots"][0]["layers"]} == {0, 1, "-"}


def test_dot_files_written_per_stage(tmp_path, capsys):
    code, out, _ = run_cli("inspect", "tiny-moe", "--format", "dot", "--out", str(tmp_path), capsys=capsys)
    assert code == 0
    dot = (tmp_path / "00-capture.dot").read_text()
    assert "digraph" in dot.splitlines()[0] and "moesys.moe_experts" in dot and "->" in dot


def test_svg_renders_or_explains_missing_graphviz(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    code, _, err = run_cli("inspect", "tiny-gpt", "--format", "svg", capsys=capsys)
    assert code == 2 and "needs Graphviz's `dot` program" in err and "--format dot" in err
    monkeypatch.undo()
    if shutil.which("dot") is None:
        pytest.skip("Graphviz is not installed here")
    code, out, _ = run_cli("inspect", "tiny-gpt", "--format", "svg", capsys=capsys)
    assert code == 0 and "<svg" in out


def test_unknown_stage_and_plan_file_errors(tmp_path, capsys):
    code, _, err = run_cli("inspect", "tiny-gpt", "--after", "nope", capsys=capsys)
    assert code == 2 and "no such stage" in err and "capture" in err
    plan = tmp_path / "plan.yaml"
    plan.write_text("mode: infer\nworld_size: 3\nexpert_parallel: 2\n")
    code, _, err = run_cli("inspect", "tiny-moe", "--plan", str(plan), capsys=capsys)
    assert code == 2 and "world_size (3) is not divisible by expert_parallel (2)" in err


def test_identity_pipeline_says_so(tmp_path, capsys):
    from moesys_compile.passes import pipeline_for
    plan = tmp_path / "plan.yaml"
    mc.Plan(mode="train", disable_passes=tuple(p.__name__ for p in pipeline_for("train"))).to_file(plan)
    code, out, _ = run_cli("inspect", "tiny-moe", "--plan", str(plan), capsys=capsys)
    assert code == 0 and "identity" in out and "the program is the captured graph unchanged" in out


def test_plan_file_and_list_passes(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    mc.Plan(mode="infer").to_file(plan)
    code, out, _ = run_cli("inspect", "tiny-moe", "--plan", str(plan), capsys=capsys)
    assert code == 0 and "mode=infer" in out
    code, out, _ = run_cli("inspect", "--list-passes", capsys=capsys)
    assert code == 0 and out.startswith("train:") and "\ninfer:" in out


def factory(dim=16):
    """Used by the package.module:factory spec test."""
    import torch
    model = mc.nn.MoE(dim, 32, 4, 2)
    return model, (torch.randn(5, dim),)


def test_factory_spec_and_console_script():
    result = subprocess.run([sys.executable, "-m", "moesys_compile", "inspect", "tests.test_inspect_cli:factory",
                             "--config", "dim=8"], capture_output=True, text=True, cwd=_repo_root())
    assert result.returncode == 0, result.stderr
    assert "moesys.nn.MoE" in result.stdout and "float32[B, 8]" in result.stdout


def _repo_root():
    import pathlib
    return str(pathlib.Path(__file__).resolve().parent.parent)
