"""ring_dtype: a graph's values in the dtypes the ring computes them in.

The ring stores every floating tensor of the model in ``Plan.dtype`` (``ring_partition``), so a
model captured in another dtype computes in other dtypes there: a bfloat16 model run with
``dtype="float32"`` has float32 activations, twice the bytes the capture's values say. The
activation workspace, ``peak_device_bytes`` and the micro-batches of a call are estimated from
the values, so ``ring_partition`` first propagates them again with the model's floating tensors
and the floating graph inputs (a decoding cache) in the plan's dtype. The model's own casts keep
their dtype, as they do when the ring runs (``x.float()`` in a norm, ``softmax(..., dtype=torch.float32)``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import sympy
import torch
import torch.fx as fx

from moesys_compile.errors import PassError, PlanError
from moesys_compile.frontend.annotation import CostModel, MemoFakeProp, bound_unbacked_sizes, symbolic_propagation
from moesys_compile.ir import moesys_meta, tensors_in
from moesys_compile.passes.ring_units import model_tensor_ids, node_state


class RingDtypeError(PassError, PlanError):
    """The model cannot compute in ``Plan.dtype``. A PassError (the pass runner lets it through
    unchanged) and a PlanError (the plan is what has to change)."""


class RingDtypeProp(MemoFakeProp):
    """Fake propagation with the model's floating tensors (``model_ids``) in ``dtype``, as the
    ring's slots hold them; the compiler's own tensors keep theirs, as they do in the ring."""

    def __init__(self, gm: fx.GraphModule, mode, home: torch.device, dtype: torch.dtype, model_ids: set[int]):
        super().__init__(gm, mode, home)
        self.dtype, self.model_ids = dtype, model_ids

    def converts(self, t: torch.Tensor) -> bool:
        return id(t) in self.model_ids and t.is_floating_point() and t.dtype != self.dtype

    def fake(self, t: torch.Tensor) -> torch.Tensor:
        value = super().fake(t)
        return value.to(self.dtype) if self.converts(t) else value

    def leaf_state(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype) if self.converts(t) else t


def _in_dtype(value: Any, dtype: torch.dtype, mode) -> Any:
    """A floating graph input as the ring is given it: in the dtype it computes in."""
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
        with mode:
            return value.to(dtype)
    return value


def ring_values_differ(gm: fx.GraphModule, ctx) -> bool:
    """Whether the ring computes in other dtypes than the capture: ``Plan.dtype`` is set and a
    floating model tensor the graph reads, or a floating graph input, has another dtype."""
    dtype = ctx.plan.torch_dtype
    if dtype is None:
        return False
    model_ids = model_tensor_ids(ctx.model)
    state = [t for node in gm.graph.nodes for t in node_state(gm, node).values() if id(t) in model_ids]
    inputs = [t for node in gm.graph.nodes if node.op == "placeholder" for t in tensors_in(node.meta.get("val"))]
    return any(t.is_floating_point() and t.dtype != dtype for t in state + inputs)


def propagate_in_ring_dtype(gm: fx.GraphModule, ctx) -> Optional[torch.dtype]:
    """Propagate every ``meta["val"]`` again with the model's floating tensors and the floating
    graph inputs in ``Plan.dtype`` (in the annotation's fake mode, so sizes stay symbolic), bound
    the data-dependent sizes that makes, and make each node's activation bytes those of its values
    now (``activation_in_ring_dtype``). Returns the dtype, or None where nothing differs
    (``ring_values_differ``). Raises ``RingDtypeError`` (a ``PlanError``) naming the node where the
    model cannot compute in that dtype."""
    if not ring_values_differ(gm, ctx):
        return None
    dtype, mode = ctx.plan.torch_dtype, ctx.annotation.fake_mode
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    inputs = [_in_dtype(node.meta.get("val"), dtype, mode) for node in placeholders]
    home = next((t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    before = {node: list(tensors_in(node.meta.get("val"))) for node in gm.graph.nodes}
    prop = RingDtypeProp(gm, mode, home, dtype, model_tensor_ids(ctx.model))
    try:
        with symbolic_propagation():
            prop.propagate_dont_convert_inputs(*inputs)
    except Exception as exc:
        node = prop.current
        where = "the graph" if node is None else f"node '{node.name}' (module {moesys_meta(node).get('module')})"
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise RingDtypeError("ring_partition", ctx.passes_run, PlanError(
            f"dtype ({ctx.plan.dtype!r}): the model cannot compute with its weights in {ctx.plan.dtype}, at {where}: "
            f"{type(exc).__name__}: {first_line}; cast the model first (model.to(torch.{ctx.plan.dtype})) and check "
            f"that it runs, or drop Plan.dtype")) from exc
    bound_unbacked_sizes(gm, ctx.annotation)
    costs = CostModel(gm, ctx.annotation)
    for node, was in before.items():
        cost = moesys_meta(node).get("cost")
        if cost is not None:     # a new Cost: the snapshots of earlier passes hold the old one
            moesys_meta(node)["cost"] = dataclasses.replace(
                cost, activation_bytes=activation_in_ring_dtype(costs, node, was, cost.activation_bytes))
    return dtype


def activation_in_ring_dtype(costs: CostModel, node: fx.Node, was: list[torch.Tensor], activation_bytes):
    """The activation bytes of ``node`` with its values now in the ring's dtypes (``was``: its
    values before): the bytes of its outputs where it counted those, else its own bytes scaled by
    the largest ratio of itemsizes among its outputs (never below what the ring allocates)."""
    if activation_bytes == sum((costs.numel(t) * t.element_size() for t in was), sympy.Integer(0)):
        return costs.out_bytes(node)
    ratios = [sympy.Rational(now.element_size(), old.element_size())
              for old, now in zip(was, tensors_in(node.meta.get("val")))]
    return activation_bytes * max(ratios, default=1)
