"""What a user of the training launcher runs into: two runs given one --ckpt-dir, a step directory
given as the run's root, an unusable --ckpt-dir, a new --lr on resume, a plan file that leaves
world_size to the launch, and data files at their edges. Each is refused up front, by name, or
does what was asked."""

from __future__ import annotations

import fcntl
import json

import numpy as np
import pytest
import torch

from moesys_compile import train

ARGS = ["--model", "tiny-moe", "--override", "n_layers=1", "--batch-size", "2", "--seq-len", "8", "--log-every", "0"]


def run(tmp_path, *extra: str) -> int:
    return train.main(ARGS + ["--ckpt-dir", str(tmp_path / "ckpt"), *extra])


def test_a_second_run_into_the_same_ckpt_dir_is_refused(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    with open(tmp_path / "ckpt" / ".lock", "a+") as held:    # as the first run holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run(tmp_path, "--steps", "1") == 2
    assert "is in use by another training run" in capsys.readouterr().err
    assert not list((tmp_path / "ckpt").glob("step_*"))
    assert run(tmp_path, "--steps", "1") == 0          # once it has ended


def test_the_ckpt_dir_is_checked_before_any_step(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("the model was built before the check"))
    (tmp_path / "file").write_text("x")
    assert train.main(ARGS + ["--ckpt-dir", str(tmp_path / "file" / "sub")]) == 2
    assert "cannot create the directory" in capsys.readouterr().err
    step = tmp_path / "run" / "step_000002"
    step.mkdir(parents=True)
    (step / "meta.json").write_text("{}")
    assert train.main(ARGS + ["--ckpt-dir", str(step)]) == 2
    assert "is one checkpoint (it holds meta.json); pass the run's root" in capsys.readouterr().err
    for flag in ("--steps", "--batch-size", "--seq-len"):
        assert train.main(ARGS + [flag, "0"]) == 2
        assert f"{flag} (0) must be >= 1" in capsys.readouterr().err


def test_a_resumed_run_trains_at_its_own_lr(tmp_path, capsys):
    assert run(tmp_path, "--steps", "2") == 0
    saved = torch.load(tmp_path / "ckpt" / "step_000002" / "optim-groups.pt", weights_only=False)
    assert run(tmp_path, "--steps", "4", "--lr", "0") == 0
    assert "--lr 0.0 replaces the checkpoint's 0.003" in capsys.readouterr().out
    from safetensors.torch import load_file
    before, after = (load_file(tmp_path / "ckpt" / f"step_00000{n}" / "dense.safetensors") for n in (2, 4))
    assert saved and all(torch.equal(before[name], after[name]) for name in before)   # lr 0: nothing moved


def test_a_plan_file_without_world_size_takes_the_launched_world(tmp_path):
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text("mode: train\nexpert_parallel: 2\ncapacity_factor: 1.25\n")
    args = train.build_parser().parse_args(["--plan", str(plan_file)])
    plan = train.make_plan(args, world=4)
    assert (plan.world_size, plan.expert_parallel, plan.capacity_factor) == (4, 2, 1.25)


def test_data_files_at_their_edges(tmp_path):
    exact = tmp_path / "exact.npy"
    np.save(exact, np.arange(9))                         # --seq-len 8 + 1: one window
    source = train.TokenSource(str(exact), vocab=64, batch=3, seq=8, seed=0)
    assert source.global_batch(0).tolist() == [list(range(9))] * 3
    ten = tmp_path / "ten.npy"
    np.save(ten, np.arange(10))                          # two windows, the last one included
    starts = {int(row[0]) for step in range(40) for row in train.TokenSource(str(ten), 64, 2, 8, 0).global_batch(step)}
    assert starts == {0, 1}
    archive = tmp_path / "ids.npz"
    np.savez(archive, ids=np.arange(20))
    with pytest.raises(ValueError, match=r"is an \.npz archive; save the token ids as one \.npy array"):
        train.TokenSource(str(archive), vocab=64, batch=2, seq=8, seed=0)


def test_keep_last_leaves_the_newest_checkpoints(tmp_path, capsys):
    assert run(tmp_path, "--steps", "4", "--ckpt-every", "1", "--keep-last", "2") == 0
    root = tmp_path / "ckpt"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000003", "step_000004"]
    assert (root / "latest").read_text() == "step_000004"
    # a --no-resume run into the same root keeps what it saved, though older runs saved higher steps
    assert run(tmp_path, "--steps", "1", "--no-resume", "--keep-last", "1") == 0
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000001"]
    assert train.main(ARGS + ["--keep-last", "2"]) == 2
    assert "--keep-last 2 applies to checkpoints, which need --ckpt-dir" in capsys.readouterr().err


def test_the_log_json_is_kept_up_to_date_and_continued_on_resume(tmp_path, monkeypatch):
    log_file = tmp_path / "log.json"
    written = []
    real_write = train._write_atomically
    monkeypatch.setattr(train, "_write_atomically", lambda path, text: (
        written.append(json.loads(text)["steps"]) if path == log_file else None, real_write(path, text)))
    assert run(tmp_path, "--steps", "3", "--log-every", "1", "--log-json", str(log_file)) == 0
    assert written[:3] == [[1], [1, 2], [1, 2, 3]]     # at every log line, not only at the end
    first = json.loads(log_file.read_text())
    assert run(tmp_path, "--steps", "5", "--log-json", str(log_file)) == 0
    log = json.loads(log_file.read_text())
    assert log["steps"] == [1, 2, 3, 4, 5] and log["loss"][:3] == first["loss"]


@pytest.mark.parametrize("env, device", [({"RANK": "3", "LOCAL_RANK": "1"}, "cuda:1"), ({"RANK": "5"}, "cuda:1")])
def test_nccl_is_bound_to_the_ranks_gpu_when_the_group_is_made(monkeypatch, env, device):
    """On CUDA the default group is made with ``device_id`` = this rank's GPU (LOCAL_RANK, else the
    rank modulo the GPUs: 5 % 4), and the process is bound to the same GPU."""
    from moesys_compile.runtime import groups
    made, bound = {}, []
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(groups.dist, "is_initialized", lambda: bool(made))
    monkeypatch.setattr(groups.dist, "init_process_group", lambda **kwargs: made.update(kwargs))
    monkeypatch.setattr(groups.dist, "get_rank", lambda: int(env["RANK"]))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    assert groups.init_from_env("cuda") == int(env["RANK"])
    assert made == {"backend": "nccl", "device_id": torch.device(device)} and bound == [torch.device(device)]
