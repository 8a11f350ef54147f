"""MoE expert path on one GPU (bf16): the Triton kernels against torch._grouped_mm and a per-expert loop.

    python -m benchmarks.moe_gpu [--quick] [--json FILE] [--models mixtral,olmoe,qwen3-30b-a3b,deepseek-v3]
                                 [--tokens 512,4096,32768] [--peak-tflops 989]

What is timed (routing ids fixed beforehand, drawn uniformly, so every run routes alike):
dispatch -> SwiGLU experts -> weighted combine, forward and forward+backward.

- moesys-triton: ``sort_slots`` + ``fused_experts`` with impl="triton" (counting sort; grouped
  GEMMs that gather rows on load and scatter weighted rows on store; SwiGLU in the epilogue).
- grouped_mm: argsort/index_select dispatch, ``torch._grouped_mm`` for both projections, torch
  SwiGLU, index_add combine (autograd through all of it).
- loop: the same dispatch and combine around one torch.mm pair per expert (the naive reference).

TFLOP/s counts routed work only: forward 2*N*D*(H+F) with N = T*K and H = 2F, forward+backward
three times that; "% peak" divides by --peak-tflops (989: H100/H200 dense bf16).
Exits with a message when there is no CUDA device.
"""

from __future__ import annotations

import sys
import traceback

import torch

from benchmarks import _harness

MODELS = {  # name: (D, F, E, K)
    "mixtral": (4096, 14336, 8, 2),
    "olmoe": (2048, 1024, 64, 8),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "deepseek-v3": (7168, 2048, 256, 8),
}


