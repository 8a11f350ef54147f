"""RingProgram: inference of a model whose weights do not fit the device budget.

The lowered graph (cut by ``ring_partition``, scheduled by ``schedule_prefetch``) is split into
one GraphModule per section. A section module owns no weights: its ``get_attr`` tensors and the
parameters of its leaf modules are views into the section's slot, filled by the ring executor
from the storage tier just before the section runs.

    >>> plan = mc.Plan(mode="infer", device_budget="64MiB", weights="disk", offload_dir="/tmp/ring")
    >>> program = mc.compile(model, plan, example_inputs=(ids,))          # doctest: +SKIP
    >>> logits = program(ids); program.stats["efficiency"]                 # doctest: +SKIP
    >>> program.generate(ids, max_new_tokens=16)                           # doctest: +SKIP

The activation workspace inside the budget is sized from the example inputs
(``Plan.options["ring_workspace"]`` sets it explicitly). A call whose activations exceed it
runs in micro-batches through the same ring (each section over slices of the batch while its
weights sit in the slot: the weights still move once per call); a call too large for that gets
the graph lowered again at its own size (a larger workspace, smaller slots: for the call rounded
up to powers of two, for the call, or else for micro-batches of it), which serves the calls after
it; only a call no ring within the budget can hold is refused. ``options["progress"]``
shows a progress bar while the weights are staged; ``Plan.weights_checkpoint`` stages from a
checkpoint directory instead of the model's own tensors.
"""

from __future__ import annotations

import dataclasses
import difflib
import operator
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from moesys_compile.ir import fetch
from moesys_compile.passes.ring_partition import RingBudgetTooSmall, RingLayout
from moesys_compile.passes.ring_units import ALIGN, node_state

from ..errors import UntraceableModelError, warn_user
from ..frontend.tracing import TURN_LOCK
from ..runtime.ring import Copy, RingExecutor, SectionLoad, SlotPool, coalesce
from ..runtime.sources import checkpoint_source, named_tensors, sliced
from ..runtime.storage import WeightStore, stage
from .base import Program
from .binding import CapturedSizeError
from .ring_calls import (RingBudgetError, Slices, call_sizer, collect_slice, join_output, node_sections, rebuild,
                         split_batch)
from .staged_weights import RingWeightsError, StagedWeights


# the Plan.options keys ring inference reads (ring_partition: the workspace; staging: the bar)
RING_OPTIONS = ("progress", "ring_workspace")


def warn_unknown_options(options: dict) -> None:
    """A mistyped ``Plan.options`` key would otherwise be ignored without a word."""
    for key in sorted(set(options) - set(RING_OPTIONS), key=str):
        near = difflib.get_close_matches(str(key), RING_OPTIONS, n=1)
        warn_user(f"Plan.options[{key!r}] is not an option of ring inference and is ignored"
                  + (f"; did you mean {near[0]!r}?" if near else "") + f" (known options: {', '.join(RING_OPTIONS)})")


@dataclass
class Section:
    index: int
    slot: int
    module: fx.GraphModule
    inputs: list[fx.Node]          # values the section reads from earlier sections / graph inputs
    outputs: list[fx.Node]         # values later sections (or the graph output) read
    load: SectionLoad


def canonical_names(model: nn.Module) -> dict[int, str]:
    """id(tensor) -> the model's first name for it (the storage key shared by every program)."""
    names: dict[int, str] = {}
    for name, t in named_tensors(model).items():
        names.setdefault(id(t), name)
    return names


def stream_keys(gm: fx.GraphModule, layout: RingLayout, names: dict[int, str]) -> dict[int, str]:
    """``names`` plus the expert-group slices the pass registered: ``w_up[lo:hi]`` keys."""
    keys = dict(names)
    for attr, (base, lo, hi) in layout.slices.items():
        keys[id(getattr(gm, attr))] = f"{names[id(fetch(gm, base))]}[{lo}:{hi}]"
    return keys


# ---------------------------------------------------------------------------------------------
# slot layout and section modules
# ---------------------------------------------------------------------------------------------


