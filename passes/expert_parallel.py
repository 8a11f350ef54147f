"""expert_parallel: shard experts over the EP group and route tokens to them with all-to-all.

Shape legend: T tokens · D dim · E experts · R EP ranks · L = E/R local experts · N = T*K slots ·
M rows received by this rank.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

import moesys_compile.runtime.collectives  # noqa: F401  registers moesys::ep_* ops
from moesys_compile.errors import PlanError
from moesys_compile.frontend.annotation import Cost
from moesys_compile.ir import is_op, moesys_meta
from moesys_compile.passes.decompose_moe import new_node
from moesys_compile.runtime.groups import Topology


def _shard_parameter(gm: fx.GraphModule, ctx, node: fx.Node, topo: Topology, cache: dict) -> fx.Node:
    """Replace a full [E, ...] expert parameter in the graph module by this rank's [L, ...] rows."""
    target = str(node.target)
    if target not in cache:
        holder_path, _, attr = target.rpartition(".")
        holder = gm.get_submodule(holder_path) if holder_path else gm
        model_holder = ctx.model.get_submodule(holder_path) if holder_path else ctx.model
        if holder is model_holder:
            raise PlanError(f"expert parameter '{target}' lives on a module the graph shares with the model; "
                            f"it cannot be sharded in place (do not declare '{holder_path}' a leaf module)")
        full = getattr(holder, attr)
        experts = full.shape[0]
        local = experts // topo.expert_parallel
        lo = topo.ep_index * local
        setattr(holder, attr, nn.Parameter(full.detach()[lo:lo + local].clone(), requires_grad=full.requires_grad))
        cache[target] = (lo, lo + local, experts)
        ctx.extras.setdefault("expert_shards", {})[target] = cache[target]
    lo, hi, experts = cache[target]
    node.meta["val"] = ctx.fake_mode.from_tensor(gm.get_parameter(target), static_shapes=True)
    meta = moesys_meta(node)
    meta.update(sharding="expert", expert_range=(lo, hi, experts))
    meta["cost"] = Cost(param_bytes=meta["cost"].param_bytes * (hi - lo) // experts)
    return node


def _a2a_cost(x_ND: fx.Node, ctx, ranks: int) -> Cost:
    value = x_ND.meta["val"]
    rows, dim = ctx.annotation.expr(value.shape[0]), value.shape[1]
    return Cost(comm_bytes=rows * dim * value.element_size() * (ranks - 1) / ranks)


def _parallelize_one(gm: fx.GraphModule, ctx, mlp: fx.Node, topo: Topology, cache: dict) -> None:
    x_ND, counts_E, w_up_EHD, w_down_EDF, activation = mlp.args
    permute = x_ND.args[0]
    order_N = next(u for u in permute.users if u.args[1] == 2)
    ranks = topo.expert_parallel
    key = moesys_meta(mlp).get("module") or mlp.name
    experts = w_up_EHD.meta["val"].shape[0]
    for param in (w_up_EHD, w_down_EDF):
        _shard_parameter(gm, ctx, param, topo, cache)
    with gm.graph.inserting_before(mlp):
        recv_RL = new_node(gm, ctx, torch.ops.moesys.ep_counts.default, (counts_E, "ep", ranks), mlp, cost=Cost())
        x_MD = new_node(gm, ctx, torch.ops.moesys.ep_dispatch.default, (x_ND, counts_E, recv_RL, "ep"), mlp,
                        cost=_a2a_cost(x_ND, ctx, ranks))
        local_counts_L = new_node(gm, ctx, torch.ops.aten.sum.dim_IntList, (recv_RL, [0]), mlp, cost=Cost())
        y_MD = new_node(gm, ctx, torch.ops.moesys.grouped_mlp.default,
                        (x_MD, local_counts_L, w_up_EHD, w_down_EDF, activation), mlp, cost=moesys_meta(mlp)["cost"])
        y_ND = new_node(gm, ctx, torch.ops.moesys.ep_combine.default, (y_MD, counts_E, recv_RL, order_N, "ep"), mlp,
                        cost=_a2a_cost(x_ND, ctx, ranks))
    moesys_meta(x_MD)["a2a"] = ("dispatch", key)
    moesys_meta(y_ND)["a2a"] = ("combine", key)
    mlp.replace_all_uses_with(y_ND)
    gm.graph.erase_node(mlp)
    lo, hi, _ = cache[str(w_up_EHD.target)]
    ctx.note(f"{key}: experts {lo}..{hi - 1} of {experts} on this rank (ep_index {topo.ep_index}); "
             f"dispatch/combine all-to-all over EP group ranks {topo.ep_ranks} (counts exchange, uneven splits)")


def _globalize_aux_losses(gm: fx.GraphModule, ctx) -> int:
    losses = [n for n in gm.graph.nodes if is_op(n, "load_balancing_loss")]
    for node in losses:
        scores_TE, ids_TK, coef = node.args
        with gm.graph.inserting_before(node):
            both = new_node(gm, ctx, torch.ops.moesys.global_load_balancing_loss.default,
                            (scores_TE, ids_TK, coef, "dense"), node, cost=moesys_meta(node)["cost"])
            new = new_node(gm, ctx, operator.getitem, (both, 0), node, cost=Cost())
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    return len(losses)


def expert_parallel(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    """Per-rank expert parallelism: local expert shards plus dispatch/combine all-to-all.

    **Contract.** Needs ``decompose_moe`` to have run (``permute -> grouped_mlp -> unpermute``
    with ``meta["val"]``), ``ctx.rank`` and ``plan.world_size``/``expert_parallel``. Writes: the
    expert parameters in the graph module become this rank's ``[E/R, ...]`` rows
    (``meta["moesys"]["sharding"] = "expert"``, ``"expert_range" = (lo, hi, E)``, and
    ``ctx.extras["expert_shards"][target]``); ``ep_dispatch``/``ep_combine`` nodes tagged
    ``meta["moesys"]["a2a"] = ("dispatch"|"combine", layer module)`` with ``comm_bytes`` costs; with
    world_size > 1 each ``load_balancing_loss`` becomes ``global_load_balancing_loss`` over all
    ranks, so the aux loss (and its gradient) equals that of one process on the global batch.
    The model's parameters are never modified (the graph module's holders are its own).
    Row counts after dispatch are data dependent (unbacked sizes in ``meta["val"]``).

    **Pseudo-code.**

        if ep == 1 and world == 1: note "no-op"; return
        for mlp in grouped_mlp nodes (ep > 1):
            w_up, w_down := rank-local rows [ep_index*L, (ep_index+1)*L)
            recv_RL = ep_counts(counts_E)                       # all-to-all of counts
            x_MD   = ep_dispatch(x_ND, counts_E, recv_RL)       # uneven all-to-all, expert-major
            y_MD   = grouped_mlp(x_MD, recv_RL.sum(0), w_up, w_down)
            y_ND   = ep_combine(y_MD, counts_E, recv_RL, order_N)  # reverse all-to-all, zero pad
        if world > 1: load_balancing_loss -> global_load_balancing_loss(group="dense")
    """
    plan = ctx.plan
    if plan.expert_parallel == 1 and plan.world_size == 1:
        ctx.note("expert_parallel is a no-op: expert_parallel=1 and world_size=1 (single device)")
        return gm
    if any(is_op(n, "moe_experts") for n in gm.graph.nodes):
        raise PlanError("expert_parallel needs decompose_moe, which did not run (remove 'decompose_moe' from "
                        "plan.disable_passes)")
    topo = Topology.of(ctx.rank, plan.world_size, plan.expert_parallel)
    cache: dict = {}
    if plan.expert_parallel > 1:
        for mlp in [n for n in gm.graph.nodes if is_op(n, "grouped_mlp")]:
            _parallelize_one(gm, ctx, mlp, topo, cache)
    else:
        ctx.note(f"expert_parallel=1: every rank holds all experts (pure data parallelism over {plan.world_size})")
    count = _globalize_aux_losses(gm, ctx)
    ctx.note(f"rank {ctx.rank}: EP group {topo.ep_ranks}, expert-data-parallel group {topo.edp_ranks}; "
             f"{count} load-balancing loss(es) use global statistics over all {plan.world_size} ranks")
    gm.delete_all_unused_submodules()
    return gm
