"""Checkpoints that must not be lost, DBRX's flat experts, and damaged checkpoints as clear errors.

Saving never deletes a directory that is not a checkpoint; flat [E*F, D] expert matrices are
saved, loaded and cut by expert blocks of F rows; a model of another shape, a missing or damaged
file (training checkpoint or Hugging Face directory) is a named error; tensors the model does not
hold are named in one warning.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import moesys_compile as mc
from moesys_compile.runtime import checkpoint, sources
from moesys_compile.runtime.checkpoint import CheckpointError
from moesys_compile.runtime.storage import StorageError


def tiny(**overrides):
    torch.manual_seed(0)
    return mc.models.build("tiny-moe", **overrides)


def train_program(model, vocab: int = 256):
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    return mc.compile(model, mc.Plan(mode="train"), example_inputs=(ids,)), ids


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 2-layer tiny-moe training program and its checkpoint."""
    root = tmp_path_factory.mktemp("sweep")
    program, _ = train_program(tiny(n_layers=2))
    program.save(str(root / "ckpt"), step=1)
    return program, root / "ckpt"


def damaged_copy(ckpt: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(ckpt, copy)
    return copy


# -- 1. save refuses a directory that is not a checkpoint ---------------------------------------


def test_save_refuses_a_directory_that_is_not_a_checkpoint(saved, tmp_path):
    program, _ = saved
    (tmp_path / "run" / "logs").mkdir(parents=True)
    (tmp_path / "run" / "notes.txt").write_text("important")
    with pytest.raises(CheckpointError, match=r"'.*run'.*not a checkpoint \(no meta\.json; it holds logs, "
                                              r"notes\.txt\).*pass a new or empty directory"):
        program.save(str(tmp_path / "run"))
    assert (tmp_path / "run" / "notes.txt").read_text() == "important"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "a refused save leaves nothing beside it"
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="an existing file"):
        program.save(str(tmp_path / "file"))


def test_save_replaces_a_checkpoint_and_fills_an_empty_directory(saved, tmp_path):
    program, _ = saved
    (tmp_path / "empty").mkdir()
    program.save(str(tmp_path / "empty"), step=1)
    program.save(str(tmp_path / "empty"), step=2)          # a checkpoint now: replaced
    assert checkpoint.read_meta(str(tmp_path / "empty"))[1]["extra"] == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"], "no temporary or old copy is left"


def test_training_cli_saves_step_directories_again(saved, tmp_path):
    from moesys_compile.train import save_checkpoint
    program, _ = saved
    for step in (1, 2, 2):                                  # the last one overwrites step_000002
        save_checkpoint(program, None, str(tmp_path / "runs"), step)
    assert checkpoint.latest_step(str(tmp_path / "runs")).name == "step_000002"
    assert checkpoint.read_meta(str(tmp_path / "runs"))[1]["extra"] == {"step": 2}


# -- 2. DBRX's flat [E*F, D] expert matrices ------------------------------------------------------


def dbrx(seed: int):
    from moesys_compile.models.hf import build_hf
    return build_hf("dbrx", seed, n_layers=1)


def test_dbrx_flat_experts_round_trip(tmp_path):
    model = dbrx(0)
    program, ids = train_program(model, model.config.vocab_size)
    opt = torch.optim.AdamW(program.parameters(), lr=1e-2)
    program(ids).logits.sum().backward()
    opt.step()
    program.save(str(tmp_path / "ckpt"), optimizer=opt)
    flat = [n for n in program.expert_layout if n.endswith(".w1")]
    assert flat and model.get_parameter(flat[0]).shape[0] > program.expert_layout[flat[0]].num_experts

    other = dbrx(1)
    resumed, _ = train_program(other, other.config.vocab_size)
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    resumed.load(str(tmp_path / "ckpt"), optimizer=opt2)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[name], tensor, rtol=0, atol=0)
    saved_state = {n: opt.state[p]["exp_avg"] for n, p in program.named_parameters()}
    for name, param in resumed.named_parameters():
        torch.testing.assert_close(opt2.state[param]["exp_avg"], saved_state[name], rtol=0, atol=0)

    plain = mc.load_into(dbrx(2), str(tmp_path / "ckpt"))
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[name], tensor, rtol=0, atol=0)
    read = sources.checkpoint_source(str(tmp_path / "ckpt"), dbrx(2))
    weight = model.get_parameter(flat[0])
    rows_per_expert = weight.shape[0] // program.expert_layout[flat[0]].num_experts
    torch.testing.assert_close(read(flat[0]), weight.detach(), rtol=0, atol=0)
    torch.testing.assert_close(read(flat[0], (rows_per_expert + 1, 3 * rows_per_expert - 1)),
                               weight.detach()[rows_per_expert + 1: 3 * rows_per_expert - 1], rtol=0, atol=0)


