"""How a call of one lowered ring graph is sized and run in micro-batches, without any device
memory: ``CallSizer`` estimates a call's activations in B and S from the graph's annotation and
cuts a batch whose activations exceed the workspace into slices (each section then runs over one
slice at a time while its weights sit in the slot); the helpers below split the inputs, gather the
outputs' slices and join them again in the structure the model returns."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import sympy
import torch
import torch.fx as fx

from moesys_compile.passes.ring_partition import RingLayout

from ..errors import MoesysError
from ..frontend.annotation import B, size_function
from ..runtime.workspace import (activation_exprs, carried_bytes, liveness_plan, peak_live_bytes, scratch_exprs,
                                 slice_peaks)


class RingBudgetError(MoesysError):
    """A call needs more device memory than the ring program was compiled for (``reason``: what
    does not fit, the message without its fix)."""

    def __init__(self, message: str, reason: Optional[str] = None, sliced_bytes: Optional[int] = None):
        super().__init__(message)
        self.reason = reason or message
        self.sliced_bytes = sliced_bytes     # the workspace micro-batches of one sequence would need


def node_sections(gm: fx.GraphModule, count: int) -> dict[fx.Node, int]:
    """Section of every node from ``meta["moesys"]["section"]``: a node a later pass added without
    one joins the section of the node before it; placeholders are -1, the output ``count``."""
    sections: dict[fx.Node, int] = {}
    current = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            sections[node] = -1 if node.op == "placeholder" else count
            continue
        current = node.meta.get("moesys", {}).get("section", current)
        sections[node] = current
    return sections


def power_of_two_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# ---------------------------------------------------------------------------------------------
# micro-batches: a call larger than the workspace runs each section over slices of the batch
# ---------------------------------------------------------------------------------------------


class Slices(list):
    """A value computed per micro-batch: one entry per slice of the batch, in order (``whole``:
    the tensor they view, when a graph output's slices were gathered into one as they came;
    ``fields``: for a namedtuple or dataclass output, the ``Slices`` of each field by its path in
    the node's ``(args, kwargs)``)."""
    whole: Optional[torch.Tensor] = None
    fields: Optional[dict[tuple, "Slices"]] = None


def _batch_leading(expr: sympy.Expr) -> bool:
    """A first dimension that is the batch times a factor free of it (B, 2*B, B*S)."""
    return expr.has(B) and not sympy.simplify(expr / B).has(B)


def micro_batch_plan(gm: fx.GraphModule, ctx) -> tuple[dict[fx.Node, str], Optional[str]]:
    """How the graph's outputs join after micro-batches: ``"cat"`` (the batch is their first
    dimension), ``"first"`` (they do not depend on the inputs), ``"fields"`` (a namedtuple or
    dataclass the model returns, built again from its fields, each joined as its own node) or
    ``"drop"`` (the load-balancing loss, a mean over the whole batch: None after a split call);
    and why the graph cannot run in micro-batches (None when it can). Rows of a batch are taken
    to be independent, as in every inference forward of a language model, except where a
    capacity drops tokens."""
    from moesys_compile.passes.decompose_moe import slot_capacity
    if not ctx.annotation.symbolic:
        return {}, f"shapes are static ({ctx.annotation.static_reason})"
    if any(node.target is slot_capacity for node in gm.graph.nodes):
        return {}, ("an MoE layer has a capacity_factor: which tokens it drops depends on the whole batch "
                    "(set Plan.capacity_factor=0 for dropless inference)")
    reads_inputs: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(i in reads_inputs for i in node.all_input_nodes):
            reads_inputs.add(node)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    result, aux_loss = output.args[0]
    join: dict[fx.Node, str] = {}
    for node, name in _output_nodes(result).items():
        val = node.meta.get("val")
        if node not in reads_inputs:
            join[node] = "first"
        elif builds_structure(node):
            join[node] = "fields"
        elif isinstance(val, torch.Tensor) and val.dim() >= 1 and _batch_leading(ctx.annotation.expr(val.shape[0])):
            join[node] = "cat"
        else:
            shape = tuple(val.shape) if isinstance(val, torch.Tensor) else type(val).__name__
            return {}, f"the output {name} ({shape}) does not have the batch as its first dimension"
    if isinstance(aux_loss, fx.Node):
        join.setdefault(aux_loss, "drop")
    return join, None


def builds_structure(node: fx.Node) -> bool:
    """A node that builds a namedtuple or a dataclass (how fx records a model returning one)."""
    target = node.target
    return node.op == "call_function" and isinstance(target, type) and (
        (issubclass(target, tuple) and hasattr(target, "_fields")) or dataclasses.is_dataclass(target))


def _output_nodes(structure: Any) -> dict[fx.Node, str]:
    """The nodes of an output structure, each with its name for a refusal; inside a namedtuple or
    dataclass it builds, the nodes of its fields too (after it), named by the field."""
    named: dict[fx.Node, str] = {}

    def visit(node: fx.Node, name: str) -> None:
        named.setdefault(node, name)
        if builds_structure(node):
            rebuild((node.args, node.kwargs), lambda leaf, path: visit(leaf, f"{name}.{_field_name(node, path)}"))
    rebuild(structure, lambda node, _: visit(node, node.name))
    return named


def _field_name(node: fx.Node, path: tuple) -> str:
    """The field of a namedtuple or dataclass at ``path`` in the ``(args, kwargs)`` that built it."""
    kind, key, *inner = path
    field = node.target._fields[key] if kind == 0 else key
    return field + "".join(f"[{i!r}]" for i in inner)


def rebuild(structure: Any, fn, path: tuple = ()) -> Any:
    """``structure`` (node arguments: tuples, namedtuples, lists and dicts holding nodes) with
    each node replaced by ``fn(node, path)``, ``path`` being its indices and keys in it, in the
    plain containers a model's own code returns (fx holds node arguments as ``immutable_list`` and
    ``immutable_dict``, which refuse the caller's changes)."""
    if isinstance(structure, fx.Node):
        return fn(structure, path)
    if isinstance(structure, dict):
        return {key: rebuild(value, fn, (*path, key)) for key, value in structure.items()}
    if isinstance(structure, (tuple, list)):
        items = [rebuild(value, fn, (*path, i)) for i, value in enumerate(structure)]
        if isinstance(structure, list):
            return items
        return type(structure)(*items) if hasattr(structure, "_fields") else tuple(items)
    return structure


def _built_from(node: fx.Node, value: Any) -> tuple[tuple, dict]:
    """The ``(args, kwargs)`` with which ``node`` built ``value``, a namedtuple or dataclass, read
    back from its fields."""
    names = value._fields if isinstance(value, tuple) else [field.name for field in dataclasses.fields(value)]
    return tuple(getattr(value, name) for name in names[:len(node.args)]), \
        {name: getattr(value, name) for name in node.kwargs}


def _at(value: Any, path: tuple) -> Any:
    for key in path:
        value = value[key]
    return value


def split_batch(value: Any, batch: int, bounds: list[tuple[int, int]]) -> Any:
    """A graph input as ``Slices`` when its first dimension is the call's batch (others, such as
    a broadcast [1, S] mask or an int, go whole to every micro-batch)."""
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
        return Slices(value[lo:hi] for lo, hi in bounds)
    return value


def _gather(into: Slices, value: torch.Tensor, bounds: list[tuple[int, int]], index: int) -> torch.Tensor:
    """Copy micro-batch ``index`` of a graph output into the whole output (allocated at the
    first), so that joining the slices allocates nothing; returns the view standing for it."""
    lo, hi = bounds[index]
    rows = value.shape[0] // (hi - lo)           # per sequence: 1, or S for [B*S, ...] outputs
    if into.whole is None:
        into.whole = value.new_empty((rows * bounds[-1][1], *value.shape[1:]))
    return into.whole[rows * lo:rows * hi].copy_(value)


def collect_slice(into: Slices, node: fx.Node, value: Any, bounds: list[tuple[int, int]], index: int,
                  join: dict[fx.Node, str], given: dict[fx.Node, Any]) -> Any:
    """Micro-batch ``index`` of the section output ``node``, to append to ``into``: gathered into
    the whole output where it joins by "cat" (``_gather``); a namedtuple or dataclass field by
    field into ``into.fields`` and built again from what was kept (so that it holds no slice's
    tensors twice), where a field the section was ``given`` whole (an earlier section's output)
    keeps that value's slices."""
    how = join.get(node)
    if how == "cat":
        return _gather(into, value, bounds, index)
    if how != "fields":
        return value
    fields = into.fields = {} if into.fields is None else into.fields
    built = _built_from(node, value)

    def collect_field(leaf: fx.Node, path: tuple) -> Any:
        if isinstance(given.get(leaf), Slices):
            fields[path] = given[leaf]
            return given[leaf][index]
        field = fields.setdefault(path, Slices())
        field.append(collect_slice(field, leaf, _at(built, path), bounds, index, join, given))
        return field[-1]
    args, kwargs = rebuild((node.args, node.kwargs), collect_field)
    return node.target(*args, **kwargs)


def join_output(node: fx.Node, value: Any, join: dict[fx.Node, str]) -> Any:
    """The value of the graph output ``node`` after micro-batches (``join_slices``); a namedtuple
    or dataclass is built again from its fields, each joined as its own node."""
    how = join.get(node, "cat")
    if how != "fields" or not isinstance(value, Slices):
        return join_slices(value, how)
    args, kwargs = rebuild((node.args, node.kwargs), lambda leaf, path: join_output(leaf, value.fields[path], join))
    return node.target(*args, **kwargs)


def join_slices(value: Any, how: str) -> Any:
    if not isinstance(value, Slices):
        return value
    if how == "cat":
        return value.whole if value.whole is not None else torch.cat(value, dim=0)
    return value[0] if how == "first" else None


# ---------------------------------------------------------------------------------------------
# sizing a call: its activations in B and S, and the micro-batches that fit the workspace
# ---------------------------------------------------------------------------------------------


class CallSizer:
    """Activation estimates and micro-batch slicing of one lowered graph's calls, in B and S, from
    its annotation: no device memory, so sizing a call needs no ring, and every ring built for the
    graph (``call_sizer``) shares one."""

    def __init__(self, gm: fx.GraphModule, ctx):
        self.layout: RingLayout = ctx.extras["ring"]
        self.annotation = ctx.annotation
        exprs = [sympy.sympify(e) for e in activation_exprs(gm, ctx)]
        unique = list(dict.fromkeys(exprs))            # repeated layers repeat their expressions
        position = {e: i for i, e in enumerate(unique)}
        self.act_index = [position[e] for e in exprs]
        self.act_fn = size_function(unique)
        self.scratch = [(i, size_function(e)) for i, e in enumerate(scratch_exprs(gm)) if e]
        self.liveness = liveness_plan(gm)
        self._act_cache: dict[tuple[int, int], int] = {}
        self.section_of = list(node_sections(gm, len(self.layout.sections)).values())
        self.join, self.no_split = micro_batch_plan(gm, ctx)
        self.node_index = {node: i for i, node in enumerate(gm.graph.nodes)}
        self._split_cache: dict[tuple[int, int], tuple[list[tuple[int, int]], int]] = {}

    def node_bytes(self, batch: int, seq: int) -> tuple[list[int], dict[int, int]]:
        """Per node: the bytes it allocates, and its kernel's scratch, at (batch, seq)."""
        values = self.act_fn(batch, seq)
        return [int(values[i]) for i in self.act_index], {i: int(fn(batch, seq)) for i, fn in self.scratch}

    def activation_bytes(self, flat_inputs: list) -> int:
        """Estimated peak live activation bytes of a call (inputs' batch and sequence length)."""
        return self.activation_bytes_at(*self.annotation.batch_and_seq(flat_inputs))

    def activation_bytes_at(self, batch: int, seq: int) -> int:
        key = (batch, seq)
        if key not in self._act_cache:
            own, scratch = self.node_bytes(*key)     # scratch: kernels' temporaries, while they run
            self._act_cache[key] = peak_live_bytes(own, *self.liveness, scratch)
        return self._act_cache[key]

    def workspace_ahead(self, flat_inputs: list) -> Optional[int]:
        """The activation bytes at the call's batch and sequence rounded up to powers of two: a
        ring lowered with that workspace also takes the next calls of a growing size (None with
        static shapes, whose estimate does not grow)."""
        if not self.annotation.symbolic:
            return None
        batch, seq = self.annotation.batch_and_seq(flat_inputs)
        ahead = self.activation_bytes_at(power_of_two_at_least(batch), power_of_two_at_least(seq))
        return ahead if ahead <= self.largest_workspace else None

    @property
    def largest_workspace(self) -> int:
        """The most workspace a ring of this graph can have: the budget beside the smallest slots
        and the resident state."""
        return self.layout.budget - (self.layout.min_budget - self.layout.workspace)

    def micro_batches(self, batch: int, seq: int, whole: int) -> tuple[list[tuple[int, int]], int]:
        """Slices of a batch whose activations (``whole`` bytes at once) exceed the workspace,
        each section running over one slice at a time while its weights sit in the slot: the
        values carried between sections are held for the whole batch, a section's temporaries
        for one slice. Returns the slices' bounds and the estimated peak; raises
        ``RingBudgetError`` when even one sequence at a time does not fit."""
        key = (batch, seq)
        if key in self._split_cache:
            return self._split_cache[key]
        fix = (f"compile with example inputs as large as this call (the ring was sized at batch "
               f"{self.layout.example_shape[0]}, seq {self.layout.example_shape[1]}: a {self.layout.workspace}-byte "
               f"workspace = device_budget {self.layout.budget} - {self.layout.slots} slots x {self.layout.slot_bytes} "
               f"bytes), or set Plan.options['ring_workspace']")
        if self.no_split is not None or batch == 1:
            why = "it is a single sequence" if batch == 1 else f"it cannot run in micro-batches: {self.no_split}"
            reason = (f"this call (batch {batch}, seq {seq}) needs about {whole} bytes of activations, more than the "
                      f"{self.layout.workspace}-byte workspace, and {why}")
            raise RingBudgetError(f"{reason}; {fix}", reason)
        roots, frees = self.liveness
        count = len(self.layout.sections)
        full = self.node_bytes(batch, seq)[0]
        gathered = frozenset(roots[self.node_index[node]] for node, how in self.join.items() if how == "cat")

        def peak(size: int) -> int:
            own, scratch = self.node_bytes(size, seq)
            held = carried_bytes(full, roots, frees, self.section_of, count, own, gathered)
            inside = slice_peaks(own, roots, frees, self.section_of, count, scratch)
            return max(h + i for h, i in zip(held, inside))
        if peak(1) > self.layout.workspace:
            reason = (f"this call (batch {batch}, seq {seq}) needs about {whole} bytes of activations, and about "
                      f"{peak(1)} even one sequence at a time (the values carried between sections are held for "
                      f"the whole batch)")
            raise RingBudgetError(f"{reason}; {fix}", reason, sliced_bytes=peak(1))
        low, high = 1, batch - 1          # the largest slice that fits: peak grows with it
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if peak(middle) <= self.layout.workspace else (low, middle - 1)
        bounds = [(start, min(start + low, batch)) for start in range(0, batch, low)]
        self._split_cache[key] = bounds, peak(low)
        return self._split_cache[key]

    def plan_call(self, flat_inputs: list, check_shapes: bool = True) -> tuple[list[tuple[int, int]], int]:
        """The micro-batches of a call (one slice: the whole batch) and its estimated activation
        bytes; raises ``RingBudgetError`` when it cannot run within the budget (unless
        ``check_shapes`` is off: the caller vouches for the sizes)."""
        activations = self.activation_bytes(flat_inputs)
        batch, seq = self.annotation.batch_and_seq(flat_inputs)
        if not check_shapes:
            return [(0, batch)], activations
        self._check_static_shapes(flat_inputs)
        if activations <= self.layout.workspace:
            return [(0, batch)], activations
        return self.micro_batches(batch, seq, activations)

    def _check_static_shapes(self, flat_inputs: list) -> None:
        """Without symbolic shapes the activation estimate is the example's at every size: a call
        larger than the example is refused rather than run past the budget unseen."""
        annotation = self.annotation
        if annotation.symbolic:
            return
        batch, seq = annotation.batch_and_seq(flat_inputs)
        if batch > annotation.example_batch or seq > annotation.example_seq:
            reason = (f"this call (batch {batch}, seq {seq}) is larger than the example the ring was compiled with "
                      f"(batch {annotation.example_batch}, seq {annotation.example_seq}), and its activations cannot "
                      f"be estimated: shapes are static because symbolic shape propagation failed "
                      f"({annotation.static_reason})")
            raise RingBudgetError(f"{reason}; compile with example inputs as large as the largest call", reason)


def call_sizer(gm: fx.GraphModule, ctx) -> CallSizer:
    """The graph's ``CallSizer``, made once per lowering."""
    if "call_sizer" not in ctx.extras:
        ctx.extras["call_sizer"] = CallSizer(gm, ctx)
    return ctx.extras["call_sizer"]
