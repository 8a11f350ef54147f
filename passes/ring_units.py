"""ring_units: the state a node reads, and how a run of nodes is cut into units (a layer, or
the nodes around one ``get_attr`` when a layer exceeds a slot) and packed into sections whose
state fits one slot of the ring. Used by ``ring_partition`` (the pass) and by the ring program,
which stages the same state.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from moesys_compile.ir import fetch, moesys_meta

ALIGN = 64            # every tensor starts on a 64-byte boundary inside a slot


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


# ---------------------------------------------------------------------------------------------
# state read by nodes
# ---------------------------------------------------------------------------------------------


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
# units and sections
# ---------------------------------------------------------------------------------------------


def state_readers(node: fx.Node) -> list[fx.Node]:
    """The nodes that read a ``get_attr``'s tensor: its users, and through an op on that tensor
    alone (a transpose, a cast: views of the slot) that op's readers too."""
    readers = []
    for user in node.users:
        readers.append(user)
        if user.op in ("call_function", "call_method") and user.all_input_nodes == [node]:
            readers.extend(state_readers(user))
    return readers


def fine_units(nodes: list[fx.Node]) -> list[list[fx.Node]]:
    """Cut a run of nodes before every node where no earlier ``get_attr`` still has a later
    reader (``state_readers``: a weight read transposed stays with the op that uses it)."""
    position = {n: i for i, n in enumerate(nodes)}
    units: list[list[fx.Node]] = []
    open_until = -1
    for i, node in enumerate(nodes):
        if not units or i > open_until:
            units.append([])
        units[-1].append(node)
        if node.op == "get_attr":
            later = [position[u] for u in state_readers(node) if u in position]
            open_until = max(open_until, max(later, default=i))
    return units


def sink_state_reads(gm: fx.GraphModule) -> int:
    """Give every user of a ``get_attr`` its own read, placed right before it (torch.export puts
    all reads at the top, and a tied weight is read by far-apart layers). Returns reads added.
    The nodes' order is read once: only ``get_attr`` nodes are moved or added, and a ``get_attr``
    takes no inputs, so it is never a user, and the users' order stays as read."""
    position = _position(gm)
    added = 0
    for node in [n for n in gm.graph.nodes if n.op == "get_attr"]:
        users = sorted(node.users, key=position)
        if not users:
            continue
        users[0].prepend(node)
        for user in users[1:]:
            with gm.graph.inserting_before(user):
                copy = gm.graph.get_attr(node.target)
            copy.meta = {key: (dict(value) if key == "moesys" else value) for key, value in node.meta.items()}
            moesys_meta(copy).update(layer=moesys_meta(user).get("layer"))
            user.replace_input_with(node, copy)
            added += 1
    return added


def _position(gm: fx.GraphModule):
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return order.__getitem__


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


def even_out(groups: list[list[fx.Node]], state_of, slot_bytes: int, slots: int) -> list[list[fx.Node]]:
    """Split the heaviest splittable sections until the count is a multiple of the slots, so
    that the last section of a call and the first of the next use different slots and the ring
    keeps loading across calls."""
    while len(groups) > slots and len(groups) % slots:
        splittable = [(i, split_units(g, state_of, slot_bytes)) for i, g in enumerate(groups)]
        splittable = [(i, units) for i, units in splittable if len(units) > 1]
        if not splittable:
            break
        i, units = max(splittable, key=lambda c: sum(unit_state(groups[c[0]], state_of).values()))
        half = max(1, len(units) // 2)
        groups[i:i + 1] = [[n for u in units[:half] for n in u], [n for u in units[half:] for n in u]]
    return groups


def describe_unit(unit: list[fx.Node], state: dict[str, int]) -> str:
    """A unit as a message names it: its module, the weights it reads where they are not that
    module's path itself (an embedding table's get_attr), and its graph nodes."""
    heavy = [n for n in unit if n.op in ("get_attr", "call_module")]
    where = moesys_meta(unit[0]).get("module") or unit[0].name
    names = ", ".join(sorted(state))
    reads = "" if names == where else f", which reads {names}"
    return f"{where}{reads} (graph nodes {[n.name for n in heavy] or [unit[0].name]})"
