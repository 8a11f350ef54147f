"""Damaged training checkpoints and run roots: every file meta.json promises (the optimizer state's
too), its entries and tied names, the optimizer groups and state shapes, and the experts each
shard file holds are checked, and a failure is a CheckpointError naming the file. A run root whose
``latest`` names a deleted step resumes from its newest complete step, with a warning, and what
killed saves left in a root is removed by the next run that holds its lock.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import moesys_compile as mc
from moesys_compile import train as launcher
from moesys_compile.runtime import checkpoint
from moesys_compile.runtime.checkpoint import CheckpointError

sys.path.insert(0, str(Path(__file__).parent))
from test_checkpoint import build, train  # noqa: E402
from test_checkpoint_sweep import damaged_copy  # noqa: E402
from test_launcher_habits import ARGS  # noqa: E402
from test_training_parity import make_model  # noqa: E402

W_UP = "layers.0.ffn.w_up"       # a stacked [E, ...] expert parameter of the test model


def adamw_program(seed_shift: float = 0.0):
    """The one-process test program with tied embeddings and an AdamW over it."""
    program, ids, targets = build(1, 1, 0, seed_shift)
    return program, torch.optim.AdamW(program.parameters(), lr=1e-2), ids, targets


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A checkpoint of the test program and its AdamW state after one step."""
    program, opt, ids, targets = adamw_program()
    train(program, opt, ids, targets, 1)
    directory = tmp_path_factory.mktemp("damage") / "ckpt"
    program.save(str(directory), optimizer=opt, step=1)
    return directory


def load_with_adamw(directory: Path) -> torch.optim.AdamW:
    program, opt, _, _ = adamw_program(seed_shift=0.5)
    program.load(str(directory), optimizer=opt)
    return opt


def edit_meta(directory: Path, edit) -> None:
    meta = json.loads((directory / "meta.json").read_text())
    edit(meta)
    (directory / "meta.json").write_text(json.dumps(meta))


# -- files meta.json promises --------------------------------------------------------------------


@pytest.mark.parametrize("file", ["optim-dense.safetensors", "optim-groups.pt", "optim-experts-ep0.safetensors"])
def test_a_missing_optimizer_file_is_named_rather_than_starting_the_optimizer_afresh(saved, tmp_path, file):
    copy = damaged_copy(saved, tmp_path)
    (copy / file).unlink()
    with pytest.raises(CheckpointError, match=rf"{file}' is missing \(meta\.json promises .*load it without "
                                              rf"optimizer="):
        load_with_adamw(copy)
    program, _, _, _ = adamw_program(seed_shift=0.5)
    assert program.load(str(copy)) == {"step": 1}          # its weights alone still load
    mc.load_into(make_model(), str(copy))


@pytest.mark.parametrize("content", [b"\0" * 100, b"garbage"], ids=["zeros", "text"])
def test_unreadable_optimizer_groups_are_named(saved, tmp_path, content):
    copy = damaged_copy(saved, tmp_path)
    (copy / "optim-groups.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"optim-groups\.pt' cannot be read as the optimizer's groups "
                                              r"\(UnpicklingError\)") as caught:
        load_with_adamw(copy)
    assert "weights_only" not in str(caught.value)
    torch.save({"lr": 0.1}, copy / "optim-groups.pt")
    with pytest.raises(CheckpointError, match=r"optim-groups\.pt' holds a dict, not the optimizer's list of groups"):
        load_with_adamw(copy)


# -- meta.json's entries and tied names ----------------------------------------------------------


@pytest.mark.parametrize("key", ["experts", "aliases", "extra", "optimizer"])
def test_meta_without_an_entry_that_loading_reads_is_named(saved, tmp_path, key):
    copy = damaged_copy(saved, tmp_path)
    edit_meta(copy, lambda meta: meta.pop(key))
    with pytest.raises(CheckpointError, match=rf"meta\.json' lacks '{key}' \(a JSON (object|boolean)\)"):
        load_with_adamw(copy)


