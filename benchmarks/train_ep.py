"""Expert-parallel training throughput of an MoE layer stack on 2 CPU ranks (gloo):
moesys-compile's TrainingProgram against DeepSpeed-MoE (``deepspeed.moe.layer.MoE``), same run.

Both stacks: L layers of top-k routing over E SwiGLU experts (dim D, hidden F), ep_size=2, fp32.
``--experts coarse`` (default): E=8, top-2, F=2D (Mixtral-like). ``--experts fine``: E=64, top-8,
F=D/2 (OLMoE-like fine-grained experts); both do the same expert FLOPs per token.
One timed step = forward + backward (aux loss included) + gradient synchronisation (ours: the
fused bucket all-reduce inside backward; DeepSpeed's layer has no engine here, so the gate's
gradients are all-reduced over the world after backward, as its engine would; its expert
gradients have an expert-data-parallel group of one rank, as ours do). Tokens/s counts the
tokens of both ranks.

Ours exchange one row per (rank, token) (``ep_exchange="token"``, the default); the row
``moesys (dropless, slot exchange)`` is the same stack with one row per routed slot
(``ep_exchange="slot"``, DeepSpeed's layout), for the difference the exchange makes.

Capacity: each of ours is compared with DeepSpeed under the same semantics: GShard capacity
(capacity_factor=1.0, DeepSpeed's default, drop_tokens=True) and dropless (DeepSpeed
drop_tokens=False, which pads every expert to the largest expert load; ours sends uneven splits).

Same function: the DeepSpeed stacks are loaded with our stacks' router and expert weights, so
both route every token to the same experts (same loads, same drops, same dropless padding); the
dropless outputs of the two are compared once before timing (``max_abs_diff_dropless``).

Columns: ``step_ms`` wall time of a step (median over rounds, both ranks in lock step);
``all_to_all_ms_per_rank`` / ``all_to_all_mb_received_per_rank`` (ours only): per rank, the ms
per step spent inside all-to-all calls (dispatch and combine, forward and backward, and the small
exchanges of counts and slot records; it includes waiting there for the other rank) and the MB
received in them, from a few extra steps after the timed
rounds with ``dist.all_to_all_single`` timed;
``cpu_ms`` CPU time of one rank's process per step (median, mean over the ranks; gloo threads
included). On a shared machine the wall time also counts the time other processes hold the
cores; CPU time counts only this process's own work (it still moves with cache and memory
contention), so ``vs_deepspeed_cpu`` (the ratio of CPU times) is the steadier of the two ratios.

    python -m benchmarks.train_ep [--experts coarse|fine] [--quick] [--json FILE]   # launches 2 ranks
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

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
                ep_size=WORLD, k=cfg["top_k"], capacity_factor=1.0, drop_tokens=drop_tokens, use_rts=False,
                top2_2nd_expert_sampling=False)
            for _ in range(cfg["layers"]))
        for layer in self.layers:
            layer.set_deepspeed_parallelism()
        self.aux_loss = None

    @torch.no_grad()
    def load_from(self, moe_layers: nn.Module) -> "DeepSpeedStack":
        """Copy the router and this rank's experts (rows [r*L, (r+1)*L) of the stacked weights,
        DeepSpeed's placement for ep_size = world size) from a stack of ``mc.nn.MoE``."""
        for ours, theirs in zip(moe_layers, self.layers):
            theirs.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight)
            local = theirs.deepspeed_moe.experts.deepspeed_experts
            first = dist.get_rank() * len(local)
            for index, expert in enumerate(local):
                expert.up.weight.copy_(ours.w_up[first + index])
                expert.down.weight.copy_(ours.w_down[first + index])
        return self

    def forward(self, x):
        aux = 0
        for layer in self.layers:
            x, l_aux, _ = layer(x)
            aux = aux + l_aux
        self.aux_loss = aux
        return x


