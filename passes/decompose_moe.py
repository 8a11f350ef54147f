"""decompose_moe: split each canonical ``moesys.moe_experts`` node along its op boundaries.

Shape legend: T tokens · D dim · E experts · K top-k · N = T*K routed slots · H up rows · F hidden.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import Tensor

from moesys_compile.frontend.annotation import CostModel
from moesys_compile.ir import bound_args, expert_biases, infer_val, is_op, moesys_meta
from moesys_compile.ops import expert_capacity
from moesys_compile.ops.autocast import follow_autocast


def slot_capacity(x_TD: Tensor, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """GShard capacity per expert for this call's token count (-1: dropless)."""
    if capacity_factor <= 0:
        return -1
    return expert_capacity(x_TD.shape[0], top_k, num_experts, capacity_factor)


@torch.library.custom_op("moesys::record_drops", mutates_args=("stats_2",))
def record_drops(counts_E: Tensor, order_N: Tensor, stats_2: Tensor) -> None:
    """Accumulate (kept slots, routed slots) of one MoE layer into ``stats_2``."""
    stats_2[0] += counts_E.sum().to(stats_2.device, stats_2.dtype)
    stats_2[1] += order_N.shape[0]


@record_drops.register_fake
def _record_drops_fake(counts_E, order_N, stats_2):
    return None


def new_node(gm: fx.GraphModule, ctx, target: Any, args: tuple, like: fx.Node, cost=None) -> fx.Node:
    """A call_function node with ``meta["val"]`` inferred and layer/module (and cost) from ``like``."""
    node = gm.graph.call_function(target, args)
    source = like.meta.get("moesys", {})
    meta = moesys_meta(node)
    meta.update(layer=source.get("layer"), module=source.get("module"))
    infer_val(node, ctx.fake_mode)
    meta["cost"] = cost if cost is not None else CostModel(gm, ctx.annotation).cost(node)
    return node


def _getitems(gm, ctx, node: fx.Node, count: int) -> list[fx.Node]:
    return [new_node(gm, ctx, operator.getitem, (node, i), node) for i in range(count)]


def _drop_buffer(gm: fx.GraphModule, ctx, key: str) -> fx.Node:
    name = "moesys_drops_" + key.replace(".", "_")
    # on the model's device (it moves with the module afterwards, as buffers do)
    device = next(gm.parameters(), torch.empty(0)).device
    gm.register_buffer(name, torch.zeros(2, dtype=torch.float64, device=device), persistent=False)
    ctx.extras.setdefault("drop_buffers", {})[key] = name
    node = gm.graph.get_attr(name)
    node.meta["val"] = ctx.fake_mode.from_tensor(getattr(gm, name))
    moesys_meta(node).update(layer=None, module=name, cost=CostModel(gm, ctx.annotation).cost(node))
    return node


def effective_capacity_factor(ctx, node: fx.Node) -> float:
    """The plan's capacity_factor overrides the layer's own (None in the plan keeps the layer's; 0
    is dropless, whatever the layer's)."""
    layer_factor = node.args[6] if len(node.args) > 6 else node.kwargs.get("capacity_factor", 0.0)
    plan_factor = ctx.plan.capacity_factor
    return float(plan_factor) if plan_factor is not None else float(layer_factor or 0.0)


