"""Read a Hugging Face checkpoint saved in the hub layout into the names of a loaded model.

transformers v5 models hold fused expert stacks (``mlp.experts.gate_up_proj`` [E, 2F, D]) while
``save_pretrained`` and the hub keep the original layout (``mlp.experts.<e>.gate_proj.weight``,
Mixtral's ``block_sparse_moe.experts.<e>.w1.weight``). transformers converts between them while it
loads a model, with the model type's ``WeightRenaming`` / ``WeightConverter`` list; this module
applies that same list lazily, one model tensor at a time, so the ring can stage a checkpoint
without ever loading the whole model.

    >>> read, consumed = hub_layout_reader(model, checkpoint_names, read_one, DIR)     # doctest: +SKIP
    >>> read["model.layers.0.mlp.experts.gate_up_proj"]().shape           # doctest: +SKIP
    torch.Size([4, 64, 32])

Tied weights are made as ``from_pretrained`` makes them, too (``tie_as_checkpoint``).
"""

from __future__ import annotations

import copy
import re
import sys
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import warn_user
from .storage import StorageError

CONVERT_CHUNK_BYTES = 64 << 20   # per-expert tensors converted into a stacked one this many bytes at a time


def hub_layout_reader(model: nn.Module, present: set[str], read_one: Callable[..., torch.Tensor],
                      checkpoint: str) -> tuple[dict[str, Callable[..., torch.Tensor]], set[str]]:
    """Model tensor name -> loader (``loader(rows=None)``; rows (lo, hi) of a stacked expert tensor
    read only those experts' tensors), for the names that ``present`` (checkpoint names of the
    directory ``checkpoint``) holds only in the hub layout, and the checkpoint names those loaders
    read. Empty when ``model`` is no transformers model or has no conversion list. A stacked
    tensor's per-expert sources are checked before they are converted: one tensor per expert
    (here), all of one shape (as they are read); else a StorageError names them.

    Pseudo-code (what transformers' loader does, minus the eager loading):

        for key in checkpoint names, in natural order (expert 2 before expert 10):
            target, pattern = renamings, then at most one converter, applied to key
            target is a model tensor: collect key under (target, converter copy, pattern)
        loader(target) = read the collected keys, run the converter's operations
    """
    if "transformers" not in sys.modules:          # no transformers model exists before it is imported
        return {}, set()
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (MergeModulelist, WeightConverter, WeightRenaming,
                                                     dot_natural_key, rename_source_key)
    except Exception:  # noqa: BLE001 - an older transformers, or one that cannot load with this torch
        return {}, set()
    if not isinstance(model, PreTrainedModel):
        return {}, set()
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if not renamings and not converters:
        return {}, set()
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    wanted = model.state_dict(keep_vars=True)
    collected: dict[str, tuple[Optional[object], dict[str, list[str]]]] = {}
    for key in sorted(present, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, wanted)
        if target not in wanted or target in present:
            continue
        converter, sources = collected.setdefault(
            target, (copy.deepcopy(by_pattern[pattern]) if pattern is not None else None, {}))
        sources.setdefault(pattern or key, []).append(key)
    for target, (converter, sources) in collected.items():
        if converter is not None and any(isinstance(op, MergeModulelist) for op in converter.operations):
            _check_expert_count(target, wanted[target].shape[0], sources, checkpoint)

    def loader(target: str, converter, sources: dict[str, list[str]]) -> Callable[..., torch.Tensor]:
        first_read: dict[str, tuple[str, torch.Size]] = {}      # pattern -> (key, shape) of its first tensor read

        def load(rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
            if converter is None:                  # a renaming only
                return read_one(next(iter(sources.values()))[0], rows)
            num_experts = wanted[target].shape[0]
            lo, hi = rows or (0, num_experts)
            if all(len(keys) == num_experts for keys in sources.values()):
                # one source tensor per expert: read experts [lo, hi) only, a chunk at a time
                # (unless the conversion disagrees)
                part = convert_in_chunks(sources, lo, hi, wanted[target])
                if part is not None:
                    return part
            whole = convert(sources)
            return whole if rows is None else whole[lo:hi]

        def convert_in_chunks(sources: dict[str, list[str]], lo: int, hi: int, like: torch.Tensor
                              ) -> Optional[torch.Tensor]:
            """Experts [lo, hi) converted ``CONVERT_CHUNK_BYTES`` at a time into one tensor: the
            stacked result and one chunk's source tensors are in memory, not all the sources and
            the conversion's intermediate stacks. None when a chunk converts to another row count."""
            step = max(1, CONVERT_CHUNK_BYTES // max(1, like[0].numel() * like.element_size()))
            out = None
            for start in range(lo, hi, step):
                stop = min(start + step, hi)
                part = convert({pattern: keys[start:stop] for pattern, keys in sources.items()})
                if part.shape[0] != stop - start:
                    return None
                if stop - start == hi - lo:      # one chunk: the conversion's result as it is
                    return part
                if out is None:
                    out = part.new_empty((hi - lo, *part.shape[1:]))
                out[start - lo:stop - lo] = part
            return out

        def convert(sources: dict[str, list[str]]) -> torch.Tensor:
            tensors = {pattern: [read_one(k) for k in keys] for pattern, keys in sources.items()}
            for pattern, keys in sources.items():
                _check_same_shape(target, keys, tensors[pattern], first_read.setdefault(
                    pattern, (keys[0], tensors[pattern][0].shape)), checkpoint)
            for op in converter.operations:
                tensors = op.convert(tensors, source_patterns=converter.source_patterns,
                                     target_patterns=converter.target_patterns, full_layer_name=target,
                                     model=model, config=model.config)
            ours = [t for name, t in tensors.items() if target.endswith(name)]
            if len(ours) != 1:
                raise KeyError(f"converting the hub layout into '{target}' gave {sorted(tensors)}")
            return ours[0]
        return load
    loaders = {target: loader(target, converter, sources) for target, (converter, sources) in collected.items()}
    consumed = {key for _, sources in collected.values() for keys in sources.values() for key in keys}
    return loaders, consumed


def _expert_indices(pattern: str, keys: list[str]) -> list[int]:
    """The expert numbers of ``keys``: what the ``*`` of ``pattern`` matches in each."""
    regex = re.compile(re.escape(pattern).replace(r"\*", r"(\d+)"))
    return [int(m.group(1)) for m in map(regex.search, keys) if m and m.groups()]


def _check_expert_count(target: str, num_experts: int, sources: dict[str, list[str]], checkpoint: str) -> None:
    """Each source pattern of the stacked ``target`` must give one tensor per expert."""
    for pattern, keys in sources.items():
        if len(keys) == num_experts:
            continue
        found = _expert_indices(pattern, keys)
        missing = sorted(set(range(num_experts)) - set(found))
        extra = sorted({i for i in found if i >= num_experts} | {i for i in found if found.count(i) > 1})
        raise StorageError(
            f"checkpoint {checkpoint!r} holds {len(keys)} tensor(s) '{pattern}' for '{target}', which stacks "
            f"{num_experts} experts (one tensor each)" + (f"; missing: experts {missing}" if missing else "")
            + (f"; unexpected: experts {extra}" if extra else "") + f"; keys: {keys[0]!r} ... {keys[-1]!r}. "
            f"The checkpoint is incomplete or of a model with another number of experts: copy it again, or "
            f"build the model from the config saved with it")


def _check_same_shape(target: str, keys: list[str], tensors: list[torch.Tensor],
                      first: tuple[str, torch.Size], checkpoint: str) -> None:
    """The per-expert tensors stacked into ``target`` must all have the shape of the first one read."""
    for key, tensor in zip(keys, tensors):
        if tensor.shape != first[1]:
            raise StorageError(
                f"checkpoint {checkpoint!r} holds '{key}' with shape {list(tensor.shape)} but '{first[0]}' with "
                f"{list(first[1])}: the per-expert tensors stacked into '{target}' must have one shape; the "
                f"checkpoint is damaged or mixes models: copy it again")


def tie_as_checkpoint(model: nn.Module, present: set[str], read_one: Callable[..., torch.Tensor],
                      checkpoint: str) -> None:
    """Tie the meta parameters that a transformers model declares tied (``all_tied_weights_keys``,
    target -> source, from ``config.tie_word_embeddings``) as ``from_pretrained`` does with a
    checkpoint holding ``present``:

        for target, source declared tied, source a meta parameter:
            checkpoint holds both, with different values -> untie (a new meta target), warn, and
                                                            drop the pair from all_tied_weights_keys
            else                                         -> target = source's Parameter

    accelerate's ``init_empty_weights()`` registers every parameter anew, so a model built under it
    has two meta parameters where ``mc.empty_weights()`` has one. Parameters in memory are left as
    their loader made them."""
    declared = getattr(model, "all_tied_weights_keys", None)
    if not isinstance(declared, dict):
        return
    for target, source in list(declared.items()):
        source_param = model.get_parameter(source)
        if not source_param.is_meta:
            continue
        parent, _, attr = target.rpartition(".")
        if target in present and source in present and not _same_values(read_one, target, source, source_param):
            warn_user(f"checkpoint {checkpoint!r} holds '{target}' and '{source}' with different values, but "
                      f"{type(model).__name__} ties them (config.tie_word_embeddings): they are used untied, as "
                      f"transformers does; set tie_word_embeddings=False in the config to silence this")
            if model.get_parameter(target) is source_param:
                setattr(model.get_submodule(parent), attr, nn.Parameter(
                    torch.empty_like(source_param, device="meta"), requires_grad=source_param.requires_grad))
            declared.pop(target)
        else:
            setattr(model.get_submodule(parent), attr, source_param)


def _same_values(read_one: Callable[..., torch.Tensor], a: str, b: str, like: torch.Tensor) -> bool:
    """Whether checkpoint tensors ``a`` and ``b`` are equal, read ``CONVERT_CHUNK_BYTES`` at a time."""
    if like.dim() == 0:
        return torch.equal(read_one(a), read_one(b))
    step = max(1, CONVERT_CHUNK_BYTES // max(1, like[0].numel() * like.element_size()))
    return all(torch.equal(read_one(a, (lo, lo + step)), read_one(b, (lo, lo + step)))
               for lo in range(0, like.shape[0], step))
