"""MoE layer forward+backward on one CPU device against DeepSpeed-MoE, HF Mixtral and a dense GEMM.

    python -m benchmarks.moe_layer [--quick] [--json FILE] [--dtypes fp32,bf16] [--threads 2]

Cases (SwiGLU experts): (a) T=4096 D=512 F=1024 E=8 top-2, (b) T=4096 D=512 F=256 E=64 top-8.
Contenders, all in the same process and interleaved round by round (so load on the machine hits
them alike):

- moesys: ``moesys_compile.nn.MoE`` captured and lowered by the compile pipeline
  (``mc.lower`` + ``lower_kernels``): route_topk -> sort_slots -> fused_experts, torch CPU path.
- moesys-eager: the same ``nn.MoE`` run eagerly (canonical ops; the fused ``moe_experts`` op
  re-runs its forward inside backward).
- deepspeed: ``deepspeed.moe.layer.MoE`` (capacity factor 1.25, no jitter/sampling) around the
  same SwiGLU expert module.
- hf-mixtral: ``transformers`` ``MixtralSparseMoeBlock`` (its default experts implementation).
- dense: the six GEMMs of a dense MLP over the N = T*K routed rows (x W_up^T, a W_down^T and
  their four backward GEMMs): exactly the routed GEMM work, with no routing, no activation.
- dense-prealloc: the same GEMMs into preallocated outputs (no first-touch page faults): the
  stricter yardstick, reported as efficiency_vs_prealloc.

Routed FLOPs = 6 * N * D * (H + F), H = 2F (gate and up rows). efficiency = routed FLOP/s of the
layer / FLOP/s of the dense GEMMs = t_dense / t_layer from the median times (efficiency_best: from
the fastest round of each; efficiency_paired: the median over rounds of t_dense / t_layer within a
round, which cancels drifts of the machine's speed during the run). tokens/s = T / t_layer (forward+backward). The JSON keeps every
sample and the 1-minute load average around each case (the CPUs may be shared).
"""

from __future__ import annotations

import math
import os
import statistics
import traceback
from typing import Callable, Optional

import torch
from torch import nn

from benchmarks import _harness

