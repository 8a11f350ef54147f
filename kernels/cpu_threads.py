"""CPU threads and scratch memory of the experts' torch path (``experts.py``).

``workspace``: per-thread scratch buffers, kept at the largest size seen per purpose, dtype and
device, so that the multi-MB temporaries of every call are not page-faulted afresh.

``expert_runs`` / ``over_runs``: with n > 1 intra-op threads the experts are split into runs of
whole experts with about equal rows, and n threads (the caller and a pool) take runs one after
another and work through them with single-threaded ops. Per-expert GEMMs are too small to split
well between threads (each would end in a barrier, and on a busy machine every barrier waits for
the slowest core); whole experts per thread need no synchronisation until the end, and a core that
other work slows down simply takes fewer runs. Runs never split an expert, so each expert's weight
gradients are written by one thread.
"""

import threading
from concurrent.futures import ThreadPoolExecutor, wait

import torch
from torch import Tensor

_WORKSPACE = threading.local()
MIN_RUN_ROWS = 256          # rows per run at least (fewer in all: one run, ops with intra-op threads)
RUNS_PER_THREAD = 4
MAX_RUN_IMBALANCE = 1.25    # largest run over a thread's even share: beyond it, one run
_POOL: list[ThreadPoolExecutor] = []
_IN_USE = threading.Lock()     # one caller at a time sets the threads and uses the pool


def workspace(sizes: list[tuple[int, int]], like: Tensor, purpose: str = "block", keep: bool = True) -> list[Tensor]:
    """Views [rows, cols] into this thread's scratch buffer for ``purpose`` and ``like``'s dtype and
    device (views from one call never overlap; calls with different purposes never overlap).
    ``keep=False``: a fresh buffer, freed with its views (memory held only while the caller runs,
    as a budgeted inference ring counts it)."""
    total = sum(r * c for r, c in sizes)
    if keep:
        pool = _WORKSPACE.__dict__.setdefault("pool", {})
        key = (purpose, like.dtype, like.device)
        if key not in pool or pool[key].numel() < total:
            with torch.inference_mode(False):   # made under inference_mode it could not be written outside it
                pool[key] = like.new_empty(total)
        buffer = pool[key]
    else:
        buffer = like.new_empty(total)
    views, offset = [], 0
    for rows, cols in sizes:
        views.append(buffer[offset:offset + rows * cols].view(rows, cols))
        offset += rows * cols
    return views


def expert_runs(bounds: list[tuple[int, int, int]], threads: int) -> list[list[tuple[int, int, int]]]:
    """Split the (expert, start, end) bounds into contiguous runs of whole experts with about equal
    rows, a few per thread (threads take the next run when they finish one, so a core that other
    work slows down takes fewer); one run (all of them) when the rows are too few to share, or when
    one expert has so many that a single thread would be left with them."""
    total = bounds[-1][2] - bounds[0][1] if bounds else 0
    count = min(RUNS_PER_THREAD * threads, len(bounds), total // MIN_RUN_ROWS)
    if threads < 2 or count < 2:
        return [bounds]
    runs, run, first = [], [], bounds[0][1]
    for expert, start, end in bounds:
        target = first + total * (len(runs) + 1) / count   # where the current run should end
        if run and len(runs) < count - 1 and abs(start - target) <= abs(end - target):
            runs.append(run)
            run = []
        run.append((expert, start, end))
    runs.append(run)
    longest = max(r[-1][2] - r[0][1] for r in runs)
    return runs if longest <= MAX_RUN_IMBALANCE * total / threads else [bounds]


def take_runs(work, runs, lock: threading.Lock) -> None:
    while True:
        with lock:
            run = next(runs, None)
        if run is None:
            return
        work(run)


def _pool_thread(work, runs, lock: threading.Lock, inference: bool) -> None:
    torch.set_num_threads(1)                 # this pool thread's intra-op threads
    with torch.inference_mode(inference), torch.no_grad():
        take_runs(work, runs, lock)


def over_runs(work, runs: list) -> None:
    """work(run) for every run, on this thread and ``torch.get_num_threads() - 1`` pool threads,
    all with single-threaded ops; the caller's intra-op threads are restored afterwards."""
    before = torch.get_num_threads()
    threads = min(before, len(runs))
    if threads < 2 or not _IN_USE.acquire(blocking=False):   # another caller has the pool: run here
        for run in runs:
            work(run)
        return
    while len(_POOL) < threads - 1:
        _POOL.append(ThreadPoolExecutor(1, thread_name_prefix="moesys-experts"))
    queue, lock, inference = iter(runs), threading.Lock(), torch.is_inference_mode_enabled()
    torch.set_num_threads(1)
    try:
        pending = [pool.submit(_pool_thread, work, queue, lock, inference) for pool in _POOL[:threads - 1]]
        try:
            take_runs(work, queue, lock)
        finally:
            wait(pending)
        for done in pending:
            done.result()
    finally:
        torch.set_num_threads(before)
        _IN_USE.release()
