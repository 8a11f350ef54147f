"""CPU threads and scratch memory of the experts' torch path (``experts.py``).

``workspace``: per-thread scratch buffers, kept at the largest size seen per purpose, dtype and
device, so that the multi-MB temporaries of every call are not page-faulted afresh.

``expert_runs`` / ``over_runs``: with n > 1 intra-op threads the expert-sorted rows are split into
runs of about equal rows, mostly whole experts, and n threads (the caller and a pool) take runs one
after another and work through them with single-threaded ops. Per-expert GEMMs are too small to
split well between threads (each would end in a barrier, and on a busy machine every barrier waits
for the slowest core); runs per thread need no synchronisation until the end, and a core that
other work slows down simply takes fewer runs. The last runs are shorter, cut inside an expert
where no expert boundary is near, so that the threads finish together; the backward then gives
the later pieces of a split expert their own weight-gradient buffers (no two threads write one
tensor) and adds them in at the end.
"""

import threading
from concurrent.futures import ThreadPoolExecutor, wait

import torch
from torch import Tensor

_WORKSPACE = threading.local()
MIN_RUN_ROWS = 256          # rows per run at least (fewer in all: one run, ops with intra-op threads)
RUNS_PER_THREAD = 4
MAX_RUN_IMBALANCE = 1.25    # largest run over a thread's even share: beyond it, one run
SNAP = 0.25                 # a cut moves to an expert boundary within this share of a run
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


def expert_runs(bounds: list[tuple[int, int, int]], threads: int,
                max_splits: int | None = None) -> list[list[tuple[int, int, int]]]:
    """Split the (expert, start, end) bounds into contiguous runs of about equal rows, a few per
    thread. Threads take the next run when they finish one, so a core that other work slows down
    takes fewer; with at least 2 runs per thread, the last 2 per thread are half as long, so that
    the threads finish close together. A cut moves to the nearest expert boundary within a quarter
    of a run, or when it would leave a piece under MIN_RUN_ROWS / 2; otherwise it splits the
    expert, at most ``max_splits`` times (None: no limit). One run (all of them) when the rows are
    too few to share, or when, without splits, one expert has so many rows that a single thread
    would be left with them."""
    total = bounds[-1][2] - bounds[0][1] if bounds else 0
    count = min(RUNS_PER_THREAD * threads, total // MIN_RUN_ROWS)
    if threads < 2 or count < 2:
        return [bounds]
    share, tail = total / count, (threads if count >= 2 * threads else 0)
    sizes = [share] * (count - tail) + [share / 2] * (2 * tail)
    edges = [end for _, _, end in bounds[:-1]]              # expert boundaries inside the rows
    cuts, target, splits = [], float(bounds[0][1]), 0
    for size in sizes[:-1]:
        target += size
        last = cuts[-1] if cuts else bounds[0][1]
        nearest = min((e for e in edges if e > last), key=lambda e: abs(e - target), default=None)
        inside = next(b for b in bounds if b[2] > target)     # the expert the cut would split
        piece = min(round(target) - inside[1], inside[2] - round(target))
        if nearest is not None and (abs(nearest - target) <= SNAP * share or piece < MIN_RUN_ROWS // 2):
            cut = nearest
        elif (max_splits is None or splits < max_splits) and piece >= MIN_RUN_ROWS // 2:
            cut, splits = round(target), splits + 1
        elif nearest is not None:
            cut = nearest
        else:
            continue
        if last < cut < bounds[-1][2]:
            cuts.append(cut)
    runs, run = [], []
    for expert, start, end in bounds:
        while cuts and cuts[0] <= start:
            cuts.pop(0)
            runs, run = runs + [run] if run else runs, []
        while cuts and cuts[0] < end:          # a cut inside this expert: its first piece ends a run
            run.append((expert, start, cuts[0]))
            runs.append(run)
            run, start = [], cuts.pop(0)
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
