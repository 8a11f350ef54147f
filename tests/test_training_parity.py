"""End to end: expert-parallel training on 1, 2 and 4 gloo ranks equals one process on the global
batch (losses and full state after 5 optimizer steps, fp32); with dropped slots (capacity is per
rank) it equals the eager model run on each rank's batch."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import moesys_compile as mc
from moesys_compile.runtime.collectives import transpose_blocks

sys.path.insert(0, str(Path(__file__).parent))
from dist_utils import run_ranks  # noqa: E402

VOCAB, BATCH, SEQ, STEPS, LR = 64, 8, 8, 5, 0.5
RTOL, ATOL = 1e-5, 1e-6
MAX_NORM = 1.0     # the global gradient norm starts above it: clipping is exercised


def make_model(**overrides) -> mc.models.Transformer:
    torch.manual_seed(0)
    config = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, ffn_dim=64, num_experts=4, top_k=2,
                  moe_ffn_dim=32, aux_loss_coef=0.05)
    return mc.models.build("tiny-moe", **{**config, **overrides})


def make_optimizer(params):
    # SGD with momentum: the update is linear in the gradients, so fp32 summation-order noise stays
    # at its own size (Adam divides near-zero gradients by their own magnitude and amplifies it).
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    return ids[:, :-1], ids[:, 1:]


def cross_entropy(logits, targets):
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def degenerate_router(model) -> None:
    """Zero router weights: equal scores, so top-1 sends every token to one expert (the tie winner);
    the other experts, and the ranks holding them, receive nothing."""
    with torch.no_grad():
        for layer in model.layers:
            layer.ffn.router.weight.zero_()


def reference_run(overrides: dict, degenerate: bool = False):
    """One eager process on the global batch: loss = CE + sum of the layers' aux losses."""
    model = make_model(**overrides)
    if degenerate:
        degenerate_router(model)
    opt = make_optimizer(model.parameters())
    ids, targets = global_batch()
    losses, norms = [], []
    for _ in range(STEPS):
        ce = cross_entropy(model(ids), targets)
        aux = sum(layer.ffn.aux_loss for layer in model.layers)
        (ce + aux).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        opt.step()
        opt.zero_grad()
        losses.append(float((ce + aux).detach()))
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, norms


def distributed_run(rank: int, world: int, ep: int, overrides: dict, capacity=None, degenerate: bool = False,
                    exchange: str = "token"):
    model = make_model(**overrides)
    if degenerate:
        degenerate_router(model)
    ids, targets = global_batch()
    local = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    plan = mc.Plan(mode="train", world_size=world, expert_parallel=ep, capacity_factor=capacity, bucket_mb=0.01,
                   ep_exchange=exchange)
    program = mc.compile(model, plan, example_inputs=(ids[local],))
    opt = make_optimizer(program.parameters())
    losses, norms = [], []
    for _ in range(STEPS):
        ce = cross_entropy(program(ids[local]), targets[local])
        (ce + program.aux_loss).backward()
        norms.append(float(program.clip_grad_norm_(MAX_NORM)))
        opt.step()
        opt.zero_grad()
        mean_ce = ce.detach().clone()
        dist.all_reduce(mean_ce)
        losses.append(float(mean_ce / world + program.aux_loss))
    state = program.full_state_dict()
    dropped = program.dropped_fraction()
    buckets = program.context.extras.get("grad_buckets", [])
    if world > 1:      # the first bucket goes out while most gradients are still to come
        assert len(buckets) > 3 and program.bucketer.launched_in_backward == STEPS * len(buckets)
        assert program.bucketer.ready_at_first_launch < len(list(program.parameters())) // 2
    return losses, (state if rank == 0 else None), dropped, norms


def scenarios_4(rank: int, world: int):
    """Everything that needs 4 ranks, in one launch (process start-up dominates test time)."""
    return {
        "ep4": distributed_run(rank, world, 4, {}),
        "dp2xep2": distributed_run(rank, world, 2, {}),
        "ep4_one_expert": distributed_run(rank, world, 4, {"top_k": 1}, degenerate=True),
    }


def scenarios_2(rank: int, world: int):
    return {"ep2": distributed_run(rank, world, 2, {}),
            "ep2_slot": distributed_run(rank, world, 2, {}, exchange="slot"),
            "ep2_capacity": distributed_run(rank, world, 2, {}, capacity=8.0)}


def moe_stack(capacity_factor: float) -> torch.nn.Sequential:
    """MoE layers on float features: the first layer's input needs no gradient (its experts skip
    grad_x), and a small capacity factor drops slots on every rank."""
    torch.manual_seed(0)
    return torch.nn.Sequential(*[mc.nn.MoE(16, 32, 4, top_k=2, capacity_factor=capacity_factor, aux_loss_coef=0.0)
                                 for _ in range(2)])


def stack_batch() -> torch.Tensor:
    return torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(2))


