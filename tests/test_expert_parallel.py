"""expert_parallel and fuse_comm: per-rank graph structure, sharding, buckets, and plan errors."""

from __future__ import annotations

import pytest
import torch

import moesys_compile as mc
from moesys_compile.ir import is_op
from moesys_compile.programs.training import TrainingProgram
from moesys_compile.runtime.collectives import transpose_blocks
from moesys_compile.runtime.groups import Topology


def tiny(**overrides):
    torch.manual_seed(0)
    return mc.models.build("tiny-moe", **{"n_layers": 2, **overrides})


IDS = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))


def ops_in(gm, *names):
    return [n for n in gm.graph.nodes if is_op(n, *names)]


def test_topology_groups():
    topo = Topology.of(rank=5, world_size=8, expert_parallel=4)
    assert (topo.ep_ranks, topo.edp_ranks, topo.ep_index, topo.dp_index) == ([4, 5, 6, 7], [1, 5], 1, 1)


@pytest.mark.parametrize("exchange", ["token", "slot"])
def test_rank_graph_holds_only_its_experts(exchange):
    model = tiny()
    full_up = model.layers[1].ffn.w_up.detach().clone()
    plan = mc.Plan(mode="train", world_size=4, expert_parallel=2, ep_exchange=exchange)
    gm, ctx = mc.lower(model, plan, (IDS,), rank=3)
    local_up = gm.get_parameter("layers.1.ffn.w_up")
    assert local_up.shape[0] == 2 and torch.equal(local_up, full_up[2:4])
    assert model.layers[1].ffn.w_up.shape[0] == 4, "the user's model keeps its full parameters"
    assert ctx.extras["expert_shards"]["layers.1.ffn.w_down"] == (2, 4, 4)
    reads = [n for n in gm.graph.nodes if n.op == "get_attr" and str(n.target).endswith(("w_up", "w_down"))]
    assert {n.meta["moesys"]["sharding"] for n in reads} == {"expert"}
    if exchange == "token":     # the slots are sorted by the plan op: no permuted rows, no unpermute
        dispatch, combine = ops_in(gm, "ep_token_dispatch"), ops_in(gm, "ep_token_combine")
        assert len(ops_in(gm, "ep_token_plan")) == 2 and not ops_in(gm, "ep_dispatch", "permute", "unpermute")
    else:
        dispatch, combine = ops_in(gm, "ep_dispatch"), ops_in(gm, "ep_combine")
        assert len(ops_in(gm, "ep_counts")) == 2 and not ops_in(gm, "ep_token_plan")
    assert len(dispatch) == len(combine) == 2
    assert [n.meta["moesys"]["a2a"] for n in dispatch] == [("dispatch", "layers.0.ffn"), ("dispatch", "layers.1.ffn")]
    assert all(n.meta["moesys"]["cost"].comm_bytes != 0 for n in dispatch + combine)
    assert isinstance(dispatch[0].meta["val"].shape[0], torch.SymInt), "received rows are data dependent"
    assert not ops_in(gm, "load_balancing_loss", "global_load_balancing_loss")
    (aux,) = ops_in(gm, "global_load_balancing_losses")      # fuse_comm: one all-reduce for both layers
    assert len(aux.args[0]) == 2
    assert any("experts 2..3 of 4" in line for line in ctx.notes["expert_parallel"])


@pytest.mark.parametrize("exchange, bounds", [("slot", {"ep_dispatch": "4*B*S"}),
                                               ("token", {"ep_token_dispatch": "4*B*S"})])
