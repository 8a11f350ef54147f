"""fuse_comm: plan fused gradient buckets per parameter class, each reduced over its own group,
and reduce the load-balancing statistics of all MoE layers in one all-reduce."""

from __future__ import annotations

import functools
import operator

import torch
import torch.fx as fx
from torch import nn

from moesys_compile.frontend.annotation import Cost
from moesys_compile.frontend.canonicalize import moe_parameter_classes
from moesys_compile.ir import is_op, moesys_meta
from moesys_compile.passes.decompose_moe import new_node
from moesys_compile.plan import format_bytes
from moesys_compile.runtime.collectives import Bucket
from moesys_compile.runtime.groups import Topology

GROUP_OF_KIND = {"dense": "dense", "router": "dense", "expert": "edp"}


def _node_params(gm: fx.GraphModule, node: fx.Node, name_of: dict[int, str]) -> list[str]:
    """The parameters of ``name_of`` (floating point: ones that can have a gradient) that ``node`` reads."""
    if node.op == "get_attr":
        values = [gm.get_parameter(str(node.target))] if _is_parameter(gm, str(node.target)) else []
    elif node.op == "call_module":
        values = list(gm.get_submodule(str(node.target)).parameters())
    else:
        values = []
    return [name_of[id(p)] for p in values if id(p) in name_of]


def _is_parameter(gm: fx.GraphModule, target: str) -> bool:
    try:
        return isinstance(gm.get_parameter(target), nn.Parameter)
    except AttributeError:
        return False


def parameter_kind(name: str, classes: dict[str, str], expert_targets: set[str]) -> str:
    """"expert", "router" or "dense"; ``classes`` comes from ``moe_parameter_classes(model)``."""
    return "expert" if name in expert_targets else classes.get(name, "dense")


def backward_order(gm: fx.GraphModule) -> tuple[list[str], dict[str, list[fx.Node]]]:
    """Floating-point parameter names in the order backward produces their gradients (reverse of
    first use in forward; unused ones last), and the nodes that read each. Frozen parameters
    (``requires_grad=False``) are included: one unfrozen after compile must be synced too (the
    GradBucketer leaves a frozen one out of its bucket's all-reduce, so it costs nothing)."""
    name_of = {id(p): n for n, p in gm.named_parameters() if p.is_floating_point()}
    first_use: list[str] = []
    readers: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        for name in _node_params(gm, node, name_of):
            readers.setdefault(name, []).append(node)
            if name not in first_use:
                first_use.append(name)
    unused = [n for n in name_of.values() if n not in readers]
    return list(reversed(first_use)) + unused, readers


def plan_buckets(gm: fx.GraphModule, order: list[str], kinds: dict[str, str], cap_bytes: int) -> list[Bucket]:
    """Greedy: walk parameters in backward order, one open bucket per class, close it at the cap."""
    open_buckets: dict[str, Bucket] = {}
    done: list[Bucket] = []
    counts: dict[str, int] = {}
    for name in order:
        param, kind = gm.get_parameter(name), kinds[name]
        bucket = open_buckets.get(kind)
        if bucket is None:
            bucket = Bucket(f"{kind}#{counts.get(kind, 0)}", kind, GROUP_OF_KIND[kind], [], 0, 0)
            counts[kind] = counts.get(kind, 0) + 1
            open_buckets[kind] = bucket
        bucket.params.append(name)
        bucket.numel += param.numel()
        bucket.nbytes += param.numel() * param.element_size()
        if bucket.nbytes >= cap_bytes:
            done.append(open_buckets.pop(kind))
    done.extend(open_buckets.values())
    return done


def _read_only_after(loss: fx.Node, last: fx.Node, position: dict) -> bool:
    """Only the loss value of ``loss`` is read (not its statistics), and only after ``last``."""
    for item in loss.users:
        if item.target is not operator.getitem or item.args[1] != 0:
            return False
        if any(position[user] <= position[last] for user in item.users):
            return False
    return True


