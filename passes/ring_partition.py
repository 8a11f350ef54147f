"""ring_partition: cut the graph into contiguous sections whose weights fit one slot of the
device ring (SE-MoE ring memory).

The device budget is split in two: a ring of ``slots`` equal weight slots, and an activation
workspace. Sections are layer-sized (several small layers share a section); a layer that alone
exceeds a slot is cut at node granularity, never between a ``get_attr`` and its users.

Words used below: *state* are the model tensors a node reads (a ``get_attr`` tensor, or the
parameters and buffers of a ``call_module`` leaf); *streamed* state lives in the host/disk tier
and is copied into a slot; *resident* state (tensors the compiler itself added to the graph
module, e.g. drop counters that are mutated in place) stays where it is and is counted in the
workspace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import sympy
import torch
import torch.fx as fx

from moesys_compile.errors import PassError, PlanError
from moesys_compile.frontend.annotation import CostModel
from moesys_compile.ir import fetch, is_op, moesys_meta
from moesys_compile.passes.ring_dtype import propagate_in_ring_dtype
from moesys_compile.passes.ring_expert_groups import split_into_groups, split_reserve, splittable_weights
from moesys_compile.passes.ring_units import (ALIGN, aligned, describe_unit, even_out, fine_units, layer_units,
                                              model_tensor_ids, node_state, pack, sink_state_reads, split_units,
                                              stored_bytes, unit_state)
from moesys_compile.plan import format_bytes
from moesys_compile.runtime.workspace import activation_exprs, evaluate_workspace, liveness_plan, scratch_exprs

MAX_DERIVED_SLOTS = 4  # deeper rings only shrink sections once two slots hide a transfer


class RingBudgetTooSmall(PassError, PlanError):
    """The budget cannot hold the ring. A PassError (the pass runner lets it through unchanged)
    and a PlanError (the plan is what has to change)."""


@dataclass
class SectionInfo:
    """One section: a contiguous run of nodes whose streamed state is copied into ``slot``."""
    index: int
    slot: int
    nodes: list[str]                       # node names in graph order
    state: dict[str, int]                  # streamed state name -> aligned bytes
    layers: tuple                          # layer indices covered (None for non-layer nodes)

    @property
    def nbytes(self) -> int:
        return sum(self.state.values())


@dataclass
class RingLayout:
    """``ctx.extras["ring"]``: everything the ring program needs to know about the cut."""
    budget: int
    slots: int
    slot_bytes: int
    workspace: int
    sections: list[SectionInfo]
    state_bytes: int                       # all streamed state, deduplicated
    min_budget: int                        # the smallest budget that holds the ring (at ``min_slots``)
    example_shape: tuple[int, int]         # (batch, seq) the workspace was estimated at
    resident: dict[str, int] = field(default_factory=dict)
    dtype: Optional[torch.dtype] = None    # streamed floating state is stored in this dtype
    slices: dict = field(default_factory=dict)     # graph attribute -> (weight it slices, lo, hi)
    schedule: list = field(default_factory=list)   # filled by schedule_prefetch
    min_slots: int = 2                     # the fewest slots the plan allows (Plan.ring_slots or 2)
    reserve: int = 0                       # set aside for the expert groups' partial sums before the split

    def budget_terms(self) -> list[tuple[str, int]]:
        """The parts the budget is made of, in bytes; they sum to ``budget``. The last one is
        what no part takes (the budget is a cap: a model far below it leaves most of it)."""
        terms = [(f"{self.slots} slots x {self.slot_bytes} B", self.slots * self.slot_bytes),
                 (f"activation workspace at batch {self.example_shape[0]}, seq {self.example_shape[1]}",
                  self.workspace)]
        if self.resident:
            terms.append(("resident state", sum(self.resident.values())))
        spare = self.budget - sum(nbytes for _, nbytes in terms)
        if spare:
            why = f", of the {self.reserve} B set aside for the expert groups' partial sums" if self.reserve else ""
            terms.append((f"unused{why}", spare))
        return terms


def choose_slots(plan_slots: Optional[int], room: int, largest_layer: int, unit_room: int, unit: int) -> int:
    """``Plan.ring_slots``, or as many slots (2 to MAX_DERIVED_SLOTS) as the room holds of the
    largest layer and ``unit_room`` (the room less the expert groups' partial sums) of the largest
    unit that cannot be split."""
    if plan_slots is not None:
        return plan_slots
    return max(2, min(MAX_DERIVED_SLOTS, room // max(largest_layer, 1), unit_room // max(unit, 1)))


def fit_to_sections(ctx, groups: list[list[fx.Node]], state_of, slots: int, slot_bytes: int) -> tuple[int, int]:
    """(slots, slot_bytes) for the packed sections. With no more sections than slots every
    section keeps a slot of its own and the ring never reloads: a slot beyond the sections would
    never be filled (prefetch depth is min(slots, sections) - 1), and a slot larger than its
    section holds nothing, so both shrink to what the sections need (the budget is a cap)."""
    if len(groups) > slots:
        return slots, slot_bytes
    if len(groups) < slots and ctx.plan.ring_slots is not None:
        ctx.note(f"ring_slots={ctx.plan.ring_slots} but only {len(groups)} section(s): {len(groups)} slot(s), "
                 f"a slot beyond the sections would never be filled")
    return len(groups), max(aligned(sum(unit_state(g, state_of).values())) for g in groups)


# ---------------------------------------------------------------------------------------------
# expert groups (the rewrite lives in ring_expert_groups): sizes and which grouped_mlps to split
# ---------------------------------------------------------------------------------------------


def expert_bytes(gm: fx.GraphModule, weights: list[fx.Node], dtype) -> tuple[int, int]:
    """(bytes of one expert's weights (up, down, biases), number of experts)."""
    tensors = [fetch(gm, str(w.target)) for w in weights]
    return sum(stored_bytes(t[0], dtype) for t in tensors), tensors[0].shape[0]


def indivisible_bytes(gm: fx.GraphModule, unit: list[fx.Node], state_of, dtype) -> int:
    """Bytes of a fine unit that must share one slot (a grouped_mlp only needs one expert)."""
    total = sum(unit_state(unit, state_of).values())
    for node in unit:
        weights = splittable_weights(node)
        if weights is not None and all(w in unit for w in weights):
            whole = sum(state_of[w][str(w.target)] for w in weights)
            total += expert_bytes(gm, weights, dtype)[0] - whole
    return total


def oversized_experts(fine: list[list[fx.Node]], state_of, slot_bytes: int) -> list[fx.Node]:
    """The splittable grouped_mlps of the fine units larger than ``slot_bytes``."""
    return [node for unit in fine if sum(unit_state(unit, state_of).values()) > slot_bytes
            for node in unit if splittable_weights(node)]


def split_oversized_experts(gm: fx.GraphModule, ctx, fine, state_of, slot_bytes: int, dtype, slices) -> int:
    """Replace each grouped_mlp whose unit exceeds a slot by expert groups that fit one."""
    split = 0
    for node in oversized_experts(fine, state_of, slot_bytes):
        per_expert, num_experts = expert_bytes(gm, splittable_weights(node), dtype)
        per_group = max(1, (slot_bytes - 2 * ALIGN) // per_expert)
        if per_group >= num_experts:
            continue
        total = split_into_groups(gm, ctx, node, per_group, slices)
        ctx.note(f"{moesys_meta(total).get('module')}: grouped_mlp over {num_experts} experts -> "
                 f"{-(-num_experts // per_group)} expert groups of <= {per_group} (a slot holds {slot_bytes} B)")
        split += 1
    return split


# ---------------------------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------------------------


def ring_partition(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    """Cut the graph into sections for the memory ring and size the ring from the budget.

    **Contract.** Needs ``meta["moesys"]["cost"]`` (activation bytes in B, S) and ``layer`` on
    every node, and ``plan.device_budget`` (no budget: the pass notes it and changes nothing).
    Where ``plan.dtype`` is not the dtype of every floating model tensor and graph input, first
    propagates every ``meta["val"]`` again in the dtypes the ring computes in and makes the
    activation bytes theirs (``ring_dtype``; ``PlanError`` where the model cannot compute so).
    Writes ``meta["moesys"]["section"]`` (int) on every node but the output,
    ``meta["moesys"]["scratch_bytes"]`` on each canonical expert op (its kernel's temporaries), and
    ``ctx.extras["ring"]`` (a ``RingLayout``: slots, slot bytes, workspace, sections with their
    streamed state, expert-weight slices). A ``grouped_mlp`` too large for a slot is replaced by
    a sum of ``moesys_ring.expert_group_mlp`` nodes over expert groups (``ring_expert_groups``;
    same rows, same values; new nodes get ``val``, ``layer``, ``module`` and ``cost``). Moves
    each ``get_attr`` right before its first user and gives every further user its own
    ``get_attr`` of the same target. The computation is unchanged. Raises ``PlanError`` stating
    the minimum budget in bytes when the budget cannot hold ``Plan.ring_slots`` (default 2) copies
    of the largest unit plus the workspace. Never more slots than sections.

    **Pseudo-code.**

        if plan.dtype differs from a floating model tensor or graph input:
            vals again with those in plan.dtype; activation bytes from the new vals
        sink every get_attr to its first user; one get_attr per further user
        workspace = plan.options["ring_workspace"] or peak live activation bytes at the example
                    (batch, seq) (liveness walk; views share their base; an expert op adds the
                    scratch of the kernel it will be lowered to while it runs)
        room      = budget - workspace - resident state
        unit_min  = largest fine unit (get_attr never separated from its users; a grouped_mlp
                    counts one expert, since it can run as expert groups)
        at_min    = extra peak activation of the expert groups' partial sums at unit-sized slots
        min_slots = plan.ring_slots or 2
        if room < min_slots * unit_min + at_min: raise PlanError(minimum in bytes)
        slots     = plan.ring_slots or clamp(min(room // largest layer, (room - at_min) // unit_min), 2, 4)
        reserve   = extra peak activation of the expert groups' partial sums (liveness walk)
        slot_bytes = (room - reserve) // slots
        grouped_mlp whose weights exceed slot_bytes -> sum of expert_group_mlp over expert groups
                    that fit a slot (weights read through slices w[lo:hi], streamed like weights)
        units    = layers; a layer larger than slot_bytes -> its fine units
        sections = greedy contiguous packing of units under slot_bytes; split sections until
                   their count is a multiple of slots (when they rotate); section i -> slot i % slots
        if sections <= slots: slots = sections, slot_bytes = largest section (the budget is a cap;
                   a note when Plan.ring_slots asked for more)
    """
    plan = ctx.plan
    if plan.device_budget is None:
        ctx.note("no device_budget in the plan: no ring (the program keeps every weight resident)")
        return gm
    dtype = plan.torch_dtype
    if propagate_in_ring_dtype(gm, ctx):
        ctx.note(f"values propagated again in {plan.dtype}, the dtype the ring computes in (the model was captured in "
                 f"another): the activation workspace is estimated in it")
    added = sink_state_reads(gm)
    if added:
        ctx.note(f"{added} weight reads duplicated so that each user reads its weight in its own section")
    slices: dict[str, tuple[str, int, int]] = {}
    state_of, resident = classify_state(gm, ctx, dtype, slices)
    batch, seq = ctx.annotation.example_batch, ctx.annotation.example_seq
    charge_expert_scratch(gm, ctx)
    workspace = activation_workspace(gm, ctx, batch, seq)
    room = plan.device_budget - workspace - sum(resident.values())
    nodes = list(state_of)
    fine = fine_units(nodes)
    unit_bytes = [indivisible_bytes(gm, u, state_of, dtype) for u in fine]
    worst = max(range(len(fine)), key=lambda i: unit_bytes[i])
    largest_layer = max(sum(unit_state(u, state_of).values()) for u in layer_units(nodes))
    at_minimum = aligned(split_reserve(gm, ctx, oversized_experts(fine, state_of, unit_bytes[worst]), batch, seq))
    min_slots = plan.ring_slots or 2
    minimum = min_slots * unit_bytes[worst] + workspace + sum(resident.values()) + at_minimum
    fewer_slots = " or lower Plan.ring_slots" if min_slots > 2 else ""     # a ring has 2 slots at least
    if plan.device_budget < minimum:
        raise RingBudgetTooSmall("ring_partition", ctx.passes_run, PlanError(
            f"device_budget ({plan.device_budget} bytes, {format_bytes(plan.device_budget)}) is below the minimum "
            f"{minimum} bytes ({format_bytes(minimum)}) for ring inference: {min_slots} slots x "
            f"{unit_bytes[worst]} bytes (largest unit that cannot be split: {describe_unit(fine[worst], unit_state(fine[worst], state_of))}) "
            f"+ {workspace} bytes activation workspace at batch {batch}, seq {seq}"
            + (f" + {sum(resident.values())} bytes resident state" if resident else "")
            + (f" + {at_minimum} bytes for the partial sums of expert groups" if at_minimum else "")
            + f"; raise Plan.device_budget{fewer_slots}"))
    slots = choose_slots(plan.ring_slots, room, largest_layer, room - at_minimum, unit_bytes[worst])
    reserve = aligned(split_reserve(gm, ctx, oversized_experts(fine, state_of, room // slots), batch, seq))
    slot_bytes = ((room - reserve) // slots) // ALIGN * ALIGN
    if split_oversized_experts(gm, ctx, fine, state_of, slot_bytes, dtype, slices):
        state_of, resident = classify_state(gm, ctx, dtype, slices)
        # expert groups add partial sums
        workspace = max(workspace, activation_workspace(gm, ctx, batch, seq))
        slot_bytes = min(slot_bytes, (plan.device_budget - workspace - sum(resident.values())) // slots // ALIGN * ALIGN)
        nodes = list(state_of)
    groups = even_out(pack(split_units(nodes, state_of, slot_bytes), state_of, slot_bytes), state_of, slot_bytes, slots)
    too_big = [g for g in groups if sum(unit_state(g, state_of).values()) > slot_bytes]
    if too_big:   # the reserve for expert groups fell short: say so rather than overrun the budget
        raise RingBudgetTooSmall("ring_partition", ctx.passes_run, PlanError(
            f"device_budget ({plan.device_budget} bytes) leaves {slot_bytes}-byte slots after the expert groups' "
            f"partial sums, but {describe_unit(too_big[0], unit_state(too_big[0], state_of))} needs "
            f"{sum(unit_state(too_big[0], state_of).values())} bytes; raise Plan.device_budget"))
    streamed = sum({k: v for n in nodes for k, v in state_of[n].items()}.values())
    slots, slot_bytes = fit_to_sections(ctx, groups, state_of, slots, slot_bytes)
    layout = RingLayout(budget=plan.device_budget, slots=slots, slot_bytes=slot_bytes, workspace=workspace,
                        sections=make_sections(groups, state_of, slots), min_budget=minimum,
                        state_bytes=streamed, example_shape=(batch, seq), resident=resident, dtype=dtype,
                        slices=slices, min_slots=min_slots, reserve=reserve)
    ctx.extras["ring"] = layout
    _notes(ctx, layout)
    return gm


def classify_state(gm: fx.GraphModule, ctx, dtype, slices) -> tuple[dict, dict]:
    """Streamed state bytes per node (graph order, output excluded) and resident state bytes."""
    known = model_tensor_ids(ctx.model)
    state_of: dict[fx.Node, dict[str, int]] = {}
    resident: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        state_of[node] = {}
        for name, t in node_state(gm, node).items():
            if id(t) in known or name in slices:
                state_of[node][name] = stored_bytes(t, dtype)
            else:
                resident[name] = aligned(t.nbytes)
    return state_of, resident


def make_sections(groups: list[list[fx.Node]], state_of, slots: int) -> list[SectionInfo]:
    sections = []
    for index, group in enumerate(groups):
        layers = tuple(dict.fromkeys(moesys_meta(n).get("layer") for n in group))
        sections.append(SectionInfo(index, index % slots, [n.name for n in group], unit_state(group, state_of), layers))
        for node in group:
            moesys_meta(node)["section"] = index
    return sections


def activation_workspace(gm: fx.GraphModule, ctx, batch: int, seq: int) -> int:
    """Activation bytes the ring reserves at (batch, seq): ``options["ring_workspace"]``, or the
    liveness peak with each kernel's scratch alive while it runs, aligned."""
    from moesys_compile.plan import parse_bytes
    given = ctx.plan.options.get("ring_workspace")
    if given is not None:
        return aligned(parse_bytes(given, "options['ring_workspace']"))
    return aligned(evaluate_workspace(activation_exprs(gm, ctx), liveness_plan(gm), batch, seq,
                                      scratch=scratch_exprs(gm)))


def charge_expert_scratch(gm: fx.GraphModule, ctx) -> None:
    """``meta["moesys"]["scratch_bytes"]`` of every canonical expert op: the scratch of the kernel
    lower_kernels will make of it (lowered nodes get their own from lower_kernels). For a
    grouped_mlp the canonical graph counts its output rows already (the rows the fused kernel keeps
    inside) but not yet the combined output, which the fused kernel holds while it runs: the one
    is taken off, the other added."""
    from moesys_compile.passes.lower_kernels import expert_scratch
    cost = CostModel(gm, ctx.annotation)
    for node in gm.graph.nodes:
        if is_op(node, "grouped_mlp", "moe_experts"):
            scratch = expert_scratch(node, ctx.annotation)
            if is_op(node, "grouped_mlp") and "val" in node.meta:
                combined = [cost.out_bytes(u) for u in node.users if is_op(u, "unpermute") and "val" in u.meta]
                scratch = sympy.Max(0, scratch - cost.out_bytes(node) + sum(combined, sympy.Integer(0)))
            moesys_meta(node)["scratch_bytes"] = scratch


def budget_note(layout: RingLayout) -> str:
    """``budget B = term B + ...`` (every term of ``RingLayout.budget_terms``) and the minimum."""
    terms = " + ".join(f"{nbytes} B ({label})" for label, nbytes in layout.budget_terms())
    return (f"budget {layout.budget} B ({format_bytes(layout.budget)}) = {terms}; minimum budget "
            f"{layout.min_budget} B ({format_bytes(layout.min_budget)}, with {layout.min_slots} slots)")


def _notes(ctx, layout: RingLayout) -> None:
    ctx.note(budget_note(layout))
    ctx.note(f"streamed weights {layout.state_bytes} B ({format_bytes(layout.state_bytes)}) in "
             f"{len(layout.sections)} sections; model / budget = {layout.state_bytes / layout.budget:.2f}")
    for section in layout.sections:
        layers = ",".join("-" if layer is None else str(layer) for layer in section.layers)
        ctx.note(f"section {section.index:>3}  slot {section.slot}  {section.nbytes:>12} B  layers {layers:<12} "
                 f"{len(section.nodes)} nodes, {len(section.state)} tensors")
    if layout.resident:
        ctx.note(f"resident (not streamed): {sorted(layout.resident)}")
    if len(layout.sections) <= layout.slots:
        ctx.note("every section has its own slot: weights are loaded once and stay on the device")
