"""Host memory of ring inference from a Hugging Face directory: is the model ever held whole?

A Qwen3-MoE model is saved with ``save_pretrained`` (the hub layout: one tensor per expert), then
each case runs in a fresh process that reports its own peak memory:

  transformers   ``AutoModelForCausalLM.from_pretrained(DIR)`` and one forward (the whole model
                 in memory: the usual way to run it)
  ring           ``moesys-compile infer DIR --weights disk --budget B --no-compare``: the model
                 built under ``empty_weights`` (parameters on meta), every tensor read from DIR
                 when staged into the disk tier, then streamed through the ring

Peak anonymous memory (``RssAnon``, sampled every 5 ms) is what the process itself allocated
(``anon_above_imports_vs_model``: the part above what importing torch, transformers and
moesys_compile already took, per byte of the model);
peak RSS (``VmHWM``) also counts pages of mapped files, which the kernel can drop at any time
(the disk tier reads its files through mmap). Both are compared with the model's size.

    python -m benchmarks.ring_memory [--quick] [--json FILE]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import _harness as h

GIB = 2 ** 30


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _child(case: str, directory: str, budget: str) -> None:
    """Run one case in this process; print its peak memory as the last line (JSON)."""
    import torch  # noqa: F401  - both cases import the same libraries before the baseline is read
    import transformers  # noqa: F401
    import moesys_compile  # noqa: F401
    baseline = _status_kib("RssAnon")
    peak_anon = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], _status_kib("RssAnon"))
            time.sleep(0.005)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if case == "transformers":
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
        with torch.inference_mode():
            model(torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)))
        code = 0
    else:
        from moesys_compile.infer import main
        with tempfile.TemporaryDirectory(prefix="ring-memory-") as scratch:
            code = main([directory, "--weights", "disk", "--budget", budget, "--no-compare", "--max-new-tokens", "0",
                         "--offload-dir", scratch])
    done.set()
    sampler.join()
    print(json.dumps({"exit_code": code, "seconds": time.perf_counter() - start,
                      "peak_anon_bytes": max(peak_anon[0], _status_kib("RssAnon")) * 1024,
                      "imports_anon_bytes": baseline * 1024,
                      "peak_rss_bytes": _status_kib("VmHWM") * 1024}))


def _measure(case: str, directory: str, budget: str) -> dict:
    run = subprocess.run([sys.executable, "-m", "benchmarks.ring_memory", "--child", case, directory, budget],
                         capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child(*sys.argv[2:])
        return
    args = h.parser("ring_memory", __doc__.splitlines()[0]).parse_args()
    args.json = h.results_path(args, "ring_memory")
    from moesys_compile.infer import model_bytes
    from moesys_compile.models.hf import build_hf
    size = dict(hidden_size=256, moe_intermediate_size=128, num_experts=8, num_hidden_layers=2) if args.quick else \
        dict(hidden_size=1024, moe_intermediate_size=512, num_experts=64, num_hidden_layers=6)
    with tempfile.TemporaryDirectory(prefix="ring-memory-model-") as directory:
        model = build_hf("qwen3_moe", intermediate_size=2 * size["moe_intermediate_size"], vocab_size=32000,
                         num_attention_heads=8, num_key_value_heads=4, **size)
        weights = model_bytes(model)
        model.save_pretrained(directory)
        del model
        budget = str(weights // 8)
        rows = []
        for case in ("transformers", "ring"):
            got = _measure(case, directory, budget)
            above = got["peak_anon_bytes"] - got["imports_anon_bytes"]
            rows.append({"case": case, "model_GiB": weights / GIB, "budget_GiB": int(budget) / GIB,
                         "imports_anon_GiB": got["imports_anon_bytes"] / GIB, "peak_anon_GiB": got["peak_anon_bytes"] / GIB,
                         "peak_rss_GiB": got["peak_rss_bytes"] / GIB, "anon_above_imports_vs_model": above / weights,
                         "seconds": got["seconds"]})
    h.print_table(rows, ["case", "model_GiB", "budget_GiB", "imports_anon_GiB", "peak_anon_GiB", "peak_rss_GiB",
                         "anon_above_imports_vs_model", "seconds"],
                  title="host memory of running a model from its directory")
    h.write_json(args.json, "ring_memory", rows, model=dict(family="qwen3_moe", **size))


if __name__ == "__main__":
    main()
