"""The disk tier reads a checkpoint's tensors in place: a tensor that a safetensors file of
``Plan.weights_checkpoint`` stores as the ring computes with it (same dtype and shape, its rows
contiguous and aligned) is mapped from that file and never written to ``offload_dir``; only
tensors that are converted (hub-layout experts, a cast, ``.bin`` files, rows across two shards)
and those the model holds itself (non-persistent buffers) are."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import moesys_compile as mc
from moesys_compile.infer import model_bytes
from moesys_compile.runtime import checkpoint
from moesys_compile.runtime.storage import FileSpan, StorageError, stage, with_spans

IDS = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(0))


def ring(model, checkpoint_dir: Path, offload: Path, fraction: int = 2, extra: int = 2**15,
         **plan) -> mc.programs.RingProgram:
    """A disk-tier ring at ``1/fraction`` of the model, plus ``extra`` bytes (activations)."""
    plan = mc.Plan(mode="infer", device_budget=model_bytes(model) // fraction + extra, weights="disk",
                   offload_dir=str(offload), weights_checkpoint=str(checkpoint_dir), **plan)
    return mc.compile(model, plan, example_inputs=(IDS,))


def where_read(program) -> dict[str, str]:
    """Each streamed tensor -> "checkpoint" (mapped from a checkpoint file) or "offload" (written)."""
    return {key: "offload" if loc.file.path.parent == Path(program.plan.offload_dir) else "checkpoint"
            for key, loc in program.store.locations.items()}


def hf_pair(family: str, tmp_path: Path, **save):
    """A model saved with save_pretrained, and a fresh one of other weights to stream it into."""
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from moesys_compile.models.hf import build_hf
    saved = build_hf(family, num_hidden_layers=2, seed=1).eval()
    saved.save_pretrained(tmp_path / "ckpt", **save)
    return saved, build_hf(family, num_hidden_layers=2, seed=2).eval()


def logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


@pytest.mark.parametrize("save", [{}, {"max_shard_size": "40KB"}], ids=["one file", "shards"])
def test_a_dense_checkpoint_is_read_in_place_and_none_of_it_is_written(tmp_path, save):
    saved, fresh = hf_pair("llama", tmp_path, **save)
    program = ring(fresh, tmp_path / "ckpt", tmp_path / "offload")
    with torch.inference_mode():
        torch.testing.assert_close(logits(program(IDS)), logits(saved(IDS)), atol=1e-6, rtol=0)
    persistent = set(fresh.state_dict())
    read = where_read(program)
    assert {key for key, place in read.items() if place == "checkpoint"} == persistent & set(read)
    assert program.store.in_place_bytes == sum(program.store[k].nbytes for k in persistent & set(read))
    assert program.store.nbytes == sum(program.store[k].nbytes for k in set(read) - persistent)   # the rotary buffer
    if save:
        assert len({loc.file.path for loc in program.store.locations.values()} - {None}) > 2
    program.close()


def test_hub_layout_experts_are_written_and_the_rest_read_in_place(tmp_path):
    """transformers saves per-expert tensors that the model holds stacked: converted, so written."""
    saved, fresh = hf_pair("qwen3_moe", tmp_path)
    program = ring(fresh, tmp_path / "ckpt", tmp_path / "offload", fraction=3)
    with torch.inference_mode():
        torch.testing.assert_close(logits(program(IDS)), logits(saved(IDS)), atol=1e-6, rtol=0)
    read = where_read(program)
    experts = {key for key in read if ".experts." in key}
    assert experts and all(read[key] == "offload" for key in experts)
    assert read["model.layers.1.self_attn.q_proj.weight"] == "checkpoint"
    program.close()


@pytest.mark.parametrize("kind", ["plan dtype", "half checkpoint", "bin"])
def test_a_cast_or_a_bin_checkpoint_is_written(tmp_path, kind):
    torch.manual_seed(0)
    saved = mc.models.build("tiny-moe", n_layers=2).eval()
    state = {k: v.contiguous() for k, v in saved.state_dict().items()}
    (tmp_path / "ckpt").mkdir()
    if kind == "bin":
        torch.save(state, tmp_path / "ckpt" / "pytorch_model.bin")
    else:
        save_file({k: v.half() for k, v in state.items()} if kind == "half checkpoint" else state,
                  str(tmp_path / "ckpt" / "model.safetensors"))
    torch.manual_seed(7)
    fresh = mc.models.build("tiny-moe", n_layers=2).eval()
    program = ring(fresh, tmp_path / "ckpt", tmp_path / "offload", **({"dtype": "bfloat16"} if kind == "plan dtype"
                                                                      else {}))
    assert set(where_read(program).values()) == {"offload"} and program.store.in_place_bytes == 0
    if kind == "bin":
        with torch.inference_mode():
            torch.testing.assert_close(program(IDS), saved(IDS), atol=1e-6, rtol=0)
    program.close()


def training_checkpoint(trained, directory: Path, shards=((0, 2), (2, 4))) -> None:
    """``trained``'s state as a training checkpoint at expert_parallel = len(shards)."""
    state = {k: v.contiguous() for k, v in trained.state_dict().items()}
    experts = {k: v for k, v in state.items() if k.endswith(("w_up", "w_down"))}
    directory.mkdir()
    save_file({k: v for k, v in state.items() if k not in experts}, str(directory / checkpoint.DENSE))
    for rank, (lo, hi) in enumerate(shards):
        save_file({k: v[lo:hi].contiguous() for k, v in experts.items()}, str(directory / f"experts-ep{rank}.safetensors"))
    meta = {"format": checkpoint.FORMAT, "world_size": len(shards), "expert_parallel": len(shards), "aliases": {},
            "optimizer": False, "extra": {}, "time": 0.0,
            "experts": {k: {"num_experts": 4, "shards": [{"file": f"experts-ep{r}.safetensors", "lo": lo, "hi": hi}
                                                        for r, (lo, hi) in enumerate(shards)]} for k in experts}}
    (directory / checkpoint.META).write_text(json.dumps(meta))