def test_flat_experts_are_cut_by_expert_blocks_across_shards(tmp_path):
    # as an expert_parallel=2 save lays them out: 4 experts of F=3 rows, two per file
    full_RD = torch.arange(4 * 3 * 2, dtype=torch.float32).reshape(12, 2)
    save_file({"w": full_RD[:6].clone()}, str(tmp_path / "experts-ep0.safetensors"))
    save_file({"w": full_RD[6:].clone()}, str(tmp_path / "experts-ep1.safetensors"))
    meta = {"experts": {"w": {"num_experts": 4, "shards": [
        {"file": "experts-ep0.safetensors", "lo": 0, "hi": 2}, {"file": "experts-ep1.safetensors", "lo": 2, "hi": 4}]}}}
    torch.testing.assert_close(checkpoint.read_rows(tmp_path, meta, "w", 1, 3), full_RD[3:9])
    torch.testing.assert_close(checkpoint.read_rows(tmp_path, meta, "w", 0, 4), full_RD)
    torch.testing.assert_close(checkpoint.read_dim0(tmp_path, meta, "w", (4, 8)), full_RD[4:8])
    with pytest.raises(CheckpointError, match=r"holds 4 experts of 'w', not experts 0\.\.7"):
        checkpoint.read_rows(tmp_path, meta, "w", 0, 8)


# -- 3. a model of another shape -----------------------------------------------------------------


def test_load_into_a_model_of_another_shape_names_the_tensor(saved):
    _, ckpt = saved
    with pytest.raises(CheckpointError, match=r"does not fit Transformer: .*'embed\.weight' is \(256, 64\) in the "
                                              r"checkpoint but \(256, 32\) in the model.*config"):
        mc.load_into(tiny(n_layers=2, dim=32, n_heads=2), str(ckpt))


def test_program_load_names_the_numbers_of_experts(saved):
    _, ckpt = saved
    program, _ = train_program(tiny(n_layers=2, num_experts=8))
    with pytest.raises(CheckpointError, match=r"holds 4 experts of 'layers\.0\.ffn\.w_up' but Transformer has 8"):
        program.load(str(ckpt))


# -- 4. damaged checkpoints for ring inference ---------------------------------------------------


def read_all(directory: Path, model) -> None:
    read = sources.checkpoint_source(str(directory), model)
    for name in model.state_dict():
        read(name)


