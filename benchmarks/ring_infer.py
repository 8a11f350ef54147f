"""Ring inference on CPU: a model four times the device budget, weights on disk.

Peers, same model and inputs, same run:
  in-memory    the eager model with every weight resident (the ceiling)
  accelerate   Hugging Face accelerate ``disk_offload(model, dir, execution_device="cpu")``: its
               hooks read each module's weights from disk right before the module runs
  ring         ``moesys_compile.compile(model, Plan(mode="infer", device_budget=model/4,
               weights="disk"))``: sections stream through a ring of slots, the next ones
               loading while the current one computes

Rows: prefill (one forward over batch x seq tokens) at a few sizes, and greedy decoding with a
KV cache. ``--hf`` runs a Hugging Face Qwen3-MoE of the same dimensions instead of the built-in
model: its decoding peers are ``model.generate(do_sample=False)`` (in memory and under
accelerate's hooks) against ``program.generate``. Throughput is tokens/s (median of the repeats;
the peers take turns call by call, so that other load on a shared machine falls on all of them);
ratios compare within the run.
Efficiency = max(transfer, compute) / wall of the ring's calls (1.0: the slower of the two hides
the other completely); for decoding, sum over the generate() calls of max(transfer, compute) /
sum of their walls (each step waits for the previous token; ``pooled_efficiency`` is
max(sum transfer, sum compute) / sum wall, for comparison). Median and minimum over the repeats.

Threads. Every peer computes with the same ``torch.set_num_threads(--threads)``; the ring has its
copy thread besides. The default, one core less than the machine has, leaves the copy thread a
core: on a 2-core machine shared with other jobs, more compute threads than free cores make every
parallel op wait for a descheduled thread, which slows all peers several times over.

    python -m benchmarks.ring_infer [--quick] [--hf] [--threads N] [--json FILE]
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time

import torch

from benchmarks import _harness as h
from moesys_compile import Plan, compile, models
from moesys_compile.generate import eager_generate
from moesys_compile.infer import model_bytes

FULL = dict(vocab_size=8192, dim=1024, n_layers=8, n_heads=16, ffn_dim=2048, num_experts=8, top_k=2,
            moe_ffn_dim=1024, max_seq_len=1024)
QUICK = dict(vocab_size=4096, dim=512, n_layers=4, n_heads=8, ffn_dim=1024, num_experts=8, top_k=2,
             moe_ffn_dim=512, max_seq_len=512)


def workloads(quick: bool) -> list[tuple[str, int, int]]:
    """(kind, batch, seq): prefill rows, then a decode row (seq = prompt, new tokens = 8)."""
    if quick:
        return [("prefill", 1, 32), ("prefill", 2, 128), ("decode", 1, 8)]
    return [("prefill", 1, 32), ("prefill", 1, 128), ("prefill", 4, 128), ("decode", 1, 16)]


def build(config: dict, hf: bool = False) -> torch.nn.Module:
    """The built-in ``small-moe``, or (``hf``) a transformers Qwen3-MoE with the same dimensions."""
    torch.manual_seed(0)
    if not hf:
        return models.build("small-moe", **config).eval()
    from moesys_compile.models.hf import build_hf
    model = build_hf("qwen3_moe", vocab_size=config["vocab_size"], hidden_size=config["dim"],
                     num_hidden_layers=config["n_layers"], num_attention_heads=config["n_heads"],
                     num_key_value_heads=config["n_heads"], intermediate_size=config["ffn_dim"],
                     num_experts=config["num_experts"], num_experts_per_tok=config["top_k"],
                     moe_intermediate_size=config["moe_ffn_dim"], max_position_embeddings=config["max_seq_len"],
                     norm_topk_prob=True).eval()
    model.generation_config.eos_token_id = None        # every row decodes all its new tokens
    return model


def greedy(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Eager greedy decoding with the model's KV cache (transformers' own for a Hugging Face model)."""
    if hasattr(model, "generation_config"):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)
    return eager_generate(model, ids, new_tokens)


def logits(out) -> torch.Tensor:
    return (out.logits if hasattr(out, "logits") else out).float()


def interleaved(peers: dict, repeats: int, after=None) -> dict[str, list[float]]:
    """Seconds of each peer's call, taking turns (a warm-up call each first), so that load from
    other processes on a shared machine falls on every peer alike. ``after(name)`` runs after
    each timed call, outside the timing."""
    samples: dict[str, list[float]] = {name: [] for name in peers}
    for round_index in range(repeats + 1):
        for name, fn in peers.items():
            timing = h.time_call(fn, repeats=1, warmup=0)
            if round_index:
                samples[name].append(timing["median_s"])
                if after is not None:
                    after(name)
    return samples


def _synchronized(fn):
    def call():
        out = fn()
        torch.cuda.synchronize()
        return out
    return call


