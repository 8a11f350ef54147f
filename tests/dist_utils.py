"""Run a test function on N gloo ranks (separate processes on 127.0.0.1) and collect results.

    results = run_ranks(my_fn, 4, arg)       # my_fn(rank, world_size, arg) at module level

Each rank is a fresh interpreter that loads the function's file by path, so test modules need not
be importable packages. A failing rank fails the call with that rank's stderr.
"""

from __future__ import annotations

import faulthandler
import importlib.util
import inspect
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 240, expect_failure: bool = False) -> list:
    """``fn(rank, world_size, *args)`` on every rank; returns the ranks' results in rank order.
    With ``expect_failure`` the ranks' exit codes are returned instead of raising."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "args.pkl").write_bytes(pickle.dumps(args))
        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, __file__, inspect.getfile(fn), fn.__name__, str(world_size), str(port), tmp]
        procs = [subprocess.Popen(cmd + [str(rank)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for rank in range(world_size)]
        outputs = _wait_all(procs, timeout)
        codes = [p.returncode for p in procs]
        if expect_failure:
            return codes
        for rank, (code, (_, err)) in enumerate(zip(codes, outputs)):
            if code != 0:
                raise AssertionError(f"rank {rank} of {world_size} exited with {code}:\n{err[-6000:]}")
        return [pickle.loads((Path(tmp) / f"result{rank}.pkl").read_bytes()) for rank in range(world_size)]


def _wait_all(procs: list, timeout: float) -> list[tuple[str, str]]:
    deadline = time.monotonic() + timeout
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            tails = "\n".join(f"--- rank {i} ---\n{p.communicate()[1][-3000:]}" for i, p in enumerate(procs))
            raise AssertionError(f"ranks did not finish within {timeout}s (a collective hung?)\n{tails}") from None
    return outputs


def _child(path: str, name: str, world_size: int, port: int, tmp: str, rank: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    faulthandler.enable(all_threads=True)     # a rank killed by a signal shows where every thread was
    faulthandler.dump_traceback_later(float(os.environ.get("DIST_TEST_TRACEBACK_AFTER", "200")), exit=False)
    spec = importlib.util.spec_from_file_location(f"_dist_test_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = pickle.loads((Path(tmp) / "args.pkl").read_bytes())
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        result = getattr(module, name)(rank, world_size, *args)
        (Path(tmp) / f"result{rank}.pkl").write_bytes(pickle.dumps(result))
    finally:
        groups = sys.modules.get("moesys_compile.runtime.groups")
        if groups is not None:
            groups.reset()
        dist.destroy_process_group()
    # The result is written and the group destroyed. Leave without the interpreter's teardown, where
    # a gloo worker thread that still drops its last tensor can abort the process (SIGABRT, "terminate
    # called without an active exception") after everything the test checks has finished.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _child(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6]))


def optimizer_steps(loss_of_step: Callable[[], Any], opt, steps: int) -> list[float]:
    """``steps`` rounds of ``loss = loss_of_step(); loss.backward(); opt.step(); opt.zero_grad()``;
    the losses as floats."""
    losses = []
    for _ in range(steps):
        loss = loss_of_step()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def global_mean(value: float) -> float:
    """``value`` averaged over the ranks (itself without a process group)."""
    import torch
    import torch.distributed as dist
    if not dist.is_initialized():
        return value
    total = torch.tensor(value)
    dist.all_reduce(total)
    return float(total) / dist.get_world_size()