def moesys_stack(cfg: dict, capacity_factor, exchange: str = "token"):
    import moesys_compile as mc
    torch.manual_seed(0)            # every stack starts from the same weights
    layers = nn.Sequential(*[mc.nn.MoE(cfg["dim"], cfg["ffn"], cfg["experts"], top_k=cfg["top_k"])
                             for _ in range(cfg["layers"])])
    plan = mc.Plan(mode="train", world_size=WORLD, expert_parallel=WORLD, capacity_factor=capacity_factor,
                   ep_exchange=exchange)
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


def config(quick: bool, experts: str = "coarse") -> dict:
    if experts == "fine":
        if quick:
            return dict(layers=2, dim=128, ffn=64, experts=16, top_k=4, batch=4, seq=64)
        return dict(layers=4, dim=256, ffn=128, experts=64, top_k=8, batch=8, seq=128)
    if quick:
        return dict(layers=2, dim=128, ffn=256, experts=4, top_k=2, batch=4, seq=64)
    return dict(layers=4, dim=256, ffn=512, experts=8, top_k=2, batch=8, seq=128)


def timed_step(fn) -> tuple[float, float]:
    """(wall, process CPU) seconds of one step, ranks in lock step (barrier before and after)."""
    dist.barrier()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    cpu = time.process_time() - cpu
    dist.barrier()
    return time.perf_counter() - wall, cpu


def all_to_all_share(cases: dict, names: list[str], rounds: int = 3) -> dict:
    """For each of our ``names``: the median ms per step this rank spends in all-to-alls (every
    ``dist.all_to_all_single``: rows, counts and slot records, timed around the call) and the MB
    it receives in them per step; measured after the main timing, so that the wrapper does not
    touch it."""
    original, spent = dist.all_to_all_single, {"s": 0.0, "bytes": 0}

    def timed(output, input, *args, **kwargs):
        start = time.perf_counter()
        result = original(output, input, *args, **kwargs)
        spent["s"] += time.perf_counter() - start
        spent["bytes"] += output.numel() * output.element_size()
        return result
    dist.all_to_all_single = timed
    try:
        share = {}
        for name in names:
            samples = []
            for _ in range(rounds):
                spent.update(s=0.0, bytes=0)
                wall, _ = timed_step(cases[name])
                samples.append((spent["s"] * 1e3, wall * 1e3, spent["bytes"] / 2 ** 20))
            a2a_ms, step_ms, mb = (statistics.median(v) for v in zip(*samples))
            share[name] = {"all_to_all_ms": a2a_ms, "step_ms": step_ms, "mb_received": mb}
        return share
    finally:
        dist.all_to_all_single = original


@torch.no_grad()
def max_abs_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    diff = torch.tensor([(a(x) - b(x)).abs().max().item()])
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