CASES = {"a": dict(T=4096, D=512, F=1024, E=8, K=2), "b": dict(T=4096, D=512, F=256, E=64, K=8)}
QUICK_CASES = {"a": dict(T=512, D=128, F=256, E=8, K=2), "b": dict(T=512, D=128, F=64, E=64, K=8)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class SwiGLUExpert(nn.Module):
    """One expert: down(silu(gate(x)) * up(x)); gate and up rows stacked as in ``nn.MoE``."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * ffn_dim, bias=False)
        self.down = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(nn.functional.silu(gate) * up)


# ---------------------------------------------------------------------------------------------
# contenders: each builder returns a step() running forward + backward once
# ---------------------------------------------------------------------------------------------


def moesys_layer(c, dtype):
    import moesys_compile as mc
    return mc.nn.MoE(c["D"], c["F"], c["E"], c["K"], activation="swiglu").to(dtype)


def build_moesys(c, dtype, x, grad_y):
    import moesys_compile as mc
    from moesys_compile.passes import pipeline_for
    from moesys_compile.passes.lower_kernels import lower_kernels
    from moesys_compile.pipeline import run_pipeline

    layer = moesys_layer(c, dtype)
    gm, ctx = mc.lower(layer, mc.Plan(mode="train", kernels="auto"), (x,))
    if lower_kernels not in pipeline_for("train"):
        ctx.current_pass = "lower_kernels"
        gm = run_pipeline(gm, ctx, [lower_kernels])
    labels = sorted({n.meta["moesys"]["lowered_to"] for n in gm.graph.nodes if "lowered_to" in n.meta.get("moesys", {})})

    def step():
        gm.zero_grad(set_to_none=True)
        y, aux = gm(x)
        torch.autograd.backward((y, aux), (grad_y, torch.ones_like(aux)))
    return step, "lowered_to: " + ", ".join(labels)


def build_moesys_eager(c, dtype, x, grad_y):
    layer = moesys_layer(c, dtype)

    def step():
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        torch.autograd.backward((y, layer.aux_loss), (grad_y, torch.ones_like(layer.aux_loss)))
    return step, "eager canonical ops"


_DS_READY: Optional[str] = None


def _init_deepspeed() -> None:
    global _DS_READY
    if _DS_READY is None:
        import torch.distributed as dist
        if not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29517")
            dist.init_process_group("gloo", rank=0, world_size=1)
        _DS_READY = "ok"


def build_deepspeed(c, dtype, x, grad_y):
    import deepspeed  # noqa: F401
    from deepspeed.moe.layer import MoE
    _init_deepspeed()
    layer = MoE(hidden_size=c["D"], expert=SwiGLUExpert(c["D"], c["F"]), num_experts=c["E"], ep_size=1, k=c["K"],
                capacity_factor=1.25, eval_capacity_factor=1.25, min_capacity=4, drop_tokens=True, use_rts=False,
                noisy_gate_policy=None, top2_2nd_expert_sampling=False).to(dtype)
    x3 = x.view(1, *x.shape)

    def step():
        layer.zero_grad(set_to_none=True)
        y, aux, _ = layer(x3)
        torch.autograd.backward((y.view_as(grad_y), aux), (grad_y, torch.ones_like(aux)))
    return step, "capacity_factor=1.25"


def build_hf_mixtral(c, dtype, x, grad_y):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    config = MixtralConfig(hidden_size=c["D"], intermediate_size=c["F"], num_local_experts=c["E"],
                           num_experts_per_tok=c["K"], router_jitter_noise=0.0)
    block = MixtralSparseMoeBlock(config).to(dtype)
    for p in block.parameters():
        nn.init.normal_(p, std=0.02)
    x3 = x.view(1, *x.shape)

    def step():
        block.zero_grad(set_to_none=True)
        y = block(x3)
        y = y[0] if isinstance(y, tuple) else y
        y.view_as(grad_y).backward(grad_y)
    return step, f"experts_implementation={getattr(config, '_experts_implementation', None) or 'eager'}"


def _dense_operands(c, dtype):
    n_rows, dim, ffn = c["T"] * c["K"], c["D"], c["F"]
    gen = torch.Generator().manual_seed(1)
    x_rows = torch.randn(n_rows, dim, generator=gen).to(dtype)
    w_up = (torch.randn(2 * ffn, dim, generator=gen) / math.sqrt(dim)).to(dtype)
    w_down = (torch.randn(dim, ffn, generator=gen) / math.sqrt(ffn)).to(dtype)
    grad_rows = torch.randn(n_rows, dim, generator=gen).to(dtype)
    grad_h = torch.randn(n_rows, 2 * ffn, generator=gen).to(dtype)
    return x_rows, w_up, w_down, grad_rows, grad_h, ffn


def build_dense(c, dtype, x, grad_y):
    x_rows, w_up, w_down, grad_rows, grad_h, ffn = _dense_operands(c, dtype)

    def step():
        h = torch.mm(x_rows, w_up.t())                 # forward: up
        torch.mm(h[:, :ffn], w_down.t())               # forward: down
        torch.mm(grad_rows, w_down)                    # backward: grad of the activation
        torch.mm(grad_rows.t(), h[:, :ffn])            # backward: grad of w_down
        torch.mm(grad_h.t(), x_rows)                   # backward: grad of w_up
        torch.mm(grad_h, w_up)                         # backward: grad of x
    return step, f"6 GEMMs over N={x_rows.shape[0]} rows"


def build_dense_prealloc(c, dtype, x, grad_y):
    """The same six GEMMs writing into preallocated outputs: GEMM speed without the first-touch
    page faults on fresh outputs that plain torch.mm (and so "dense") pays every step."""
    x_rows, w_up, w_down, grad_rows, grad_h, ffn = _dense_operands(c, dtype)
    h, y, grad_x = torch.empty_like(grad_h), torch.empty_like(grad_rows), torch.empty_like(x_rows)
    grad_a = torch.empty(x_rows.shape[0], ffn, dtype=dtype)
    grad_w_down, grad_w_up = torch.empty_like(w_down), torch.empty_like(w_up)

    def step():
        torch.mm(x_rows, w_up.t(), out=h)
        torch.mm(h[:, :ffn], w_down.t(), out=y)
        torch.mm(grad_rows, w_down, out=grad_a)
        torch.mm(grad_rows.t(), h[:, :ffn], out=grad_w_down)
        torch.mm(grad_h.t(), x_rows, out=grad_w_up)
        torch.mm(grad_h, w_up, out=grad_x)
    return step, "6 GEMMs, preallocated outputs"


CONTENDERS: dict[str, Callable] = {
    "dense": build_dense, "dense-prealloc": build_dense_prealloc, "moesys": build_moesys, "moesys-eager": build_moesys_eager,
    "deepspeed": build_deepspeed, "hf-mixtral": build_hf_mixtral,
}


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------


def run_case(name, c, dtype_name, repeats, contenders):
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    x = torch.randn(c["T"], c["D"]).to(dtype).requires_grad_(True)
    grad_y = torch.randn(c["T"], c["D"]).to(dtype)
    steps, notes, rows = {}, {}, []
    for contender in contenders:
        try:
            steps[contender], notes[contender] = CONTENDERS[contender](c, dtype, x, grad_y)
            _harness.time_call(steps[contender], repeats=1, warmup=1)   # warm-up (and first-call setup)
        except Exception as exc:  # a peer that cannot run here is recorded, not fatal
            notes[contender] = f"failed: {type(exc).__name__}: {exc}".splitlines()[0][:300]
            traceback.print_exc()
            steps.pop(contender, None)
    samples = {k: [] for k in steps}
    load_before = os.getloadavg()[0]
    for _ in range(repeats):  # interleaved rounds: each contender once per round
        for contender, step in steps.items():
            x.grad = None
            samples[contender].append(_harness.time_call(step, repeats=1, warmup=0)["min_s"])
    load = (load_before, os.getloadavg()[0])
    flops = 6 * c["T"] * c["K"] * c["D"] * (3 * c["F"])
    dense = samples.get("dense")
    for contender in contenders:
        times = samples.get(contender)
        median_s = statistics.median(times) if times else None
        rows.append({
            "case": name, "dtype": dtype_name, "contender": contender,
            "T": c["T"], "D": c["D"], "F": c["F"], "E": c["E"], "K": c["K"],
            "median_ms": median_s * 1e3 if median_s else None,
            "min_ms": min(times) * 1e3 if times else None,
            "tokens_per_s": c["T"] / median_s if median_s else None,
            "routed_gflops": flops / median_s / 1e9 if median_s else None,
            "efficiency": statistics.median(dense) / median_s if (times and dense) else None,
            "efficiency_best": min(dense) / min(times) if (times and dense) else None,
            # per round: the dense GEMM and the contender timed in the same round, so that drifts in
            # the machine's speed over the run cancel; the median of those ratios
            "efficiency_paired": (statistics.median(d / t for d, t in zip(dense, times))
                                  if (times and dense) else None),
            "efficiency_vs_prealloc": (statistics.median(samples["dense-prealloc"]) / median_s
                                       if (times and samples.get("dense-prealloc")) else None),
            "samples_ms": [t * 1e3 for t in times] if times else [],
            "loadavg_1min": load,
            "note": notes.get(contender, ""),
        })
    return rows


def main(argv=None) -> None:
    p = _harness.parser("moe_layer", __doc__.splitlines()[0])
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    p.add_argument("--cases", default="a,b", help="comma list of a, b")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="comma list of " + ", ".join(CONTENDERS))
    args = p.parse_args(argv)
    args.json = _harness.results_path(args, "moe_layer")
    torch.set_num_threads(args.threads)
    cases = QUICK_CASES if args.quick else CASES
    contenders = [c for c in args.contenders.split(",") if c]
    rows = []
    for dtype_name in args.dtypes.split(","):
        for name in args.cases.split(","):
            repeats = args.repeats or (2 if args.quick else (5 if dtype_name == "fp32" else 3))
            rows += run_case(name, cases[name], dtype_name, repeats, contenders)
            case_rows = [r for r in rows if r["case"] == name and r["dtype"] == dtype_name]
            _harness.print_table(case_rows, ["contender", "median_ms", "tokens_per_s", "routed_gflops", "efficiency",
                                             "efficiency_paired", "efficiency_best", "efficiency_vs_prealloc",
                                             "note"],
                                 title=f"\ncase ({name}) {cases[name]} {dtype_name}, {args.threads} threads")
            load = case_rows[0]["loadavg_1min"]
            if max(load) > os.cpu_count():
                print(f"note: 1-minute load average {load[0]:.1f} -> {load[1]:.1f} on {os.cpu_count()} cores: "
                      f"other processes shared the CPUs during this case")
    _harness.write_json(args.json, "moe_layer", rows, threads=args.threads, quick=args.quick,
                        cases={k: cases[k] for k in args.cases.split(",")},
                        flops="6*T*K*D*(H+F), H=2F", efficiency="t_dense / t_layer")


if __name__ == "__main__":
    main()
