"""The model tensors a ring program staged, watched for changes made after it was compiled.

A ring computes with the weights it staged: copies (on disk, in pinned memory, cast to the plan's
dtype) or, in host memory on the CPU, the model's own tensors read in place. A model changed
after compile would therefore run with stale weights, or with a mix of old and new ones once a
call lowers the graph again. The next call is refused instead, naming the tensor and the change;
an in-place change of a tensor the ring reads in place (every stored row of it is the model's
own memory) is what the ring computes with, and is taken.

    >>> watch = StagedWeights(model)                       # doctest: +SKIP
    >>> store = stage(groups, sliced(watch.source()), "host")       # doctest: +SKIP
    >>> watch.check(store)                                 # before each call: RingWeightsError if changed
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import MoesysError
from ..runtime.sources import named_tensors, row_range
from ..runtime.storage import Rows, Source, WeightStore, slice_key


# the one change a ring may take (where it reads the tensor in place): ``_change``'s word for it
MODIFIED_IN_PLACE = "was modified in place"


class RingWeightsError(MoesysError, RuntimeError):
    """The ring cannot take in new weights: it staged the model's weights when it was compiled."""


@dataclass(frozen=True)
class _Seen:
    """What a staged tensor was when the ring read it (``tensor`` and ``storage``: weak references
    to it and to its memory; torch keeps one storage object per storage, alive as long as it is)."""
    storage: weakref.ref
    storage_offset: int
    version: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    tensor: weakref.ref

    @staticmethod
    def of(tensor: torch.Tensor) -> "_Seen":
        return _Seen(weakref.ref(tensor.untyped_storage()), tensor.storage_offset(), _version(tensor), tensor.dtype,
                     tuple(tensor.shape), weakref.ref(tensor))


def _version(tensor: torch.Tensor) -> int:
    """The tensor's count of in-place changes; -1 for an inference tensor, which keeps none."""
    return -1 if tensor.is_inference() else tensor._version


class StagedWeights:
    """The model's tensors as the ring read them, by name; ``check`` compares the model's now."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.seen: dict[str, _Seen] = {}
        self._listed: dict[str, torch.Tensor] = {}

    def source(self) -> Source:
        """The model's tensors as staging reads them (name, rows -> tensor), each noted as it is
        first read. They are listed once until the next ``check`` (which runs before every call,
        so nothing changed in between), not once per tensor read."""
        def read(name: str, rows: Rows = None) -> torch.Tensor:
            if name not in self._listed:
                self._listed = named_tensors(self.model)
            tensor = self._listed[name]
            self.seen.setdefault(name, _Seen.of(tensor))
            return row_range(tensor.detach(), rows)
        return read

    def check(self, store: WeightStore) -> bool:
        """RingWeightsError naming the first staged tensor the model no longer holds as it was
        read; an in-place change of a tensor ``store`` reads in place is taken (noted as seen).
        Returns whether one was taken: the slots holding copies of it must load it again."""
        self._listed = {}
        taken = False
        now = named_tensors(self.model) if self.seen else {}
        for name, seen in self.seen.items():
            tensor = now.get(name)
            change = _change(seen, tensor)
            if change is None or _held_under_another_name(seen, now):
                continue
            if change == MODIFIED_IN_PLACE and _read_in_place(store, name, tensor):
                self.seen[name] = _Seen.of(tensor)
                taken = True
                continue
            raise RingWeightsError(
                f"{name} of {type(self.model).__name__} {change} after the ring program was compiled, and the ring "
                f"computes with the weights it staged then (its own copies on disk, in pinned memory or in "
                f"Plan.dtype), so the call would run with stale or mixed weights; compile the model again "
                f"(mc.compile) to run its new weights, or change them before compiling")
        return taken


def _change(seen: _Seen, tensor: Optional[torch.Tensor]) -> Optional[str]:
    if tensor is None:
        return "is no longer in the model"
    if tensor.dtype != seen.dtype:
        return f"was cast from {seen.dtype} to {tensor.dtype}"
    if tuple(tensor.shape) != seen.shape:
        return f"changed shape from {list(seen.shape)} to {list(tensor.shape)}"
    if seen.tensor() is not tensor or _other_memory(seen, tensor):   # the graph holds the model's own objects
        return "was replaced by another tensor"
    if _version(tensor) != seen.version:
        return MODIFIED_IN_PLACE
    return None


def _held_under_another_name(seen: _Seen, now: dict[str, torch.Tensor]) -> bool:
    """The very tensor the ring read, unchanged, still in the model under another of its names: a
    name that had aliased it now holds another tensor (a dynamic rotary embedding, called eagerly,
    points ``inv_freq`` at new frequencies and back at ``original_inv_freq``). The ring reads the
    tensor, not the name, and a graph lowered again finds it under the name that still holds it."""
    tensor = seen.tensor()
    return tensor is not None and any(other is tensor and _change(seen, other) is None for other in now.values())


def _other_memory(seen: _Seen, tensor: torch.Tensor) -> bool:
    """``tensor`` is not the memory the ring read: another storage (``.data`` assigned, ``.to()``)
    or another place in it. The storage, not its address: new memory can sit at the address of
    memory freed since, and a storage moved into shared memory (``share_memory_``, as
    ``model.share_memory()`` or ``program.share_memory()`` do for torch.multiprocessing) keeps its
    values at a new address; views of it follow the move, copies still hold its values."""
    return tensor.untyped_storage() is not seen.storage() or tensor.storage_offset() != seen.storage_offset


def _read_in_place(store: WeightStore, name: str, tensor: torch.Tensor) -> bool:
    """Every location ``store`` keeps of ``name`` (whole, or rows of it) is memory of ``tensor``."""
    storage = tensor.untyped_storage().data_ptr()
    held = [loc for key, loc in store.locations.items() if key == name or (slice_key(key) or (None,))[0] == name]
    return bool(held) and all(loc.buffer.untyped_storage().data_ptr() == storage for loc in held)
