"""torch.compile of a train program on 2 gloo ranks: data parallel (ep=1, gradients all-reduced in
fused buckets by hooks outside the graph) and expert parallel (ep=2, slot and token exchange).
The collectives and their backwards are opaque ops (no ProcessGroup captured, no host read in the
traced backward), the program compiles as one graph with fullgraph=True, and a few SGD steps give
the losses and parameters of the uncompiled program."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from dist_utils import optimizer_steps, run_ranks  # noqa: E402

STEPS = 3


def _build(ep: int, exchange: str):
    import moesys_compile as mc

    torch.manual_seed(0)
    model = mc.models.build("tiny-moe", dim=32, n_heads=2, n_layers=2, num_experts=4, vocab_size=64)
    plan = mc.Plan(mode="train", world_size=2, expert_parallel=ep, ep_exchange=exchange)
    return mc.compile(model, plan, example_inputs=(_batch(0, 0),))


def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(100 * step + rank))


def _train(program, run, rank: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses of STEPS SGD steps of ``run`` (the program or its compiled form), and the parameters after."""
    steps = itertools.count()
    losses = optimizer_steps(lambda: run(_batch(rank, next(steps))).logsumexp(-1).mean() + program.aux_loss,
                             torch.optim.SGD(program.parameters(), lr=0.5), STEPS)
    return losses, {n: p.detach().clone() for n, p in program.named_parameters()}


def _capturing_backend(graphs: dict):
    """aot_eager that keeps the call targets of the forward and backward graphs it compiles."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs.setdefault(kind, set()).update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return make_boxed_func(gm)
        return compiler
    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))


def compiled_vs_eager(rank: int, world_size: int, ep: int, exchange: str, backend: str) -> dict:
    """Train two programs of the same model, one uncompiled and one under torch.compile(fullgraph=True)
    (``backend`` "capture": aot_eager keeping the graphs), and return both results and dynamo's counts."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    graphs: dict = {}
    eager_program = _build(ep, exchange)
    eager = _train(eager_program, eager_program, rank)
    program = _build(ep, exchange)
    compiled = torch.compile(program, backend=_capturing_backend(graphs) if backend == "capture" else backend,
                             fullgraph=True)
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        result = _train(program, compiled, rank)
    return {"eager": eager, "compiled": result, "graphs": graphs,
            "unique_graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}


def _assert_same(result: dict) -> None:
    (losses_e, params_e), (losses_c, params_c) = result["eager"], result["compiled"]
    torch.testing.assert_close(torch.tensor(losses_c), torch.tensor(losses_e), rtol=1e-5, atol=1e-5)
    assert params_c.keys() == params_e.keys()
    for name in params_e:
        torch.testing.assert_close(params_c[name], params_e[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def _each_case(rank: int, world_size: int, cases: list) -> list[dict]:
    """Every case in one launch of the ranks (a launch costs an interpreter and a process group)."""
    return [compiled_vs_eager(rank, world_size, ep, exchange, backend) for ep, exchange, backend in cases]


def test_compiled_program_is_one_graph_and_trains_like_eager():
    """ep=1: the global aux loss's backward all-reduce is an op; ep=2 slot exchange: the dispatch's
    backward is an op (and the token exchange's, run under inductor below)."""
    cases = [(1, "token", "capture"), (2, "slot", "capture")]
    backward_ops = ["moesys.all_reduce_sum.default", "moesys.ep_undispatch.default"]
    for per_rank in run_ranks(_each_case, 2, cases, timeout=240):
        for (ep, exchange, _), backward_op, result in zip(cases, backward_ops, per_rank):
            graphs = result["graphs"]
            assert backward_op in graphs["backward"], (ep, exchange)
            assert not any("c10d" in t or "_local_scalar_dense" in t for t in graphs["backward"] | graphs["forward"])
            assert result["unique_graphs"] == 1 and result["graph_breaks"] == 0
            _assert_same(result)


def test_inductor_compiles_expert_parallel_program():
    """The README's ``torch.compile(program)`` with the default backend, tokens over the EP group
    (every backward of the token exchange is an op: a collective traced into the backward graph
    would fail its compile)."""
    for result in run_ranks(compiled_vs_eager, 2, 2, "token", "inductor", timeout=240):
        assert result["unique_graphs"] == 1 and result["graph_breaks"] == 0
        _assert_same(result)
