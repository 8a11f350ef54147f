"""Render a compile context for ``inspect``: text, JSON, DOT (through networkx) and SVG."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import defaultdict
from typing import Any, Optional

import networkx as nx
import sympy
import torch

from .frontend.annotation import Cost
from .ir import tensors_in
from .pipeline import CompileContext, NodeRecord, Snapshot
from .plan import format_bytes


class InspectError(Exception):
    """A request ``inspect`` cannot serve (unknown pass, missing Graphviz)."""


def shape_text(value: Any) -> str:
    tensors = list(tensors_in(value))
    if not tensors:
        return "" if value is None else type(value).__name__
    parts = [f"{str(t.dtype).removeprefix('torch.')}[{', '.join(_size_text(s) for s in t.shape)}]" for t in tensors]
    return parts[0] if len(parts) == 1 else "(" + ", ".join(parts) + ")"


def _size_text(size: Any) -> str:
    return str(size.node.expr) if isinstance(size, torch.SymInt) else str(size)


class Renderer:
    """Evaluates cost formulas at (batch, seq) and lays out the snapshots of one context."""

    def __init__(self, ctx: CompileContext, batch: int, seq: int):
        self.ctx, self.batch, self.seq = ctx, batch, seq
        self.symbol_map = {v: k for k, v in ctx.annotation.symbol_map.items()}

    def pretty_shape(self, value: Any) -> str:
        text = shape_text(value)
        for shape_symbol, name in self.ctx.annotation.symbol_map.items():
            text = text.replace(str(shape_symbol), str(name))
        return text

    def snapshots(self, after: Optional[str]) -> list[Snapshot]:
        if after is None:
            return self.ctx.snapshots
        chosen = [s for s in self.ctx.snapshots if s.stage == after]
        if not chosen:
            raise no_such_stage(after, [s.stage for s in self.ctx.snapshots], self.ctx.passes_skipped)
        return chosen

    def pipeline_line(self) -> str:
        from moesys_compile.passes import pipeline_for
        names = [p.__name__ for p in pipeline_for(self.ctx.plan.mode)]
        if not self.ctx.passes_run:
            why = "no passes in this mode's pipeline" if not names else "every pass is disabled by the plan"
            return f"pipeline ({self.ctx.plan.mode}): identity — {why}; the program is the captured graph unchanged"
        skipped = f"  [disabled: {', '.join(self.ctx.passes_skipped)}]" if self.ctx.passes_skipped else ""
        return f"pipeline ({self.ctx.plan.mode}): capture → " + " → ".join(self.ctx.passes_run) + skipped

    def layer_totals(self, snapshot: Snapshot) -> list[dict[str, Any]]:
        totals: dict[Optional[int], Cost] = defaultdict(Cost)
        counts: dict[Optional[int], int] = defaultdict(int)
        for record in snapshot.nodes:
            totals[record.layer] = totals[record.layer] + record.cost
            counts[record.layer] += 1
        order = sorted(totals, key=lambda layer: (layer is None, layer if layer is not None else 0))
        return [{"layer": "-" if layer is None else layer, "nodes": counts[layer],
                 **{f: str(getattr(totals[layer], f)) for f in Cost.FIELDS},
                 **{f"{f}_value": v for f, v in totals[layer].evaluate(self.batch, self.seq).items()}}
                for layer in order]

    def node_row(self, record: NodeRecord) -> dict[str, Any]:
        values = record.cost.evaluate(self.batch, self.seq)
        return {"name": record.name, "op": record.op, "target": record.target, "shape": self.pretty_shape(record.val),
                "layer": record.layer, "module": record.module,
                **{f: str(getattr(record.cost, f)) for f in Cost.FIELDS},
                **{f"{f}_value": values[f] for f in Cost.FIELDS},
                "inputs": list(record.inputs), "meta": {k: _plain(v) for k, v in record.extra.items()}}

    # -- formats -------------------------------------------------------------------------------

    def header(self, title: str = "") -> list[str]:
        ann = self.ctx.annotation
        lines = [f"== moesys-compile inspect {title} (mode={self.ctx.plan.mode}, capture={self.ctx.capture}, "
                 f"B={self.batch}, S={self.seq})"]
        if not ann.symbolic:
            lines.append(f"shapes are static (symbolic propagation failed: {ann.static_reason})")
        lines.append("MoE layers found:" if self.ctx.blocks else "MoE layers found: none")
        lines.extend("  " + block.describe() for block in self.ctx.blocks)
        lines.append(self.pipeline_line())
        return lines

    def totals_lines(self, snapshot: Snapshot) -> list[str]:
        lines = [f"   per-layer totals at B={self.batch}, S={self.seq}:",
                 f"   {'layer':>5} {'nodes':>6} {'flops':>14} {'params':>12} {'activations':>12} {'comm':>10}   flops formula"]
        for row in self.layer_totals(snapshot):
            lines.append(f"   {row['layer']:>5} {row['nodes']:>6} {row['flops_value']:>14} "
                         f"{format_bytes(row['param_bytes_value']):>12} {format_bytes(row['activation_bytes_value']):>12} "
                         f"{format_bytes(row['comm_bytes_value']):>10}   {row['flops']}")
        return lines

    def summary(self, title: str = "") -> str:
        """Header, MoE layers, pipeline, notes and per-layer totals of the final graph (no node list)."""
        final = self.ctx.snapshots[-1]
        lines = self.header(title) + [f"-- final graph ({final.stage}): {len(final.nodes)} nodes"]
        for snapshot in self.ctx.snapshots:
            lines.extend(f"   note [{snapshot.stage}]: {note}" for note in snapshot.notes)
        return "\n".join(lines + self.totals_lines(final))

    def text(self, after: Optional[str] = None, title: str = "") -> str:
        lines = self.header(title)
        for snapshot in self.snapshots(after):
            change = "" if snapshot.stage == "capture" else ("" if snapshot.changed else "  (no change)")
            lines.append(f"\n-- after {snapshot.stage}: {len(snapshot.nodes)} nodes{change}")
            lines.extend(f"   note: {note}" for note in snapshot.notes)
            lines.append(f"   {'node':<24} {'op':<13} {'target':<30} {'shape':<28} {'layer':>5}  {'flops':<22} {'@B,S':>12}  extra")
            for record in snapshot.nodes:
                flops_value = record.cost.evaluate(self.batch, self.seq)["flops"]
                extra = " ".join(f"{k}={_short(v)}" for k, v in record.extra.items())
                lines.append(f"   {record.name:<24} {record.op:<13} {record.target[:30]:<30} "
                             f"{self.pretty_shape(record.val)[:28]:<28} {_layer(record.layer):>5}  "
                             f"{str(record.cost.flops)[:22]:<22} {flops_value:>12}  {extra}")
            lines.extend(self.totals_lines(snapshot))
        return "\n".join(lines)

    def json(self, after: Optional[str] = None) -> str:
        record = {
            "mode": self.ctx.plan.mode, "capture": self.ctx.capture, "batch": self.batch, "seq": self.seq,
            "symbolic_shapes": self.ctx.annotation.symbolic, "plan": self.ctx.plan.to_dict(),
            "moe_layers": [vars(block) for block in self.ctx.blocks],
            "pipeline": self.pipeline_line(), "passes_run": self.ctx.passes_run,
            "passes_skipped": self.ctx.passes_skipped, "frontend_seconds": self.ctx.frontend_seconds,
            "snapshots": [{"stage": s.stage, "changed": s.changed, "notes": s.notes, "seconds": s.seconds,
                           "nodes": [self.node_row(r) for r in s.nodes], "layers": self.layer_totals(s)}
                          for s in self.snapshots(after)],
        }
        return json.dumps(record, indent=1, default=_plain)

    def networkx(self, snapshot: Snapshot) -> nx.DiGraph:
        graph = nx.DiGraph(name=snapshot.stage)
        for record in snapshot.nodes:
            flops = record.cost.evaluate(self.batch, self.seq)["flops"]
            label = f"{record.name}\\n{record.target}\\n{self.pretty_shape(record.val)}"
            if record.layer is not None:
                label += f"\\nlayer {record.layer}"
            if flops:
                label += f"\\n{flops:.3g} flop"
            graph.add_node(record.name, label=f'"{label}"', shape="box",
                           style='"filled"', fillcolor=f'"{_colour(record)}"')
            for source in record.inputs:
                graph.add_edge(source, record.name)
        return graph

    def dot(self, snapshot: Snapshot) -> str:
        """The snapshot's graph as DOT source, every node id quoted: fx names nodes after their
        modules, and a module called ``node``, ``edge`` or ``graph`` is a DOT keyword unquoted."""
        graph = self.networkx(snapshot)
        return nx.nx_pydot.to_pydot(nx.relabel_nodes(graph, {name: _dot_id(name) for name in graph})).to_string()

    def svg(self, snapshot: Snapshot) -> str:
        result = subprocess.run([dot_program(), "-Tsvg"], input=self.dot(snapshot), capture_output=True, text=True,
                                check=False)
        if result.returncode:
            raise InspectError(f"Graphviz dot failed: {result.stderr.strip()}")
        return result.stdout


def check_stage(after: Optional[str], plan) -> None:
    """Refuse ``--after`` naming no stage of ``plan``'s run (capture, then the mode's passes that
    ``disable_passes`` leaves), before anything is lowered."""
    from moesys_compile.passes import pipeline_for
    names = [fn.__name__ for fn in pipeline_for(plan.mode)]
    stages = ["capture"] + [name for name in names if name not in plan.disable_passes]
    if after is not None and after not in stages:
        raise no_such_stage(after, stages, [name for name in names if name in plan.disable_passes], plan.mode)


def no_such_stage(after: str, stages: list[str], skipped: list[str], mode: Optional[str] = None) -> InspectError:
    from moesys_compile.passes import PIPELINES
    other = next((m for m, passes in PIPELINES.items() if m != mode and after in [p.__name__ for p in passes]), None)
    return InspectError(f"--after {after!r}: no such stage; stages of this run: {', '.join(stages)}"
                        + (f" (disabled: {', '.join(skipped)})" if skipped else "")
                        + (f"; {after} is a pass of mode {other!r}, not {mode!r}: pass --mode {other} (or a plan "
                           f"file with mode: {other})" if other and mode else ""))


def dot_program() -> str:
    """The path of Graphviz's ``dot``, which ``--format svg`` runs."""
    dot_binary = shutil.which("dot")
    if dot_binary is None:
        raise InspectError("--format svg needs Graphviz's `dot` program, which is not installed "
                           "(Debian/Ubuntu: apt-get install graphviz); --format dot writes the DOT source instead")
    return dot_binary


def _dot_id(name: str) -> str:
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _colour(record: NodeRecord) -> str:
    if record.target.startswith("moesys."):
        return "#f4b183"
    if record.op in ("placeholder", "output"):
        return "#c5e0b4"
    if record.op == "get_attr":
        return "#deebf7"
    return "#ffffff"


def _layer(layer: Optional[int]) -> str:
    return "-" if layer is None else str(layer)


def _short(value: Any) -> str:
    text = str(_plain(value))
    return text if len(text) <= 40 else text[:37] + "..."


def _plain(value: Any) -> Any:
    if isinstance(value, (sympy.Basic, torch.SymInt)):
        return str(value)
    if isinstance(value, Cost):
        return {f: str(getattr(value, f)) for f in Cost.FIELDS}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)
