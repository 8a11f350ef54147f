"""The training launcher: torchrun on 2 ranks with checkpoints, resume in one process, plan checks."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import moesys_compile as mc
from moesys_compile import train


def common(tmp_path, steps: int) -> list[str]:
    return ["--model", "tiny-moe", "--override", "n_layers=1", "--steps", str(steps), "--batch-size", "4",
            "--seq-len", "16", "--ckpt-dir", str(tmp_path / "ckpt"), "--ckpt-every", "2", "--log-every", "1",
            "--log-json", str(tmp_path / "log.json")]


def test_torchrun_two_ranks_then_resume_in_one_process(tmp_path, capsys):
    code = train.launch(common(tmp_path, 4) + ["--ep", "2"], nproc=2)
    assert code == 0
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["world_size"] == 2 and log["expert_parallel"] == 2 and log["steps"] == [1, 2, 3, 4]
    assert train.latest_checkpoint(str(tmp_path / "ckpt")).name == "step_000004"
    assert mc.Plan.from_file(tmp_path / "ckpt" / "step_000004" / "plan.yaml").expert_parallel == 2
    # resume the ep=2 checkpoint in a single process (weights and optimizer state resharded to ep=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train.main(common(tmp_path, 6)) == 0
    assert not [w for w in caught if "optimizer" in str(w.message)], [str(w.message) for w in caught]
    assert "resumed from" in capsys.readouterr().out
    resumed = json.loads((tmp_path / "log.json").read_text())
    assert resumed["steps"] == [1, 2, 3, 4, 5, 6] and resumed["world_size"] == 1   # the log continued
    assert resumed["runs"] == [{"first_step": 1, "world_size": 2, "expert_parallel": 2},
                               {"first_step": 5, "world_size": 1, "expert_parallel": 1}]
    assert train.latest_checkpoint(str(tmp_path / "ckpt")).name == "step_000006"
    # the run's root stands for its newest step, for load_into and for ring inference
    model = mc.models.build("tiny-moe", n_layers=1)
    mc.load_into(model, str(tmp_path / "ckpt"))
    newest = mc.models.build("tiny-moe", n_layers=1)
    mc.load_into(newest, str(tmp_path / "ckpt" / "step_000006"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), newest.state_dict().values()))
    from moesys_compile.infer import main as infer_main
    assert infer_main(["tiny-moe", "--config", "n_layers=1", "--checkpoint", str(tmp_path / "ckpt"), "--budget",
                       "256KiB", "--offload-dir", str(tmp_path / "ring"), "--prompt-ids", "1,2,3", "4",
                       "--max-new-tokens", "2"]) == 0
    assert "max |ring - eager| = 0.00e+00" in capsys.readouterr().out


def test_plan_world_size_must_match_launch(tmp_path, capsys, monkeypatch):
    plan_file = tmp_path / "plan.yaml"
    mc.Plan(mode="train", world_size=4, expert_parallel=2).to_file(plan_file)
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("the model was built before the check"))
    assert train.main(["--plan", str(plan_file), "--steps", "1"]) == 2
    assert "plan.world_size (4) differs from the launched world (1 process(es))" in capsys.readouterr().err


def test_synthetic_data_is_learnable_and_split_over_ranks():
    source = train.TokenSource("synthetic", vocab=64, batch=4, seq=8, seed=0)
    batch = source.global_batch(3)
    stride = (batch[:, 1] - batch[:, 0]) % 64
    assert bool((((batch[:, 1:] - batch[:, :-1]) % 64) == stride[:, None]).all())
    x0, y0 = source.local_batch(3, rank=0, world=2)
    x1, _ = source.local_batch(3, rank=1, world=2)
    assert x0.shape == (2, 8) and bool((x0[:, 1:] == y0[:, :-1]).all())
    assert bool((x1 == batch[2:, :-1]).all())


def test_a_hugging_face_model_trains_from_the_launcher(tmp_path, capsys, monkeypatch):
    """``--model hf:<family>``: its MoE blocks count as shardable in the launcher's check (they
    are canonicalised first), its output's logits feed the loss, and the last step is logged and
    saved even when --log-every does not divide --steps."""
    pytest.importorskip("transformers")
    argv = ["--model", "hf:qwen3_moe", "--override", "num_hidden_layers=1", "--steps", "3", "--batch-size", "2",
            "--seq-len", "8", "--ckpt-dir", str(tmp_path / "ckpt")]
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(train, "launch", lambda *a, **k: 0)
    assert train.main(argv + ["--nproc-per-node", "2", "--ep", "2"]) == 0, capsys.readouterr().err
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert "step     3  loss " in out and f"saved {tmp_path / 'ckpt' / 'step_000003'}" in out
    from moesys_compile.models.hf import build_hf
    initial = build_hf("qwen3_moe", num_hidden_layers=1)      # what hf:qwen3_moe starts from (seed 0)
    restored = mc.load_into(build_hf("qwen3_moe", seed=5, num_hidden_layers=1), str(tmp_path / "ckpt" / "step_000003"))
    moved = [name for name, t in initial.state_dict().items() if not torch.equal(restored.state_dict()[name], t)]
    assert "lm_head.weight" in moved and any(".mlp.experts." in name for name in moved), "3 steps trained them"
