"""Command-line rough edges found by the sweeps: ``inspect`` of expert-parallel and ring plans,
and ``moesys-compile train``'s argument checks and log lines. Tiny models, one step at most."""

import json

import pytest
import sympy
import torch

import moesys_compile as mc
from moesys_compile import train
from moesys_compile.cli import main
from moesys_compile.frontend.annotation import B, S


@pytest.fixture
def no_launch(monkeypatch):
    """Run ``train.main`` in this process as rank 0 of one; launching ranks fails the test."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(train, "launch", lambda *a, **k: pytest.fail("ranks were launched"))


def run_cli(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- inspect -------------------------------------------------------------------------------------


def test_lowered_expert_costs_of_an_expert_parallel_plan_are_in_b_and_s():
    """After dispatch the rows are a data-dependent ``u0``: lower_kernels charges the grouped
    experts their outputs' bytes, which must be bounded in B and S to be evaluated."""
    model = mc.models.build("tiny-moe", n_layers=1)
    _, ctx = mc.lower(model, mc.Plan(mode="train", world_size=2, expert_parallel=2), (torch.randint(0, 256, (2, 16)),))
    lowered = next(s for s in ctx.snapshots if s.stage == "lower_kernels")
    experts = [r for r in lowered.nodes if "grouped_mlp" in str(r.target)]
    assert experts, "the expert-parallel graph has a lowered grouped_mlp"
    for record in experts:
        activation = sympy.sympify(record.cost.activation_bytes)
        assert activation.free_symbols <= {B, S} and activation.free_symbols, activation
        assert record.cost.evaluate(2, 16)["activation_bytes"] > 0


@pytest.mark.parametrize("fmt", ["text", "json", "dot"])
def test_inspect_shows_an_expert_parallel_plan(fmt, tmp_path, capsys):
    plan = tmp_path / "ep2.yaml"
    plan.write_text("mode: train\nworld_size: 2\nexpert_parallel: 2\n")
    code, out, err = run_cli(capsys, "inspect", "tiny-moe", "--config", "n_layers=1", "--plan", str(plan),
                             "--format", fmt)
    assert code == 0, err
    if fmt == "text":
        assert "note: bucket expert#0" in out and "moesys_kernels.grouped_mlp" in out
        assert "no all-reduce: its edp group is this rank alone" in out          # ep=2 of 2: one rank each
        assert "async all-reduce over dense group [0, 1]" in out
    elif fmt == "json":
        last = json.loads(out)["snapshots"][-1]
        assert last["stage"] == "lower_kernels"
        assert any("grouped_mlp" in node["target"] for node in last["nodes"])
    else:
        assert out.startswith('strict digraph "lower_kernels"') and "grouped_mlp" in out


def test_inspect_plans_the_ring_at_the_given_batch_and_seq(tmp_path, capsys):
    """199168 B is tiny-moe's minimum ring budget at (2, 8), where ``mc.compile`` takes it; at
    (2, 16), which inspect used whatever --batch/--seq said, it is refused."""
    plan = tmp_path / "ring.yaml"
    plan.write_text("mode: infer\ndevice_budget: 199168\n")
    code, out, err = run_cli(capsys, "inspect", "tiny-moe", "--plan", str(plan), "--batch", "2", "--seq", "8",
                             "--after", "ring_partition")
    assert code == 0, err
    assert "activation workspace at batch 2, seq 8" in out and "per-layer totals at B=2, S=8" in out


def test_inspect_refuses_a_seq_above_max_seq_len_in_one_line(capsys):
    code, out, err = run_cli(capsys, "inspect", "tiny-moe", "--config", "n_layers=1", "--seq", "700")
    assert code == 2 and not out
    assert err.strip().splitlines() == ["moesys-compile inspect: error: --seq 700 exceeds the model's max_seq_len "
                                        "512; pass --config max_seq_len=700 or a --seq of at most 512"]


# -- train ---------------------------------------------------------------------------------------

TINY = ["--model", "tiny-moe", "--override", "n_layers=1", "--batch-size", "2", "--seq-len", "8", "--steps", "1"]


def test_train_refuses_a_seq_len_above_max_seq_len_in_one_line(no_launch, capsys):
    argv = ["--model", "tiny-moe", "--override", "n_layers=1", "--batch-size", "1", "--seq-len", "700", "--steps", "1"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["moesys-compile train: error: --seq-len 700 exceeds the model's max_seq_len "
                                        "512; pass --override max_seq_len=700 or a --seq-len of at most 512"]
    assert train.main(argv + ["--override", "max_seq_len=700"]) == 0   # the fix it names works


def test_train_log_json_folder_is_created_up_front(no_launch, tmp_path, capsys):
    log_file = tmp_path / "runs" / "a" / "log.json"
    assert train.main(TINY + ["--log-json", str(log_file)]) == 0, capsys.readouterr().err
    assert json.loads(log_file.read_text())["steps"] == [1]


def test_train_log_json_under_a_file_is_refused_before_any_step(no_launch, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    assert train.main(TINY + ["--log-json", str(tmp_path / "taken" / "log.json")]) == 2
    captured = capsys.readouterr()
    assert "step " not in captured.out
    assert captured.err.count("\n") == 1 and "--log-json" in captured.err and "cannot create its folder" in captured.err


def test_train_log_lines_show_the_dropped_fraction_with_a_capacity_factor(no_launch, capsys):
    assert train.main(TINY + ["--capacity-factor", "1.0", "--log-every", "1"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("step "))
    assert " dropped 0." in line
    assert train.main(TINY + ["--log-every", "1"]) == 0                      # dropless: nothing to show
    assert " dropped" not in capsys.readouterr().out


def test_train_refuses_an_unshardable_expert_layout_before_launching(no_launch, capsys):
    """DBRX's flat expert view cannot be sharded: one PlanError before torchrun, not one per rank."""
    pytest.importorskip("transformers")
    argv = ["--model", "hf:dbrx", "--override", "n_layers=1", "--ep", "2", "--nproc-per-node", "2", "--steps", "1",
            "--batch-size", "2", "--seq-len", "8"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("moesys-compile train: error:") == 1
    assert "cannot shard its experts over expert_parallel=2" in err


def test_inspect_applies_the_plan_dtype_to_a_model_torch_export_captures(tmp_path, capsys):
    """The refusal said to cast the model first, which a command-line user cannot do."""
    plan = tmp_path / "bf16.yaml"
    plan.write_text("mode: infer\ndevice_budget: 4MiB\ndtype: bfloat16\n")
    code, out, err = run_cli(capsys, "inspect", "hf:qwen3_moe", "--config", "num_hidden_layers=1", "--plan", str(plan))
    assert code == 0, err
    assert "ring_partition" in out