def slot_layout(keys: list[str], store: WeightStore, slot_bytes: int) -> dict[str, int]:
    """Byte offset in the slot of every tensor. When the section's tensors are one run of one
    storage buffer (what staging writes), mirror that run so the load is a single copy."""
    locations = sorted((store[k] for k in dict.fromkeys(keys)), key=lambda loc: loc.offset)
    keyed = {id(store[k]): k for k in keys}
    if locations and all(loc.buffer is locations[0].buffer for loc in locations):
        base = locations[0].offset
        span = locations[-1].offset + locations[-1].nbytes - base
        itemsize_ok = all((loc.offset - base) % loc.dtype.itemsize == 0 for loc in locations)
        if itemsize_ok and span <= slot_bytes:
            return {keyed[id(loc)]: loc.offset - base for loc in locations}
    offsets, cursor = {}, 0
    for loc in locations:
        offsets[keyed[id(loc)]] = cursor
        cursor += -(-loc.nbytes // ALIGN) * ALIGN
    return offsets


def _attach(root: nn.Module, path: str, value: Any) -> None:
    """Put ``value`` (a module stub or a slot view) at ``path`` in ``root``. A section may both call
    a leaf module and read one of its tensors (``self.emb(ids) * s.to(self.emb.weight.dtype)``),
    in either order: a stub replaces the plain module an earlier read made (it holds that tensor
    too), and a tensor the stub holds already is left as it is (the same slot view)."""
    *parents, leaf = path.split(".")
    module = root
    for part in parents:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    if isinstance(value, nn.Module):
        module.add_module(leaf, value)
    elif leaf not in module._parameters and leaf not in module._buffers:
        module.register_buffer(leaf, value, persistent=False)


def stub_module(module: nn.Module, prefix: str, tensor_for) -> nn.Module:
    """A shallow copy of ``module`` whose parameters and buffers are the tensors ``tensor_for``
    gives (slot views), in eval mode as the ring computes (whatever mode the model is in when the
    sections are built); the original module and its weights are left untouched."""
    stub = object.__new__(type(module))      # copy.copy's shallow copy, which a parametrized module refuses
    stub.__dict__.update(module.__dict__)
    stub.training = False
    stub._parameters = OrderedDict(
        (name, None if p is None else nn.Parameter(tensor_for(f"{prefix}.{name}", p), requires_grad=False))
        for name, p in module._parameters.items())
    stub._buffers = OrderedDict((name, None if b is None else tensor_for(f"{prefix}.{name}", b))
                                for name, b in module._buffers.items())
    stub._modules = OrderedDict((name, None if child is None else stub_module(child, f"{prefix}.{name}", tensor_for))
                                for name, child in module._modules.items())
    return stub


def release_inputs(inputs: list) -> None:
    """Empties a section's list of inputs once the section has taken them (see ``section_module``)."""
    inputs.clear()


def section_module(gm: fx.GraphModule, nodes: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node],
                   tensor_for) -> fx.GraphModule:
    """The section's nodes as a module called with one list of its inputs, which it empties before
    it computes: the generated code then frees each input after its last use, as the ring's
    activation accounting assumes, where positional arguments would stay alive in the caller until
    the whole section returned."""
    graph = fx.Graph()
    boxed = graph.placeholder("inputs")
    env = {node: graph.call_function(operator.getitem, (boxed, i)) for i, node in enumerate(inputs)}
    graph.call_function(release_inputs, (boxed,))
    root = nn.Module()
    for node in nodes:
        target = str(node.target)
        if node.op == "get_attr" and isinstance(fetch(gm, target), nn.Module):   # sub-graph of a higher-order op
            _attach(root, target, stub_module(fetch(gm, target), target, tensor_for))
        elif node.op == "get_attr":
            _attach(root, target, tensor_for(target, node_state(gm, node)[target]))
        elif node.op == "call_module":
            _attach(root, target, stub_module(gm.get_submodule(target), target, tensor_for))
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[node] for node in outputs))
    return fx.GraphModule(root, graph, class_name="RingSection")


def section_nodes(gm: fx.GraphModule, count: int) -> list[list[fx.Node]]:
    """Nodes of each section, in graph order (see ``node_sections``)."""
    groups: list[list[fx.Node]] = [[] for _ in range(count)]
    for node, index in node_sections(gm, count).items():
        if 0 <= index < count:
            groups[index].append(node)
    return groups


# ---------------------------------------------------------------------------------------------
# one lowered graph, run through the ring
# ---------------------------------------------------------------------------------------------


