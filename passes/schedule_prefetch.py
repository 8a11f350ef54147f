"""schedule_prefetch: the order in which the ring loads sections into slots, and what each load
waits for. The ring program's copy stream/thread follows this schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.fx as fx

from moesys_compile.passes.ring_partition import RingBudgetTooSmall, RingLayout, activation_workspace, budget_note
from moesys_compile.passes.ring_units import ALIGN
from moesys_compile.plan import PlanError, format_bytes


@dataclass
class LoadStep:
    """Load ``section`` into ``slot`` once section ``after`` (the slot's previous occupant in the
    cyclic order) has finished computing; ``reload`` is False when the slot keeps the section
    from one pass to the next (every section has a slot of its own)."""
    section: int
    slot: int
    after: Optional[int]
    nbytes: int
    reload: bool


def previous_occupant(index: int, slots: int, count: int) -> int:
    """The section that used ``index``'s slot (``index % slots``) just before it, cyclically."""
    if index >= slots:
        return index - slots
    last = count - 1
    return last - ((last - index) % slots)


def schedule_prefetch(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    """Derive the ring's load schedule from the sections of ``ring_partition``.

    **Contract.** Needs ``ctx.extras["ring"]`` (skipped with a note when there is none) and
    ``meta["moesys"]["section"]`` on the nodes (the graph is the truth: passes between the
    partition and this one, e.g. lower_kernels, may have replaced nodes). Writes
    ``ctx.extras["ring"].schedule`` (one ``LoadStep`` per section), refreshes each section's node
    names from the graph, and writes ``meta["moesys"]["slot"]`` on every node that has a
    ``section``. Re-estimates the activation workspace on the final graph at the example shape
    (the ring program checks every call against it): a larger need takes the budget's unused
    rest, or the room the sections leave in their slots (``slot_bytes`` shrinks), or raises
    ``PlanError`` naming both figures. Adds no node; the graph computes the same thing.

    **Pseudo-code.**

        n = len(sections); r = slots
        for i, section in enumerate(sections):
            slot  = i % r
            after = previous section with the same slot, cyclic across calls (None if n <= r)
            reload = n > r                               # n <= r: loaded once, stays
        # the executor keeps up to r loads in flight ahead of compute: section i+r starts loading
        # as soon as section i has been computed, while sections i+1 .. i+r-1 compute
        need = workspace of the final graph at the example (batch, seq)
        if need > layout.workspace: take it if budget - slots x slot_bytes - resident holds it, else
            shrink the slots to what their largest section needs if that frees enough, else raise PlanError
    """
    layout = ctx.extras.get("ring")
    if layout is None:
        ctx.note("no ring layout (ring_partition did not run or there is no device_budget): nothing to schedule")
        return gm
    count, slots = len(layout.sections), layout.slots
    rotating = count > slots
    schedule = []
    for section in layout.sections:
        after = previous_occupant(section.index, slots, count) if rotating else None
        schedule.append(LoadStep(section.index, section.index % slots, after, section.nbytes, rotating))
    layout.schedule = schedule
    for section in layout.sections:
        section.nodes = []
    for node in gm.graph.nodes:
        index = node.meta.get("moesys", {}).get("section")
        if index is not None:
            layout.sections[index].nodes.append(node.name)
            node.meta["moesys"]["slot"] = index % slots
    refresh_workspace(gm, ctx, layout)
    moved = sum(step.nbytes for step in schedule) if rotating else 0
    ctx.note(f"{'rotating' if rotating else 'resident'} ring: {count} sections over {slots} slots, prefetch depth "
             f"{min(slots, count) - 1}; bytes moved per forward {moved} ({format_bytes(moved)})")
    for step in schedule:
        wait = f"after section {step.after} computed" if step.after is not None else "once, at the first call"
        ctx.note(f"load section {step.section:>3} -> slot {step.slot}  {step.nbytes:>12} B  {wait}")
    return gm


def refresh_workspace(gm: fx.GraphModule, ctx, layout: RingLayout) -> None:
    """Passes after ring_partition (lower_kernels) change the nodes whose activation bytes the ring
    checks every call against; the workspace must still hold the example call."""
    batch, seq = layout.example_shape
    need = activation_workspace(gm, ctx, batch, seq)
    if need <= layout.workspace:
        return
    resident = sum(layout.resident.values())
    rest = layout.budget - layout.slots * layout.slot_bytes - resident
    if need > rest:
        # ring_partition gave the slots all the room; their sections may leave some of it unused
        fitted = (layout.budget - need - resident) // layout.slots // ALIGN * ALIGN
        if fitted < max(section.nbytes for section in layout.sections):
            raise RingBudgetTooSmall("schedule_prefetch", ctx.passes_run, PlanError(
                f"the lowered graph needs a {need}-byte activation workspace at batch {batch}, seq {seq}, but "
                f"device_budget ({layout.budget} bytes) leaves {rest} bytes next to {layout.slots} slots x "
                f"{layout.slot_bytes} bytes (ring_partition sized {layout.workspace}); set "
                f"Plan.options['ring_workspace'] = {need} so that ring_partition leaves it, raise "
                f"Plan.device_budget by {need - rest} bytes or more, or disable_passes=['lower_kernels']"))
        ctx.note(f"slots {layout.slot_bytes} B -> {fitted} B (their sections fit) to hold the workspace")
        layout.slot_bytes = fitted
    ctx.note(f"activation workspace {layout.workspace} B -> {need} B after the passes that followed ring_partition")
    layout.workspace = need
    ctx.note(budget_note(layout))
