"""Ring inference on one GPU: a model four times the device budget, weights in pinned host memory.

Peers, same model and inputs, same run:
  in-memory    the eager model with every weight resident on the GPU (the ceiling)
  accelerate   Hugging Face accelerate ``cpu_offload(model, execution_device="cuda")``: its hooks
               copy each module's weights from host memory right before the module runs
  ring         ``moesys_compile.compile(model, Plan(mode="infer", device="cuda",
               device_budget=model/4, weights="host"))``: sections stream host -> device over
               PCIe through a ring of slots on a copy stream while the current section computes

Rows: prefill at a few sizes and greedy decoding with a KV cache, measured by
``benchmarks.ring_infer.case`` on CUDA ids: tokens/s is the median of the repeats (peers take
turns call by call); every call ends with ``torch.cuda.synchronize()``. In bf16, decoding
reports ``tokens_agree`` (the fraction of eager's greedy tokens it reproduces) instead of
requiring them all: the fused kernels round differently from eager's ops.
Efficiency = max(transfer, compute) / wall of the ring's call. ``cuda_max_alloc_MiB`` is
``torch.cuda.max_memory_allocated`` during the ring's call (slots + activations), against the budget.

    python -m benchmarks.ring_gpu [--quick] [--json FILE] [--dtype bf16|fp32]
"""

from __future__ import annotations

import copy
import sys
import time

import torch

from benchmarks import _harness as h
from benchmarks.ring_infer import build, case
from moesys_compile import Plan, compile
from moesys_compile.infer import model_bytes

FULL = dict(vocab_size=32000, dim=2048, n_layers=8, n_heads=16, ffn_dim=5632, num_experts=8, top_k=2,
            moe_ffn_dim=2048, max_seq_len=4096)
QUICK = dict(vocab_size=8192, dim=1024, n_layers=4, n_heads=8, ffn_dim=2048, num_experts=8, top_k=2,
             moe_ffn_dim=1024, max_seq_len=1024)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def workloads(quick: bool) -> list[tuple[str, int, int]]:
    if quick:
        return [("prefill", 1, 128), ("decode", 1, 8)]
    return [("prefill", 1, 128), ("prefill", 2, 512), ("prefill", 4, 512), ("decode", 1, 16)]


def main(argv=None) -> int:
    from accelerate import cpu_offload
    p = h.parser("ring_gpu", __doc__.splitlines()[0])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = p.parse_args(argv)
    args.json = h.results_path(args, "ring_gpu")
    if not torch.cuda.is_available():
        sys.exit("ring_gpu: no CUDA device (torch.cuda.is_available() is False); "
                 "on CPU run `python -m benchmarks.ring_infer`.")
    repeats = args.repeats or (2 if args.quick else 3)
    config = QUICK if args.quick else FULL
    model = build(config).to(DTYPES[args.dtype])
    size = model_bytes(model)
    budget = size // 4
    cases = workloads(args.quick)
    largest = max(cases, key=lambda c: c[1] * c[2])
    start = time.perf_counter()
    program = compile(model, Plan(mode="infer", device="cuda", device_budget=budget, weights="host"),
                      example_inputs=(torch.zeros(largest[1], largest[2], dtype=torch.long),))
    compile_s = time.perf_counter() - start
    accelerated = cpu_offload(copy.deepcopy(model), execution_device=torch.device("cuda"))
    resident = copy.deepcopy(model).cuda()
    layout = program.context.extras["ring"]
    print(f"{torch.cuda.get_device_name(0)}; model {size / 2**20:.0f} MiB {args.dtype}, budget {budget / 2**20:.0f} MiB "
          f"(model/budget = {size / budget:.1f}), {layout.slots} slots x {layout.slot_bytes / 2**20:.1f} MiB, "
          f"{len(layout.sections)} sections; compile + staging {compile_s:.1f} s", flush=True)
    record = dict(model_config=config, dtype=args.dtype, model_bytes=size, budget_bytes=budget, slots=layout.slots,
                  slot_bytes=layout.slot_bytes, sections=len(layout.sections), compile_and_stage_seconds=compile_s)
    rows = []
    for kind, batch, seq in cases:   # each row printed and recorded as it comes: a run cut short keeps them
        rows.append(case(kind, batch, seq, resident, accelerated, program, repeats, device="cuda",
                         exact_tokens=args.dtype == "fp32"))
        row = rows[-1]
        print(f"[{time.perf_counter() - start:.0f} s] {kind} {batch}x{seq}: ring {row['ring_tok_s']:.1f} tok/s, "
              f"{row['ring_vs_accelerate']:.2f}x accelerate, efficiency {row['efficiency']:.2f}", flush=True)
        h.write_json(args.json, "ring_gpu", rows, complete=len(rows) == len(cases), **record)
    program.close()
    h.print_table(rows, ["workload", "batch", "seq", "in_memory_tok_s", "accelerate_tok_s", "ring_tok_s",
                         "ring_vs_accelerate", "ring_vs_in_memory", "efficiency", "GB_s_moved", "peak_device_MiB",
                         "cuda_max_alloc_MiB", "max_abs_err", "tokens_agree"],
                  title=f"ring inference, CUDA, weights in pinned host memory, budget {budget / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
