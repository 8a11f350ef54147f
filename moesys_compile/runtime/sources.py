"""Sources of the weights that ring inference streams: ``source(name, rows=None)`` -> CPU tensor,
names are the model's own state names; ``rows=(lo, hi)`` asks for rows lo..hi of dim 0 only, e.g.
an expert group, which checkpoint sources read without reading, dequantizing or converting the
other rows. ``runtime.storage`` stages what a source gives into a tier.

    model_source(model)                    the model's parameters and buffers
    checkpoint_source(directory, model)    a Hugging Face style directory (``model.safetensors``,
                                           or shards listed by ``model.safetensors.index.json``;
                                           else ``pytorch_model.bin`` or its ``.bin.index.json``
                                           shards; only without these, every ``*.safetensors``
                                           but the ring's offload files; names all under
                                           ``graph_module.``, a program's state_dict as the
                                           HF Trainer saves it, are read without it), or this project's
                                           training checkpoint (``meta.json`` + dense/expert
                                           shards); non-persistent buffers (not in checkpoints)
                                           and tied weights saved under one name come from the
                                           model; a transformers model's declared ties are
                                           made, or undone, as ``from_pretrained`` does
                                           (``hf_layout.tie_as_checkpoint``). Quantized
                                           tensors (fine-grained FP8, MXFP4) are read
                                           dequantized (``runtime.quantized``). Every
                                           tensor must have the model's shape; a floating one
                                           is cast to the model's dtype. A missing or damaged
                                           file (shard, index, meta.json) is a StorageError
                                           naming it; checkpoint tensors the model does not
                                           hold are named in one warning
    sliced(source)                         also serves ``name[lo:hi]``

A checkpoint source also tells where a tensor lies unconverted in a safetensors file
(``storage.span_of``: a ``FileSpan`` with the model's dtype and shape, for the disk tier to read
it in place); a tensor that is dequantized, converted from the hub layout, cast or taken from the
model has none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import pickle
import re
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import warn_user
from ..frontend.adapters import peft_base_model
from .quantized import dequantizing_reader, fp8_block_size
from .storage import OFFLOAD_FILE, FileSpan, Rows, Source, StorageError, slice_key, span_of, with_spans


def row_range(tensor: torch.Tensor, rows: Rows) -> torch.Tensor:
    return tensor if rows is None else tensor[rows[0]:rows[1]]


def _safetensors_rows(opened, name: str, rows: Rows) -> torch.Tensor:
    """``name`` from an open safetensors file; with ``rows``, only those rows are read."""
    return opened.get_tensor(name) if rows is None else opened.get_slice(name)[rows[0]:rows[1]]


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by each of its names (tied ones under all)."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return tensors


def tensor_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Every state name -> all names of the same tensor (tied weights), canonical name first."""
    by_id: dict[int, list[str]] = {}
    for name, tensor in named_tensors(model).items():
        by_id.setdefault(id(tensor), []).append(name)
    return {name: names for names in by_id.values() for name in names}


def model_source(model: nn.Module) -> Source:
    state = named_tensors(model)

    def read(name: str, rows: Rows = None) -> torch.Tensor:
        return row_range(state[name].detach(), rows)
    return read


def _damaged(file: Path, why: str) -> StorageError:
    return StorageError(f"checkpoint file {str(file)!r} {why}: the checkpoint is incomplete or damaged; copy or "
                        f"download it again (or save it again with model.save_pretrained(DIR))")


def _weight_map(index: Path) -> dict[str, Path]:
    """Tensor name -> file, from a sharded checkpoint's index; every file it names must exist."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: index.parent / file for name, file in weight_map.items()}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise _damaged(index, f"is not a valid index (a JSON object with a 'weight_map' of tensor name -> file; "
                              f"{type(exc).__name__}: {exc})") from None
    missing = sorted({file.name for file in files.values() if not file.is_file()})
    if missing:
        raise _damaged(index.parent / missing[0], f"is missing ({index.name} names {missing}, not all in the "
                                                  f"directory)")
    return files


# the files transformers loads, in its order of preference: one file, else a sharded checkpoint's index
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")


def _hf_index(directory: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the file holding it, from the files transformers would load
    (``HF_WEIGHTS``: other ``*.safetensors`` beside them, an EMA copy or a ring's offload files,
    are not read); only a directory with none of them has its ``*.safetensors`` (else
    ``pytorch_model*.bin``) read, each tensor name in one file."""
    for name in HF_WEIGHTS:
        if (directory / name).is_file():
            file = directory / name
            return _weight_map(file) if name.endswith(".json") else _names_in([file])
    files = ([f for f in sorted(directory.glob("*.safetensors")) if not OFFLOAD_FILE.fullmatch(f.name)]
             or sorted(directory.glob("pytorch_model*.bin")))
    if not files:
        raise StorageError(f"checkpoint directory {str(directory)!r} has no model.safetensors, "
                           f"model.safetensors.index.json, *.safetensors (ring-*.safetensors offload files are "
                           f"not checkpoints) or pytorch_model.bin file; save the model there with "
                           f"model.save_pretrained(directory)")
    return _names_in(files)