def test_received_rows_are_bounded_by_every_ranks_slots(exchange, bounds):
    """top-2 over 4 experts on 2 ranks: a rank receives at most 2 ranks x B*S tokens x 2 slots
    (not the element count of the rows sent, which the generic rule would give)."""
    plan = mc.Plan(mode="train", world_size=2, expert_parallel=2, ep_exchange=exchange)
    gm, ctx = mc.lower(tiny(n_layers=1, num_experts=4), plan, (IDS,), rank=0)
    (name, bound), = bounds.items()
    (dispatch,) = ops_in(gm, name)
    assert str(ctx.annotation.expr(dispatch.meta["val"].shape[0])) == bound
    if exchange == "token":     # and sends one row per token and rank it goes to
        (plan_node,) = ops_in(gm, "ep_token_plan")
        assert str(ctx.annotation.expr(plan_node.meta["val"][2].shape[0])) == "2*B*S"


def test_single_device_is_a_noop():
    gm, ctx = mc.lower(tiny(), mc.Plan(mode="train"), (IDS,))
    assert not ops_in(gm, "ep_dispatch", "global_load_balancing_loss")
    assert "no-op" in ctx.notes["expert_parallel"][0] and "no-op" in ctx.notes["fuse_comm"][0]


def test_needs_decompose():
    plan = mc.Plan(mode="train", world_size=2, expert_parallel=2, disable_passes=("decompose_moe",))
    with pytest.raises(mc.PassError, match="decompose_moe"):
        mc.lower(tiny(), plan, (IDS,), rank=0)


@pytest.mark.parametrize("bucket_mb, max_params", [(1e-6, 1), (100.0, None)])
def test_buckets_per_class_and_group(bucket_mb, max_params):
    plan = mc.Plan(mode="train", world_size=4, expert_parallel=2, bucket_mb=bucket_mb)
    gm, ctx = mc.lower(tiny(), plan, (IDS,), rank=1)
    buckets = ctx.extras["grad_buckets"]
    kinds = {b.kind: b.group for b in buckets}
    assert kinds == {"dense": "dense", "router": "dense", "expert": "edp"}
    names = [n for b in buckets for n in b.params]
    assert sorted(names) == sorted(n for n, _ in gm.named_parameters()), "every parameter in exactly one bucket"
    expert_names = {n for b in buckets if b.kind == "expert" for n in b.params}
    assert expert_names == {f"layers.{i}.ffn.{w}" for i in (0, 1) for w in ("w_up", "w_down")}
    if max_params:
        assert all(len(b.params) == max_params for b in buckets)
    else:
        assert len(buckets) == 3
    assert names[0] == "lm_head.weight", "buckets follow backward order (last layer first)"
    router = next(n for n in gm.graph.nodes if n.target == "layers.0.ffn.router")
    assert router.meta["moesys"]["bucket"][0].startswith("router#")
    assert any("over edp group [1, 3]" in line for line in ctx.notes["fuse_comm"])


def test_received_rows_become_expert_major():
    recv_RL = [[1, 2], [3, 0]]                    # source-major rows: s0e0 | s0e1 s0e1 | s1e0 x3
    rows = torch.arange(6.0)[:, None]
    assert transpose_blocks(rows, recv_RL).flatten().tolist() == [0, 3, 4, 5, 1, 2]
    assert transpose_blocks(rows[:0], [[0, 0], [0, 0]]).numel() == 0


def test_world_size_without_process_group_is_a_plan_error():
    with pytest.raises(mc.PlanError, match=r"world_size \(2\).*torchrun --nproc-per-node 2"):
        mc.compile(tiny(), mc.Plan(mode="train", world_size=2, expert_parallel=2), (IDS,))


def test_single_rank_training_program_matches_program():
    model = tiny()
    gm, ctx = mc.lower(model, mc.Plan(mode="train"), (IDS,))
    program = TrainingProgram(gm, ctx)
    torch.testing.assert_close(program(IDS), model(IDS))
    assert {id(p) for p in program.parameters()} == {id(p) for p in model.parameters()}
    for name, tensor in program.full_state_dict().items():
        torch.testing.assert_close(tensor, model.state_dict()[name])
    program(IDS).sum().backward()
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    norm = program.clip_grad_norm_(1e-3)
    torch.testing.assert_close(norm, expected)
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    assert float(clipped) == pytest.approx(1e-3, rel=1e-3)
