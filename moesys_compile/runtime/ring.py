"""The ring executor: device slots, a copy thread that fills them ahead of compute, and the
accounting behind ``RingProgram.stats``.

Schedule. Sections run in order, pass after pass; section ``i`` always uses slot ``i % slots``.
The copy thread walks the same cyclic order and loads step ``j`` into its slot as soon as the
slot's previous occupant has been computed, so up to ``slots - 1`` loads run ahead of compute
and the first sections of the next pass load while the last ones of this pass compute. When
every section has a slot of its own nothing is reloaded.

Ordering. CPU: the thread copies with ``memmove`` (outside the GIL) and compute waits on a
condition variable. CUDA: the thread issues host -> device copies on a copy stream; a *ready*
event per slot makes the compute stream wait for the copy, and a *free* event per slot makes
the copy stream wait until the compute that read the slot is done.

Accounting. Device bytes = the slots + resident state + live activations (estimated in
``workspace.py``). Time, per call: *wall* runs from
``begin_call`` to ``end_call``; *compute* is the time inside the sections; *transfer* is, on CPU,
the time the copy thread spent copying inside that window (a load that ran between two calls,
ahead of the next one, counts for neither: it cost no call any time), and on CUDA the device
time of the copies the call consumed. So transfer <= wall and compute <= wall on CPU, and
efficiency = max(transfer, compute) / wall is at most 1.
"""

from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch


@dataclass
class Copy:
    """``nbytes`` bytes from ``src[src_offset:]`` (a uint8 CPU tensor) to slot byte ``dst_offset``."""
    src: torch.Tensor
    src_offset: int
    dst_offset: int
    nbytes: int


@dataclass
class SectionLoad:
    slot: int
    copies: list[Copy]
    files: list = field(default_factory=list)   # mapped offload files the copies read (``MappedFile``)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.copies)


def coalesce(copies: list[Copy], max_gap: int = 4096) -> list[Copy]:
    """Merge copies that are adjacent (up to ``max_gap`` bytes apart) in both source and slot."""
    merged: list[Copy] = []
    for copy in sorted(copies, key=lambda c: c.dst_offset):
        last = merged[-1] if merged else None
        if last is not None and last.src is copy.src:
            src_gap = copy.src_offset - (last.src_offset + last.nbytes)
            dst_gap = copy.dst_offset - (last.dst_offset + last.nbytes)
            if src_gap == dst_gap and 0 <= src_gap <= max_gap:
                last.nbytes = copy.dst_offset + copy.nbytes - last.dst_offset
                continue
        merged.append(Copy(copy.src, copy.src_offset, copy.dst_offset, copy.nbytes))
    return merged


class SlotPool:
    """``slots`` byte buffers of ``slot_bytes`` on the device: the only place streamed weights
    are ever put on it. They are consecutive pieces of one ``reservoir``, which may be the one of
    a ring closed before (memory touched already: fresh memory costs page faults on the ring's
    first pass); ``nbytes`` counts the whole reservoir."""

    def __init__(self, slots: int, slot_bytes: int, device: torch.device, reservoir: Optional[torch.Tensor] = None):
        self.device = device
        self.slot_bytes = slot_bytes
        if reservoir is None or reservoir.device != device or reservoir.numel() < slots * slot_bytes:
            reservoir = torch.empty(slots * slot_bytes, dtype=torch.uint8, device=device)
        self.reservoir = reservoir
        self.buffers = [reservoir[i * slot_bytes:(i + 1) * slot_bytes] for i in range(slots)]

    @property
    def nbytes(self) -> int:
        return self.reservoir.numel()

    def owns(self, tensor: torch.Tensor) -> bool:
        """True if ``tensor`` views memory of a slot (it must be copied out before the slot is reused)."""
        if tensor.device != self.device:
            return False
        pointer = tensor.untyped_storage().data_ptr()
        return any(buffer.data_ptr() <= pointer < buffer.data_ptr() + self.slot_bytes for buffer in self.buffers)


