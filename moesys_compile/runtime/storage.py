"""Storage tiers of ring inference: where the streamed weights live while they are not in a slot.

    host   host memory: on a CUDA device one pinned buffer per section group; on the CPU the
           tensors as the source gives them (a model's own, where no cast or copy is needed)
    disk   one safetensors file per section group under ``offload_dir``, read through ``mmap``
           (``ring-<store token>-<group>.safetensors``, removed when the store is collected);
           a tensor that a checkpoint's safetensors file stores as the ring needs it (the
           source's ``FileSpan``: same dtype and shape, rows contiguous, aligned) is read from
           that file in place instead, and never written

Either way a tensor is a ``Location``: a byte range of a CPU uint8 buffer (the packed buffer, or
the file's mapping) that the ring copies into a device slot. Nothing here ever holds the whole
model at once: staging reads one group from the source, writes it to its tier and lets it go.

Tensors come from a source (``runtime.sources``: the model itself, or a checkpoint directory),
``source(name, rows=None)`` -> CPU tensor; a source may also tell where a tensor lies in a file
(``source.span(key)`` -> ``FileSpan`` or None, see ``span_of``).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import struct
import uuid
import warnings
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..errors import MoesysError

ALIGN = 64
Rows = Optional[tuple[int, int]]
Source = Callable[..., torch.Tensor]      # (name, rows: Rows = None) -> tensor
OFFLOAD_FILE = re.compile(r"ring-[0-9a-f]{8}-\d{5}\.safetensors")     # WeightStore's files, never a checkpoint's
SLICE_KEY = re.compile(r"(.+)\[(\d+):(\d+)\]")        # ``name[lo:hi]``: rows lo..hi of ``name``


def slice_key(key: str) -> Optional[tuple[str, int, int]]:
    """``(name, lo, hi)`` of a key naming rows of a tensor (``w_up[0:4]``, an expert group); None
    for a key naming a whole tensor."""
    match = SLICE_KEY.fullmatch(key)
    return (match.group(1), int(match.group(2)), int(match.group(3))) if match else None


class StorageError(MoesysError):
    """A checkpoint or offload directory cannot provide the tensors the program needs."""


@dataclass(eq=False)
class MappedFile:
    """An offload file (or a checkpoint file read in place: ``checkpoint``) as it was when mapped.
    Reading a mapping past the end of a file truncated since kills the process (SIGBUS), and one
    written again in place would change the weights under the program, so the copy thread calls
    ``check`` before it reads. A file deleted, or replaced by a new one (a rename, as atomic saves
    do), leaves the mapping its data."""
    path: Path
    inode: int
    nbytes: int
    mtime_ns: int
    checkpoint: bool = False

    @classmethod
    def of(cls, path: Path, nbytes: int, checkpoint: bool = False) -> "MappedFile":
        now = os.stat(path)
        return cls(path, now.st_ino, nbytes, now.st_mtime_ns, checkpoint)

    def check(self) -> None:
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return                      # unlinked: the mapping still holds the data
        if now.st_ino != self.inode:
            return                      # replaced: the mapping still holds the old file's data
        if now.st_size < self.nbytes:
            change = f"was truncated to {now.st_size} bytes (it had {self.nbytes})"
        elif now.st_mtime_ns != self.mtime_ns:
            change = "was written again"
        else:
            return
        what, field = ("checkpoint file", "Plan.weights_checkpoint (save a new checkpoint to another directory)"
                       ) if self.checkpoint else ("offload file", "Plan.offload_dir")
        raise StorageError(f"{what} {str(self.path)!r} {change} while a ring program maps it; leave the files "
                           f"under {field} alone while a program is alive, and compile the program again")


@dataclass(frozen=True)
class FileSpan:
    """Where a source's tensor lies, unconverted: rows ``rows`` of dim 0 (None: all) of tensor
    ``key`` of the safetensors file ``path``; ``dtype`` and ``shape`` are those of the tensor the
    source gives (None where the part of the source that found the span does not know them: the
    disk tier maps only a span that states both, and only where the file's header agrees)."""
    path: Path
    key: str
    rows: Rows = None
    dtype: Optional[torch.dtype] = None
    shape: Optional[tuple[int, ...]] = None


def span_of(source: Source, key: str, rows: Rows = None) -> Optional[FileSpan]:
    """``source``'s ``FileSpan`` for ``key`` (and ``rows``, for a source taking them); None where it
    has none or cannot tell."""
    find = getattr(source, "span", None)
    return None if find is None else find(key, rows)


def with_spans(read: Source, span: Callable[..., Optional[FileSpan]]) -> Source:
    """``read`` that also answers ``span_of``."""
    read.span = span
    return read


@dataclass
class Location:
    """``nbytes`` bytes at ``offset`` of ``buffer`` (a 1-D uint8 CPU tensor) hold one tensor;
    ``file`` is the offload file mapped as ``buffer`` (disk tier)."""
    buffer: torch.Tensor
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Optional[MappedFile] = None

    def tensor(self) -> torch.Tensor:
        raw = self.buffer[self.offset:self.offset + self.nbytes]
        return raw.view(self.dtype).view(self.shape)


class WeightStore:
    """Name -> Location for every streamed tensor, plus what keeps the buffers alive."""

    def __init__(self, tier: str, directory: Optional[Path] = None):
        self.tier = tier
        self.directory = directory
        self.locations: dict[str, Location] = {}
        self._keepalive: list = []
        self._groups = 0
        self.files: list[Path] = []
        self.token = uuid.uuid4().hex[:8]    # file names of this store: never reuse a mapped file
        self._rows: dict[str, list[tuple[int, int, Location]]] = {}   # name -> (lo, hi, location) stored
        self._stored_bytes = 0
        self.in_place_bytes = 0        # disk tier: bytes read from a checkpoint's files, not written
        self._mapped: dict[Path, Optional[tuple]] = {}     # checkpoint file -> map_safetensors + MappedFile
        weakref.finalize(self, _remove, self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.locations

    def remove_files(self) -> None:
        """Delete the offload files now; their mappings keep the data while the store lives."""
        _remove(self.files)

    def __getitem__(self, name: str) -> Location:
        return self.locations[name]

    @property
    def nbytes(self) -> int:
        """Bytes the store holds (rows read from a stored tensor's bytes count once)."""
        return self._stored_bytes

    def add(self, names: Iterable[str], source: Source, dtype: Optional[torch.dtype] = None, pin: bool = False) -> None:
        """Stage the named tensors not stored yet as one group (one buffer, or one file). Rows
        ``name[lo:hi]`` that a stored tensor of ``name`` holds (whole, or rows around them, as when
        a ring lowered again groups experts more finely) are read from its bytes, not stored again."""
        fresh = []
        for name in dict.fromkeys(names):
            if name in self.locations:
                continue
            within = self._within_stored(name, dtype)
            if within is None:
                fresh.append(name)
            else:
                self.locations[name] = within
        if self.tier == "disk":
            fresh = [name for name in fresh if not self._read_in_place(name, source, dtype)]
        if not fresh:
            return
        tensors = {name: _prepare(source(name), dtype) for name in fresh}
        if self.tier == "disk":
            path = self.directory / f"ring-{self.token}-{self._groups:05d}.safetensors"
            self.files.append(path)
            _stage_disk(self, tensors, path)
        else:
            _stage_host(self, tensors, pin)
        self._groups += 1
        for name in fresh:
            self._stored_bytes += self.locations[name].nbytes
            self._record_rows(name)

    def _record_rows(self, name: str) -> None:
        """Remember the rows that ``name``'s location holds, for ``_within_stored``."""
        held = self.locations[name]
        base, lo, hi = slice_key(name) or (name, 0, held.shape[0] if held.shape else 0)
        if hi > lo:
            self._rows.setdefault(base, []).append((lo, hi, held))

    def _read_in_place(self, name: str, source: Source, dtype: Optional[torch.dtype]) -> bool:
        """Locate ``name`` in the checkpoint file that ``source`` reads it from, where the file
        stores it as the ring needs it (``_span_location``); False (stage it) otherwise."""
        span = span_of(source, name)
        if span is None or span.dtype is None or span.shape is None:
            return False
        if dtype is not None and span.dtype.is_floating_point and span.dtype != dtype:
            return False                # the plan's dtype: converted, so written
        if span.path not in self._mapped:
            self._mapped[span.path] = _map_checkpoint_file(span.path)
        location = _span_location(self._mapped[span.path], span)
        if location is None:
            return False
        self.locations[name] = location
        self.in_place_bytes += location.nbytes
        self._record_rows(name)
        return True

    def _within_stored(self, key: str, dtype: Optional[torch.dtype]) -> Optional[Location]:
        """Where rows ``key`` (``name[lo:hi]``) lie inside a stored tensor of ``name`` (in
        ``dtype``): that tensor's bytes of those rows; None where no stored tensor holds them all."""
        parsed = slice_key(key)
        if parsed is None:
            return None
        base, lo, hi = parsed
        for start, stop, held in self._rows.get(base, ()):
            if start <= lo and hi <= stop and (dtype is None or not held.dtype.is_floating_point or held.dtype == dtype):
                row_bytes = held.nbytes // (stop - start)
                return replace(held, offset=held.offset + (lo - start) * row_bytes, nbytes=(hi - lo) * row_bytes,
                               shape=(hi - lo, *held.shape[1:]))
        return None


# ---------------------------------------------------------------------------------------------
# staging into a tier
# ---------------------------------------------------------------------------------------------


def _remove(files: list[Path]) -> None:
    """Delete a store's files once nothing maps them any more (the store was collected). A file that
    cannot be deleted (a read-only file system) stays: cleanup, often from a finalizer at exit, must
    not fail."""
    for path in files:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def _prepare(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.detach().contiguous().cpu()


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


def _stage_host(store: WeightStore, tensors: dict[str, torch.Tensor], pin: bool) -> None:
    """Pinned (a CUDA device): the group packed into one pinned buffer, loaded as one copy.
    Unpinned: each tensor kept as it is, so a model's own CPU tensors (of the plan's dtype) are read
    in place rather than held a second time."""
    if not pin:
        for name, t in tensors.items():
            store.locations[name] = Location(_as_bytes(t), 0, t.nbytes, t.dtype, tuple(t.shape))
        return
    offsets, total = {}, 0
    for name, t in tensors.items():
        offsets[name] = total
        total += -(-t.nbytes // ALIGN) * ALIGN
    buffer = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=True)
    for name, t in tensors.items():
        buffer[offsets[name]:offsets[name] + t.nbytes].copy_(_as_bytes(t))
        store.locations[name] = Location(buffer, offsets[name], t.nbytes, t.dtype, tuple(t.shape))
    store._keepalive.append(buffer)


@dataclass(frozen=True)
class StoredTensor:
    """A tensor in a mapped safetensors file: ``nbytes`` at byte ``offset`` of the mapping, as its
    header records it (``dtype`` None: a dtype torch cannot view bytes as here)."""
    offset: int
    nbytes: int
    dtype: Optional[torch.dtype]
    shape: tuple[int, ...]


# safetensors' dtype names
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def map_safetensors(path: Path) -> tuple[torch.Tensor, dict[str, StoredTensor], mmap.mmap]:
    """Map a safetensors file; return its bytes (uint8 view of the mapping) and its tensors by name."""
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    (header_len,) = struct.unpack("<Q", mapping[:8])
    header = json.loads(mapping[8:8 + header_len])
    start = 8 + header_len
    with warnings.catch_warnings():   # read-only mapping: the ring only ever reads it
        warnings.simplefilter("ignore", UserWarning)
        data = torch.frombuffer(mapping, dtype=torch.uint8)
    tensors = {name: StoredTensor(start + entry["data_offsets"][0], entry["data_offsets"][1] - entry["data_offsets"][0],
                                  SAFETENSORS_DTYPES.get(entry["dtype"]), tuple(entry["shape"]))
               for name, entry in header.items() if name != "__metadata__"}
    return data, tensors, mapping


def _map_checkpoint_file(path: Path) -> Optional[tuple]:
    """(bytes, tensors, mapping, MappedFile) of a checkpoint's safetensors file; None where it
    cannot be mapped (its source then reads the tensors, and names a damaged file)."""
    try:
        data, tensors, mapping = map_safetensors(path)
        return data, tensors, mapping, MappedFile.of(path, len(mapping), checkpoint=True)
    except (OSError, ValueError, KeyError, TypeError, struct.error, RuntimeError):
        return None


def _span_location(mapped: Optional[tuple], span: FileSpan) -> Optional[Location]:
    """The bytes of ``span`` in its mapped file, where the file's header agrees with the span's
    dtype and shape and the rows start at a multiple of the element size; else None."""
    if mapped is None:
        return None
    data, tensors, _, file = mapped
    stored = tensors.get(span.key)
    if stored is None or stored.dtype != span.dtype or not stored.shape:
        return None
    lo, hi = span.rows or (0, stored.shape[0])
    if not 0 <= lo <= hi <= stored.shape[0] or (hi - lo, *stored.shape[1:]) != tuple(span.shape):
        return None
    row_bytes = stored.nbytes // stored.shape[0] if stored.shape[0] else 0
    offset = stored.offset + lo * row_bytes
    if offset % span.dtype.itemsize or offset + (hi - lo) * row_bytes > stored.offset + stored.nbytes:
        return None
    return Location(data, offset, (hi - lo) * row_bytes, span.dtype, tuple(span.shape), file)


def _stage_disk(store: WeightStore, tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        save_file(tensors, str(path), metadata={"format": "pt", "writer": "moesys_compile.runtime.storage"})
    except (OSError, SafetensorError) as exc:       # safetensors reports a full disk as a SafetensorError
        raise StorageError(f"cannot write the offload file {str(path)!r} ({exc}); set Plan.offload_dir to a "
                           f"writable directory with room for the model's weights") from exc
    data, stored, mapping = map_safetensors(path)
    file = MappedFile.of(path, len(mapping))
    for name, t in tensors.items():
        store.locations[name] = Location(data, stored[name].offset, stored[name].nbytes, t.dtype, tuple(t.shape), file)
    store._keepalive.append(mapping)


def stage(groups: Iterable[list[str]], source: Source, tier: str, offload_dir: Optional[str] = None,
          dtype: Optional[torch.dtype] = None, pin: bool = False, progress: bool = False) -> WeightStore:
    """Put every named tensor into the tier, one group (a section's tensors) at a time; a name
    seen in an earlier group is not stored again.

        >>> store = stage([["embed.weight"], ["lm_head.weight"]], model_source(model), "host")  # doctest: +SKIP
    """
    from tqdm import tqdm
    directory = None
    if tier == "disk":
        if not offload_dir:
            raise StorageError("weights='disk' needs Plan.offload_dir (a directory for the safetensors files)")
        directory = Path(offload_dir)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"Plan.offload_dir ({offload_dir!r}) cannot be used as a directory ({exc}); set it "
                               f"to a writable directory (it is created if missing)") from exc
    store = WeightStore(tier, directory)
    try:
        for names in tqdm(list(groups), desc=f"staging weights ({tier})", unit="section", disable=not progress):
            store.add(names, source, dtype, pin)
    except BaseException:
        _remove(store.files)     # now, not when the store is collected: the traceback still holds it
        raise
    return store
