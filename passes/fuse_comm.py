"""fuse_comm: plan fused gradient buckets per parameter class, each reduced over its own group."""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from moesys_compile.frontend.canonicalize import moe_parameter_classes
from moesys_compile.ir import moesys_meta
from moesys_compile.plan import format_bytes
from moesys_compile.runtime.collectives import Bucket
from moesys_compile.runtime.groups import Topology

GROUP_OF_KIND = {"dense": "dense", "router": "dense", "expert": "edp"}


def _node_params(gm: fx.GraphModule, node: fx.Node, name_of: dict[int, str]) -> list[str]:
    if node.op == "get_attr":
        value = gm.get_parameter(str(node.target)) if _is_parameter(gm, str(node.target)) else None
        return [name_of[id(value)]] if value is not None else []
    if node.op == "call_module":
        return [name_of[id(p)] for p in gm.get_submodule(str(node.target)).parameters()]
    return []


def _is_parameter(gm: fx.GraphModule, target: str) -> bool:
    try:
        return isinstance(gm.get_parameter(target), nn.Parameter)
    except AttributeError:
        return False


def parameter_kind(name: str, classes: dict[str, str], expert_targets: set[str]) -> str:
    """"expert", "router" or "dense"; ``classes`` comes from ``moe_parameter_classes(model)``."""
    return "expert" if name in expert_targets else classes.get(name, "dense")


def backward_order(gm: fx.GraphModule) -> tuple[list[str], dict[str, list[fx.Node]]]:
    """Trainable parameter names in the order backward produces their gradients (reverse of
    first use in forward; unused ones last), and the nodes that read each."""
    name_of = {id(p): n for n, p in gm.named_parameters() if p.requires_grad}
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


def fuse_comm(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    """Fused gradient communication (SE-MoE): flat buckets per parameter class and group.

    **Contract.** Needs the expert shards of ``expert_parallel`` (``ctx.extras["expert_shards"]``)
    and the MoE blocks of the frontend (``ctx.blocks``). Writes ``ctx.extras["grad_buckets"]``
    (list of ``collectives.Bucket`` in launch order) and ``meta["moesys"]["bucket"]`` (bucket
    names) on every node that reads a parameter. Classes: ``expert`` (w_up/w_down, all-reduced
    over the expert-data-parallel group), ``router`` and ``dense`` (over all ranks). The graph's
    computation is unchanged; the TrainingProgram's GradBucketer all-reduces each bucket
    asynchronously as soon as its last gradient is accumulated in backward.

    **Pseudo-code.**

        if world_size == 1: note "no gradient communication"; return
        order = parameters in reverse order of first forward use       # ~ backward order
        for p in order: append p to the open bucket of kind(p); close it at plan.bucket_mb
        record buckets (kind, group, params, bytes) in ctx.extras, ctx.note and node meta
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
    buckets = plan_buckets(gm, order, kinds, int(plan.bucket_mb * 2**20))
    ctx.extras["grad_buckets"] = buckets
    for bucket in buckets:
        for name in bucket.params:
            for node in readers.get(name, []):
                moesys_meta(node).setdefault("bucket", [])
                if bucket.name not in moesys_meta(node)["bucket"]:
                    moesys_meta(node)["bucket"].append(bucket.name)
        ranks = topo.ranks(bucket.group)
        ctx.note(f"bucket {bucket.name}: {len(bucket.params)} grads, {format_bytes(bucket.nbytes)}, async all-reduce "
                 f"over {bucket.group} group {ranks} (sum / {plan.world_size})")
    ctx.note(f"{len(buckets)} bucket(s) of at most {plan.bucket_mb} MB, launched in backward order")
    return gm
