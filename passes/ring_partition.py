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

import torch
import torch.fx as fx

from moesys_compile.errors import PlanError
from moesys_compile.ir import moesys_meta, tensors_in
from moesys_compile.plan import format_bytes

ALIGN = 64            # every tensor starts on a 64-byte boundary inside a slot
MAX_DERIVED_SLOTS = 4  # deeper rings only shrink sections once two slots hide a transfer


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


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
    min_budget: int
    example_shape: tuple[int, int]         # (batch, seq) the workspace was estimated at
    resident: dict[str, int] = field(default_factory=dict)
    dtype: Optional[torch.dtype] = None    # streamed floating state is stored in this dtype
    schedule: list = field(default_factory=list)   # filled by schedule_prefetch


# ---------------------------------------------------------------------------------------------
# state read by nodes
# ---------------------------------------------------------------------------------------------


def fetch(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def node_state(gm: fx.GraphModule, node: fx.Node) -> dict[str, torch.Tensor]:
    """Tensors a node reads from the module, by qualified name."""
    if node.op == "get_attr":
        value = fetch(gm, str(node.target))
        return {str(node.target): value} if isinstance(value, torch.Tensor) else {}
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
        return {f"{node.target}.{name}": t for name, t in named}
    return {}


def stored_bytes(t: torch.Tensor, dtype: Optional[torch.dtype]) -> int:
    """Bytes ``t`` takes in a slot (floating tensors are stored in the plan's dtype)."""
    itemsize = torch.empty((), dtype=dtype).element_size() if dtype is not None and t.is_floating_point() \
        else t.element_size()
    return aligned(t.numel() * itemsize)


def model_tensor_ids(model: torch.nn.Module) -> set[int]:
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return {id(t) for _, t in named}


# ---------------------------------------------------------------------------------------------
# activation workspace: a liveness walk over the graph with per-node bytes
# ---------------------------------------------------------------------------------------------


def activation_exprs(gm: fx.GraphModule, ctx) -> list:
    """Per node (graph order): bytes it allocates, as sympy expressions in B and S. Views and
    weight reads allocate nothing (their bytes belong to their base), except views of state
    that are carried to another layer: the ring copies those out of the slot."""
    exprs = []
    for node in gm.graph.nodes:
        cost = moesys_meta(node).get("cost")
        own = cost.activation_bytes if cost is not None else 0
        if own == 0 and _is_state_view(node) and _used_outside_layer(node):
            own = sum((_numel(ctx, t) * t.element_size() for t in tensors_in(node.meta.get("val"))), 0)
        exprs.append(own)
    return exprs


def _numel(ctx, t: torch.Tensor):
    total = 1
    for size in t.shape:
        total = total * ctx.annotation.expr(size)
    return total


def _is_state_view(node: fx.Node) -> bool:
    root = alias_root(node)
    return root is not node and root.op == "get_attr"


def _used_outside_layer(node: fx.Node) -> bool:
    layer = moesys_meta(node).get("layer")
    return any(moesys_meta(user).get("layer") != layer for user in node.users if user.op != "output")


def alias_root(node: fx.Node) -> fx.Node:
    """The node whose storage ``node`` views (itself unless it allocates nothing and reads a tensor)."""
    while node.op not in ("placeholder", "get_attr"):
        cost = moesys_meta(node).get("cost")
        if cost is None or cost.activation_bytes != 0:
            break
        sources = [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)
                   or isinstance(a.meta.get("val"), (tuple, list))]
        if not sources:
            break
        node = sources[0]
    return node