@dataclass
class CallStats:
    bytes_moved: int = 0
    transfer_seconds: float = 0.0
    compute_seconds: float = 0.0
    stall_seconds: float = 0.0
    wall_seconds: float = 0.0
    sections_run: int = 0
    compute_events: list = field(default_factory=list)
    transfer_events: list = field(default_factory=list)


class RingExecutor:
    """Runs sections in ring order; ``run(i, fn, *args)`` waits for section i's weights, calls
    ``fn`` and hands the slot back. Use ``begin_call``/``end_call`` around one pass."""

    def __init__(self, loads: list[SectionLoad], pool: SlotPool):
        self.loads, self.pool = loads, pool
        self.slots = len(pool.buffers)
        self.cuda = pool.device.type == "cuda"
        self._cond = threading.Condition()
        self._slot_step = [-1] * self.slots        # schedule step whose section the slot holds
        self._slot_section = [-1] * self.slots
        self._consumed = 0                         # compute steps finished
        self._next = 0                             # next compute step
        self._records: dict[int, tuple] = {}     # step -> (bytes, CUDA events or None)
        self._busy: list[tuple[float, float]] = []   # CPU: (start, end) of finished loads not yet accounted
        self._loading_since: Optional[float] = None  # CPU: start of the load in progress
        self._stop = False
        self._error: Optional[BaseException] = None
        self._copy_section = -1                    # section the copy thread loads (or last loaded)
        self._thread: Optional[threading.Thread] = None
        self.call = CallStats()
        self.total_bytes_moved = 0
        if self.cuda:
            self._copy_stream = torch.cuda.Stream(device=pool.device)
            self._ready = [torch.cuda.Event() for _ in range(self.slots)]
            self._free = [torch.cuda.Event() for _ in range(self.slots)]
            self._staging = torch.empty(pool.slot_bytes, dtype=torch.uint8, pin_memory=True)

    # -- copy side -----------------------------------------------------------------------------

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._copy_loop, name="moesys-ring-copy", daemon=True)
            self._thread.start()

    def _copy_loop(self) -> None:
        step = 0
        try:
            if self.cuda:
                torch.cuda.set_device(self.pool.device)
            # the slots may have been allocated under the caller's inference_mode (a thread-local
            # mode): writing into such tensors needs the mode in this thread too
            with torch.inference_mode():
                self._copy_sections(step)
        except BaseException as exc:  # surfaced to the compute side
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def _copy_sections(self, step: int) -> None:
        while True:
            section = step % len(self.loads)
            slot = self.loads[section].slot
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self._slot_step[slot] < self._consumed)
                if self._stop:
                    return
            record, span = (0, None), None
            if self._slot_section[slot] != section:
                self._copy_section = section      # named by the compute side if the load fails
                self._loading_since = start = time.perf_counter()
                events = self._load(self.loads[section], slot)
                span = (start, time.perf_counter())
                record = (self.loads[section].nbytes, events)
                self._slot_section[slot] = section
            with self._cond:
                if span is not None and not self.cuda:
                    self._busy.append(span)
                self._loading_since = None
                self._slot_step[slot] = step
                self._records[step] = record
                self._cond.notify_all()
            step += 1

    def _load(self, load: SectionLoad, slot: int) -> Optional[tuple]:
        """Copy one section into ``slot``. CUDA: returns the (start, end) events of the host ->
        device transfer, so that its time excludes the wait for the slot's previous compute."""
        buffer = self.pool.buffers[slot]
        for file in load.files:     # a truncated file would SIGBUS the memmove below
            file.check()
        if not self.cuda:
            base = buffer.data_ptr()
            for c in load.copies:
                ctypes.memmove(base + c.dst_offset, c.src.data_ptr() + c.src_offset, c.nbytes)
            return None
        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        with torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_event(self._free[slot])
            events[0].record(self._copy_stream)
            pinned = all(c.src.is_pinned() for c in load.copies)
            if pinned:
                for c in load.copies:
                    buffer[c.dst_offset:c.dst_offset + c.nbytes].copy_(
                        c.src[c.src_offset:c.src_offset + c.nbytes], non_blocking=True)
            else:   # disk tier: mmap -> pinned staging -> device, one transfer per section
                base = self._staging.data_ptr()
                for c in load.copies:
                    ctypes.memmove(base + c.dst_offset, c.src.data_ptr() + c.src_offset, c.nbytes)
                end = max(c.dst_offset + c.nbytes for c in load.copies)
                buffer[:end].copy_(self._staging[:end], non_blocking=True)
            events[1].record(self._copy_stream)
            self._ready[slot].record(self._copy_stream)
        self._copy_stream.synchronize()   # the staging buffer is reused by the next load
        return events

    # -- compute side --------------------------------------------------------------------------

    def begin_call(self) -> None:
        self._raise_copy_error()       # a failed copy thread stays failed: every later call says why
        self.call = CallStats()
        self._call_start = time.perf_counter()
        self._start()

    def _raise_copy_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"ring copy thread failed loading section {self._copy_section}: "
                               f"{type(self._error).__name__}: {self._error}") from self._error

    def _acquire(self, section: int) -> int:
        step = self._next
        if step % len(self.loads) != section:
            raise RuntimeError(f"ring executor: section {section} requested but the ring is at section "
                               f"{step % len(self.loads)}; sections must run in order")
        slot = self.loads[section].slot
        start = time.perf_counter()
        with self._cond:
            self._cond.wait_for(lambda: self._error is not None or self._slot_step[slot] == step)
            self._raise_copy_error()
            nbytes, events = self._records.pop(step, (0, None))   # absent if an interrupt hit here before
        self.call.stall_seconds += time.perf_counter() - start
        self.call.bytes_moved += nbytes
        if events is not None:
            self.call.transfer_events.append(events)
        self.total_bytes_moved += nbytes
        if self.cuda:
            torch.cuda.current_stream(self.pool.device).wait_event(self._ready[slot])
        return slot

    def _release(self, slot: int) -> None:
        if self.cuda:
            self._free[slot].record(torch.cuda.current_stream(self.pool.device))
        with self._cond:
            self._consumed = self._next = self._next + 1
            self._cond.notify_all()

    def run(self, section: int, fn: Callable[..., Any], *args: Any) -> Any:
        slot = self._acquire(section)
        try:
            if self.cuda:
                events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                events[0].record()
                result = fn(*args)
                events[1].record()
                self.call.compute_events.append(events)
            else:
                start = time.perf_counter()
                result = fn(*args)
                self.call.compute_seconds += time.perf_counter() - start
        finally:
            self._release(slot)
        self.call.sections_run += 1
        return result

    def skip_rest_of_pass(self) -> None:
        """After a failed section: consume the pass's remaining steps so the ring stays in order."""
        while self._next % len(self.loads) != 0 and self._error is None:
            self._release(self._acquire(self._next % len(self.loads)))

    def end_call(self) -> CallStats:
        if self.cuda:
            torch.cuda.synchronize(self.pool.device)
            self.call.compute_seconds = sum(a.elapsed_time(b) for a, b in self.call.compute_events) / 1e3
            self.call.transfer_seconds = sum(a.elapsed_time(b) for a, b in self.call.transfer_events) / 1e3
            self.call.compute_events, self.call.transfer_events = [], []
        end = time.perf_counter()
        if not self.cuda:
            self.call.transfer_seconds = self._copy_busy(self._call_start, end)
        self.call.wall_seconds = end - self._call_start
        return self.call

    def _copy_busy(self, start: float, end: float) -> float:
        """Seconds the copy thread spent loading within [start, end]; forgets the loads that
        finished before ``end`` (a later window cannot overlap them)."""
        with self._cond:
            spans = list(self._busy)
            if self._loading_since is not None:
                spans.append((self._loading_since, end))
            self._busy = [span for span in self._busy if span[1] > end]
        return sum(max(0.0, min(b, end) - max(a, start)) for a, b in spans)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
