"""Shared pieces of the benchmark scripts: arguments, timing, the table, the JSON record."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parser(name: str, description: str) -> argparse.ArgumentParser:
    """``--quick`` (small sizes, few repeats) and ``--json FILE`` (default ``results_path``)."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description)
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (CI smoke run)")
    p.add_argument("--json", default=None,
                   help=f"where to write the JSON record (default results/{name}.json; with --quick "
                        f"results/{name}.quick.json, which leaves the committed record alone)")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions per case")
    return p


def results_path(args: argparse.Namespace, name: str) -> str:
    """``--json``, or by default ``results/<name>.json``; a ``--quick`` run's default is
    ``results/<name>.quick.json``, so that a smoke run never replaces the record README quotes."""
    return args.json or str(RESULTS_DIR / f"{name}{'.quick' if args.quick else ''}.json")


def time_call(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1,
              sync: Optional[Callable[[], None]] = None) -> dict[str, float]:
    """Median/min/mean seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
        sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "mean_s": statistics.fmean(samples),
            "repeats": repeats}


def environment() -> dict[str, Any]:
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    return info


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str = "") -> str:
    """Fixed-width table of ``rows`` (dicts), floats shown with 4 significant digits."""
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "-" if value is None else str(value)
    cells = [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells)
    text = "\n".join(lines)
    print(text)
    return text


def write_json(path: str, name: str, rows: Iterable[dict[str, Any]], **extra: Any) -> None:
    """Atomically write ``{"benchmark", "command", "environment", "rows", ...}`` to ``path``."""
    record = {"benchmark": name, "command": "python -m benchmarks." + name + " " + " ".join(sys.argv[1:]),
              "environment": environment(), "rows": list(rows), **extra}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(target)
    print(f"wrote {target}")