def test_meta_of_another_shape_is_named(saved, tmp_path):
    copy = damaged_copy(saved, tmp_path)
    edit_meta(copy, lambda meta: meta["experts"][W_UP].pop("shards"))
    with pytest.raises(CheckpointError, match=rf"meta\.json' has no 'num_experts' and 'shards' .* \['{W_UP}'\]"):
        mc.load_into(make_model(), str(copy))
    (copy / "meta.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"meta\.json' holds a JSON list, not an object"):
        mc.load_into(make_model(), str(copy))


def test_a_format_of_another_type_is_shown_as_it_is(saved, tmp_path):
    copy = damaged_copy(saved, tmp_path)
    edit_meta(copy, lambda meta: meta.update(format="1"))
    with pytest.raises(CheckpointError, match=r"checkpoint format '1' is not supported \(expected 1\)"):
        mc.load_into(make_model(), str(copy))


def test_a_tied_name_whose_tensor_is_missing_is_named(tmp_path):
    directory = tmp_path / "tied"
    tied = make_model(tie_embeddings=True)
    mc.compile(tied, mc.Plan(mode="train"), (torch.zeros(1, 8, dtype=torch.long),)).save(str(directory))
    aliases = json.loads((directory / "meta.json").read_text())["aliases"]
    (alias, target), = aliases.items()
    dense = load_file(directory / "dense.safetensors")
    del dense[target]
    save_file(dense, str(directory / "dense.safetensors"))
    with pytest.raises(CheckpointError, match=rf"dense\.safetensors' has no tensor '{target}', which meta\.json's "
                                              rf"aliases name as the one that '{alias}' is tied to"):
        mc.load_into(make_model(tie_embeddings=True), str(directory))
    edit_meta(directory, lambda meta: meta["aliases"].update({alias: "nowhere"}))
    with pytest.raises(CheckpointError, match=r"has no tensor 'nowhere'"):
        mc.load_into(make_model(tie_embeddings=True), str(directory))


# -- the optimizer state's shapes and the experts of each shard file -----------------------------


def test_optimizer_state_of_another_shape_is_named_before_a_step(saved, tmp_path):
    copy = damaged_copy(saved, tmp_path)
    state = load_file(copy / "optim-dense.safetensors")
    name = next(key for key in state if key.endswith(":exp_avg") and state[key].dim() == 2)
    shape = tuple(state[name].shape)
    state[name] = state[name][:3].clone()
    save_file(state, str(copy / "optim-dense.safetensors"), metadata=safe_open(
        str(saved / "optim-dense.safetensors"), "pt").metadata())
    parameter = name.split(":")[0]
    with pytest.raises(CheckpointError, match=rf"optim-dense\.safetensors' holds optimizer state '{name}' of shape "
                                              rf"\(3, {shape[1]}\) for parameter '{parameter}' of shape "
                                              rf"\({shape[0]}, {shape[1]}\)"):
        load_with_adamw(copy)


def test_factored_optimizer_state_still_loads(tmp_path):
    """Adafactor keeps [rows, 1] and [1, columns] moments of a matrix: not a damaged shape."""
    program, _, ids, targets = adamw_program()
    opt = torch.optim.Adafactor(program.parameters(), lr=1e-2)
    train(program, opt, ids, targets, 1)
    program.save(str(tmp_path / "ckpt"), optimizer=opt)
    resumed, _, _, _ = adamw_program(seed_shift=0.5)
    again = torch.optim.Adafactor(resumed.parameters(), lr=1e-2)
    resumed.load(str(tmp_path / "ckpt"), optimizer=again)
    assert any(value.shape[-1] == 1 for state in again.state.values() for value in state.values()
               if isinstance(value, torch.Tensor) and value.dim() > 1)


def test_each_expert_shard_file_records_its_experts(saved, tmp_path):
    with safe_open(str(saved / "experts-ep0.safetensors"), "pt") as f:
        assert json.loads(f.metadata()[checkpoint.RANGES])[W_UP] == [0, 4]
    copy = damaged_copy(saved, tmp_path)
    # as if meta.json sent experts 2..3 to the file of experts 0..1 (the file names of two shards swapped)
    edit_meta(copy, lambda meta: meta["experts"][W_UP].update(shards=[
        {"file": "experts-ep0.safetensors", "lo": 0, "hi": 2}, {"file": "experts-ep0.safetensors", "lo": 2, "hi": 4}]))
    with pytest.raises(CheckpointError, match=rf"experts-ep0\.safetensors' holds experts 0\.\.3 of '{W_UP}', but "
                                              rf"meta\.json places experts 0\.\.1 there"):
        mc.load_into(make_model(), str(copy))


# -- a run root ----------------------------------------------------------------------------------


def test_a_stale_latest_stands_for_the_newest_complete_step_with_a_warning(saved, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved, run / "step_000002")
    (run / "latest").write_text("step_000004")          # its directory deleted
    with pytest.warns(UserWarning, match=r"latest' names 'step_000004', which holds no complete checkpoint.*"
                                         r"write 'step_000002' into"):
        assert checkpoint.latest_step(str(run)) == run / "step_000002"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mc.load_into(make_model(), str(run))
    (run / "step_000002").rename(run / "elsewhere")
    assert checkpoint.latest_step(str(run)) == run / "step_000004"     # nothing to fall back to
    with pytest.raises(CheckpointError, match="no complete checkpoint at .*step_000004"):
        mc.load_into(make_model(), str(run))


def test_the_launcher_resumes_past_a_deleted_step_and_removes_what_killed_saves_left(tmp_path, capsys):
    root = tmp_path / "ckpt"
    assert launcher.main(ARGS + ["--ckpt-dir", str(root), "--steps", "2", "--ckpt-every", "1"]) == 0
    shutil.rmtree(root / "step_000002")
    left = root / ".step_000003.tmp-4242-1"               # a save of step 3 killed midway
    shutil.copytree(root / "step_000001", left)
    with open(root / ".lock", "a+") as held:                # while another run holds the root: kept
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert launcher.main(ARGS + ["--ckpt-dir", str(root), "--steps", "3"]) == 2
    assert left.is_dir()
    capsys.readouterr()
    with pytest.warns(UserWarning, match="names 'step_000002', which holds no complete checkpoint"):
        assert launcher.main(ARGS + ["--ckpt-dir", str(root), "--steps", "4", "--ckpt-every", "2"]) == 0
    out = capsys.readouterr().out
    assert f"removed {left}, left by a save that was interrupted" in out
    assert "resumed from" in out and "step_000001 at step 1" in out
    assert sorted(p.name for p in root.iterdir()) == [".lock", "latest", "step_000001", "step_000002", "step_000004"]
