"""Every CPU benchmark runs whole at its ``--quick`` size, as a CI benchmark run calls it (a fresh
process, ``python -m benchmarks.NAME --quick --json FILE``), and its record holds what the README
reads from it: every peer ran (none recorded as failed), each ratio is a positive number, and the
outputs the benchmark compares agree. Timings themselves are not checked (they are the
benchmarks' job, on a quiet machine)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(tmp_path: Path, name: str, *args: str) -> dict:
    record = tmp_path / f"{name}.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--quick", "--json", str(record), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"benchmarks.{name} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(record.read_text())


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_moe_layer_times_every_peer_against_the_dense_gemm(tmp_path):
    pytest.importorskip("deepspeed")
    rows = run_benchmark(tmp_path, "moe_layer", "--dtypes", "fp32", "--repeats", "1")["rows"]
    assert {row["contender"] for row in rows} == {"dense", "dense-prealloc", "moesys", "moesys-eager", "deepspeed",
                                                  "hf-mixtral"}
    assert {row["case"] for row in rows} == {"a", "b"}
    for row in rows:
        assert not row["note"].startswith("failed"), row
        assert positive(row["tokens_per_s"]) and positive(row["efficiency"]), row


@pytest.mark.parametrize("experts", ["coarse", "fine"])
def test_train_ep_runs_two_ranks_against_deepspeed_with_the_same_outputs(tmp_path, experts):
    pytest.importorskip("deepspeed")
    record = run_benchmark(tmp_path, "train_ep", "--experts", experts, "--repeats", "1")
    assert record["max_abs_diff_dropless"] < 1e-4
    cases = {row["case"]: row for row in record["rows"]}
    assert len(cases) == 5 and all(positive(row["vs_deepspeed"]) for row in cases.values())
    assert all(positive(sum(row["all_to_all_mb_received_per_rank"])) for name, row in cases.items()
               if name.startswith("moesys"))


def test_ring_infer_equals_eager_within_its_budget_against_accelerate(tmp_path):
    pytest.importorskip("accelerate")
    record = run_benchmark(tmp_path, "ring_infer", "--repeats", "1")
    assert {row["workload"] for row in record["rows"]} == {"prefill", "decode"}
    for row in record["rows"]:
        assert row["max_abs_err"] <= 1e-5 and positive(row["ring_vs_accelerate"]), row
        assert 0 < row["efficiency"] <= 1 and row["peak_device_MiB"] * 2**20 <= record["budget_bytes"], row


def test_ring_memory_and_compile_latency_records(tmp_path):
    memory = run_benchmark(tmp_path, "ring_memory")["rows"]
    assert memory and all(positive(row["peak_rss_GiB"]) for row in memory)
    latency = run_benchmark(tmp_path, "compile_latency")
    assert [row["layers"] for row in latency["rows"]] == [8, 16]
    assert all(positive(row["compile_s"]) for row in latency["rows"])
