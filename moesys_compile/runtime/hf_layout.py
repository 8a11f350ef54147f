"""Read a Hugging Face checkpoint saved in the hub layout into the names of a loaded model.

transformers v5 models hold fused expert stacks (``mlp.experts.gate_up_proj`` [E, 2F, D]) while
``save_pretrained`` and the hub keep the original layout (``mlp.experts.<e>.gate_proj.weight``,
Mixtral's ``block_sparse_moe.experts.<e>.w1.weight``). transformers converts between them while it
loads a model, with the model type's ``WeightRenaming`` / ``WeightConverter`` list; this module
applies that same list lazily, one model tensor at a time, so the ring can stage a checkpoint
without ever loading the whole model.

    >>> read, consumed = hub_layout_reader(model, checkpoint_names, read_one)     # doctest: +SKIP
    >>> read("model.layers.0.mlp.experts.gate_up_proj").shape           # doctest: +SKIP
    torch.Size([4, 64, 32])
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
from torch import nn

CONVERT_CHUNK_BYTES = 64 << 20   # per-expert tensors converted into a stacked one this many bytes at a time


def hub_layout_reader(model: nn.Module, present: set[str], read_one: Callable[..., torch.Tensor]
                      ) -> tuple[dict[str, Callable[..., torch.Tensor]], set[str]]:
    """Model tensor name -> loader (``loader(rows=None)``; rows (lo, hi) of a stacked expert tensor
    read only those experts' tensors), for the names that ``present`` (checkpoint names) holds only
    in the hub layout, and the checkpoint names those loaders read. Empty when ``model`` is no
    transformers model or has no conversion list.

    Pseudo-code (what transformers' loader does, minus the eager loading):

        for key in checkpoint names, in natural order (expert 2 before expert 10):
            target, pattern = renamings, then at most one converter, applied to key
            target is a model tensor: collect key under (target, converter copy, pattern)
        loader(target) = read the collected keys, run the converter's operations
    """
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (WeightConverter, WeightRenaming, dot_natural_key,
                                                     rename_source_key)
    except ImportError:
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

    def loader(target: str, converter, sources: dict[str, list[str]]) -> Callable[..., torch.Tensor]:
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