@pytest.mark.parametrize("fraction", [2, 8])
def test_a_training_checkpoint_is_read_in_place_where_rows_lie_in_one_shard(tmp_path, fraction):
    """At a half, each expert tensor streams whole and spans both shards (written); at an eighth,
    expert groups of one shard's experts are mapped from it."""
    torch.manual_seed(0)
    trained = mc.models.build("tiny-moe", n_layers=4).eval()
    training_checkpoint(trained, tmp_path / "ckpt")
    torch.manual_seed(7)
    fresh = mc.models.build("tiny-moe", n_layers=4).eval()
    program = ring(fresh, tmp_path / "ckpt", tmp_path / "offload", fraction=fraction, extra=2**17)
    with torch.inference_mode():
        torch.testing.assert_close(program(IDS), trained(IDS), atol=1e-6, rtol=0)
    read = where_read(program)
    for key, place in read.items():
        rows = re.fullmatch(r"(.+)\[(\d+):(\d+)\]", key)
        if key.endswith(("w_up", "w_down")) or (rows and rows.group(1).endswith(("w_up", "w_down"))):
            lo, hi = (int(rows.group(2)), int(rows.group(3))) if rows else (0, 4)
            assert place == ("checkpoint" if hi <= 2 or lo >= 2 else "offload"), key
        elif key in fresh.state_dict():
            assert place == "checkpoint", key
    assert any(re.fullmatch(r".+\[\d+:\d+\]", k) for k in read) == (fraction == 8)
    program.close()


def live_program(tmp_path: Path) -> tuple:
    """A ring program reading a llama checkpoint in place, called once (it equals eager), whose
    every call loads sections again; with the expected logits and the checkpoint's file."""
    saved, fresh = hf_pair("llama", tmp_path)
    program = ring(fresh, tmp_path / "ckpt", tmp_path / "offload")
    with torch.inference_mode():
        expected = logits(saved(IDS))
    torch.testing.assert_close(logits(program(IDS)), expected, atol=1e-6, rtol=0)
    assert program.stats["sections"] > program.stats["slots"], "every call loads sections again"
    return program, expected, tmp_path / "ckpt" / "model.safetensors"