def _inputs(num_tokens, dim, ffn, num_experts, top_k, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(device="cuda", generator=gen)
    x = torch.randn(num_tokens, dim, **kw).bfloat16().requires_grad_(True)
    w_up = (torch.randn(num_experts, 2 * ffn, dim, **kw) / dim ** 0.5).bfloat16().requires_grad_(True)
    w_down = (torch.randn(num_experts, dim, ffn, **kw) / ffn ** 0.5).bfloat16().requires_grad_(True)
    ids = torch.rand(num_tokens, num_experts, **kw).argsort(dim=1)[:, :top_k].contiguous()
    weights = torch.rand(num_tokens, top_k, **kw).softmax(-1).requires_grad_(True)
    return x, ids, weights, w_up, w_down


def moesys_triton(x, ids, weights, w_up, w_down):
    counts, order = torch.ops.moesys_kernels.sort_slots(ids, w_up.shape[0], impl="triton")
    return torch.ops.moesys_kernels.fused_experts(x, order, counts, weights, w_up, w_down, "swiglu", True, "triton")[0]


def _dispatch(x, ids, num_experts):
    order = ids.reshape(-1).argsort(stable=True)
    counts = torch.bincount(ids.reshape(-1), minlength=num_experts)
    return x.index_select(0, order // ids.shape[1]), counts, order


def _combine(y_rows, order, weights, num_tokens):
    scaled = y_rows * weights.reshape(-1)[order].to(y_rows.dtype)[:, None]
    return torch.zeros(num_tokens, y_rows.shape[1], device=y_rows.device, dtype=y_rows.dtype).index_add(
        0, order // weights.shape[1], scaled)


def grouped_mm(x, ids, weights, w_up, w_down):
    x_rows, counts, order = _dispatch(x, ids, w_up.shape[0])
    offs = counts.cumsum(0).to(torch.int32)
    h = torch._grouped_mm(x_rows, w_up.transpose(1, 2), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    y_rows = torch._grouped_mm(torch.nn.functional.silu(gate) * up, w_down.transpose(1, 2), offs=offs)
    return _combine(y_rows, order, weights, x.shape[0])


def per_expert_loop(x, ids, weights, w_up, w_down):
    x_rows, counts, order = _dispatch(x, ids, w_up.shape[0])
    outs, start = [], 0
    for expert, count in enumerate(counts.tolist()):
        gate, up = (x_rows[start:start + count] @ w_up[expert].t()).chunk(2, dim=-1)
        outs.append((torch.nn.functional.silu(gate) * up) @ w_down[expert].t())
        start += count
    return _combine(torch.cat(outs), order, weights, x.shape[0])


CONTENDERS = {"moesys-triton": moesys_triton, "grouped_mm": grouped_mm, "loop": per_expert_loop}


def run_one(fn, inputs, backward, repeats):
    x, ids, weights, w_up, w_down = inputs
    grad = torch.randn_like(x)

    def step():
        for t in (x, weights, w_up, w_down):
            t.grad = None
        y = fn(x, ids, weights, w_up, w_down)
        if backward:
            y.backward(grad)
    return _harness.time_call(step, repeats=repeats, warmup=2, sync=torch.cuda.synchronize)["median_s"]


def profile_kernels(name, fn, inputs) -> None:
    """CUDA time per kernel over three forward+backward passes (``run_one``'s two warm-ups and one
    timed pass; after the timed runs, so compiled and tuned)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_one(fn, inputs, backward=True, repeats=1)
    print(f"\n{name}: CUDA time per kernel over three forward+backward passes (two warm-ups, one timed)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


def main(argv=None) -> None:
    p = _harness.parser("moe_gpu", __doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--tokens", default="512,4096,32768")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--profile", action="store_true",
                   help="also print the CUDA time per kernel of each contender's forward+backward")
    args = p.parse_args(argv)
    args.json = _harness.results_path(args, "moe_gpu")
    if not torch.cuda.is_available():
        sys.exit("moe_gpu: no CUDA device (torch.cuda.is_available() is False); this benchmark needs a GPU. "
                 "On CPU run `python -m benchmarks.moe_layer`.")
    import moesys_compile.kernels as kernels
    reason = kernels.triton_unavailable("cuda")
    if reason:
        sys.exit(f"moe_gpu: the Triton kernels cannot run: {reason}")
    torch.backends.cuda.matmul.allow_tf32 = True
    models = args.models.split(",")[:2] if args.quick else args.models.split(",")
    tokens = [512] if args.quick else [int(t) for t in args.tokens.split(",")]
    repeats = args.repeats or (3 if args.quick else 10)
    rows = []
    for model in models:
        dim, ffn, num_experts, top_k = MODELS[model]
        for num_tokens in tokens:
            inputs = _inputs(num_tokens, dim, ffn, num_experts, top_k)
            fwd_flops = 2 * num_tokens * top_k * dim * 3 * ffn
            for name in args.contenders.split(","):
                for backward in (False, True):
                    row = {"model": model, "T": num_tokens, "D": dim, "F": ffn, "E": num_experts, "K": top_k,
                           "contender": name, "pass": "fwd+bwd" if backward else "fwd"}
                    try:
                        seconds = run_one(CONTENDERS[name], inputs, backward, repeats)
                        flops = fwd_flops * (3 if backward else 1)
                        row.update(ms=seconds * 1e3, tflops=flops / seconds / 1e12,
                                   pct_peak=100 * flops / seconds / 1e12 / args.peak_tflops)
                    except Exception as exc:  # e.g. out of memory, or _grouped_mm missing on this GPU
                        row.update(error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
                        traceback.print_exc()
                    rows.append(row)
                    torch.cuda.empty_cache()
                if args.profile:
                    profile_kernels(name, CONTENDERS[name], inputs)
            del inputs
        _harness.print_table([r for r in rows if r["model"] == model],
                             ["T", "contender", "pass", "ms", "tflops", "pct_peak", "error"],
                             title=f"\n{model}: D={dim} F={ffn} E={num_experts} top-{top_k}, bf16")
        # after every model, so that a run stopped part-way keeps what it measured
        _harness.write_json(args.json, "moe_gpu", rows, peak_tflops=args.peak_tflops, quick=args.quick)


if __name__ == "__main__":
    main()
