"""networkx view of a graph, for analysis: layers, critical path, contiguous partitions.

    >>> G = to_networkx(gm)                       # doctest: +SKIP
    >>> path, flops = critical_path(G, batch=2, seq=128)   # doctest: +SKIP
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Optional

import networkx as nx
import torch.fx as fx

from .ir import moesys_meta, target_name


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """One nx node per fx node (keyed by name) with op, target, layer, module and cost; edges follow data."""
    graph = nx.DiGraph()
    for order, node in enumerate(gm.graph.nodes):
        meta = node.meta.get("moesys", {})
        graph.add_node(node.name, order=order, op=node.op, target=target_name(node), layer=meta.get("layer"),
                       module=meta.get("module"), cost=meta.get("cost"), fx_node=node)
        for source in node.all_input_nodes:
            graph.add_edge(source.name, node.name)
    return graph


def layers(graph: nx.DiGraph) -> dict[Optional[int], list[str]]:
    """Node names by layer index (None: outside any numbered layer), in graph order."""
    grouped: dict[Optional[int], list[str]] = defaultdict(list)
    for name, data in sorted(graph.nodes(data=True), key=lambda item: item[1]["order"]):
        grouped[data["layer"]].append(name)
    return dict(grouped)


def node_weight(data: dict, field: str, batch: int, seq: int) -> int:
    cost = data.get("cost")
    return cost.evaluate(batch, seq)[field] if cost is not None else 0


def critical_path(graph: nx.DiGraph, batch: int, seq: int, field: str = "flops") -> tuple[list[str], int]:
    """Longest dependency chain weighted by a cost field evaluated at (batch, seq)."""
    weights = {name: node_weight(data, field, batch, seq) for name, data in graph.nodes(data=True)}
    best: dict[str, tuple[int, Optional[str]]] = {}
    for name in nx.topological_sort(graph):
        preds = [(best[p][0], p) for p in graph.predecessors(name)]
        total, parent = max(preds) if preds else (0, None)
        best[name] = (total + weights[name], parent)
    if not best:
        return [], 0
    end = max(reversed(list(best)), key=lambda n: best[n][0])   # ties: the latest node
    path, cursor = [], end
    while cursor is not None:
        path.append(cursor)
        cursor = best[cursor][1]
    return path[::-1], best[end][0]


def contiguous_partitions(graph: nx.DiGraph, size_of: Callable[[dict], int], budget: int,
                          boundary: Callable[[dict, dict], bool] = lambda prev, cur: prev["layer"] != cur["layer"]
                          ) -> list[list[str]]:
    """Cut the graph order into contiguous groups whose summed ``size_of`` stays within ``budget``,
    preferring cuts where ``boundary(prev, cur)`` holds (by default: at layer changes). A single
    unit larger than the budget gets a group of its own; the caller decides what that means."""
    ordered = sorted(graph.nodes(data=True), key=lambda item: item[1]["order"])
    units: list[list[tuple[str, dict]]] = []
    for name, data in ordered:
        if not units or boundary(units[-1][-1][1], data):
            units.append([])
        units[-1].append((name, data))
    groups: list[list[str]] = []
    current: list[str] = []
    used = 0
    for unit in units:
        unit_size = sum(size_of(data) for _, data in unit)
        if current and used + unit_size > budget:
            groups.append(current)
            current, used = [], 0
        current.extend(name for name, _ in unit)
        used += unit_size
    if current:
        groups.append(current)
    return groups


def mark(gm: fx.GraphModule, key: str, values: dict[str, object]) -> None:
    """Write an analysis result back to ``meta["moesys"][key]`` for the named nodes."""
    for node in gm.graph.nodes:
        if node.name in values:
            moesys_meta(node)[key] = values[node.name]