def test_damaged_training_checkpoint_is_a_storage_error(saved, tmp_path):
    _, ckpt = saved
    copy = damaged_copy(ckpt, tmp_path)
    read_all(copy, tiny(n_layers=2))
    (copy / "experts-ep0.safetensors").unlink()
    with pytest.raises(StorageError, match=r"experts-ep0\.safetensors' is missing.*save it again"):
        read_all(copy, tiny(n_layers=2))
    shutil.copy(ckpt / "experts-ep0.safetensors", copy)
    (copy / "dense.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(StorageError, match=r"dense\.safetensors' cannot be read"):
        read_all(copy, tiny(n_layers=2))
    (copy / "meta.json").write_text("{")
    with pytest.raises(StorageError, match=r"meta\.json' cannot be read \(JSONDecodeError"):
        read_all(copy, tiny(n_layers=2))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """The 2-layer tiny-moe state as a Hugging Face style directory, single file and sharded."""
    root = tmp_path_factory.mktemp("hf")
    state = {k: v.contiguous() for k, v in tiny(n_layers=2).state_dict().items()}
    (root / "single").mkdir()
    save_file(state, str(root / "single" / "model.safetensors"))
    (root / "sharded").mkdir()
    names = sorted(state)
    files = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
             "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, held in files.items():
        save_file({n: state[n] for n in held}, str(root / "sharded" / file))
    index = {"weight_map": {n: file for file, held in files.items() for n in held}}
    (root / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    return root


def test_damaged_hugging_face_directory_is_a_storage_error(hf_dirs, tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    shutil.copytree(hf_dirs / "single", single)
    shutil.copytree(hf_dirs / "sharded", sharded)
    read_all(sharded, tiny(n_layers=2))
    with open(single / "model.safetensors", "r+b") as f:
        f.truncate(2000)
    with pytest.raises(StorageError, match=r"model\.safetensors' cannot be read \(SafetensorError.*download it again"):
        read_all(single, tiny(n_layers=2))
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(StorageError, match=r"model-00002-of-00002\.safetensors' is missing \(model\.safetensors"
                                           r"\.index\.json names"):
        read_all(sharded, tiny(n_layers=2))
    (sharded / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(StorageError, match=r"index\.json' is not a valid index.*JSONDecodeError"):
        read_all(sharded, tiny(n_layers=2))


# -- 5. tensors the model does not hold: one warning ---------------------------------------------


def unused_warnings(directory: Path, calls: int) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(calls):
            sources.checkpoint_source(str(directory), tiny(n_layers=1))
    return [str(w.message) for w in caught if "match no tensor" in str(w.message)]


def test_training_checkpoint_warns_about_unused_tensors(saved, tmp_path):
    _, ckpt = saved
    found = unused_warnings(damaged_copy(ckpt, tmp_path), 1)
    assert len(found) == 1 and "layers.1.attn.proj.weight" in found[0]


def test_unused_tensors_are_warned_about_once(hf_dirs, tmp_path):
    shutil.copytree(hf_dirs / "single", tmp_path / "single")
    found = unused_warnings(tmp_path / "single", 2)   # compile's probe and the ring each open it
    assert len(found) == 1 and "7 tensor(s)" in found[0]


def test_optimizer_state_of_another_optimizer_class_is_refused_by_name(tmp_path):
    """SGD's momentum state loaded into AdamW failed inside torch with a bare KeyError('step')."""
    program, ids = train_program(tiny())
    sgd = torch.optim.SGD(program.parameters(), lr=0.1, momentum=0.9)
    program(ids).sum().backward()
    sgd.step()
    program.save(str(tmp_path / "ckpt"), optimizer=sgd)
    again, _ = train_program(tiny())
    with pytest.raises(CheckpointError, match=r"its optimizer state is SGD's, not AdamW's .*build a SGD over "
                                              r"program\.parameters\(\)"):
        again.load(str(tmp_path / "ckpt"), optimizer=torch.optim.AdamW(again.parameters()))
    resumed = torch.optim.SGD(again.parameters(), lr=0.1, momentum=0.9)
    again.load(str(tmp_path / "ckpt"), optimizer=resumed)
    assert len(resumed.state) == len(sgd.state)


def test_a_run_directory_without_its_latest_file_stands_for_its_newest_step(saved, tmp_path):
    """A copy of a --ckpt-dir that left out its 'latest' file was read as a Hugging Face directory
    ("has no model.safetensors"); its newest complete step_N directory is read instead."""
    program, ckpt = saved
    run = tmp_path / "run"
    for step in (2, 10):
        shutil.copytree(ckpt, run / f"step_{step:06d}")
    (run / "step_000011").mkdir()                   # incomplete: no meta.json
    assert checkpoint.latest_step(str(run)) == run / "step_000010"
    model = tiny(n_layers=2)
    mc.load_into(model, str(run))
    torch.testing.assert_close(model.state_dict(), program.full_state_dict())


def test_a_tensor_missing_from_a_checkpoint_of_a_built_in_model_names_how_to_save_one(tmp_path):
    model = tiny()
    state = {k: v for k, v in model.state_dict().items() if k != "embed.weight"}
    (tmp_path / "w").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w" / "model.safetensors"))
    with pytest.raises(StorageError, match=r"has no tensor 'embed.weight'.*program\.save\(DIR\) of its training "
                                           r"program, or safetensors of model\.state_dict\(\)"):
        sources.checkpoint_source(str(tmp_path / "w"), model)("embed.weight")
