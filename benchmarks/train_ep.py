"""Expert-parallel training throughput of an MoE layer stack on 2 CPU ranks (gloo):
moesys-compile's TrainingProgram against DeepSpeed-MoE (``deepspeed.moe.layer.MoE``), same run.

Both stacks: L layers of top-2 routing over E SwiGLU experts (dim D, hidden F), ep_size=2, fp32.
One timed step = forward + backward (aux loss included) + gradient synchronisation (ours: the
fused bucket all-reduce inside backward; DeepSpeed's layer has no engine here, so the gate's
gradients are all-reduced over the world after backward, as its engine would; its expert
gradients have an expert-data-parallel group of one rank, as ours do). Tokens/s counts the
tokens of both ranks.

Capacity: each of ours is compared with DeepSpeed under the same semantics: GShard capacity
(capacity_factor=1.0, DeepSpeed's default, drop_tokens=True) and dropless (DeepSpeed
drop_tokens=False, which pads every expert to the largest expert load; ours sends uneven splits).

    python -m benchmarks.train_ep [--quick] [--json FILE]   # launches 2 ranks (torchrun)
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")   # DeepSpeed picks its accelerator at import

import torch                                    # noqa: E402
import torch.distributed as dist                # noqa: E402
from torch import nn                            # noqa: E402

from benchmarks import _harness                 # noqa: E402

NAME = "train_ep"
WORLD = 2


class SwiGLU(nn.Module):
    """The expert both stacks use: down(silu(gate(x)) * up(x)), gate/up fused in one [2F, D] matrix."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = self.up(x).chunk(2, dim=-1)
        return self.down(nn.functional.silu(gate) * up)


class DeepSpeedStack(nn.Module):
    def __init__(self, cfg: dict, drop_tokens: bool = True):
        super().__init__()
        from deepspeed.moe.layer import MoE
        self.layers = nn.ModuleList(
            MoE(hidden_size=cfg["dim"], expert=SwiGLU(cfg["dim"], cfg["ffn"]), num_experts=cfg["experts"],
                ep_size=WORLD, k=2, capacity_factor=1.0, drop_tokens=drop_tokens, use_rts=False,
                top2_2nd_expert_sampling=False)
            for _ in range(cfg["layers"]))
        for layer in self.layers:
            layer.set_deepspeed_parallelism()
        self.aux_loss = None

    def forward(self, x):
        aux = 0
        for layer in self.layers:
            x, l_aux, _ = layer(x)
            aux = aux + l_aux
        self.aux_loss = aux
        return x


def moesys_stack(cfg: dict, capacity_factor):
    import moesys_compile as mc
    layers = nn.Sequential(*[mc.nn.MoE(cfg["dim"], cfg["ffn"], cfg["experts"], top_k=2) for _ in range(cfg["layers"])])
    plan = mc.Plan(mode="train", world_size=WORLD, expert_parallel=WORLD, capacity_factor=capacity_factor)
    return mc.compile(layers, plan, example_inputs=(example(cfg),))


def example(cfg: dict) -> torch.Tensor:
    gen = torch.Generator().manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    return torch.randn(cfg["batch"], cfg["seq"], cfg["dim"], generator=gen)


def step_fn(module: nn.Module, x: torch.Tensor, dense_sync):
    def step():
        out = module(x)
        loss = out.square().mean() + module.aux_loss
        loss.backward()
        dense_sync()
        for p in module.parameters():
            p.grad = None
    return step


def gate_allreduce(stack: DeepSpeedStack):
    gates = [p for n, p in stack.named_parameters() if ".gate." in n]

    def sync():
        flat = torch.cat([p.grad.reshape(-1) for p in gates]).div_(WORLD)
        dist.all_reduce(flat)
        offset = 0
        for p in gates:
            p.grad.copy_(flat[offset: offset + p.numel()].view_as(p))
            offset += p.numel()
    return sync


def config(quick: bool) -> dict:
    if quick:
        return dict(layers=2, dim=128, ffn=256, experts=4, batch=4, seq=64)
    return dict(layers=4, dim=256, ffn=512, experts=8, batch=8, seq=128)


def measure(cfg: dict, repeats: int) -> list[dict]:
    """Round-robin over the cases (one timed step of each per round) so that load from other
    processes on the machine spreads evenly over them; medians over the rounds."""
    torch.manual_seed(0)
    x = example(cfg)
    tokens = WORLD * cfg["batch"] * cfg["seq"]
    ds_capacity, ds_dropless = DeepSpeedStack(cfg, drop_tokens=True), DeepSpeedStack(cfg, drop_tokens=False)
    ours_capacity, ours_dropless = moesys_stack(cfg, 1.0), moesys_stack(cfg, None)
    cases = {
        "deepspeed-moe (cf=1.0)": step_fn(ds_capacity, x, gate_allreduce(ds_capacity)),
        "moesys (cf=1.0)": step_fn(ours_capacity, x, lambda: None),
        "deepspeed-moe (dropless)": step_fn(ds_dropless, x, gate_allreduce(ds_dropless)),
        "moesys (dropless)": step_fn(ours_dropless, x, lambda: None),
    }
    passes = ours_capacity.context.passes_run
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for round_index in range(repeats + 2):          # the first two rounds warm up
        for name, fn in cases.items():
            timing = _harness.time_call(fn, repeats=1, warmup=0, sync=dist.barrier)
            if round_index >= 2:
                samples[name].append(timing["median_s"])
    rows = []
    for name, times in samples.items():
        median = statistics.median(times)
        rows.append({"case": name, "step_ms": median * 1e3, "tokens_per_s": tokens / median,
                     "min_ms": min(times) * 1e3, "repeats": len(times)})
    for row in rows:      # each case against DeepSpeed with the same capacity semantics
        peer = "deepspeed-moe (dropless)" if "dropless" in row["case"] else "deepspeed-moe (cf=1.0)"
        row["vs_deepspeed"] = row["tokens_per_s"] / next(r["tokens_per_s"] for r in rows if r["case"] == peer)
    return rows, passes


def rank_main(args) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = config(args.quick)
    rows, passes = measure(cfg, args.repeats or (3 if args.quick else 10))
    if dist.get_rank() == 0:
        title = (f"MoE stack training step on {WORLD} CPU ranks (gloo), ep=2: {cfg['layers']} layers, D={cfg['dim']}, "
                 f"F={cfg['ffn']}, E={cfg['experts']}, top-2, {WORLD}x{cfg['batch']}x{cfg['seq']} tokens")
        _harness.print_table(rows, ["case", "step_ms", "min_ms", "tokens_per_s", "vs_deepspeed"], title)
        ratios = {r["case"]: r["vs_deepspeed"] for r in rows if r["case"].startswith("moesys")}
        print(f"train pipeline: {' -> '.join(passes)}")
        _harness.write_json(args.json, NAME, rows, config=cfg, world_size=WORLD, deepspeed=deepspeed.__version__,
                            ratios=ratios, target_ratio=1.5, passes=passes)
    dist.barrier()
    dist.destroy_process_group()


def arguments():
    return _harness.parser(NAME, __doc__.splitlines()[0]).parse_args()


def main() -> int:
    args = arguments()
    if "RANK" in os.environ:
        rank_main(args)
        return 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), "-m", f"benchmarks.{NAME}", *sys.argv[1:]]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