def fuse_aux_losses(gm: fx.GraphModule, ctx) -> int:
    """Replace the ``global_load_balancing_loss`` nodes of one group by one
    ``global_load_balancing_losses`` node placed after the last of them (one all-reduce each way
    instead of one per layer). A loss whose value is read before that point, or whose statistics
    are read at all, keeps its own node. Returns how many losses were fused."""
    losses = [n for n in gm.graph.nodes if is_op(n, "global_load_balancing_loss")]
    position = {node: index for index, node in enumerate(gm.graph.nodes)}
    fused = 0
    for group in dict.fromkeys(n.args[3] for n in losses):
        members = [n for n in losses if n.args[3] == group]
        last = members[-1]
        members = [n for n in members if _read_only_after(n, last, position)]
        if len(members) < 2:
            continue
        scores, ids, coefs = ([n.args[i] for n in members] for i in range(3))
        cost = functools.reduce(operator.add, (moesys_meta(n)["cost"] for n in members))
        with gm.graph.inserting_after(last):
            both = new_node(gm, ctx, torch.ops.moesys.global_load_balancing_losses.default,
                            (scores, ids, coefs, group), last, cost=cost)
        moesys_meta(both).update(layer=None, module=None)     # it spans layers
        with gm.graph.inserting_after(both):
            values_n = new_node(gm, ctx, operator.getitem, (both, 0), both, cost=Cost())
        anchor = values_n
        for index, loss in enumerate(members):
            with gm.graph.inserting_after(anchor):
                anchor = new_node(gm, ctx, torch.ops.aten.select.int, (values_n, 0, index), loss, cost=Cost())
            for item in list(loss.users):
                item.replace_all_uses_with(anchor)
                gm.graph.erase_node(item)
            gm.graph.erase_node(loss)
        fused += len(members)
        over = (f"the {group} group" if isinstance(group, str)      # a node: training_group, local without grad
                else f"the {group.args[0]} group (none under torch.no_grad)")
        ctx.note(f"{len(members)} load-balancing losses over {over}: one all-reduce of their "
                 f"statistics in forward and one of their gradients in backward")
    return fused


def fuse_comm(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    """Fused communication (SE-MoE): gradient buckets per parameter class and group, one load-balancing all-reduce.

    Flat gradient buckets per parameter class, each reduced over its own group, and one
    all-reduce for the load-balancing statistics of every MoE layer.

    **Contract.** Needs the expert shards of ``expert_parallel`` (``ctx.extras["expert_shards"]``)
    and the MoE blocks of the frontend (``ctx.blocks``). Writes ``ctx.extras["grad_buckets"]``
    (list of ``collectives.Bucket`` in launch order) and ``meta["moesys"]["bucket"]`` (bucket
    names) on every node that reads a parameter. Every floating-point parameter is bucketed, frozen
    ones too (they may be unfrozen after compile); classes: ``expert`` (w_up/w_down, all-reduced
    over the expert-data-parallel group), ``router`` and ``dense`` (over all ranks); the
    TrainingProgram's GradBucketer all-reduces each bucket asynchronously as soon as its last
    gradient is accumulated in backward. The ``global_load_balancing_loss`` nodes of one group
    whose values are read only after the last of them become one ``global_load_balancing_losses``
    node there (``meta["moesys"]["layer"]`` None) and an ``aten.select`` per layer (with the
    layer's meta and ``val``); values and gradients are unchanged.

    **Pseudo-code.**

        if world_size == 1: note "no gradient communication"; return
        order = floating-point parameters (frozen too) in reverse order of first forward use  # ~ backward
        for p in order: append p to the open bucket of kind(p); close it once it reaches plan.bucket_mb MiB
        record buckets (kind, group, params, bytes) in ctx.extras, ctx.note and node meta
        losses = global_load_balancing_loss nodes of a group read only after the last one
        if len(losses) >= 2:
            aux_n, _ = global_load_balancing_losses([scores], [ids], [coef], group)  # after the last
            each loss[0] -> aux_n[i]
    """
    plan = ctx.plan
    if plan.world_size == 1:
        ctx.note("fuse_comm is a no-op: world_size=1 (no gradient communication)")
        return gm
    topo = Topology.of(ctx.rank, plan.world_size, plan.expert_parallel)
    classes = moe_parameter_classes(ctx.model)
    expert_targets = set(ctx.extras.get("expert_shards", {}))
    order, readers = backward_order(gm)
    kinds = {name: parameter_kind(name, classes, expert_targets) for name in order}
    cap_bytes = int(plan.bucket_mb * 2**20)
    buckets = plan_buckets(gm, order, kinds, cap_bytes)
    ctx.extras["grad_buckets"] = buckets
    for bucket in buckets:
        for name in bucket.params:
            for node in readers.get(name, []):
                moesys_meta(node).setdefault("bucket", [])
                if bucket.name not in moesys_meta(node)["bucket"]:
                    moesys_meta(node)["bucket"].append(bucket.name)
        ranks = topo.ranks(bucket.group)
        how = (f"async all-reduce over {bucket.group} group {ranks} (sum / {plan.world_size})" if len(ranks) > 1
               else f"no all-reduce: its {bucket.group} group is this rank alone (scaled by 1 / {plan.world_size})")
        ctx.note(f"bucket {bucket.name}: {len(bucket.params)} grads, {format_bytes(bucket.nbytes)}, {how}")
    largest = max((bucket.nbytes for bucket in buckets), default=0)
    ctx.note(f"{len(buckets)} bucket(s), each closed once it reaches bucket_mb={plan.bucket_mb} MiB ({cap_bytes} B), "
             f"the largest {format_bytes(largest)}; launched in backward order")
    fuse_aux_losses(gm, ctx)
    return gm