@pytest.mark.parametrize("change", ["truncated", "written again"])
def test_a_checkpoint_file_changed_under_a_live_program_is_named(tmp_path, change):
    program, _, file = live_program(tmp_path)
    if change == "truncated":
        os.truncate(file, 100)
    else:
        data = file.read_bytes()
        with open(file, "r+b") as f:                  # the same bytes, written in place
            f.write(data)
        stat = os.stat(file)
        os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with pytest.raises(RuntimeError, match=f"checkpoint file .*{re.escape(str(file))}.* {change}.*"
                                           f"Plan.weights_checkpoint"):
        program(IDS)
    program.close()


def test_a_replaced_checkpoint_file_leaves_the_program_its_weights(tmp_path):
    """A save that writes a new file and renames it over the old one (atomic saves) does not
    change what a live program computes."""
    program, expected, file = live_program(tmp_path)
    save_file({k: torch.zeros_like(v) for k, v in program.context.model.state_dict().items()},
              str(tmp_path / "new.safetensors"))
    os.replace(tmp_path / "new.safetensors", file)
    torch.testing.assert_close(logits(program(IDS)), expected, atol=1e-6, rtol=0)
    program.close()


def raw_safetensors(path: Path, first: torch.Tensor, second: torch.Tensor) -> None:
    """A safetensors file holding ``first`` then ``second`` packed back to back, as another writer
    may lay them out (safetensors itself orders them by alignment)."""
    header = {"a": {"dtype": "F16", "shape": list(first.shape), "data_offsets": [0, first.nbytes]},
              "b": {"dtype": "F32", "shape": list(second.shape),
                    "data_offsets": [first.nbytes, first.nbytes + second.nbytes]}}
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)          # the data starts 8-byte aligned
    path.write_bytes(struct.pack("<Q", len(text)) + text + first.numpy().tobytes() + second.numpy().tobytes())


@pytest.mark.parametrize("halves, in_place", [(2, True), (1, False)])
def test_a_tensor_whose_bytes_are_misaligned_is_written(tmp_path, halves, in_place):
    """A float32 tensor 2 bytes past a 4-byte boundary cannot be viewed in place."""
    first, second = torch.arange(halves, dtype=torch.float16), torch.arange(6, dtype=torch.float32)
    raw_safetensors(tmp_path / "raw.safetensors", first, second)

    def read(key: str) -> torch.Tensor:
        return second
    source = with_spans(read, lambda key, rows=None: FileSpan(tmp_path / "raw.safetensors", "b", None,
                                                               torch.float32, (6,)))
    store = stage([["b"]], source, "disk", str(tmp_path / "offload"))
    assert torch.equal(store["b"].tensor(), second)
    assert (store["b"].file.path.name == "raw.safetensors") == in_place
    assert store.in_place_bytes == (24 if in_place else 0)


def test_a_span_that_disagrees_with_the_files_header_is_written(tmp_path):
    """The source's dtype or shape against the header: a mismatch reads through the source."""
    raw_safetensors(tmp_path / "raw.safetensors", torch.zeros(2, dtype=torch.float16), torch.arange(6.0))
    for dtype, shape in [(torch.float16, (6,)), (torch.float32, (3, 2)), (torch.float32, (5,))]:
        source = with_spans(lambda key: torch.arange(6.0),
                            lambda key, rows=None, d=dtype, s=shape: FileSpan(tmp_path / "raw.safetensors", "b",
                                                                              None, d, s))
        store = stage([["b"]], source, "disk", str(tmp_path / "offload"))
        assert store.in_place_bytes == 0 and store["b"].file.path.parent == tmp_path / "offload"


def test_rows_of_a_span_are_read_from_their_bytes(tmp_path):
    raw_safetensors(tmp_path / "raw.safetensors", torch.zeros(2, dtype=torch.float16), torch.arange(12.0).view(6, 2))
    source = with_spans(lambda key: torch.arange(12.0).view(6, 2)[1:4],
                        lambda key, rows=None: FileSpan(tmp_path / "raw.safetensors", "b", (1, 4), torch.float32,
                                                        (3, 2)))
    store = stage([["b[1:4]"]], source, "disk", str(tmp_path / "offload"))
    assert store.in_place_bytes == 24
    assert torch.equal(store["b[1:4]"].tensor(), torch.arange(12.0).view(6, 2)[1:4])