def stack_step(rank: int, world: int, capacity_factor: float):
    """One SGD step of the EP program on this rank's half of the batch: (output, full state, dropped
    on this rank, dropped over both ranks)."""
    x = stack_batch()[rank * 2:(rank + 1) * 2]
    plan = mc.Plan(mode="train", world_size=world, expert_parallel=world, capacity_factor=capacity_factor)
    program = mc.compile(moe_stack(capacity_factor), plan, example_inputs=(x,))
    out = program(x)
    out.square().mean().backward()
    torch.optim.SGD(program.parameters(), lr=1.0).step()
    return out.detach(), program.full_state_dict(), program.dropped_fraction(), \
        program.dropped_fraction(across_ranks=True)


def test_two_ranks_with_dropped_slots_match_per_rank_eager():
    """GShard capacity is per rank (local tokens), so the reference runs each rank's half of the
    batch through the eager model separately; gradients are the mean over the halves."""
    factor = 0.75     # the two halves drop different fractions
    results = run_ranks(stack_step, 2, factor)
    model = moe_stack(factor)
    halves = stack_batch().split(2)
    outs = [model(half) for half in halves]
    (sum(out.square().mean() for out in outs) / len(outs)).backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    # both halves route as many slots, so over both ranks a layer drops the mean of their fractions
    both = {layer: sum(result[2][layer] for result in results) / 2 for layer in results[0][2]}
    for rank, (out, state, dropped, dropped_on_both) in enumerate(results):
        torch.testing.assert_close(out, outs[rank].detach(), rtol=RTOL, atol=ATOL)
        assert all(fraction > 0 for fraction in dropped.values()), f"capacity {factor} must drop slots: {dropped}"
        assert dropped_on_both == pytest.approx(both) and dropped_on_both != dropped, (rank, dropped_on_both)
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(state[name], tensor, rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"rank {rank} {name}: {m}")


def expert_major_index(recv_RL: torch.Tensor) -> torch.Tensor:
    """The specification: received rows come source-major (r, l); this index lists them
    expert-major (l, r)."""
    starts = (torch.cumsum(recv_RL.reshape(-1), 0) - recv_RL.reshape(-1)).view(recv_RL.shape)
    return torch.cat([torch.arange(int(starts[r, e]), int(starts[r, e] + recv_RL[r, e]))
                      for e in range(recv_RL.shape[1]) for r in range(recv_RL.shape[0])])


@pytest.mark.parametrize("recv_RL", [[[2, 0, 3], [1, 4, 0]], [[0, 0], [0, 5]], [[3]], [[0, 0], [0, 0]]])
def test_transpose_blocks_is_the_expert_major_permutation(recv_RL):
    """Dispatch reorders received rows by block copies; the index form is the specification."""
    counts = torch.tensor(recv_RL)
    x_MD = torch.randn(int(counts.sum()), 3)
    expert_major = transpose_blocks(x_MD, recv_RL)
    assert torch.equal(expert_major, x_MD.index_select(0, expert_major_index(counts)))
    assert torch.equal(transpose_blocks(expert_major, counts.t().tolist()), x_MD)


def scenarios_1(rank: int, world: int):
    return {"ep1": distributed_run(rank, world, 1, {})}


def assert_same(reference, result, label: str) -> None:
    ref_losses, ref_state, ref_norms = reference
    losses, state, _, norms = result
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=RTOL, atol=ATOL,
                               msg=lambda m: f"{label} global gradient norms: {m}")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL,
                               msg=lambda m: f"{label} losses: {m}")
    assert list(state) == list(ref_state), f"{label}: full_state_dict names differ from the model's"
    for name, tensor in ref_state.items():
        torch.testing.assert_close(state[name], tensor, rtol=RTOL, atol=ATOL, msg=lambda m: f"{label} {name}: {m}")


@pytest.fixture(scope="module")
def reference():
    return reference_run({})


def test_four_ranks_match_one_process(reference):
    results = run_ranks(scenarios_4, 4)[0]
    for label in ("ep4", "dp2xep2"):
        assert_same(reference, results[label], label)
    assert reference[0][-1] < reference[0][0], "the reference loss should fall over 5 steps"
    assert reference[2][0] > MAX_NORM, "the first step must clip"
    assert_same(reference_run({"top_k": 1}, degenerate=True), results["ep4_one_expert"], "ep4_one_expert")


def test_degenerate_routing_really_sends_everything_to_one_expert():
    model = make_model(top_k=1)
    degenerate_router(model)
    x_TD = torch.randn(16, 32)
    _, ids_TK, _ = torch.ops.moesys.route(model.layers[0].ffn.router(x_TD), 1)
    assert ids_TK.unique().numel() == 1


def test_two_ranks_match_one_process(reference):
    results = run_ranks(scenarios_2, 2)[0]
    assert_same(reference, results["ep2"], "ep2")
    assert_same(reference, results["ep2_slot"], "ep2_slot")
    assert_same(reference, results["ep2_capacity"], "ep2_capacity")
    dropped = results["ep2_capacity"][2]
    assert list(dropped.values()) == [0.0, 0.0], f"capacity 8 must drop nothing (and be measured): {dropped}"


def test_one_rank_process_group_matches_one_process(reference):
    assert_same(reference, run_ranks(scenarios_1, 1)[0]["ep1"], "ep1")
