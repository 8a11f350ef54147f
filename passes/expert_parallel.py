"""expert_parallel: shard experts over the EP group and route tokens to them with all-to-all.

Shape legend: T tokens · D dim · E experts · K top-k · R EP ranks · L = E/R local experts ·
N = T*K slots · M rows received by this rank.

Which rows of the expert weights a rank keeps, whatever the model's layout, is ``expert_rows``.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from moesys_compile.errors import PlanError
from moesys_compile.frontend.annotation import Cost
from moesys_compile.ir import bound_args, expert_tensors, is_op, moesys_meta
from moesys_compile.passes.decompose_moe import new_node
from moesys_compile.passes.expert_rows import (ExpertRows, check_dense_uses, check_producers, drop_unused,
                                               expert_owners, expert_rows_of, expert_weights, producers)
from moesys_compile.runtime import collectives, token_exchange  # noqa: F401  register the moesys::ep_* ops
from moesys_compile.runtime.groups import Topology

def _a2a_cost(x: fx.Node, ctx, ranks: int, copies: int = 1) -> Cost:
    """Bytes one rank sends to the others for ``copies`` rows per row of ``x`` (at most)."""
    value = x.meta["val"]
    rows, dim = ctx.annotation.expr(value.shape[0]), value.shape[1]
    return Cost(comm_bytes=rows * copies * dim * value.element_size() * (ranks - 1) / ranks)


def _permute_of(mlp: fx.Node) -> Optional[fx.Node]:
    """The ``permute`` whose rows ``mlp`` reads, or None."""
    rows = mlp.args[0]
    permute = rows.args[0] if rows.op == "call_function" and rows.args else None
    return permute if is_op(permute, "permute") else None


def _sole_unpermute(mlp: fx.Node) -> Optional[fx.Node]:
    """The ``unpermute`` that alone reads ``mlp`` when the layer is the plain decomposition
    (permute -> grouped_mlp -> unpermute, the permuted rows read by the experts only, the order
    and counts by the layer's own ops): the shape the token exchange replaces. Else None."""
    users, permute = list(mlp.users), _permute_of(mlp)
    if len(users) != 1 or not is_op(users[0], "unpermute") or permute is None:
        return None
    unpermute = users[0]
    allowed = {mlp, unpermute} | {n for n in unpermute.graph.nodes if is_op(n, "record_drops")}
    outputs = list(permute.users)
    if any(not set(item.users) <= allowed for item in outputs) or len(mlp.args[0].users) != 1:
        return None
    return unpermute if unpermute.args[1] in outputs and unpermute.args[0] is mlp else None


def _top_k(mlp: fx.Node) -> int:
    """K of the layer: its permuted rows are T*K slots of the permute's T tokens."""
    permute = _permute_of(mlp)
    return 2 if permute is None else int(permute.args[1].meta["val"].shape[1])   # unknown: several


def _slot_exchange(gm, ctx, mlp: fx.Node, local_experts: tuple, ranks: int):
    """One row per routed slot each way: x_ND -> dispatch -> experts -> combine -> y_ND.
    ``local_experts``: the grouped_mlp's arguments after the counts, for this rank's experts."""
    x_ND, counts_E = mlp.args[:2]
    order_N = next(u for u in x_ND.args[0].users if u.args[1] == 2)
    recv_RL = new_node(gm, ctx, torch.ops.moesys.ep_counts.default, (counts_E, "ep", ranks), mlp, cost=Cost())
    x_MD = new_node(gm, ctx, torch.ops.moesys.ep_dispatch.default, (x_ND, counts_E, recv_RL, "ep"), mlp,
                    cost=_a2a_cost(x_ND, ctx, ranks))
    local_counts_L = new_node(gm, ctx, torch.ops.aten.sum.dim_IntList, (recv_RL, [0]), mlp, cost=Cost())
    y_MD = _local_experts_call(gm, ctx, mlp, x_MD, local_counts_L, local_experts)
    y_ND = new_node(gm, ctx, torch.ops.moesys.ep_combine.default, (y_MD, counts_E, recv_RL, order_N, "ep"), mlp,
                    cost=_a2a_cost(x_ND, ctx, ranks))
    mlp.replace_all_uses_with(y_ND)
    return x_MD, y_ND, [mlp]


def _token_exchange(gm, ctx, mlp: fx.Node, unpermute: fx.Node, local_experts: tuple, ranks: int):
    """One row per (rank, token) each way: the permute, the slot rows and the unpermute go; the
    plan op sorts the slots, and the experts' rank weights and sums a token's outputs."""
    permute = mlp.args[0].args[0]
    x_TD, ids_TK, num_experts, capacity = permute.args
    weights_TK = unpermute.args[2]
    top_k = ids_TK.meta["val"].shape[1]
    plan = new_node(gm, ctx, torch.ops.moesys.ep_token_plan.default,
                    (ids_TK, weights_TK, num_experts, capacity, "ep", ranks), mlp, cost=Cost())
    outs = [new_node(gm, ctx, operator.getitem, (plan, i), mlp, cost=Cost()) for i in range(7)]
    counts_E, order_N, send_token_S, slot_row_M, recv_RL, rows_2R, weights_M = outs
    for item in list(permute.users):
        if item.args[1] in (1, 2):             # counts and order: the drop statistics read them
            item.replace_all_uses_with(counts_E if item.args[1] == 1 else order_N)
    local_counts_L = new_node(gm, ctx, torch.ops.aten.sum.dim_IntList, (recv_RL, [0]), mlp, cost=Cost())
    x_MD = new_node(gm, ctx, torch.ops.moesys.ep_token_dispatch.default,
                    (x_TD, send_token_S, slot_row_M, rows_2R, "ep"), mlp,
                    cost=_a2a_cost(x_TD, ctx, ranks, min(top_k, ranks)))
    y_MD = _local_experts_call(gm, ctx, mlp, x_MD, local_counts_L, local_experts)
    y_TD = new_node(gm, ctx, torch.ops.moesys.ep_token_combine.default,
                    (y_MD, weights_M, send_token_S, slot_row_M, rows_2R, ids_TK, "ep"), mlp,
                    cost=_a2a_cost(x_TD, ctx, ranks, min(top_k, ranks)))
    unpermute.replace_all_uses_with(y_TD)
    return x_MD, y_TD, [unpermute, mlp, *permute.users, permute]


def _without_dropout_mask(mlp: fx.Node) -> tuple[tuple, Optional[fx.Node]]:
    """(the grouped_mlp's arguments after the counts, without the experts' dropout mask, which
    ``decompose_moe`` passes last, after both biases; the mask node, or None)."""
    keep_NF = bound_args(mlp).get("keep_NF")
    args = mlp.args[2:]
    return (args[:5], keep_NF) if keep_NF is not None else (args, None)


def _local_experts_call(gm, ctx, mlp: fx.Node, x_MD: fx.Node, local_counts_L: fx.Node, local_experts: tuple):
    """grouped_mlp of this rank's experts on the received rows; with the experts' dropout (a
    mask of the routed slots last in ``local_experts``), a mask drawn for the received rows."""
    if len(local_experts) > 5:
        routed_mask = local_experts[5]
        _, _, ffn, p = routed_mask.args
        received_mask = new_node(gm, ctx, torch.ops.moesys.expert_dropout_keep.default, (x_MD, 1, ffn, p), routed_mask,
                                 cost=Cost())
        local_experts = (*local_experts[:5], received_mask)
    return new_node(gm, ctx, torch.ops.moesys.grouped_mlp.default, (x_MD, local_counts_L, *local_experts), mlp,
                    cost=moesys_meta(mlp)["cost"])


def _parallelize_one(gm: fx.GraphModule, ctx, mlp: fx.Node, rows: ExpertRows, experts: int) -> None:
    """``mlp`` on this rank's experts of its ``experts``, between the all-to-alls."""
    topo = rows.topo
    ranks = topo.expert_parallel
    key = moesys_meta(mlp).get("module") or mlp.name
    lo, hi = topo.ep_index * experts // ranks, (topo.ep_index + 1) * experts // ranks
    # top-1 sends one row per token either way: the slot exchange does it without the records
    dedup = ctx.plan.ep_exchange == "token" and _top_k(mlp) > 1
    unpermute = _sole_unpermute(mlp) if dedup else None
    # the token exchange reads the top-k weights, so it goes where the unpermute was
    experts_args, keep_NF = _without_dropout_mask(mlp)
    with gm.graph.inserting_before(unpermute or mlp):
        rows.where = key
        local_experts = fx.node.map_arg(experts_args, lambda n: rows.local(n, lo, hi))
        if keep_NF is not None:     # the experts' dropout: a mask of the received rows replaces the slots'
            local_experts = (*local_experts, keep_NF)
        if unpermute is not None:
            dispatch, combine, replaced = _token_exchange(gm, ctx, mlp, unpermute, local_experts, ranks)
        else:
            dispatch, combine, replaced = _slot_exchange(gm, ctx, mlp, local_experts, ranks)
    moesys_meta(dispatch)["a2a"] = ("dispatch", key)
    moesys_meta(combine)["a2a"] = ("combine", key)
    for node in replaced:
        gm.graph.erase_node(node)
    if keep_NF is not None and not keep_NF.users:    # the mask of the routed slots, replaced by the received rows'
        gm.graph.erase_node(keep_NF)
    if dedup and unpermute is None:
        ctx.note(f"{key}: ep_exchange='token' needs permute -> grouped_mlp -> unpermute with nothing else "
                 f"reading them; this layer exchanges one row per slot instead")
    how = "one row per (rank, token), summed before the return" if unpermute is not None else "one row per slot"
    ctx.note(f"{key}: experts {lo}..{hi - 1} of {experts} on this rank (ep_index {topo.ep_index}); "
             f"dispatch/combine all-to-all over EP group ranks {topo.ep_ranks} ({how}; uneven splits)")


def _shard_experts(gm: fx.GraphModule, ctx, mlps: list[fx.Node], topo: Topology) -> None:
    weights = [w for mlp in mlps for w in expert_tensors(mlp)]
    weight_producers = producers(weights)
    check_dense_uses(gm, ctx, weight_producers)
    check_producers(ctx, mlps, weight_producers)
    rows = ExpertRows(gm, ctx, topo)
    # counted before any is sharded: a block called twice (a looped layer) reads the same weights
    experts = [expert_rows_of(mlp.args[2]) for mlp in mlps]
    for mlp, count in zip(mlps, experts):
        _parallelize_one(gm, ctx, mlp, rows, count)
    dropped = drop_unused(gm, ctx, weight_producers)
    ctx.extras["expert_shards"] = dict(rows.sharded)
    if dropped:
        ctx.note(f"{len(dropped)} per-expert parameter(s) of other ranks' experts left out of this rank's graph")


def _globalize_aux_losses(gm: fx.GraphModule, ctx) -> int:
    losses = [n for n in gm.graph.nodes if is_op(n, "load_balancing_loss")]
    group = "dense"
    if losses and ctx.plan.expert_parallel == 1:     # no other collective in forward: evaluation may be local
        with gm.graph.inserting_before(losses[0]):
            group = new_node(gm, ctx, collectives.training_group, ("dense",), losses[0], cost=Cost())
        moesys_meta(group).update(layer=None, module=None)    # read by every layer's loss
    for node in losses:
        scores_TE, ids_TK, coef = node.args
        with gm.graph.inserting_before(node):
            both = new_node(gm, ctx, torch.ops.moesys.global_load_balancing_loss.default,
                            (scores_TE, ids_TK, coef, group), node, cost=moesys_meta(node)["cost"])
            new = new_node(gm, ctx, operator.getitem, (both, 0), node, cost=Cost())
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    return len(losses)


def expert_parallel(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    """Per-rank expert parallelism: local expert shards plus dispatch/combine all-to-all.

    **Contract.** Needs ``decompose_moe`` to have run (``permute -> grouped_mlp -> unpermute``
    with ``meta["val"]``), ``ctx.rank`` and ``plan.world_size``/``expert_parallel``. Writes (every
    plan): ``ctx.extras["expert_owners"]`` (per-expert parameter -> its expert index, for
    ModuleList-style experts). With ep > 1: the graph module holds only this rank's experts --
    stacked ``[E, ...]`` parameters become their ``[E/R, ...]`` rows (``meta["moesys"]["sharding"]
    = "expert"``, ``"expert_range" = (lo, hi, E)``, ``ctx.extras["expert_shards"][target]``),
    other ranks' per-expert parameters are removed. ``plan.ep_exchange="token"`` (default):
    ``permute``/``unpermute`` give way to ``ep_token_plan`` -> ``ep_token_dispatch`` -> experts ->
    ``ep_token_combine`` (a token crosses to a rank once, its outputs come back weighted and summed;
    a top-1 layer keeps the slot exchange, which sends the same rows without per-slot records, and
    a layer whose permuted rows something else reads keeps it too, with a note); "slot":
    ``ep_counts``/``ep_dispatch``/``ep_combine`` around the experts, one row per slot. Either way
    the two row exchanges are tagged ``meta["moesys"]["a2a"] = ("dispatch"|"combine", layer
    module)`` with ``comm_bytes`` costs (token: at most min(K, ep) rows per token). A layer whose
    experts drop out in training (``grouped_mlp``'s ``keep_NF``) gets an ``expert_dropout_keep``
    of the received rows instead of the routed slots' mask, which goes.
    With world_size > 1 each ``load_balancing_loss`` becomes ``global_load_balancing_loss`` over
    all ranks, so the aux loss (and its gradient) equals that of one process on the global batch.
    With ep == 1 its group is ``collectives.training_group("dense")`` (one node, read by every
    loss): a forward without autograd (``torch.no_grad``) reduces nothing, so a rank may
    evaluate alone, as with DDP; with ep > 1 every forward is a collective anyway.
    The model's modules are never modified (the graph module's holders are its own); a shard is a
    view of the model's tensor, so training updates those rows in place, as it does the dense
    parameters the program shares with the model. Dense parameters the expert weights are computed
    from (an adapter's update per expert) stay whole on every rank and are synced as dense ones
    (averaged over all ranks): a rank's gradient holds, for its experts' rows only, the sum over
    the local losses of its EP group, so the average over the dp × ep ranks is one process's
    gradient on the global batch. Row counts
    after dispatch are data dependent (unbacked sizes in ``meta["val"]``). Expert weights computed
    in a way that moves dim 0 (or read elsewhere) raise a PlanError naming the block and node.

    **Pseudo-code.**

        record expert_owners from the weight producers (stack entry i -> expert i)
        if ep == 1 and world == 1: note "no-op"; return
        for mlp in grouped_mlp nodes (ep > 1):
            w_up, w_down (and expert biases) := producers rebuilt for rows [ep_index*L, (ep_index+1)*L):
                stacked parameter -> its rows; stack/cat(dim 0) -> the pieces in range;
                transpose/cast/cat(dim > 0)/row-wise op (add, bmm, ...) or region -> same op on
                the inputs' rows; computed from dense parameters only -> slice [lo, hi); else PlanError
            token exchange (K > 1, plain permute -> mlp -> unpermute):
              counts, order, send_S, row_M, recv_RL, rows, w_M = ep_token_plan(ids_TK, weights_TK, E, cap)
              x_MD = ep_token_dispatch(x_TD, send_S, row_M, rows)   # unique (rank, token) rows
              y_MD = grouped_mlp(x_MD, recv_RL.sum(0), w_up, w_down)
              y_TD = ep_token_combine(y_MD, w_M, send_S, row_M, rows, ids_TK)  # weighted sum first
              record_drops reads the plan's counts and order; permute, unpermute erased
            slot exchange:
              recv_RL = ep_counts(counts_E)                       # all-to-all of counts
              x_MD   = ep_dispatch(x_ND, counts_E, recv_RL)       # uneven all-to-all, expert-major
              y_MD   = grouped_mlp(x_MD, recv_RL.sum(0), w_up, w_down)
              y_ND   = ep_combine(y_MD, counts_E, recv_RL, order_N)  # reverse all-to-all, zero pad
        erase the old producers; drop parameters nothing reads
        if world > 1: load_balancing_loss -> global_load_balancing_loss(group)
            group = "dense" if ep > 1 else training_group("dense")   # "local" under no_grad
    """
    plan = ctx.plan
    ctx.extras["expert_owners"] = expert_owners(expert_weights(gm), strict=plan.expert_parallel > 1)
    if plan.expert_parallel == 1 and plan.world_size == 1:
        ctx.note("expert_parallel is a no-op: expert_parallel=1 and world_size=1 (single device)")
        return gm
    if any(is_op(n, "moe_experts") for n in gm.graph.nodes):
        raise PlanError("expert_parallel needs decompose_moe, which did not run (remove 'decompose_moe' from "
                        "plan.disable_passes)")
    topo = Topology.of(ctx.rank, plan.world_size, plan.expert_parallel)
    if plan.expert_parallel > 1:
        _shard_experts(gm, ctx, [n for n in gm.graph.nodes if is_op(n, "grouped_mlp")], topo)
    else:
        ctx.note(f"expert_parallel=1: every rank holds all experts (pure data parallelism over {plan.world_size})")
    count = _globalize_aux_losses(gm, ctx)
    ctx.note(f"rank {ctx.rank}: EP group {topo.ep_ranks}, expert-data-parallel group {topo.edp_ranks}; "
             f"{count} load-balancing loss(es) use global statistics over all {plan.world_size} ranks"
             + (" (under torch.no_grad: this rank's own, no collective)" if plan.expert_parallel == 1 else ""))
    gm.delete_all_unused_submodules()
    return gm
