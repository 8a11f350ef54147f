"""Which tensors a Hugging Face checkpoint directory gives the ring, and how it refuses one it
cannot serve: the files transformers would load and no other, tied weights as ``from_pretrained``
ties them (also for a model built under accelerate's ``init_empty_weights()``), per-expert tensors
checked before they are stacked, and an offload directory that cannot be written or cleaned."""

from __future__ import annotations

import errno
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import moesys_compile as mc
from moesys_compile.infer import model_bytes
from moesys_compile.runtime import storage
from moesys_compile.runtime.sources import checkpoint_source, model_source
from moesys_compile.runtime.storage import StorageError

sys.path.insert(0, str(Path(__file__).parent))
from test_empty_weights import _ids, _logits, _ring  # noqa: E402


def _save_linear(path: Path, value: float) -> dict[str, torch.Tensor]:
    tensors = {"weight": torch.full((3, 2), value), "bias": torch.full((3,), value)}
    save_file(tensors, str(path))
    return tensors


def _change(path: Path, change) -> None:
    """Apply ``change(state) -> None`` to a safetensors file in place."""
    state = load_file(str(path))
    change(state)
    save_file(state, str(path), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# the files read
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("other", ["model_ema.safetensors", "ring-0123abcd-00000.safetensors"])
def test_model_safetensors_is_read_alone_as_transformers_reads_it(other, tmp_path):
    """Another safetensors file beside model.safetensors (an EMA copy, a ring's offload file) is
    not read, even where its name sorts after it."""
    want = _save_linear(tmp_path / "model.safetensors", 1.0)
    _save_linear(tmp_path / other, 2.0)
    read = checkpoint_source(str(tmp_path), nn.Linear(2, 3))
    torch.testing.assert_close(read("weight"), want["weight"], rtol=0, atol=0)


def test_a_sharded_checkpoint_reads_the_files_of_its_index_only(tmp_path):
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file({k: v for k, v in state.items() if k.startswith("0.")}, str(tmp_path / "model-1.safetensors"))
    save_file({k: v for k, v in state.items() if k.startswith("1.")}, str(tmp_path / "model-2.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {' + ", ".join(f'"{k}": "model-{1 if k.startswith("0.") else 2}.safetensors"'
                                       for k in state) + "}}")
    save_file({"1.weight": torch.zeros(2, 3)}, str(tmp_path / "zz-extra.safetensors"))
    read = checkpoint_source(str(tmp_path), model)
    torch.testing.assert_close(read("1.weight"), state["1.weight"], rtol=0, atol=0)


def test_the_rings_own_offload_files_in_the_checkpoint_directory_are_never_read(tmp_path):
    """offload_dir == weights_checkpoint: a bf16 program's offload files (or those a killed process
    left) do not stand for the checkpoint of a later fp32 one."""
    model = nn.Linear(2, 3)
    want = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file(want, str(tmp_path / "model.safetensors"))
    bf16 = storage.stage([["weight"], ["bias"]], model_source(model), "disk", str(tmp_path), torch.bfloat16)
    assert bf16.files and all(f.parent == tmp_path for f in bf16.files)
    torch.testing.assert_close(checkpoint_source(str(tmp_path), model)("weight"), want["weight"], rtol=0, atol=0)
    (tmp_path / "model.safetensors").rename(tmp_path / "weights.safetensors")    # a directory read by glob
    torch.testing.assert_close(checkpoint_source(str(tmp_path), model)("weight"), want["weight"], rtol=0, atol=0)


def test_a_tensor_in_two_files_of_a_directory_without_model_safetensors_is_refused(tmp_path):
    _save_linear(tmp_path / "a.safetensors", 1.0)
    _save_linear(tmp_path / "b.safetensors", 2.0)
    with pytest.raises(StorageError, match=r"a\.safetensors'.*b\.safetensors' both hold tensor '(bias|weight)'"):
        checkpoint_source(str(tmp_path), nn.Linear(2, 3))


# ---------------------------------------------------------------------------------------------
# tied weights
# ---------------------------------------------------------------------------------------------


def _tied_qwen(directory: Path):
    """A tied Qwen3-MoE saved in the hub layout (save_pretrained keeps the embedding only), and it
    loaded whole."""
    pytest.importorskip("transformers")
    from moesys_compile.models.hf import build_hf, load_local
    build_hf("qwen3_moe", tie_word_embeddings=True).save_pretrained(str(directory))
    return load_local(str(directory), {}).eval()


def test_tied_weights_of_a_model_built_under_accelerates_init_empty_weights(tmp_path):
    """accelerate registers lm_head's meta Parameter anew: the tie is the model's declared one."""
    accelerate = pytest.importorskip("accelerate")
    from moesys_compile.models.hf import config_only
    whole = _tied_qwen(tmp_path / "hf")
    with accelerate.init_empty_weights():
        model = config_only(str(tmp_path / "hf"), {}).eval()
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    program = _ring(model, tmp_path / "hf", tmp_path, model_bytes(whole) // 2 + 2**16)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.is_meta
    with torch.inference_mode():
        torch.testing.assert_close(_logits(program(_ids())), _logits(whole(_ids())), rtol=1e-5, atol=1e-5)


def test_a_checkpoint_with_its_own_head_unties_a_tied_config_as_transformers_does(tmp_path):
    pytest.importorskip("transformers")
    from moesys_compile.models.hf import config_only, load_local
    _tied_qwen(tmp_path / "hf")
    head = torch.randn(128, 32, generator=torch.Generator().manual_seed(1)) * 0.02
    _change(tmp_path / "hf" / "model.safetensors", lambda state: state.update({"lm_head.weight": head}))
    whole = load_local(str(tmp_path / "hf"), {}).eval()
    assert not torch.equal(whole.lm_head.weight, whole.model.embed_tokens.weight)
    with mc.empty_weights():
        model = config_only(str(tmp_path / "hf"), {}).eval()
    with pytest.warns(UserWarning, match=r"'lm_head\.weight' and 'model\.embed_tokens\.weight' with different values"):
        program = _ring(model, tmp_path / "hf", tmp_path, model_bytes(whole) // 2 + 2**16, weights="host")
    assert model.lm_head.weight is not model.model.embed_tokens.weight and model.lm_head.weight.is_meta
    with torch.inference_mode():
        torch.testing.assert_close(_logits(program(_ids())), _logits(whole(_ids())), rtol=1e-5, atol=1e-5)


def test_a_checkpoint_holding_both_tied_names_with_one_value_stays_tied(tmp_path):
    """A PyTorch .bin checkpoint saves the tied tensor under both names."""
    pytest.importorskip("transformers")
    from moesys_compile.models.hf import config_only
    whole = _tied_qwen(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(whole.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    with mc.empty_weights():
        model = config_only(str(tmp_path / "hf"), {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read = checkpoint_source(str(tmp_path / "hf"), model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(read("lm_head.weight"), whole.lm_head.weight.detach(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# per-expert tensors of the hub layout
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage,message", [
    ("missing", r"holds 3 tensor\(s\) 'mlp\.experts\.\*\.up_proj\.weight' for 'model\.layers\.0\.mlp\.experts"
                r"\.gate_up_proj', which stacks 4 experts.*missing: experts \[2\]"),
    ("extra", r"holds 5 tensor\(s\).*unexpected: experts \[4\]"),
    ("shape", r"'model\.layers\.0\.mlp\.experts\.3\.down_proj\.weight' with shape \[32, 16\] but "
              r"'model\.layers\.0\.mlp\.experts\.0\.down_proj\.weight' with \[32, 32\].*'model\.layers\.0\.mlp"
              r"\.experts\.down_proj'"),
], ids=["missing", "extra", "shape"])
def test_per_expert_tensors_that_cannot_be_stacked_are_named(damage, message, tmp_path):
    pytest.importorskip("transformers")
    from moesys_compile.models.hf import build_hf, config_only
    build_hf("qwen3_moe").save_pretrained(str(tmp_path / "hf"))

    def change(state):
        if damage == "missing":
            del state["model.layers.0.mlp.experts.2.up_proj.weight"]
        elif damage == "extra":
            state["model.layers.0.mlp.experts.4.up_proj.weight"] = torch.zeros(32, 32)
        else:
            state["model.layers.0.mlp.experts.3.down_proj.weight"] = torch.zeros(32, 16)
    _change(tmp_path / "hf" / "model.safetensors", change)
    with mc.empty_weights():
        model = config_only(str(tmp_path / "hf"), {})
    with pytest.raises(StorageError, match=message):
        read = checkpoint_source(str(tmp_path / "hf"), model)
        read("model.layers.0.mlp.experts.gate_up_proj")
        read("model.layers.0.mlp.experts.down_proj")


# ---------------------------------------------------------------------------------------------
# the offload directory
# ---------------------------------------------------------------------------------------------


def test_a_full_offload_directory_is_a_storage_error_naming_plan_offload_dir(tmp_path, monkeypatch):
    def full(*args, **kwargs):      # what safetensors raises when the disk is full
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(storage, "save_file", full)
    with pytest.raises(StorageError, match=r"No space left on device.*Plan\.offload_dir"):
        storage.stage([["weight"]], model_source(nn.Linear(2, 3)), "disk", str(tmp_path / "off"))


def test_offload_files_that_cannot_be_removed_are_left_without_an_error(tmp_path, monkeypatch):
    store = storage.stage([["weight"]], model_source(nn.Linear(2, 3)), "disk", str(tmp_path))

    def read_only(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system", str(self))
    monkeypatch.setattr(Path, "unlink", read_only)
    store.remove_files()
    assert store.files[0].is_file()


def test_a_model_with_its_buffers_on_meta_is_pointed_to_accelerates_include_buffers_false(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    from moesys_compile.models.hf import build_hf, config_only
    build_hf("qwen3_moe").save_pretrained(str(tmp_path / "hf"))
    with accelerate.init_empty_weights(include_buffers=True):
        model = config_only(str(tmp_path / "hf"), {})
    with pytest.raises(mc.PlanError, match=r"init_empty_weights\(include_buffers=False\)"):
        _ring(model, tmp_path / "hf", tmp_path, 2**20)