def case(kind: str, batch: int, seq: int, model, accelerated, program, repeats: int, new_tokens: int = 8,
         device: str = "cpu", exact_tokens: bool = True) -> dict:
    """One row: the three peers in rotation on the same ids (on ``device``; CUDA calls end with a
    synchronize, inside the timing). Decoding must give eager's tokens where ``exact_tokens`` (fp32);
    in bf16 the fused kernels round differently from eager's ops, so a near-tie among the logits
    can pick another token: the row then records the fraction of tokens that agree."""
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    if kind == "prefill":
        tokens = batch * seq
        run_eager = lambda: model(ids)                         # noqa: E731
        run_acc = lambda: accelerated(ids)                     # noqa: E731
        run_ring = lambda: program(ids)                        # noqa: E731
    else:
        tokens = batch * new_tokens
        run_eager = lambda: greedy(model, ids, new_tokens)        # noqa: E731
        run_acc = lambda: greedy(accelerated, ids, new_tokens)    # noqa: E731
        run_ring = lambda: program.generate(ids, new_tokens)      # noqa: E731
    ring_stats = []

    def keep_stats(name: str) -> None:
        if name == "ring":
            ring_stats.append(dict(program.stats))
    peers = {"in_memory": run_eager, "accelerate": run_acc, "ring": run_ring}
    if torch.device(device).type == "cuda":
        peers = {name: _synchronized(fn) for name, fn in peers.items()}
    with torch.inference_mode():
        samples = interleaved(peers, repeats, keep_stats)
        check = (logits(program(ids)) - logits(model(ids))).abs().max().item()
        if kind == "decode":
            ours, eager = program.generate(ids, new_tokens), greedy(model, ids, new_tokens)
            assert torch.equal(ours, eager) or not exact_tokens, "tokens differ"
            agree = (ours[:, seq:] == eager[:, seq:]).float().mean().item()
    seconds = {name: statistics.median(values) for name, values in samples.items()}
    efficiencies = [s["efficiency"] for s in ring_stats]
    stats = ring_stats[-1]
    row = {"workload": kind, "decode": stats.get("decode", ""), "batch": batch, "seq": seq, "tokens": tokens,
           "in_memory_tok_s": tokens / seconds["in_memory"], "accelerate_tok_s": tokens / seconds["accelerate"],
           "ring_tok_s": tokens / seconds["ring"], "efficiency": statistics.median(efficiencies),
           "efficiency_min": min(efficiencies),
           "pooled_efficiency": statistics.median(s.get("pooled_efficiency", s["efficiency"]) for s in ring_stats),
           "transfer_s": statistics.median(s["transfer_seconds"] for s in ring_stats),
           "compute_s": statistics.median(s["compute_seconds"] for s in ring_stats),
           "wall_s": statistics.median(s["wall_seconds"] for s in ring_stats),
           "peak_device_MiB": max(s["peak_device_bytes"] for s in ring_stats) / 2**20, "max_abs_err": check,
           "moved_MiB_per_call": stats["bytes_moved"] / 2**20, "stall_s": stats["stall_seconds"],
           "GB_s_moved": stats["bytes_moved"] / max(stats["transfer_seconds"], 1e-9) / 1e9}
    if "cuda_max_allocated_bytes" in stats:
        row["cuda_max_alloc_MiB"] = max(s["cuda_max_allocated_bytes"] for s in ring_stats) / 2**20
    if kind == "decode":
        row["tokens_agree"] = agree
    row["ring_vs_accelerate"] = row["ring_tok_s"] / row["accelerate_tok_s"]
    row["ring_vs_in_memory"] = row["ring_tok_s"] / row["in_memory_tok_s"]
    row["seconds"] = samples
    return row


def main(argv=None) -> int:
    from accelerate import disk_offload
    p = h.parser("ring_infer", __doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="torch threads of every peer (default: one core less than the machine has)")
    p.add_argument("--hf", action="store_true", help="a Hugging Face Qwen3-MoE of the same dimensions")
    args = p.parse_args(argv)
    args.json = h.results_path(args, "ring_infer")
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 3)
    config = QUICK if args.quick else FULL
    model = build(config, args.hf)
    size = model_bytes(model)
    budget = size // 4
    cases = workloads(args.quick)
    largest = max(cases, key=lambda c: c[1] * c[2])
    example = torch.zeros(largest[1], largest[2], dtype=torch.long)
    with tempfile.TemporaryDirectory(prefix="ring-bench-") as scratch:
        start = time.perf_counter()
        plan = Plan(mode="infer", device="cpu", device_budget=budget, weights="disk", offload_dir=f"{scratch}/ring")
        program = compile(model, plan, example_inputs=(example,))
        compile_s = time.perf_counter() - start
        accelerated = copy.deepcopy(model)
        disk_offload(accelerated, f"{scratch}/accelerate", execution_device="cpu")
        layout = program.context.extras["ring"]
        print(f"model {size / 2**20:.0f} MiB, budget {budget / 2**20:.0f} MiB (model/budget = {size / budget:.1f}), "
              f"{layout.slots} slots x {layout.slot_bytes / 2**20:.1f} MiB, {len(layout.sections)} sections; "
              f"compile + staging {compile_s:.1f} s; torch threads {torch.get_num_threads()}")
        rows = [case(kind, batch, seq, model, accelerated, program, repeats) for kind, batch, seq in cases]
        program.close()
    h.print_table(rows, ["workload", "decode", "batch", "seq", "in_memory_tok_s", "accelerate_tok_s", "ring_tok_s",
                         "ring_vs_accelerate", "ring_vs_in_memory", "efficiency", "efficiency_min", "pooled_efficiency",
                         "peak_device_MiB", "max_abs_err"],
                  title="ring inference, CPU, weights on disk (tokens/s; ratios within this run)")
    h.write_json(args.json, "ring_infer", rows, model_config=config, model=type(model).__name__, model_bytes=size,
                 budget_bytes=budget,
                 slots=layout.slots, slot_bytes=layout.slot_bytes, sections=len(layout.sections),
                 compile_and_stage_seconds=compile_s, torch_threads=args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