def _decompose_one(gm: fx.GraphModule, ctx, node: fx.Node) -> None:
    args = bound_args(node)
    x_TD, ids_TK, weights_TK, w_up_EHD, w_down_EDF = (args[name] for name in (
        "x_TD", "ids_TK", "weights_TK", "w_up_EHD", "w_down_EDF"))
    activation = args["activation"]
    extras = expert_biases(args)   # () for bias-free experts: the five-argument call
    if args.get("keep_NF") is not None:    # the experts' dropout mask (training mode), after both biases
        extras = (args["b_up_EH"], args["b_down_ED"], args["keep_NF"])
    num_experts = w_up_EHD.meta["val"].shape[0]
    top_k = ids_TK.meta["val"].shape[1]
    factor = effective_capacity_factor(ctx, node)
    key = moesys_meta(node).get("module") or node.name
    with gm.graph.inserting_before(node):
        capacity: Any = -1
        if factor > 0:
            capacity = new_node(gm, ctx, slot_capacity, (x_TD, top_k, num_experts, factor), node)
        permute = new_node(gm, ctx, torch.ops.moesys.permute.default, (x_TD, ids_TK, num_experts, capacity), node)
        x_ND, counts_E, order_N = _getitems(gm, ctx, permute, 3)
        y_ND = new_node(gm, ctx, torch.ops.moesys.grouped_mlp.default,
                        (x_ND, counts_E, w_up_EHD, w_down_EDF, activation, *extras), node,
                        cost=moesys_meta(node)["cost"])
        y_TD = new_node(gm, ctx, torch.ops.moesys.unpermute.default, (y_ND, order_N, weights_TK), node)
        if factor > 0:
            new_node(gm, ctx, torch.ops.moesys.record_drops.default, (counts_E, order_N, _drop_buffer(gm, ctx, key)),
                     node)
    node.replace_all_uses_with(y_TD)
    gm.graph.erase_node(node)
    detail = f"capacity_factor={factor} (GShard capacity, dropped fraction recorded)" if factor > 0 else "dropless"
    ctx.note(f"{key}: moe_experts -> permute -> grouped_mlp(E={num_experts}) -> unpermute, {detail}")


def decompose_moe(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    """Rewrite every canonical MoE experts node into its dense-layout decomposition.

    **Contract.** Needs ``meta["val"]`` on the ``moe_experts`` node's inputs (frontend annotation).
    Writes: new ``permute``/``grouped_mlp``/``unpermute`` nodes carrying the replaced node's
    ``layer``/``module``; ``grouped_mlp`` takes its ``cost``; with a capacity a ``record_drops``
    node per layer accumulating (kept, routed) slots into a non-persistent buffer listed in
    ``ctx.extras["drop_buffers"]``. Keeps the model's function exactly
    (``ops.moe_experts_decomposed`` is the specification) and every parameter read as it was.

    **Pseudo-code.**

        for node in moe_experts nodes:
            cf = plan.capacity_factor if set else node's capacity_factor
            cap = slot_capacity(x_TD, K, E, cf)          # -1: dropless
            x_ND, counts_E, order_N = permute(x_TD, ids_TK, E, cap)
            y_ND = grouped_mlp(x_ND, counts_E, w_up_EHD, w_down_EDF, activation[, b_up_EH, b_down_ED][, keep_NF])
            y_TD = unpermute(y_ND, order_N, weights_TK)  # weighted top-k sum
            if cap >= 0: record_drops(counts_E, order_N, drops_buffer)
            replace node by y_TD
    """
    nodes = [n for n in gm.graph.nodes if is_op(n, "moe_experts")]
    for node in nodes:
        _decompose_one(gm, ctx, node)
    if not nodes:
        ctx.note("no moesys.moe_experts node: nothing to decompose")
    return gm


def dropped_fraction(module: torch.nn.Module, reset: bool = False,
                     across_ranks: bool = False) -> dict[str, Optional[float]]:
    """Fraction of routed slots dropped by capacity per MoE layer (by module path) since the last
    reset (None for a layer that has seen no tokens). ``module`` is a program or its graph module
    (keyed by buffer name).
    ``across_ranks`` (collective, with a default process group): over every rank's tokens, the
    same figure on all ranks; otherwise this rank's own."""
    gm = getattr(module, "graph_module", module)
    context = getattr(module, "context", None)        # a program: its layers by module path
    layers = {name: key for key, name in (context.extras.get("drop_buffers", {}) if context else {}).items()}
    buffers = {layers.get(name, name.removeprefix("moesys_drops_")): buffer for name, buffer in gm.named_buffers()
               if name.startswith("moesys_drops_")}
    counts = torch.stack(list(buffers.values())).cpu() if buffers else torch.zeros(0, 2, dtype=torch.float64)
    if across_ranks and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)      # [layers, (kept, routed)], summed over ranks
    if reset:
        for buffer in buffers.values():
            buffer.zero_()
    return {layer: None if routed == 0 else 1.0 - kept / routed
            for layer, (kept, routed) in zip(buffers, counts.tolist())}


# torch.autocast: expert matmuls in the autocast dtype, the rest on their inputs as they come
follow_autocast("moesys::record_drops", cast=False)