def liveness_plan(gm: fx.GraphModule) -> tuple[list[int], list[list[int]]]:
    """For each node index: its alias root's index, and the roots freed after it runs."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    roots = [index[alias_root(n)] for n in nodes]
    last_use = list(range(len(nodes)))
    for i, node in enumerate(nodes):
        for user in node.users:
            last_use[roots[i]] = max(last_use[roots[i]], index[user])
    frees: list[list[int]] = [[] for _ in nodes]
    for root in set(roots):
        frees[last_use[root]].append(root)
    return roots, frees


def peak_live_bytes(own_bytes: list[int], roots: list[int], frees: list[list[int]]) -> int:
    """Largest sum of live allocations while the graph runs in order."""
    live = peak = 0
    size = [0] * len(own_bytes)
    for i, nbytes in enumerate(own_bytes):
        size[roots[i]] += nbytes
        live += nbytes
        peak = max(peak, live)
        for root in frees[i]:
            live -= size[root]
            size[root] = 0
    return peak


# ---------------------------------------------------------------------------------------------
# units and sections
# ---------------------------------------------------------------------------------------------


def fine_units(nodes: list[fx.Node]) -> list[list[fx.Node]]:
    """Cut a run of nodes before every node where no earlier ``get_attr`` still has a later user."""
    position = {n: i for i, n in enumerate(nodes)}
    units: list[list[fx.Node]] = []
    open_until = -1
    for i, node in enumerate(nodes):
        if not units or i > open_until:
            units.append([])
        units[-1].append(node)
        if node.op == "get_attr":
            later = [position[u] for u in node.users if u in position]
            open_until = max(open_until, max(later, default=i))
    return units


def layer_units(nodes: list[fx.Node]) -> list[list[fx.Node]]:
    units: list[list[fx.Node]] = []
    for node in nodes:
        if not units or moesys_meta(units[-1][-1]).get("layer") != moesys_meta(node).get("layer"):
            units.append([])
        units[-1].append(node)
    return units


def unit_state(unit: list[fx.Node], state_of: dict[fx.Node, dict[str, int]]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for node in unit:
        merged.update(state_of[node])
    return merged


def pack(units: list[list[fx.Node]], state_of, slot_bytes: int) -> list[list[fx.Node]]:
    """Greedy contiguous packing of units into groups whose deduplicated state fits a slot."""
    groups: list[list[fx.Node]] = []
    current: list[fx.Node] = []
    current_state: dict[str, int] = {}
    for unit in units:
        merged = {**current_state, **unit_state(unit, state_of)}
        if current and sum(merged.values()) > slot_bytes:
            groups.append(current)
            current, merged = [], unit_state(unit, state_of)
        current.extend(unit)
        current_state = merged
    if current:
        groups.append(current)
    return groups


def split_units(nodes: list[fx.Node], state_of, slot_bytes: int) -> list[list[fx.Node]]:
    """Layer units, with any layer larger than a slot replaced by its fine units."""
    units = []
    for unit in layer_units(nodes):
        if sum(unit_state(unit, state_of).values()) > slot_bytes:
            units.extend(fine_units(unit))
        else:
            units.append(unit)
    return units


def describe_unit(unit: list[fx.Node], state: dict[str, int]) -> str:
    heavy = [n for n in unit if n.op in ("get_attr", "call_module")]
    where = moesys_meta(unit[0]).get("module") or unit[0].name
    names = ", ".join(sorted(state))
    return f"nodes {[n.name for n in heavy] or [unit[0].name]} in {where} read {names}"


def choose_slots(plan_slots: Optional[int], room: int, largest_layer: int) -> int:
    if plan_slots is not None:
        return plan_slots
    return max(2, min(MAX_DERIVED_SLOTS, room // max(largest_layer, 1)))


# ---------------------------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------------------------


def ring_partition(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    """Cut the graph into sections for the memory ring and size the ring from the budget.

    **Contract.** Needs ``meta["moesys"]["cost"]`` (activation bytes in B, S) and ``layer`` on
    every node, and ``plan.device_budget`` (no budget: the pass notes it and changes nothing).
    Writes ``meta["moesys"]["section"]`` (int) on every node but the output, and
    ``ctx.extras["ring"]`` (a ``RingLayout``: slots, slot bytes, workspace, sections with their
    streamed state). Adds no node and changes no computation. Raises ``PlanError`` stating the
    minimum budget in bytes when the budget cannot hold ``slots`` copies of the largest unit
    plus the workspace.

    **Pseudo-code.**

        workspace = plan.options["ring_workspace"] or peak live activation bytes at the example
                    (batch, seq) (liveness walk; views share their base)
        room      = budget - workspace - resident state
        unit_min  = largest fine unit (get_attr never separated from its users)
        slots     = plan.ring_slots or clamp(room // largest layer, 2, 4)
        if room < slots * unit_min: raise PlanError(minimum = slots * unit_min + workspace + resident)
        slot_bytes = room // slots
        units    = layers; a layer larger than slot_bytes -> its fine units
        sections = greedy contiguous packing of units under slot_bytes; section i -> slot i % slots
    """
    plan = ctx.plan
    if plan.device_budget is None:
        ctx.note("no device_budget in the plan: no ring (the program keeps every weight resident)")
        return gm
    dtype = plan.torch_dtype if plan.dtype != "float32" else None
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    known = model_tensor_ids(ctx.model)
    state_of: dict[fx.Node, dict[str, int]] = {}
    resident: dict[str, int] = {}
    for node in nodes:
        streamed = {}
        for name, t in node_state(gm, node).items():
            if id(t) in known:
                streamed[name] = stored_bytes(t, dtype)
            else:
                resident[name] = aligned(t.nbytes)
        state_of[node] = streamed

    batch, seq = ctx.annotation.example_batch, ctx.annotation.example_seq
    workspace = _workspace(gm, ctx, batch, seq)
    room = plan.device_budget - workspace - sum(resident.values())
    fine = fine_units(nodes)
    unit_bytes = [sum(unit_state(u, state_of).values()) for u in fine]
    worst = max(range(len(fine)), key=lambda i: unit_bytes[i])
    largest_layer = max(sum(unit_state(u, state_of).values()) for u in layer_units(nodes))
    slots = choose_slots(plan.ring_slots, room, largest_layer)
    minimum = slots * unit_bytes[worst] + workspace + sum(resident.values())
    if plan.device_budget < minimum:
        raise PlanError(
            f"device_budget ({plan.device_budget} bytes, {format_bytes(plan.device_budget)}) is below the minimum "
            f"{minimum} bytes ({format_bytes(minimum)}) for ring inference: {slots} slots x {unit_bytes[worst]} bytes "
            f"(largest unit that cannot be split: {describe_unit(fine[worst], unit_state(fine[worst], state_of))}) "
            f"+ {workspace} bytes activation workspace at batch {batch}, seq {seq}"
            + (f" + {sum(resident.values())} bytes resident state" if resident else "")
            + "; raise Plan.device_budget or lower Plan.ring_slots")
    slot_bytes = (room // slots) // ALIGN * ALIGN
    groups = pack(split_units(nodes, state_of, slot_bytes), state_of, slot_bytes)

    sections = []
    for index, group in enumerate(groups):
        layers = tuple(dict.fromkeys(moesys_meta(n).get("layer") for n in group))
        sections.append(SectionInfo(index, index % slots, [n.name for n in group], unit_state(group, state_of), layers))
        for node in group:
            moesys_meta(node)["section"] = index
    all_state = {name: size for node in nodes for name, size in state_of[node].items()}
    layout = RingLayout(budget=plan.device_budget, slots=slots, slot_bytes=slot_bytes, workspace=workspace,
                        sections=sections, state_bytes=sum(all_state.values()), min_budget=minimum,
                        example_shape=(batch, seq), resident=resident, dtype=dtype)
    ctx.extras["ring"] = layout
    _notes(ctx, layout)
    return gm


def _workspace(gm: fx.GraphModule, ctx, batch: int, seq: int) -> int:
    from moesys_compile.plan import parse_bytes
    given = ctx.plan.options.get("ring_workspace")
    if given is not None:
        return aligned(parse_bytes(given, "options['ring_workspace']"))
    return aligned(evaluate_workspace(activation_exprs(gm, ctx), liveness_plan(gm), batch, seq))


def evaluate_workspace(exprs: list, liveness: tuple, batch: int, seq: int) -> int:
    from moesys_compile.frontend.annotation import B, S
    import sympy
    values = {B: batch, S: seq}
    own = [int(sympy.sympify(e).xreplace(values)) for e in exprs]
    return peak_live_bytes(own, *liveness)


def _notes(ctx, layout: RingLayout) -> None:
    ctx.note(f"budget {layout.budget} B ({format_bytes(layout.budget)}) = {layout.slots} slots x "
             f"{layout.slot_bytes} B + activation workspace {layout.workspace} B "
             f"(batch {layout.example_shape[0]}, seq {layout.example_shape[1]}); minimum budget {layout.min_budget} B")
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
