"""Graph invariants checked after every pass. Rules are data: each takes (node, gm) and returns
an error string or None; ``verify`` names the node, its op, dtype and inputs on failure.
Passes that introduce new invariants append rules to ``NODE_RULES`` or ``GRAPH_RULES``."""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Optional

import torch
import torch.fx as fx

from .errors import VerifyError

NodeRule = Callable[[fx.Node, fx.GraphModule], Optional[str]]
GraphRule = Callable[[fx.GraphModule], Optional[str]]


def has_val(node: fx.Node, gm: fx.GraphModule) -> Optional[str]:
    if node.op != "output" and "val" not in node.meta:
        return "has no meta['val']; a pass that creates a node must set it (moesys_compile.ir.infer_val)"
    return None


def has_moesys_meta(node: fx.Node, gm: fx.GraphModule) -> Optional[str]:
    meta = node.meta.get("moesys")
    if node.op != "output" and (meta is None or "layer" not in meta or "cost" not in meta):
        return "has no meta['moesys'] layer/cost; copy them from the node it replaces"
    return None


def dispatch_has_combine(gm: fx.GraphModule) -> Optional[str]:
    """Every all-to-all tagged ``meta["moesys"]["a2a"] = ("dispatch", key)`` has its combine."""
    seen: dict = defaultdict(set)
    for node in gm.graph.nodes:
        tag = node.meta.get("moesys", {}).get("a2a")
        if tag:
            seen[tag[1]].add(tag[0])
    broken = [key for key, kinds in seen.items() if kinds != {"dispatch", "combine"}]
    return f"all-to-all {broken[0]!r} has {sorted(seen[broken[0]])} but needs dispatch and combine" if broken else None


def parameter_placement_is_unique(gm: fx.GraphModule) -> Optional[str]:
    """No parameter is both local and sharded (``meta["moesys"]["sharding"]`` agrees on all reads)."""
    placement: dict[str, set] = defaultdict(set)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            placement[str(node.target)].add(node.meta.get("moesys", {}).get("sharding", "local"))
    for target, kinds in placement.items():
        if len(kinds) > 1:
            return f"parameter '{target}' is read as {sorted(kinds)}; it must be either local or sharded"
    return None


NODE_RULES: list[NodeRule] = [has_val, has_moesys_meta]
GRAPH_RULES: list[GraphRule] = [dispatch_has_combine, parameter_placement_is_unique]


def describe(node: fx.Node) -> str:
    value = node.meta.get("val")
    dtype = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
    inputs = ", ".join(str(a) for a in node.all_input_nodes) or "none"
    return f"node '{node.name}' (op={node.op}, target={node.target}, dtype={dtype}, inputs=[{inputs}])"


def verify(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        for rule in NODE_RULES:
            problem = rule(node, gm)
            if problem:
                raise VerifyError(f"{describe(node)} {problem}")
    for rule in GRAPH_RULES:
        problem = rule(gm)
        if problem:
            raise VerifyError(problem)