def measure(cfg: dict, repeats: int) -> tuple[list[dict], list[str], float]:
    """Round-robin over the cases (one timed step of each per round) so that load from other
    processes on the machine spreads evenly over them; medians over the rounds."""
    x = example(cfg)
    tokens = WORLD * cfg["batch"] * cfg["seq"]
    ours_capacity, ours_dropless = moesys_stack(cfg, 1.0), moesys_stack(cfg, None)
    ours_slots = moesys_stack(cfg, None, exchange="slot")
    model = ours_dropless.context.model
    ds_capacity = DeepSpeedStack(cfg, drop_tokens=True).load_from(model)
    ds_dropless = DeepSpeedStack(cfg, drop_tokens=False).load_from(model)
    diff = max_abs_diff(ours_dropless, ds_dropless, x)
    cases = {
        "deepspeed-moe (cf=1.0)": step_fn(ds_capacity, x, gate_allreduce(ds_capacity)),
        "moesys (cf=1.0)": step_fn(ours_capacity, x, lambda: None),
        "deepspeed-moe (dropless)": step_fn(ds_dropless, x, gate_allreduce(ds_dropless)),
        "moesys (dropless)": step_fn(ours_dropless, x, lambda: None),
        "moesys (dropless, slot exchange)": step_fn(ours_slots, x, lambda: None),
    }
    passes = ours_capacity.context.passes_run
    walls: dict[str, list[float]] = {name: [] for name in cases}
    cpus: dict[str, list[float]] = {name: [] for name in cases}
    for round_index in range(repeats + 2):          # the first two rounds warm up
        for name, fn in cases.items():
            wall, cpu = timed_step(fn)
            if round_index >= 2:
                walls[name].append(wall)
                cpus[name].append(cpu)
    cpu_medians = torch.tensor([statistics.median(cpus[name]) for name in cases], dtype=torch.float64)
    dist.all_reduce(cpu_medians)
    rows = []
    for name, cpu in zip(cases, (cpu_medians / WORLD).tolist()):
        median = statistics.median(walls[name])
        rows.append({"case": name, "step_ms": median * 1e3, "tokens_per_s": tokens / median,
                     "min_ms": min(walls[name]) * 1e3, "cpu_ms": cpu * 1e3, "repeats": len(walls[name])})
    share = all_to_all_share(cases, [name for name in cases if name.startswith("moesys")])
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, share)
    for row in rows:
        if row["case"] in share:
            row["all_to_all_ms_per_rank"] = [round(g[row["case"]]["all_to_all_ms"], 1) for g in gathered]
            row["all_to_all_mb_received_per_rank"] = [round(g[row["case"]]["mb_received"], 1) for g in gathered]
    for row in rows:      # each case against DeepSpeed with the same capacity semantics
        peer_name = "deepspeed-moe (dropless)" if "dropless" in row["case"] else "deepspeed-moe (cf=1.0)"
        peer = next(r for r in rows if r["case"] == peer_name)
        row["vs_deepspeed"] = row["tokens_per_s"] / peer["tokens_per_s"]
        row["vs_deepspeed_cpu"] = peer["cpu_ms"] / row["cpu_ms"]
    return rows, passes, diff


def rank_main(args) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = config(args.quick, args.experts)
    rows, passes, diff = measure(cfg, args.repeats or (3 if args.quick else 10))
    if dist.get_rank() == 0:
        title = (f"MoE stack training step on {WORLD} CPU ranks (gloo), ep=2: {cfg['layers']} layers, D={cfg['dim']}, "
                 f"F={cfg['ffn']}, E={cfg['experts']}, top-{cfg['top_k']}, {WORLD}x{cfg['batch']}x{cfg['seq']} tokens")
        columns = ["case", "step_ms", "min_ms", "tokens_per_s", "vs_deepspeed", "cpu_ms", "vs_deepspeed_cpu",
                   "all_to_all_ms_per_rank", "all_to_all_mb_received_per_rank"]
        _harness.print_table(rows, columns, title)
        ours = [r for r in rows if r["case"].startswith("moesys")]
        ratios = {r["case"]: r["vs_deepspeed"] for r in ours}
        cpu_ratios = {r["case"]: r["vs_deepspeed_cpu"] for r in ours}
        print(f"train pipeline: {' -> '.join(passes)}; same weights as DeepSpeed, "
              f"dropless outputs differ by {diff:.2e}")
        _harness.write_json(args.json, NAME, rows, config=cfg, world_size=WORLD, deepspeed=deepspeed.__version__,
                            ratios=ratios, cpu_ratios=cpu_ratios, target_ratio=1.5, passes=passes,
                            max_abs_diff_dropless=diff)
    dist.barrier()
    dist.destroy_process_group()


def arguments():
    parser = _harness.parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--experts", choices=("coarse", "fine"), default="coarse",
                        help="coarse: E=8, top-2, F=2D; fine: E=64, top-8, F=D/2")
    args = parser.parse_args()
    args.json = _harness.results_path(args, f"{NAME}_fine" if args.experts == "fine" else NAME)
    return args


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