class RingRuntime:
    """Sections, slot pool and executor of one lowered graph over a shared weight store."""

    def __init__(self, gm: fx.GraphModule, ctx, store: WeightStore, device: torch.device, names: dict[int, str],
                 reservoir: Optional[torch.Tensor] = None):
        self.layout: RingLayout = ctx.extras["ring"]
        self.gm, self.ctx, self.device = gm, ctx, device
        self.pool = SlotPool(self.layout.slots, self.layout.slot_bytes, device, reservoir)
        self.resident_bytes = sum(self.layout.resident.values())
        self.sections = self._split(gm, store, stream_keys(gm, self.layout, names))
        self.executor = RingExecutor([s.load for s in self.sections], self.pool)
        self._finalizer = weakref.finalize(self, RingExecutor.close, self.executor)
        self.output_node = next(n for n in gm.graph.nodes if n.op == "output")
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self._drop_after = self._drops()
        self.sizer = call_sizer(gm, ctx)
        self.check_shapes = True

    def _split(self, gm: fx.GraphModule, store: WeightStore, names: dict[int, str]) -> list[Section]:
        sections = []
        for index, nodes in enumerate(section_nodes(gm, len(self.layout.sections))):
            slot = index % self.layout.slots
            members = set(nodes)
            inputs = list(dict.fromkeys(i for n in nodes for i in n.all_input_nodes if i not in members))
            outputs = [n for n in nodes if any(u not in members for u in n.users)]
            state = {name: t for n in nodes for name, t in node_state(gm, n).items()}
            keys = {name: names[id(t)] for name, t in state.items() if id(t) in names}
            offsets = slot_layout(list(keys.values()), store, self.pool.slot_bytes)
            end = max((offsets[k] + store[k].nbytes for k in offsets), default=0)
            if end > self.pool.slot_bytes:
                raise RingBudgetError(f"section {index} needs {end} bytes but a slot has {self.pool.slot_bytes}; a pass "
                                      f"after ring_partition added weights to it ({sorted(keys)[:4]} ...)")
            module = section_module(gm, nodes, inputs, outputs, self._tensor_for(store, keys, offsets, slot))
            copies = [Copy(store[k].buffer, store[k].offset, offsets[k], store[k].nbytes) for k in offsets]
            files = list({id(f): f for f in (store[k].file for k in offsets) if f is not None}.values())
            load = SectionLoad(slot, coalesce(copies), files)
            sections.append(Section(index, slot, module, inputs, outputs, load))
        return sections

    def _tensor_for(self, store: WeightStore, keys: dict[str, str], offsets: dict[str, int], slot: int):
        """Streamed state -> a view of the slot; compiler-owned (resident) state -> itself."""
        buffer = self.pool.buffers[slot]

        def tensor_for(name: str, original: torch.Tensor) -> torch.Tensor:
            if name not in keys:
                return original.to(self.device)
            loc, start = store[keys[name]], offsets[keys[name]]
            return buffer[start:start + loc.nbytes].view(loc.dtype).view(loc.shape)
        return tensor_for

    def _drops(self) -> list[list[fx.Node]]:
        """Per section: the carried values no later section (nor the output) reads."""
        last: dict[fx.Node, int] = {}
        for section in self.sections:
            for node in section.inputs:
                last[node] = section.index
        keep = set(self.output_node.all_input_nodes)
        drops: list[list[fx.Node]] = [[] for _ in self.sections]
        for node, index in last.items():
            if node not in keep:
                drops[index].append(node)
        return drops

    def plan_call(self, flat_inputs: list) -> tuple[list[tuple[int, int]], int]:
        """The micro-batches of a call (one slice: the whole batch) and its estimated activation
        bytes (``CallSizer.plan_call``; sizes unchecked after ``check_shapes = False``)."""
        return self.sizer.plan_call(flat_inputs, self.check_shapes)

    def __call__(self, flat_inputs: list, call_plan: Optional[tuple[list[tuple[int, int]], int]] = None
                 ) -> tuple[Any, dict]:
        """Run a call through the ring; ``call_plan``: what ``plan_call`` returned for it, if asked
        already."""
        executor = self.executor
        executor.begin_call()      # the wall covers the whole call: checks, inputs, sections, output
        bounds, activations = call_plan or self.plan_call(flat_inputs)
        batch = bounds[-1][1]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            baseline = torch.cuda.memory_allocated(self.device) - self.pool.nbytes   # slots count, the rest is not ours
        env = {node: _to_device(value, self.device) for node, value in zip(self.placeholders, flat_inputs)}
        if len(bounds) > 1:
            env = {node: split_batch(value, batch, bounds) for node, value in env.items()}
        with torch.no_grad():      # outputs the caller may change in place, as a model's under no_grad
            try:
                for section in self.sections:
                    inputs = [env[n] for n in section.inputs]
                    for node in self._drop_after[section.index]:   # the section holds the last reference
                        env.pop(node, None)
                    # no local name for the outputs: it would keep them alive through the next section
                    env.update(zip(section.outputs, executor.run(section.index, self._run_section, section,
                                                                 bounds, inputs)))
            except BaseException:
                executor.skip_rest_of_pass()
                raise
        output = rebuild(self.output_node.args[0], lambda node, _: join_output(node, env[node], self.sizer.join))
        call = executor.end_call()
        stats = self._stats(call, activations)
        stats["micro_batches"] = len(bounds)
        stats["compiled_for"] = self.layout.example_shape
        if self.device.type == "cuda":
            stats["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device) - baseline
        return output, stats

    def _run_section(self, section: Section, bounds: list[tuple[int, int]], inputs: list) -> tuple:
        """Run one section on the list of its inputs, which the section module empties — once per
        micro-batch (``bounds``) when an input comes in ``Slices``: then each slice's list is
        emptied, and the whole-batch ``Slices`` stay until the section returns —; outputs that view
        its slot (e.g. slices of a weight) are copied out before the slot is handed back to the copy
        thread."""
        count = next((len(a) for a in inputs if isinstance(a, Slices)), 0)
        if count:
            outputs = [Slices() for _ in section.outputs]
            given = dict(zip(section.inputs, inputs))
            for i in range(count):
                values = self._run_section(section, bounds, [a[i] if isinstance(a, Slices) else a for a in inputs])
                for node, into, value in zip(section.outputs, outputs, values):
                    into.append(collect_slice(into, node, value, bounds, i, self.sizer.join, given))
            return tuple(outputs)
        values = section.module(inputs)
        return tuple(v.clone() if isinstance(v, torch.Tensor) and self.pool.owns(v) else v for v in values)

    def _stats(self, call, activations: int) -> dict:
        bound = max(call.transfer_seconds, call.compute_seconds)
        return {
            "peak_device_bytes": self.pool.nbytes + self.resident_bytes + activations,
            "budget_bytes": self.layout.budget, "slots": self.layout.slots, "slot_bytes": self.layout.slot_bytes,
            "sections": len(self.sections), "activation_bytes": activations,
            "bytes_moved": call.bytes_moved, "transfer_seconds": call.transfer_seconds,
            "compute_seconds": call.compute_seconds, "stall_seconds": call.stall_seconds,
            "wall_seconds": call.wall_seconds, "efficiency": bound / call.wall_seconds if call.wall_seconds else 0.0,
            "total_bytes_moved": self.executor.total_bytes_moved,
        }

    def close(self) -> None:
        self._finalizer()


def _innermost_cause(error: BaseException) -> BaseException:
    """The error at the end of ``error``'s chain of causes (torch's own, under this package's)."""
    seen = {id(error)}
    while error.__cause__ is not None and id(error.__cause__) not in seen:
        error = error.__cause__
        seen.add(id(error))
    return error


def _to_device(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


# ---------------------------------------------------------------------------------------------
# the program
# ---------------------------------------------------------------------------------------------


class RingProgram(Program):
    """``program(*args)`` runs the model through the memory ring, at any batch and sequence length
    the budget can hold; ``program.stats`` describes the last call (``micro_batches``: slices of
    the batch it ran in — after more than one, ``program.aux_loss``, a mean over the whole batch,
    is None; ``compiled_for``: the example size of the ring it ran on); ``program.generate(ids,
    n)`` decodes greedily with a KV cache (see ``generate``)."""

    def __init__(self, gm: fx.GraphModule, ctx):
        super().__init__(gm, ctx)
        plan = ctx.plan
        warn_unknown_options(plan.options)
        self.device = torch.device(plan.device)
        if self.device.type == "cuda" and self.device.index is None:   # the copy thread selects it by index
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.names = canonical_names(ctx.model)
        layout: RingLayout = ctx.extras["ring"]
        checkpoint = plan.weights_checkpoint
        self.staged = None if checkpoint else StagedWeights(ctx.model)     # the model's tensors, watched
        self.source = sliced(checkpoint_source(checkpoint, ctx.model) if checkpoint else self.staged.source())
        groups = [self._keys(gm, layout, section.state) for section in layout.sections]
        self.store = stage(groups, self.source, plan.weights, plan.offload_dir, layout.dtype,
                           pin=self.device.type == "cuda", progress=bool(plan.options.get("progress", False)))
        self._runtimes: dict[Any, RingRuntime] = {}
        self._forward_key, self._forward_graph = "forward", (gm, ctx)
        self.stats: dict = {}
        # calls take turns with those of every other ring program and with every capture, process-wide
        # (the ring runs one pass at a time; fx tracing patches nn.Module.__call__): see TURN_LOCK
        self._lock = TURN_LOCK

    def _keys(self, gm: fx.GraphModule, layout: RingLayout, state_names) -> list[str]:
        keys = stream_keys(gm, layout, self.names)
        return [keys[id(fetch(gm, name))] for name in state_names]

    def runtime(self, key: Any, lowered: tuple) -> RingRuntime:
        """The ring of one lowered graph; only one ring holds device slots at a time. A switch
        hands the slot memory over when the new ring's slots fit in it and the budget still holds
        with it (``generate``'s prefill and step graphs share one layout for that)."""
        reservoir = None
        for other in [k for k in self._runtimes if k != key]:   # every other: an interrupted switch left one
            closed = self._runtimes.pop(other)
            closed.close()
            reservoir = closed.pool.reservoir
        if key not in self._runtimes:
            gm, ctx = lowered
            layout = ctx.extras["ring"]
            for section in layout.sections:      # another graph may slice experts differently
                self.store.add(self._keys(gm, layout, section.state), self.source, layout.dtype,
                               pin=self.device.type == "cuda")
            room = layout.budget - sum(layout.resident.values()) - layout.workspace
            if reservoir is not None and not layout.slots * layout.slot_bytes <= reservoir.numel() <= room:
                reservoir = None                 # freed before the new slots are allocated
            self._runtimes[key] = RingRuntime(gm, ctx, self.store, self.device, self.names, reservoir)
        return self._runtimes[key]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``nn.Module.__call__`` taken in turn: while another thread traces, torch.fx has patched it,
        so the lock is taken before it runs, not only in ``forward``."""
        with self._lock:
            return super().__call__(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self._check_weights_unchanged()
            before = (self._forward_key, self._forward_graph)
            runtime, flat_inputs, call_plan = self._runtime_for_call(args, kwargs)
            try:
                (output, aux_loss), self.stats = runtime(flat_inputs, call_plan)
            except BaseException as exc:          # an interrupt too: the program stays as it was
                self._forward_kept(before)
                refusal_of_dtype = self._input_of_another_dtype(args, kwargs, exc) if isinstance(exc, Exception) \
                    else None
                if refusal_of_dtype is None:
                    raise
                raise refusal_of_dtype from exc
            self.aux_loss = aux_loss
            return self._forward_graph[1].extras["binder"].model_output(output)

    def _forward_kept(self, before: tuple) -> None:
        """After a call failed: a ring lowered for it is dropped, and the forward graph from
        ``before`` (its key and graph) serves later calls again, as if the call had not been made."""
        if self._forward_key != before[0]:
            dropped = self._runtimes.pop(self._forward_key, None)
            if dropped is not None:
                dropped.close()
            self._forward_key, self._forward_graph = before

    def _runtime_for_call(self, args: tuple, kwargs: dict) -> tuple[RingRuntime, list, tuple]:
        """The forward ring, the call's graph inputs and its ``plan_call``. A call that fits neither the compiled
        workspace nor, in micro-batches, the compiled ring gets a ring lowered for it
        (``_ring_for_call``), which then serves every later call."""
        runtime = None
        try:
            flat_inputs = self._forward_graph[1].extras["binder"].graph_inputs(args, kwargs)
            runtime = self.forward_runtime()
            return runtime, flat_inputs, runtime.plan_call(flat_inputs)
        except (RingBudgetError, CapturedSizeError) as refusal:
            ahead = runtime.sizer.workspace_ahead(flat_inputs) if isinstance(refusal, RingBudgetError) else None
            self._close_runtimes()                     # their slots are not needed while lowering
            return self._ring_for_call(args, kwargs, refusal, ahead)

    @property
    def forward_graph(self) -> tuple:
        """(gm, ctx) of the forward graph (the one compiled, or the last one lowered for a call)."""
        return self._forward_graph

    def forward_runtime(self) -> RingRuntime:
        """The ring of the forward graph (the one compiled, or the last one lowered for a call)."""
        return self.runtime(self._forward_key, self._forward_graph)

    def _ring_for_call(self, args: tuple, kwargs: dict, refusal: Exception,
                       ahead: Optional[int]) -> tuple[RingRuntime, list, tuple]:
        """The forward graph lowered at the call's size, with the first workspace whose ring takes
        the call: ``ahead`` (sized for the call rounded up to powers of two, so that a growing
        call does not lower again at every size), the whole call's, then the one a ring estimated
        for running the call in micro-batches (``RingBudgetError.sliced_bytes``: the values carried
        between sections for the whole batch plus one sequence's temporaries), the new ring's own
        estimate last. A larger workspace leaves smaller slots in the same budget."""
        from ..api import lower_prepared, prepare
        compiled = self._forward_graph[1].annotation
        workspaces, tried, causes, prepared = ([ahead] if ahead else []) + [None], [], [], None
        while workspaces and len(tried) < 4:
            workspace = workspaces.pop(0)
            looking_ahead = bool(ahead) and not tried
            tried.append(workspace)
            plan = self.plan if workspace is None else dataclasses.replace(
                self.plan, options={**self.plan.options, "ring_workspace": workspace})
            try:
                prepared = prepared or prepare(self.context.model, self.plan, args, kwargs)   # one capture
                lowered = lower_prepared(prepared, plan)
                flat_inputs = lowered[1].extras["binder"].graph_inputs(args, kwargs)
                key = ("forward", *lowered[1].annotation.batch_and_seq(flat_inputs), workspace)
                runtime = self.runtime(key, lowered)
                call_plan = runtime.plan_call(flat_inputs)
            except UntraceableModelError as exc:
                refusal_of_dtype = self._input_of_another_dtype(args, kwargs, exc)
                if refusal_of_dtype is None:
                    raise
                raise refusal_of_dtype from exc
            except (RingBudgetTooSmall, RingBudgetError) as exc:
                self._close_runtimes()
                if not looking_ahead:                  # the look-ahead is a bonus, not worth a word
                    causes.append(str(exc.cause) if isinstance(exc, RingBudgetTooSmall) else exc.reason)
                sliced = getattr(exc, "sliced_bytes", None) or getattr(refusal, "sliced_bytes", None)
                if not workspaces and sliced is not None and sliced not in tried:
                    workspaces.append(sliced)
                continue
            self._forward_key, self._forward_graph = key, lowered
            return runtime, flat_inputs, call_plan
        raise RingBudgetError(
            f"this call does not fit Plan.device_budget: the ring compiled at batch {compiled.example_batch}, seq "
            f"{compiled.example_seq} cannot take it ({getattr(refusal, 'reason', refusal)}), nor can a ring lowered "
            f"for it ({'; '.join(causes)}); pass fewer sequences per call or raise Plan.device_budget")

    def _input_of_another_dtype(self, args: tuple, kwargs: dict, failure: Exception) -> Optional[TypeError]:
        """Where lowering a ring for a call, or running it, failed (``failure``) and the call passed a
        tensor in another dtype than the program was compiled with (int16 token ids for int64 ones):
        that tensor's dtype is the cause, named with the model's own error; None where every dtype
        is the compiled one."""
        gm, ctx = self._forward_graph
        binder = ctx.extras["binder"]
        flat = binder.graph_inputs(args, kwargs)
        placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
        names = binder.traced_names if len(binder.traced_names) == len(flat) else [n.name for n in placeholders]
        for name, node, value in zip(names, placeholders, flat):
            compiled = node.meta.get("val")
            if isinstance(value, torch.Tensor) and isinstance(compiled, torch.Tensor) and value.dtype != compiled.dtype:
                cause = _innermost_cause(failure)
                return TypeError(
                    f"this call's {name} is {value.dtype}, but the program was compiled with {compiled.dtype} and "
                    f"the model cannot run on {value.dtype} ({type(cause).__name__}: {str(cause).splitlines()[0]}); "
                    f"pass {name} as {compiled.dtype}, as compiled")
        return None

    def _close_runtimes(self) -> None:
        for runtime in self._runtimes.values():
            runtime.close()
        self._runtimes.clear()

    def generate(self, ids: Optional[torch.Tensor] = None, max_new_tokens: Optional[int] = None,
                 attention_mask: Optional[torch.Tensor] = None, *, input_ids: Optional[torch.Tensor] = None,
                 **generation_settings: Any) -> torch.Tensor:
        """Greedy decoding, every step through the ring; returns prompt + new tokens, as
        ``model.generate(ids, max_new_tokens=n, do_sample=False)`` (see ``generate.decode``); a
        Hugging Face model's call with ``do_sample=True`` samples instead, as ``model.generate``
        does with it (``torch.manual_seed`` before both gives the same tokens).
        The prompts may be passed as ``input_ids=``; without ``max_new_tokens``, ``max_length`` or
        the model's ``generation_config`` bounds the length, as in ``model.generate``.
        ``attention_mask``: for padded prompts of Hugging Face models; ``generation_settings``: their
        ``GenerationConfig`` fields (``eos_token_id=2``, ``repetition_penalty=1.2``, ... or
        ``generation_config=``) over the model's ``generation_config``, as ``model.generate`` takes
        them."""
        from ..generate import decode, prompt_ids
        with self._lock:
            self._check_weights_unchanged()
            return decode(self, prompt_ids(ids, input_ids), max_new_tokens, attention_mask, **generation_settings)

    def close(self) -> None:
        """Release the slots, the copy threads and the offload files (the weights stay mapped until
        the program is dropped). A call after ``close`` still runs: it starts a copy thread again
        (and writes offload files for a graph lowered anew), released by another ``close`` or when
        the program is dropped."""
        with self._lock:
            self._close_runtimes()
            self.store.remove_files()

    def _check_weights_unchanged(self) -> None:
        """RingWeightsError where the model's staged tensors changed since (``StagedWeights``). A
        change the ring takes (in place, of a tensor it reads in place) releases the slots: they
        keep their sections between calls (all of them where every section has a slot, the next
        call's first ones as they load ahead), so each is loaded again with the new values."""
        if self.staged is not None and self.staged.check(self.store):
            self._close_runtimes()

    def _apply(self, fn: Any, recurse: bool = True) -> "RingProgram":
        """``program.to(...)``, ``.half()``, ``.cuda()``: refused where they would change a tensor (the
        program's and the model's alike), before any is changed; one that changes none is taken."""
        model_names = {id(t): name for name, t in named_tensors(self.context.model).items()}
        staged_dtype = self.plan.dtype or "the model's own"
        for name, tensor in named_tensors(self).items():
            moved = fn(tensor)
            if moved is not tensor:
                raise RingWeightsError(
                    f"a RingProgram runs on Plan.device ({self.plan.device!r}) in the dtype its ring staged the "
                    f"weights in (Plan.dtype: {staged_dtype}), and cannot move or cast them: "
                    f"{model_names.get(id(tensor), name)} would become {moved.dtype} on {moved.device}; "
                    f"{self._recompile_advice(moved.dtype)}")
        return self

    def _recompile_advice(self, dtype: torch.dtype) -> str:
        """How to run the model in ``dtype`` (or on another device): a Plan that casts the staged
        weights, except for a graph that torch.export captured, which holds its dtype fixed."""
        if self.context.capture == "export" and dtype != self._staged_dtype():
            return (f"cast the model itself and compile it again (model.to({dtype}); mc.compile), since "
                    f"torch.export fixed the captured dtype in the graph (Plan.dtype cannot change it); for another "
                    f"device, compile again under a Plan with that device")
        return ("compile the model again under a Plan with that device or dtype (mc.compile), which casts the "
                "staged weights itself")

    def _staged_dtype(self) -> Optional[torch.dtype]:
        floating = [loc.dtype for loc in self.store.locations.values() if loc.dtype.is_floating_point]
        return floating[0] if floating else None

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Refused: the ring staged the model's weights (host memory or offload files) when it was
        compiled and computes with those, so weights loaded now would be ignored."""
        raise RingWeightsError(
            "RingProgram.load_state_dict: the ring staged the model's weights when it was compiled and keeps "
            "computing with them, so loading new ones into the program (or the model) is not seen; load them "
            "into the model and compile it again (mc.compile), or pass Plan(weights_checkpoint=DIR) to stage "
            "them from a checkpoint directory")

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Refused for ``copy.copy``, ``copy.deepcopy``, ``pickle`` and ``torch.save`` alike."""
        raise TypeError(
            "a RingProgram cannot be copied or pickled: it holds device slots, copy threads and offload "
            "files; compile the model again (mc.compile) for another program, or save the model's weights "
            "(torch.save(model.state_dict(), PATH)) and compile after loading them")
