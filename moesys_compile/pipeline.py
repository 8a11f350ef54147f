"""Compile context, snapshots, and the pass runner.

After each pass: ``graph.lint()``, recompile (when the graph changed), ``verify()``, and a
snapshot for ``inspect`` (``changed`` also when the pass only wrote node metadata).
A failing pass is re-raised as PassError naming it and the passes that ran before it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch.fx as fx
from torch import nn

from .errors import PassError, PlanError
from .frontend.annotation import Annotation, Cost
from .frontend.canonicalize import BlockReport
from .ir import target_name
from .plan import Plan
from .verify import verify


@dataclass
class NodeRecord:
    """What inspect shows of one node; ``val`` is kept (not rendered) until it is printed."""
    name: str
    op: str
    target: str
    val: Any
    layer: Optional[int]
    module: Optional[str]
    cost: Cost
    inputs: tuple[str, ...]
    extra: dict


@dataclass
class Snapshot:
    stage: str                 # "capture" or a pass name
    nodes: list[NodeRecord]
    changed: bool              # the pass changed the graph or wrote node metadata (cost, layer, module aside)
    notes: list[str]
    seconds: float             # wall time of the pass; of "capture": the whole frontend (``frontend_seconds``)


@dataclass
class CompileContext:
    """Everything a pass may read, and where passes leave results for later passes and programs."""
    plan: Plan
    model: nn.Module
    annotation: Annotation
    blocks: list[BlockReport]
    input_names: list[str]
    capture: str                               # "fx" or "export"
    rank: int = 0
    snapshots: list[Snapshot] = field(default_factory=list)
    passes_run: list[str] = field(default_factory=list)
    passes_skipped: list[str] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    current_pass: str = "capture"
    frontend_seconds: dict[str, float] = field(default_factory=dict)   # canonicalize, capture, annotate

    @property
    def fake_mode(self):
        return self.annotation.fake_mode

    def note(self, message: str) -> None:
        """A line shown by ``inspect`` under the pass that is running."""
        self.notes.setdefault(self.current_pass, []).append(message)


def unlowered_copy(gm: fx.GraphModule, ctx: CompileContext, plan: Plan) -> tuple[fx.GraphModule, CompileContext]:
    """A prepared graph and its context (``api.prepare``'s) as a pipeline under ``plan`` may rewrite
    them while the originals stay as they are, so that one capture serves lowerings under several
    plans: the graph, each node's ``meta["moesys"]`` (passes update a cost in place), the
    annotation's tables and the context's lists are copied; modules, parameters and fake values
    are shared."""
    graph = copy.deepcopy(gm.graph)
    for node in graph.nodes:
        if "moesys" in node.meta:
            node.meta["moesys"] = {key: copy.copy(value) for key, value in node.meta["moesys"].items()}
    copied = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    copied.meta = dict(gm.meta)
    annotation = dataclasses.replace(ctx.annotation, symbol_map=dict(ctx.annotation.symbol_map),
                                     unbacked_bounds=dict(ctx.annotation.unbacked_bounds))
    return copied, dataclasses.replace(
        ctx, plan=plan, annotation=annotation, snapshots=list(ctx.snapshots), passes_run=list(ctx.passes_run),
        passes_skipped=list(ctx.passes_skipped), notes={k: list(v) for k, v in ctx.notes.items()},
        extras=dict(ctx.extras))


_SKIP_EXTRA = {"cost", "layer", "module"}


@contextlib.contextmanager
def timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    """Adds the wall time spent within to ``seconds[stage]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start


def take_snapshot(stage: str, gm: fx.GraphModule, ctx: CompileContext, changed: bool, seconds: float) -> Snapshot:
    records = []
    for node in gm.graph.nodes:
        meta = node.meta.get("moesys", {})
        records.append(NodeRecord(
            name=node.name, op=node.op, target=target_name(node), val=node.meta.get("val"),
            layer=meta.get("layer"), module=meta.get("module"), cost=meta.get("cost") or Cost(),
            inputs=tuple(n.name for n in node.all_input_nodes),
            # lists copied: a later pass appending to one must not rewrite this snapshot
            extra={k: list(v) if isinstance(v, list) else v for k, v in meta.items() if k not in _SKIP_EXTRA}))
    return Snapshot(stage, records, changed, list(ctx.notes.get(stage, [])), seconds)


def annotated(before: Snapshot, after: Snapshot) -> bool:
    """A node's metadata differs between two snapshots of the same nodes (a pass that only
    annotates, e.g. fuse_comm's buckets or schedule_prefetch's slots, still changed the program)."""
    return [(r.name, r.extra) for r in before.nodes] != [(r.name, r.extra) for r in after.nodes]


def graph_fingerprint(gm: fx.GraphModule) -> list[tuple]:
    """Each node's name, op, target, args and kwargs, the objects themselves (cheaper than
    codegen, and than printing them): what ``graph_changed`` compares."""
    return [(n.name, n.op, n.target, n.args, n.kwargs) for n in gm.graph.nodes]


def graph_changed(before: list[tuple], gm: fx.GraphModule) -> bool:
    """Whether a node was added, removed, retargeted or rewired since ``before``. fx gives a node
    new args whenever they are set, so a node whose parts are the same objects is unchanged;
    others are compared as printed (args rebuilt equal are no change)."""
    after = graph_fingerprint(gm)
    return len(after) != len(before) or any(x is not y and str(x) != str(y)
                                            for old, new in zip(before, after) for x, y in zip(old, new))


# passes a plan cannot skip: (when it needs the pass, what the program would lack, the fix)
REQUIRED_PASSES = {
    "expert_parallel": (lambda plan: plan.mode == "train" and plan.world_size > 1,
                        "the ranks' gradients would never be synchronized (nor the experts sharded), so they "
                        "diverge in silence", "set world_size=1"),
    "ring_partition": (lambda plan: plan.mode == "infer" and plan.device_budget is not None,
                       "a ring program is built from its sections", "drop device_budget for a resident program"),
}


def check_disabled(plan: Plan, passes: Sequence) -> None:
    known = [p.__name__ for p in passes]
    unknown = [name for name in plan.disable_passes if name not in known]
    if unknown:
        raise PlanError(f"disable_passes names unknown pass(es) {unknown}; passes of mode "
                        f"'{plan.mode}': {known or 'none'}")
    for name in plan.disable_passes:
        needed, lack, fix = REQUIRED_PASSES.get(name, (lambda _: False, "", ""))
        if needed(plan):
            raise PlanError(f"disable_passes: this plan cannot skip '{name}': {lack}; remove it from "
                            f"disable_passes, or {fix}")


def run_pipeline(gm: fx.GraphModule, ctx: CompileContext, passes: Sequence) -> fx.GraphModule:
    check_disabled(ctx.plan, passes)
    for fn in passes:
        name = fn.__name__
        if name in ctx.plan.disable_passes:
            ctx.passes_skipped.append(name)
            continue
        ctx.current_pass = name
        before = graph_fingerprint(gm)
        start = time.perf_counter()
        try:
            gm = fn(gm, ctx)
            gm.graph.lint()
            changed = graph_changed(before, gm)
            if changed:
                gm.recompile()
            verify(gm)
        except PassError:
            raise
        except Exception as exc:
            raise PassError(name, ctx.passes_run, exc) from exc
        ctx.passes_run.append(name)
        snapshot = take_snapshot(name, gm, ctx, changed, time.perf_counter() - start)
        snapshot.changed = changed or (bool(ctx.snapshots) and annotated(ctx.snapshots[-1], snapshot))
        ctx.snapshots.append(snapshot)
    ctx.current_pass = "done"
    return gm
