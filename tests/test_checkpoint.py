"""Checkpoints: round trip, resharding across EP sizes (weights and optimizer state), exact resume,
and a save killed midway."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import moesys_compile as mc
from moesys_compile.programs.training import TrainingProgram
from moesys_compile.runtime import checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from dist_utils import optimizer_steps, run_ranks  # noqa: E402
from test_training_parity import cross_entropy, global_batch, make_model, make_optimizer  # noqa: E402


def build(world: int, ep: int, rank: int, seed_shift: float = 0.0):
    model = make_model()
    if seed_shift:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(seed_shift)
    ids, targets = global_batch()
    local = slice(rank * len(ids) // world, (rank + 1) * len(ids) // world)
    program = mc.compile(model, mc.Plan(mode="train", world_size=world, expert_parallel=ep), (ids[local],))
    return program, ids[local], targets[local]


def train(program, opt, ids, targets, steps: int) -> list[float]:
    return optimizer_steps(lambda: cross_entropy(program(ids), targets) + program.aux_loss, opt, steps)


def reshard_and_resume(rank: int, world: int, root: str):
    program, ids, targets = build(world, 4, rank)
    opt = make_optimizer(program.parameters())
    train(program, opt, ids, targets, 2)
    program.save(f"{root}/ckpt", optimizer=opt, step=2)
    saved = program.full_state_dict()
    continued = train(program, opt, ids, targets, 2)
    out = {"saved": saved if rank == 0 else None, "continued": continued}
    for ep in (2, 1):     # same world, other EP sizes; start from different values, then load
        other, _, _ = build(world, ep, rank, seed_shift=0.5)
        other_opt = make_optimizer(other.parameters())
        extra = other.load(f"{root}/ckpt", optimizer=other_opt)
        state = other.full_state_dict()      # collective: every rank calls it
        out[f"ep{ep}"] = state if rank == 0 else None
        out[f"extra{ep}"] = extra
        out[f"resumed{ep}"] = train(other, other_opt, ids, targets, 2)   # optimizer state resharded too
    resumed, _, _ = build(world, 4, rank, seed_shift=0.5)
    opt2 = make_optimizer(resumed.parameters())
    resumed.load(f"{root}/ckpt", optimizer=opt2)
    out["resumed"] = train(resumed, opt2, ids, targets, 2)
    return out


def test_reshard_load_into_and_exact_resume(tmp_path):
    results = run_ranks(reshard_and_resume, 4, str(tmp_path))
    saved = results[0]["saved"]
    for ep in (2, 1):
        assert list(results[0][f"ep{ep}"]) == list(saved)
        for name, tensor in saved.items():
            torch.testing.assert_close(results[0][f"ep{ep}"][name], tensor, rtol=0, atol=0)
        assert results[0][f"extra{ep}"] == {"step": 2}
        for r in results:
            assert r[f"resumed{ep}"] == pytest.approx(r["continued"], rel=1e-5), f"resumed at ep={ep}"
    for r in results:
        assert r["resumed"] == pytest.approx(r["continued"], rel=1e-6), "optimizer state must resume exactly"
    plain = mc.load_into(make_model(), str(tmp_path / "ckpt"))
    for name, tensor in plain.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["dense.safetensors", "experts-ep0.safetensors", "experts-ep1.safetensors",
                     "experts-ep2.safetensors", "experts-ep3.safetensors", "meta.json", "optim-dense.safetensors",
                     "optim-experts-ep0.safetensors", "optim-experts-ep1.safetensors",
                     "optim-experts-ep2.safetensors", "optim-experts-ep3.safetensors", "optim-groups.pt", "plan.yaml"]
    assert mc.Plan.from_file(tmp_path / "ckpt" / "plan.yaml").expert_parallel == 4


def save_then_die(rank: int, world: int, root: str, stage: str):
    program, ids, targets = build(world, 1, rank)
    assert isinstance(program, TrainingProgram)
    opt = make_optimizer(program.parameters())
    train(program, opt, ids, targets, 1)
    program.save(f"{root}/ckpt", step=1)
    torch.save(program.full_state_dict(), f"{root}/first.pt")
    train(program, opt, ids, targets, 1)
    checkpoint.FAULT_HOOK = lambda s: os._exit(7) if s == stage else None
    program.save(f"{root}/ckpt", step=2)


def test_save_killed_midway_keeps_previous_checkpoint(tmp_path):
    # killed after every shard and the commit record were written, just before the swap: the
    # complete-looking temporary copy must still not replace the previous checkpoint
    codes = run_ranks(save_then_die, 1, str(tmp_path), "before_swap", expect_failure=True)
    assert codes == [7]
    first = torch.load(tmp_path / "first.pt")
    assert any(p.name.startswith(".ckpt.tmp-") for p in tmp_path.iterdir()), "the killed save left its temp dir"
    restored = mc.load_into(make_model(), str(tmp_path / "ckpt"))
    for name, tensor in restored.state_dict().items():
        torch.testing.assert_close(tensor, first[name], rtol=0, atol=0)
    assert checkpoint.read_meta(str(tmp_path / "ckpt"))[1]["extra"] == {"step": 1}


def single_rank_program():
    model = make_model()
    ids, _ = global_batch()
    gm, ctx = mc.lower(model, mc.Plan(mode="train"), (ids,))
    return TrainingProgram(gm, ctx), model


def test_interrupted_swap_falls_back_to_previous_copy(tmp_path):
    program, model = single_rank_program()
    program.save(str(tmp_path / "ckpt"), step=5)
    (tmp_path / "ckpt").rename(tmp_path / ".ckpt.old-123")       # as if killed between the renames
    restored = mc.load_into(make_model(n_layers=2), str(tmp_path / "ckpt"))
    torch.testing.assert_close(restored.layers[1].ffn.w_up, model.layers[1].ffn.w_up)
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint"):
        mc.load_into(make_model(), str(tmp_path / "missing"))


def test_load_into_rejects_other_architecture(tmp_path):
    program, _ = single_rank_program()
    program.save(str(tmp_path / "ckpt"))
    with pytest.raises(checkpoint.CheckpointError, match="does not fit"):
        mc.load_into(make_model(num_shared_experts=1), str(tmp_path / "ckpt"))


def grouped_adamw(program, matrices_first: bool) -> torch.optim.AdamW:
    """Two groups with other hyperparameters: matrices (decay) and the rest (no decay)."""
    matrices = [p for p in program.parameters() if p.dim() >= 2]
    rest = [p for p in program.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": 0.1, "lr": 1e-2}, {"params": rest, "weight_decay": 0.0, "lr": 3e-3}]
    return torch.optim.AdamW(groups if matrices_first else groups[::-1])


def test_optimizer_groups_built_in_another_order_get_their_own_hyperparameters(tmp_path):
    program, ids, targets = build(1, 1, 0)
    opt = grouped_adamw(program, matrices_first=True)
    train(program, opt, ids, targets, 1)
    program.save(str(tmp_path / "ckpt"), optimizer=opt)
    resumed, _, _ = build(1, 1, 0, seed_shift=0.5)
    reordered = grouped_adamw(resumed, matrices_first=False)
    for group in reordered.param_groups:
        group["lr"] = group["weight_decay"] = 0.5       # the saved values must replace these
    resumed.load(str(tmp_path / "ckpt"), optimizer=reordered)
    for group in reordered.param_groups:
        decayed = group["params"][0].dim() >= 2
        assert (group["weight_decay"], group["lr"]) == ((0.1, 1e-2) if decayed else (0.0, 3e-3))
    saved = {name: opt.state[p]["exp_avg"] for name, p in program.named_parameters()}
    for name, p in resumed.named_parameters():
        torch.testing.assert_close(reordered.state[p]["exp_avg"], saved[name], rtol=0, atol=0)