def _names_in(files: list[Path]) -> dict[str, Path]:
    """Tensor name -> file, over ``files``; a name in two of them is refused (which one holds the
    model's tensor is not known)."""
    names: dict[str, Path] = {}
    for file in files:
        for name in _open_weights(file).keys():
            if name in names:
                raise StorageError(f"checkpoint files {str(names[name])!r} and {str(file)!r} both hold tensor "
                                   f"'{name}': the directory holds more than one checkpoint; move the files that "
                                   f"are not the model's (e.g. an EMA copy) out of it, or list the model's files "
                                   f"in a model.safetensors.index.json")
            names[name] = file
    return names


def _open_weights(file: Path):
    """A file's tensors by name, read lazily: safetensors through ``safe_open``, a ``.bin`` through
    ``torch.load(mmap=True)``. A missing or damaged file is a StorageError naming it."""
    try:
        if file.suffix == ".safetensors":
            return safe_open(str(file), framework="pt")
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except (OSError, SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise _damaged(file, f"cannot be read ({type(exc).__name__}: {exc})") from None


def _read_hf(files: dict[str, Path]) -> Source:
    opened: dict[Path, object] = {}         # one file open at a time: sections read shards in order

    def read(name: str, rows: Rows = None) -> torch.Tensor:
        file = files[name]
        if file not in opened:
            opened.clear()
            opened[file] = _open_weights(file)
        try:
            if file.suffix != ".safetensors":
                return row_range(opened[file][name], rows)
            return _safetensors_rows(opened[file], name, rows)
        except (KeyError, SafetensorError) as exc:      # the index names a tensor the file lacks
            raise _damaged(file, f"cannot give tensor '{name}' ({type(exc).__name__}: {exc})") from None

    def span(name: str, rows: Rows = None) -> Optional[FileSpan]:
        file = files.get(name)
        return FileSpan(file, name, rows) if file is not None and file.suffix == ".safetensors" else None
    return with_spans(read, span)


# a training program's own module: ``program.state_dict()`` holds the model's names under it
PROGRAM_PREFIX = "graph_module."


def _program_state(root: Path, files: dict[str, Path], read: Source) -> tuple[dict[str, Path], Source]:
    """A checkpoint of ``program.state_dict()`` (every name under ``graph_module.``: what the HF
    Trainer saves of a compiled program, as of any module that is not a ``PreTrainedModel``), read
    by the model's own names; one rank's expert shard (a program at expert_parallel > 1) is refused."""
    if not files or not all(name.startswith(PROGRAM_PREFIX) for name in files):
        return files, read
    if f"{PROGRAM_PREFIX}_extra_state" in files:
        raise StorageError(f"checkpoint {str(root)!r} holds program.state_dict() of one rank at expert_parallel > 1 "
                           f"(its own experts only); save the whole model with program.save(DIR) (a collective), "
                           f"or program.full_state_dict()")
    own = {name.removeprefix(PROGRAM_PREFIX): file for name, file in files.items()}

    def read_own(name: str, rows: Rows = None) -> torch.Tensor:
        return read(PROGRAM_PREFIX + name, rows)

    def span(name: str, rows: Rows = None) -> Optional[FileSpan]:
        return span_of(read, PROGRAM_PREFIX + name, rows)
    return own, with_spans(read_own, span)


@contextlib.contextmanager
def _as_storage_error():
    """A training checkpoint's own error (CheckpointError: a damaged file, named) as the
    StorageError that every checkpoint source raises."""
    from .checkpoint import CheckpointError
    try:
        yield
    except CheckpointError as exc:
        raise StorageError(str(exc)) from exc


def _project_reader(directory: Path) -> tuple[set[str], Source]:
    """This project's training checkpoint: its tensor names and a reader (``rows``: rows of dim 0
    of the full tensor, read from the expert shards that hold them)."""
    from . import checkpoint
    with _as_storage_error():
        path, meta = checkpoint.read_meta(str(directory))
        with checkpoint.open_file(path / checkpoint.DENSE) as f:
            dense = set(f.keys())
    experts = meta.get("experts", {})
    aliases = meta.get("aliases", {})

    def read(name: str, rows: Rows = None) -> torch.Tensor:
        name = aliases.get(name, name)
        with _as_storage_error():
            if name in experts:
                return checkpoint.read_dim0(path, meta, name, rows)
            with checkpoint.open_file(path / checkpoint.DENSE) as f:
                return _safetensors_rows(f, name, rows)

    def span(name: str, rows: Rows = None) -> Optional[FileSpan]:
        name = aliases.get(name, name)
        if name in dense:
            return FileSpan(path / checkpoint.DENSE, name, rows)
        with contextlib.suppress(checkpoint.CheckpointError, KeyError, TypeError):
            return checkpoint.shard_span(path, meta, name, rows)
        return None
    return dense | set(experts) | set(aliases), with_spans(read, span)


def checkpoint_source(directory: str, model: nn.Module) -> Source:
    """Read tensors one at a time from a checkpoint directory (see the module docstring); a
    training run's checkpoint root stands for its newest step."""
    from .checkpoint import latest_step
    root = latest_step(directory) or Path(directory)
    if not root.is_dir():
        raise StorageError(f"checkpoint directory {directory!r} does not exist")
    if peft_base_model(model) is not None:
        raise StorageError(
            f"{type(model).__name__} cannot stage its weights from checkpoint {directory!r}: a PEFT model names its "
            f"tensors with PEFT's prefixes (base_model.model., .base_layer) and holds adapter tensors that a base "
            f"checkpoint lacks; build it with its base model's weights loaded (from_pretrained, then "
            f"PeftModel.from_pretrained) and compile it without Plan.weights_checkpoint (weights='disk' keeps them in "
            f"offload_dir), or merge the adapter (merge_and_unload(), save_pretrained(DIR)) and stage that DIR")
    state = model.state_dict(keep_vars=True)      # the persistent tensors: what checkpoints hold
    if (root / "meta.json").is_file():
        (present, read_one), converted_from = _project_reader(root), set()
    else:
        files = _hf_index(root)
        files, read_hf = _program_state(root, files, _read_hf(files))
        shapes = {name: t.shape for name, t in state.items()}
        present, read_file = dequantizing_reader(set(files), read_hf, fp8_block_size(root), shapes.get)
        present, read_one, converted_from = _with_hub_layout(model, root, present, read_file)
    from .hf_layout import tie_as_checkpoint
    tie_as_checkpoint(model, present, read_one, str(root))
    aliases = tensor_aliases(model)
    _warn_unused(root, present - converted_from - set(aliases), model)
    fallback = model_source(model)

    def read(name: str, rows: Rows = None) -> torch.Tensor:
        for candidate in aliases.get(name, [name]):
            if candidate in present:
                return _fitted(root, name, read_one(candidate, rows), fallback(name, rows), model)
        if name not in state:
            return fallback(name, rows)     # a non-persistent buffer: checkpoints never hold it
        raise missing_tensor(root, name, aliases.get(name, [name]), present, model)

    def span(name: str, rows: Rows = None) -> Optional[FileSpan]:
        """Where ``read`` would read ``name`` unconverted, with the model's dtype and shape (the
        disk tier checks the file's header against them, so a cast or a misfit is staged)."""
        candidate = next((c for c in aliases.get(name, [name]) if c in present), None)
        found = None if candidate is None else span_of(read_one, candidate, rows)
        if found is None:
            return None
        like = fallback(name, rows)
        return dataclasses.replace(found, dtype=like.dtype, shape=tuple(like.shape))
    return with_spans(read, span)


def _fitted(root: Path, name: str, tensor: torch.Tensor, like: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """``tensor`` as the model holds ``name``: its shape checked here (not as a matmul error in the
    ring), a floating tensor cast to the model's dtype (the dtype the graph was captured in)."""
    if tensor.shape != like.shape:
        raise StorageError(f"checkpoint {str(root)!r} holds '{name}' with shape {list(tensor.shape)}, but "
                           f"{type(model).__name__} has it as {list(like.shape)}: the checkpoint is of a model "
                           f"with another configuration; build the model from the config saved with it")
    return tensor.to(like.dtype) if tensor.is_floating_point() and like.is_floating_point() else tensor


def _with_hub_layout(model: nn.Module, root: Path, present: set[str], read_file: Source):
    """Also serve the model names that a hub-layout checkpoint holds in another form (per-expert
    tensors, older module names), converted one tensor at a time as transformers would; also
    returns the checkpoint names those conversions read."""
    from .hf_layout import hub_layout_reader
    converted, converted_from = hub_layout_reader(model, present, read_file, str(root))
    if not converted:
        return present, read_file, converted_from

    def read(name: str, rows: Rows = None) -> torch.Tensor:
        return converted[name](rows) if name in converted else read_file(name, rows)

    def span(name: str, rows: Rows = None) -> Optional[FileSpan]:
        return None if name in converted else span_of(read_file, name, rows)
    return present | set(converted), with_spans(read, span), converted_from


# the unused-tensor warnings given in this process: compile (its probe and the ring) and the CLI's
# eager reference each open the same checkpoint for the same model, and one warning says it all
_WARNED_UNUSED: set[str] = set()


def _warn_unused(root: Path, names: set[str], model: nn.Module) -> None:
    """Warn, once per process, about checkpoint tensors ``names`` that ``model`` does not hold (as
    transformers does when it loads a checkpoint of another model or configuration), except those
    the model class declares as expected leftovers (``_keys_to_ignore_on_load_unexpected``)."""
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    unused = sorted(n for n in names - set(model.state_dict(keep_vars=True)) if not any(p.search(n) for p in ignored))
    if not unused:
        return
    shown = ", ".join(unused[:5]) + (f", ... ({len(unused) - 5} more)" if len(unused) > 5 else "")
    message = (f"checkpoint {str(root)!r}: {len(unused)} tensor(s) match no tensor of {type(model).__name__} and "
               f"are not used: {shown}; check that the checkpoint is of this model and configuration")
    key = f"{root.resolve()}\n{message}"
    if key not in _WARNED_UNUSED:
        _WARNED_UNUSED.add(key)
        warn_user(message)


def missing_tensor(root: Path, name: str, candidates: list[str], present: set[str], model: nn.Module) -> StorageError:
    """The error for a model tensor the checkpoint lacks: the checkpoint's nearest names, and for a
    Hugging Face directory the usual cause, a hub layout (e.g. one tensor per expert) that
    transformers converts only while it loads a model."""
    nearest = difflib.get_close_matches(name, sorted(present), n=3, cutoff=0.5)
    others = [c for c in candidates if c != name]
    message = (f"checkpoint {str(root)!r} has no tensor '{name}'" + (f" (nor an alias of it: {others})" if others
               else "") + f"; it does not fit {type(model).__name__}"
               + (f"; nearest names in it: {nearest}" if nearest else "")
               + "; pass a complete checkpoint saved from this model ("
               + ("model.save_pretrained(DIR)" if hasattr(model, "save_pretrained") else
                  "program.save(DIR) of its training program, or safetensors of model.state_dict()") + ").")
    owner = name.rsplit(".", 1)[0] + "."
    if (root / "config.json").is_file() and any(key.startswith(owner) for key in present):
        message += (" A Hugging Face checkpoint in the hub layout is converted by transformers when it loads the "
                    "model: pass the directory as MODEL (moesys-compile infer DIR ...), or compile "
                    "AutoModelForCausalLM.from_pretrained(DIR) without Plan.weights_checkpoint")
    return StorageError(message)


def sliced(source: Source) -> Source:
    """A source that also serves ``name[lo:hi]`` (rows lo..hi of ``name``, e.g. an expert group)."""
    def read(key: str) -> torch.Tensor:
        rows = slice_key(key)
        return source(rows[0], rows[1:]) if rows else source(key)

    def span(key: str, _rows: Rows = None) -> Optional[FileSpan]:
        rows = slice_key(key)
        return span_of(source, rows[0], rows[1:]) if rows else span_of(source, key)
    return with_spans(read, span)
