"""Capture a model as a ``torch.fx.GraphModule``: fx symbolic tracing with a leaf policy first,
``torch.export`` (non-strict) when fx cannot, and a precise UntraceableModelError when neither can.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import operator
import os
import sys
import threading
import traceback
import warnings
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from ..errors import UntraceableModelError, torch_logs_silenced, warn_user
from ..ir import canonical_target, region_body
from .adapters import check_peft_model, untraceable_adapter_fix
from .empty_weights import put_back, stand_ins
from .hf_capture import check_hf_example
from .modes import drop_empty_grad_regions, mode_signature, recording_grad_mode

_TORCH_DIR = os.path.dirname(torch.__file__)
_FRONTEND_DIR = os.path.dirname(__file__)

# While it traces, torch.fx patches ``nn.Module.__call__`` for the whole process (and capture
# patches ``autograd.Function.apply``, adapters ``Module.to``): a module called in another thread
# then runs as if traced ("module is not installed as a submodule"). Captures, and the calls of
# every ring program (whose ``generate`` captures inside a call, hence re-entrant), take turns
# under this lock; modules the user calls eagerly in other threads are beyond its reach.
TURN_LOCK = threading.RLock()


def taking_turns(function: Callable) -> Callable:
    """``function`` run while holding ``TURN_LOCK`` (see there)."""
    @functools.wraps(function)
    def in_turn(*args: Any, **kwargs: Any) -> Any:
        with TURN_LOCK:
            return function(*args, **kwargs)
    return in_turn


class MoesysTracer(fx.Tracer):
    """fx tracer with our leaf policy: torch.nn building blocks and the user's named leaves stay
    single ``call_module`` nodes; everything else (including canonical MoE modules, so that
    their canonical ops appear) is traced through. Buffers are proxied, so slicing a buffer by
    a traced length works, and an in-place update of one is a graph call on the model's buffer
    (not done once while tracing). Grad-mode regions (``torch.no_grad()``) are kept
    (``modes.recording_grad_mode``). Remembers the innermost module being traced when tracing
    fails."""

    proxy_buffer_attributes = True

    def __init__(self, leaf_modules: Iterable[str | type] = ()):
        super().__init__()
        leaves = list(leaf_modules)
        self.leaf_paths = {leaf for leaf in leaves if isinstance(leaf, str)}
        self.leaf_types = tuple(leaf for leaf in leaves if isinstance(leaf, type))
        self.path_stack: list[str] = []
        self.failed_in: Optional[str] = None

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if qualified_name in self.leaf_paths or (self.leaf_types and isinstance(module, self.leaf_types)):
            return True
        return super().is_leaf_module(module, qualified_name)

    def trace(self, root, concrete_args=None) -> fx.Graph:
        buffers = [(path, module, name, buffer) for path, module in root.named_modules()
                   for name, buffer in module._buffers.items()]
        try:
            with recording_grad_mode(self):
                graph = super().trace(root, concrete_args)
        finally:
            assigned = _put_back_buffers(buffers)
        _write_assigned_buffers(graph, assigned)
        drop_empty_grad_regions(graph)
        return graph

    def call_module(self, module, forward, args, kwargs):
        self.path_stack.append(self.path_of_module(module))
        try:
            return super().call_module(module, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_stack[-1]
            raise
        finally:
            self.path_stack.pop()


def _put_back_buffers(buffers: list[tuple[str, nn.Module, str, Any]]) -> list[tuple[str, fx.Proxy]]:
    """Tracing ``self.steps += 1`` or ``self.ema = 0.9 * self.ema + ...`` assigns a traced value to
    the model's buffer (a Proxy, left there): put every buffer back, and return the assignments
    (the buffer's qualified name, the traced value last assigned), for ``_write_assigned_buffers``."""
    assigned = []
    for path, module, name, buffer in buffers:
        now = module._buffers.get(name)
        if now is not buffer:
            module._buffers[name] = buffer
            if isinstance(now, fx.Proxy):
                assigned.append((f"{path}.{name}" if path else name, now))
    return assigned


def _write_assigned_buffers(graph: fx.Graph, assigned: list[tuple[str, fx.Proxy]]) -> None:
    """A buffer the forward assigns (see ``_put_back_buffers``) is written in place in the graph,
    ``buffer.copy_(value)`` once the value is computed, as eager's ``+=`` updates it in place (and
    a plain assignment leaves these values in it). Reads after the assignment already use the
    value itself."""
    for target, value in assigned:
        with graph.inserting_after(value.node):
            buffer = graph.get_attr(target)
        with graph.inserting_after(buffer):
            graph.call_method("copy_", (buffer, value.node))


def _user_frame(exc: BaseException) -> Optional[traceback.FrameSummary]:
    """The innermost traceback frame in user code (not torch, not this frontend)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(_TORCH_DIR) and not f.filename.startswith(_FRONTEND_DIR)]
    return frames[-1] if frames else None


def _construct(exc: BaseException) -> str:
    message = str(exc)
    if "cannot be used as inputs to control flow" in message:
        return "Python control flow (if/while/assert/bool()) on a traced tensor value"
    if "cannot be iterated" in message:
        return "iteration over a traced value (a loop or unpacking whose length is only known at run time)"
    if "DataDependentOutput" in type(exc).__name__ or "_local_scalar_dense" in message:
        return "a tensor value read into Python (.item(), .tolist(), int(tensor)) that decides shapes or control flow"
    if "data-dependent" in message.lower() or "GuardOnDataDependent" in type(exc).__name__:
        return "a branch or shape that depends on tensor values"
    return f"{type(exc).__name__}: {message.splitlines()[0] if message else ''}"


def _running_module(model: nn.Module, exc: BaseException) -> Optional[str]:
    """Path of the innermost module of ``model`` whose code was running when ``exc`` was raised
    (non-strict torch.export runs the model's own Python, so its frames are in the traceback)."""
    paths = {id(module): path for path, module in model.named_modules()}
    found, tb = None, exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if id(owner) in paths:
            found = paths[id(owner)] or "<root>"
        tb = tb.tb_next
    return found


def untraceable_error(model: nn.Module, fx_error: BaseException, tracer: MoesysTracer,
                      export_error: Optional[BaseException], export_first: bool = False) -> UntraceableModelError:
    """``export_first``: export was the capture adapter's choice (Hugging Face models), so its
    failure is the one explained and fx's is the footnote."""
    if export_first and export_error is not None:
        fx_error, export_error = export_error, fx_error
        path = _running_module(model, fx_error) or "<root>"
    else:
        path = tracer.failed_in or "<root>"
    frame = _user_frame(fx_error)
    where = f"{frame.filename}:{frame.lineno}: {frame.line}" if frame else "unknown source line"
    construct = _construct(fx_error)
    if export_first:    # torch.export traces every module: Plan.leaf_modules cannot keep one opaque
        leaf_hint = (f"change that code in the model (torch.export captures {type(model).__name__}, since fx "
                     f"cannot trace its forward, and export traces into every module: Plan.leaf_modules does "
                     f"not apply)")
    elif path != "<root>":
        leaf_hint = (f"declare it a leaf so it runs as one opaque call: Plan(leaf_modules=[{path!r}]) or "
                     f"trace(..., leaf_modules=[{path!r}])")
    else:
        leaf_hint = "move the data-dependent part into a submodule and declare that a leaf (Plan.leaf_modules)"
    fix = (untraceable_adapter_fix(model, path)
           or f"express it with tensor ops (torch.where, masking, torch.cond) instead, or {leaf_hint}")
    lines = [
        f"cannot trace {type(model).__name__}: module '{path}' uses {construct}",
        f"  at {where}",
        f"  fix: {fix}",
    ]
    if export_error is not None:
        first = str(export_error).strip().splitlines()[0] if str(export_error).strip() else ""
        lines.append(f"  {'fx' if export_first else 'torch.export'} fallback also failed: "
                     f"{type(export_error).__name__}: {first}")
    error = UntraceableModelError("\n".join(lines))
    error.module_path, error.source_line, error.construct = path, where, construct
    return error


def _eager_error(model: nn.Module, example_inputs: Sequence[Any], example_kwargs: dict) -> Optional[Exception]:
    """What ``model(*example_inputs, **example_kwargs)`` raises when run eagerly (None: it runs,
    or it cannot be run here, its tensors being on the meta device). The run leaves no trace: no
    gradient, the buffers and the CPU random state as they were."""
    tensors = [*model.parameters(), *model.buffers()]
    if any(t.is_meta for t in tensors) or any(t.is_meta for t in tree_leaves((example_inputs, example_kwargs))
                                               if isinstance(t, torch.Tensor)):
        return None
    buffers = [(buffer, buffer.clone()) for buffer in model.buffers()]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(*example_inputs, **example_kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure is the model's own, reported as such
        return exc
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    return None


def failing_eagerly_too(model: nn.Module, example_inputs: Sequence[Any],
                        example_kwargs: dict) -> Optional[UntraceableModelError]:
    """Where ``model`` could not be captured (neither fx nor torch.export) or its shapes not
    propagated: the error to raise instead when it fails on the example when run eagerly too (a
    config whose sizes do not fit together, a layer of the wrong width, an example of the wrong
    shape), which no change to the capture would mend; None where it runs."""
    exc = _eager_error(model, example_inputs, example_kwargs)
    if exc is None:
        return None
    path = _running_module(model, exc) or "<root>"
    kind = type(model.get_submodule(path) if path != "<root>" else model).__name__
    frame = _user_frame(exc)
    where = f"{frame.filename}:{frame.lineno}: {frame.line}" if frame else "unknown source line"
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    error = UntraceableModelError(
        f"cannot compile {type(model).__name__}: it fails on the example inputs when run eagerly too, in module "
        f"'{path}' ({kind}): {type(exc).__name__}: {message}\n"
        + (f"  at {where}\n" if frame else "") +
        f"  fix: make model(*example_inputs, **example_kwargs) run before compiling: check the config's sizes "
        f"(e.g. the head size, hidden_size / num_attention_heads, must be even for rotary embeddings) and the "
        f"example inputs' shapes and dtypes")
    error.module_path, error.source_line, error.construct = path, where, f"{type(exc).__name__}: {message}"
    return error


def distinct_inputs(example_inputs: Sequence[Any], example_kwargs: dict) -> tuple[tuple, dict]:
    """The example with every tensor that is, or shares storage with, an earlier one cloned
    (``model(ids, labels=ids)``): non-strict torch.export gives aliased inputs one fake tensor, so
    the graph would read the one through the other (a ``labels`` placeholder feeding the embedding).
    An example without aliases is returned as it is."""
    seen: set[tuple[str, int]] = set()
    cloned: list[bool] = []

    def distinct(value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or value.is_meta or value.layout is not torch.strided:
            return value
        storage = value.untyped_storage()
        key = ("storage", storage.data_ptr()) if storage.nbytes() else ("tensor", id(value))
        if key in seen:
            cloned.append(True)
            return value.clone()
        seen.add(key)
        return value

    example = (tuple(example_inputs), dict(example_kwargs))
    distinct_example = tree_map(distinct, example)
    return distinct_example if cloned else example


def traced_names(model: nn.Module, example_inputs: Sequence[Any], example_kwargs: dict) -> tuple[list[str], dict]:
    """Forward parameters fed by the example (traced) and the rest pinned to defaults (concrete)."""
    signature = inspect.signature(model.forward)
    bound = signature.bind_partial(*example_inputs, **example_kwargs)
    traced = list(bound.arguments)
    concrete = {name: p.default for name, p in signature.parameters.items()
                if name not in bound.arguments and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    missing = [name for name, value in concrete.items() if value is inspect.Parameter.empty]
    if not traced and concrete and not missing:
        missing = list(concrete)[:1]     # every input optional (Hugging Face models): the first is the one fed
    if missing:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        shape = f"torch.randint(0, {vocab}, (2, 128))" if isinstance(vocab, int) else "a tensor"
        raise UntraceableModelError(
            f"{type(model).__name__}.forward needs argument(s) {missing} that the example inputs do not give; "
            f"pass them in example_inputs/example_kwargs (e.g. example_inputs=({shape},)); a ring program "
            f"sizes its activation workspace at them")
    return traced, concrete


def _drop_concrete_placeholders(graph: fx.Graph, traced: list[str]) -> None:
    """fx turns pinned arguments into placeholders guarded by asserts; drop both so the graph's
    inputs are exactly the traced arguments."""
    for node in [n for n in graph.nodes if n.op == "placeholder"]:
        if node.target in traced:
            continue
        doomed, frontier = [], [node]
        while frontier:
            current = frontier.pop()
            doomed.append(current)
            frontier.extend(current.users)
        if any(n.op == "output" for n in doomed):
            continue  # the pinned value reaches the output; keep it
        for dead in reversed(list(dict.fromkeys(doomed))):
            if not dead.users:
                graph.erase_node(dead)


@taking_turns
def fx_trace(model: nn.Module, example_inputs: Sequence[Any], example_kwargs: dict,
             tracer: MoesysTracer) -> fx.GraphModule:
    check_graph_module_names(model)
    traced, concrete = traced_names(model, example_inputs, example_kwargs)
    graph = tracer.trace(model, concrete_args=concrete or None)
    _drop_concrete_placeholders(graph, traced)
    for node in graph.nodes:
        if node.op == "call_function":
            node.target = canonical_target(node.target)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta["moesys_capture"] = "fx"
    return gm


# What a GraphModule defines besides nn.Module's own attributes: the captured graph keeps the
# model's submodules, parameters and buffers under their names, so the model may not use these.
RESERVED_NAMES = frozenset(set(dir(fx.GraphModule)) - set(dir(nn.Module))) | {
    "graph", "code", "meta", "_graph", "_code", "_tracer_cls", "_tracer_extras", "_lineno_map", "_prologue_start",
    "shape_env", "_erase_node_hooks", "_create_node_hooks", "_replace_hooks", "_deepcopy_hooks"}


def check_graph_module_names(model: nn.Module) -> None:
    """Refuse a model whose own submodule, parameter or buffer takes a name a GraphModule reserves
    (``self.graph = nn.Linear(...)``): the captured graph could not hold it under that name."""
    names = [*model._modules, *model._parameters, *model._buffers]
    clashes = sorted(name for name in names if name in RESERVED_NAMES)
    if clashes:
        kinds = ", ".join(f"{name!r} ({_kind(model, name)})" for name in clashes)
        raise UntraceableModelError(
            f"cannot capture {type(model).__name__}: its attribute(s) {kinds} take a name that torch.fx's "
            f"GraphModule reserves for itself; rename them in {type(model).__name__} (e.g. self.{clashes[0]} -> "
            f"self.{clashes[0]}_proj); a checkpoint saved under the old name loads after renaming its keys")


def _kind(model: nn.Module, name: str) -> str:
    if name in model._modules:
        return f"submodule {type(model._modules[name]).__name__}"
    return "parameter" if name in model._parameters else "buffer"


def _bound_inputs(model: nn.Module, example_inputs: Sequence[Any], example_kwargs: dict) -> dict[str, Any]:
    """The example bound to ``forward``'s parameters, keywords that reach its ``**kwargs`` by their
    own names (the Trainer's ``num_items_in_batch`` reaches a Hugging Face model's that way)."""
    signature = inspect.signature(model.forward)
    bound = signature.bind_partial(*example_inputs, **example_kwargs).arguments
    inputs = {}
    for name, value in bound.items():
        inputs.update(value if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD else {name: value})
    return inputs


def _symbolic_dims_of(model: nn.Module, name: str, leaf: Any, argument: Any) -> tuple[int, ...]:
    """The dims of one tensor of argument ``name`` that export may keep symbolic: those the module
    names for the argument in ``symbolic_dims`` ({argument: {dim: size in B and S}}, which
    annotation follows too), else batch and sequence (the first two dims), also of each tensor
    inside a dict, list or tuple argument (a batch dict, ``*args``); none of anything else."""
    own = getattr(model, "symbolic_dims", {})
    if name in own and leaf is argument:
        return tuple(own[name])
    return tuple(range(min(leaf.dim(), 2))) if isinstance(leaf, torch.Tensor) else ()


def _export_dynamic_shapes(model: nn.Module, example_inputs: Sequence[Any], example_kwargs: dict):
    """Per argument, in its own structure, its tensors' symbolic dims left for export to decide."""
    auto = getattr(torch.export.Dim, "AUTO", None)
    if auto is None:
        return None
    bound = inspect.signature(model.forward).bind_partial(*example_inputs, **example_kwargs)

    def spec(name: str, argument: Any) -> Any:
        return tree_map(lambda leaf: {d: auto for d in _symbolic_dims_of(model, name, leaf, argument)} or None,
                        argument)
    return {name: spec(name, argument) for name, argument in bound.arguments.items()}


@contextlib.contextmanager
def _keywords_named(model: nn.Module, example_kwargs: dict):
    """While exporting, ``forward`` names the example's keywords that would reach its ``**kwargs``
    (the Trainer's ``num_items_in_batch`` for a Hugging Face model) as keyword-only parameters.
    torch.export cannot keep any size symbolic for a ``forward`` given keywords through ``**kwargs``
    (making its constraints, it lists them both in the ``kwargs`` dict and on their own, and fails),
    so such an example would fix the batch and sequence sizes. The named keywords come last, as
    ``**kwargs`` does, so the graph's inputs keep the order the program binds calls in."""
    signature = inspect.signature(model.forward)
    params = list(signature.parameters.values())
    extra = [name for name in example_kwargs if name not in signature.parameters]
    if not extra or not params or params[-1].kind is not inspect.Parameter.VAR_KEYWORD:
        yield
        return
    forward = model.forward

    def named_forward(*args: Any, **kwargs: Any) -> Any:
        return forward(*args, **kwargs)
    named_forward.__signature__ = signature.replace(
        parameters=params[:-1] + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in extra])
    with forward_replaced(model, named_forward):
        yield


@contextlib.contextmanager
def forward_replaced(model: nn.Module, forward: Callable) -> Iterator[None]:
    """``model.forward`` is ``forward`` inside the block; the model's own after it (an instance
    ``forward`` it had set is put back, else the class's shows through again)."""
    had_own = "forward" in model.__dict__
    own = model.forward
    model.forward = forward
    try:
        yield
    finally:
        if had_own:
            model.forward = own
        else:
            del model.forward


def _widened(value: Any, dims: Sequence[int] = (0, 1)) -> Any:
    """An example tensor whose dynamic dims (batch, sequence) of size 1 are repeated to 2: export
    fixes a size-1 dim for good, so a single prompt would give a graph for one size only."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    repeats = [2 if d in dims and size == 1 else 1 for d, size in enumerate(value.shape)]
    return value.repeat(*repeats) if any(r == 2 for r in repeats) else value


def _positional_names(model: nn.Module, args: tuple) -> list[str]:
    """The parameter of ``forward`` each positional input binds to (``*args``' name for each of its)."""
    names = []
    for param in inspect.signature(model.forward).parameters.values():
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            names.append(param.name)
        elif param.kind is param.VAR_POSITIONAL:
            names.extend([param.name] * (len(args) - len(names)))
    return names[:len(args)]


def _widened_argument(model: nn.Module, name: str, argument: Any) -> Any:
    return tree_map(lambda leaf: _widened(leaf, _symbolic_dims_of(model, name, leaf, argument)), argument)


def _widened_example(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    names = _positional_names(model, args)
    wide_args = tuple(_widened_argument(model, name, value) for name, value in zip(names, args))
    return wide_args, {name: _widened_argument(model, name, value) for name, value in kwargs.items()}


def _widened_dims(model: nn.Module, args: tuple, kwargs: dict) -> list[set[int]]:
    """Per flattened input (the exported graph's placeholders), the dims ``_widened`` repeats."""
    return [{d for d in _symbolic_dims_of(model, name, leaf, value) if leaf.shape[d] == 1}
            for name, value in _bound_inputs(model, args, kwargs).items() for leaf in tree_leaves(value)]


def _fixed_at_two(gm: fx.GraphModule, widened: list[set[int]]) -> bool:
    """An input dim that was widened from 1 and that export fixed to 2: the widened example was
    taken for a size the model needs (a ``view(2, ...)``), and the example's own size would no
    longer run."""
    from ..programs.binding import fixed_input_sizes
    return any((fixed or {}).get(dim) == 2 for fixed, dims in zip(fixed_input_sizes(gm), widened) for dim in dims)


def _in_signature_order(model: nn.Module, kwargs: dict) -> dict:
    """``kwargs`` ordered as ``model.forward`` declares them (names it does not declare last)."""
    order = {name: index for index, name in enumerate(inspect.signature(model.forward).parameters)}
    return dict(sorted(kwargs.items(), key=lambda item: order.get(item[0], len(order))))


@taking_turns
@contextlib.contextmanager
def _without_partial_graph():
    """torch.export prints the partial graph of a failed export to stderr; a failure here becomes
    a fallback or this package's error, which names the module and line, so that dump is dropped
    (the rest of stderr, warnings included, is written as it came)."""
    written = io.StringIO()
    try:
        with contextlib.redirect_stderr(written):
            yield
    except Exception as exc:
        dump = getattr(exc, "partial_fx_graph", None)
        sys.stderr.write(written.getvalue().replace(f"{dump}\n", "") if dump is not None else written.getvalue())
        raise
    sys.stderr.write(written.getvalue())


def export_trace(model: nn.Module, example_inputs: Sequence[Any], example_kwargs: dict) -> fx.GraphModule:
    """Non-strict torch.export; the unlifted module shares the model's parameters (tensors on the
    meta device are exported as uninitialised host stand-ins, where the ring keeps weights, then
    put back). Batch and sequence stay symbolic where export allows, also for an example of one
    sequence or one token (``_widened``); failing that, the example's sizes are fixed. The
    keyword inputs go in the order of ``forward``'s signature, which is the order the program binds
    calls in (``traced_names``): export orders the graph's inputs as the example's keys."""
    args, kwargs = tuple(example_inputs), _in_signature_order(model, example_kwargs)
    wide_args, wide_kwargs = _widened_example(model, args, kwargs)
    widened = any(w is not v for w, v in zip((*wide_args, *wide_kwargs.values()), (*args, *kwargs.values())))
    with stand_ins(model, torch.device("cpu")) as originals, _keywords_named(model, kwargs):
        dynamic = _export_dynamic_shapes(model, args, kwargs)
        attempts = ([(wide_args, wide_kwargs, dynamic, True)] if dynamic is not None and widened else []) \
            + ([(args, kwargs, dynamic, False)] if dynamic is not None else []) + [(args, kwargs, None, False)]
        for attempt, (example_args, example_kwargs_, shapes, is_widened) in enumerate(attempts):
            try:
                with torch_logs_silenced("torch.fx.experimental.symbolic_shapes"), _without_partial_graph(), \
                        warnings.catch_warnings():
                    # capture takes such attributes off the model again (_tensor_attributes_kept)
                    warnings.filterwarnings("ignore", message=r"The tensor attributes? .* assigned during export")
                    program = torch.export.export(model, example_args, example_kwargs_, strict=False,
                                                  dynamic_shapes=shapes)
            except Exception:
                if attempt == len(attempts) - 1:
                    raise
                continue
            gm = program.module()
            if not (is_widened and _fixed_at_two(gm, _widened_dims(model, args, kwargs))):
                break
    put_back(gm, originals)
    _drop_dtype_asserts(gm)
    _drop_dead_regions(gm)
    # export's module refuses train()/eval(), which breaks program.train()/eval(); drop those
    # overrides: like an fx graph, the captured graph keeps the mode it was captured in.
    for name in ("train", "eval"):
        gm.__dict__.pop(name, None)
    gm.meta["moesys_capture"] = "export"
    return gm


def _drop_dtype_asserts(gm: fx.GraphModule) -> None:
    """Export asserts the capture's dtype on the input of every ``.to()``; a call under
    ``torch.autocast`` gives some of those inputs another dtype, as it does in eager, which the
    assertion refuses. They compute nothing: drop them."""
    target = getattr(torch.ops.aten, "_assert_tensor_metadata", None)
    if target is None:
        return
    for module in gm.modules():
        if not isinstance(module, fx.GraphModule):
            continue
        asserts = [n for n in module.graph.nodes if n.op == "call_function" and n.target is target.default]
        for node in asserts:
            module.graph.erase_node(node)
        if asserts:
            module.recompile()


def _drop_dead_regions(gm: fx.GraphModule) -> None:
    """Erase the calls of export's regions (``wrap_with_autocast``, ``wrap_with_set_grad_enabled``)
    whose body returns nothing and mutates nothing: code whose result eager discards, such as the
    check ``torch.nn.utils.parametrize`` makes when a parametrization is registered in ``forward``
    (PEFT's LoRA on expert parameters), which would otherwise compute a whole expert stack each
    call for nothing."""
    dead = [n for n in gm.graph.nodes if n.op == "call_function" and not n.users
            and isinstance(n.target, torch._ops.HigherOrderOperator) and _returns_nothing(gm, n)]
    for node in dead:
        _erase_with_unread_inputs(gm.graph, node)
    if dead:
        gm.delete_all_unused_submodules()
        gm.recompile()


def _returns_nothing(gm: fx.GraphModule, region: fx.Node) -> bool:
    bodies = [region_body(gm, a) for a in region.args if isinstance(a, fx.Node) and a.op == "get_attr"]
    if len(bodies) != 1 or bodies[0] is None:
        return False
    nodes = list(bodies[0].graph.nodes)
    return all(_pure(n) for n in nodes if n.op not in ("placeholder", "output")) and nodes[-1].args[0] in ((), [])


def _pure(node: fx.Node) -> bool:
    return (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and not node.target._schema.is_mutable)


def _erase_with_unread_inputs(graph: fx.Graph, node: fx.Node) -> None:
    """Erase ``node``, then each input that nothing reads any more and that is a pure op or a
    region's body (parameters stay)."""
    inputs = node.all_input_nodes
    graph.erase_node(node)
    for source in inputs:
        if not source.users and (_pure(source) or region_body(graph.owning_module, source) is not None):
            _erase_with_unread_inputs(graph, source)


# Capture adapters: ``adapter(model, example_inputs, example_kwargs)`` returns None (not its kind
# of model) or a context manager entered around capture; a context that yields True asks for
# torch.export before fx (e.g. the Hugging Face adapter in hf_capture.py, which also turns the KV
# cache off while capturing).
CAPTURE_ADAPTERS: list[Callable[[nn.Module, Sequence[Any], dict], Optional[contextlib.AbstractContextManager]]] = []


def _graph_call_of(function: type) -> Callable:
    """A named function that applies the autograd Function ``function`` (a graph call target)."""
    def apply(*args: Any, **kwargs: Any) -> Any:
        return function.apply(*args, **kwargs)
    apply.__name__ = apply.__qualname__ = f"{function.__name__}_apply"
    apply.__module__ = function.__module__
    return apply


@contextlib.contextmanager
def own_autograd_functions(inlined: list[str]):
    """While capturing, ``apply`` of a model's own ``torch.autograd.Function`` (not torch's): on fx
    proxies it becomes one graph call, so that the program runs the Function with its own
    backward; torch.export traces through its forward (its backward is lost), and ``inlined``
    collects its name."""
    base = torch.autograd.Function
    original = base.__dict__["apply"]

    def apply(cls, *args: Any, **kwargs: Any) -> Any:
        if not cls.__module__.startswith("torch."):
            proxy = next((a for a in tree_leaves((args, kwargs)) if isinstance(a, fx.Proxy)), None)
            if proxy is not None:
                return proxy.tracer.create_proxy("call_function", _graph_call_of(cls), args, kwargs)
            if cls.__qualname__ not in inlined:
                inlined.append(cls.__qualname__)
        return original.__func__(cls, *args, **kwargs)
    base.apply = classmethod(apply)
    try:
        yield
    finally:
        base.apply = original


@taking_turns
def capture(model: nn.Module, example_inputs: Sequence[Any] = (), example_kwargs: Optional[dict] = None,
            leaf_modules: Iterable[str | type] = ()) -> fx.GraphModule:
    """fx first, export second, UntraceableModelError (module path, source line, construct, fix) last.
    A capture adapter may swap the order to export first. An exported graph lists in
    ``meta["moesys_inlined_functions"]`` the model's autograd Functions it traced through."""
    example_inputs, example_kwargs = distinct_inputs(example_inputs, example_kwargs or {})
    leaf_modules = tuple(leaf_modules)
    check_hf_example(model, example_inputs, example_kwargs)
    check_peft_model(model)
    inlined: list[str] = []
    checkpointed: list[bool] = []
    with own_autograd_functions(inlined), _noting_activation_checkpoints(checkpointed), _tensor_attributes_kept(model):
        gm = _capture(model, example_inputs, example_kwargs, leaf_modules)
    _drop_unread_state(gm)
    gm.meta["moesys_captured_training"] = model.training
    gm.meta["moesys_mode_signature"] = mode_signature(gm)
    gm.meta["moesys_recapture"] = functools.partial(capture_in_mode, model, tuple(example_inputs), example_kwargs,
                                                    leaf_modules)
    if gm.meta.get("moesys_capture") == "export":
        gm.meta["moesys_inlined_functions"] = inlined
    _warn_hooks_traced_through(model, gm)
    if checkpointed and model.training and not _checkpointing_flag(model):   # (transformers' own flag warns itself)
        warn_user(f"{type(model).__name__} calls torch.utils.checkpoint, which the captured graph does not keep: "
                  f"the program computes the same values and gradients but stores every activation; lower the "
                  f"batch size if memory runs out")
    return gm


@contextlib.contextmanager
def _tensor_attributes_kept(model: nn.Module) -> Iterator[None]:
    """Undo the tensors a forward sets as plain attributes of its modules while it is captured:
    they are the capture's fake tensors or proxies, and the model, called eagerly later, would
    compute with them (Phi-3's longrope rotary embedding caches ``long_inv_freq`` on first call)."""
    before = [(module, {name: value for name, value in vars(module).items() if isinstance(value, _CAPTURE_VALUES)})
              for module in model.modules()]
    try:
        yield
    finally:
        for module, kept in before:
            attributes = vars(module)
            for name in [n for n, value in attributes.items() if isinstance(value, _CAPTURE_VALUES)
                         and kept.get(n) is not value]:
                if name in kept:
                    attributes[name] = kept[name]
                else:
                    del attributes[name]


_CAPTURE_VALUES = (torch.Tensor, fx.Proxy)


def _drop_unread_state(gm: fx.GraphModule) -> None:
    """Drop the graph's reads of model tensors that nothing uses. Export lists every buffer of a
    module it traced through, also one the forward never reads (a dynamic rotary embedding's
    ``inv_freq``, which the capture replaces by frequencies computed per call); a ring would stage
    it and refuse the next call once the eager model, called again, replaced that buffer."""
    unread = [node for node in gm.graph.nodes if node.op == "get_attr" and not node.users]
    for node in unread:
        gm.graph.erase_node(node)
    if unread:
        gm.recompile()


# hooks of these libraries are written for a capture (transformers records router logits by them) or
# are this package's own (a warning on a stale model)
_LIBRARY_HOOKS = ("torch.", "transformers.", "accelerate.", "deepspeed.", "moesys_compile.")


def _user_hooks(module: nn.Module) -> list[str]:
    """The names of ``module``'s forward, pre-forward and backward hooks that the user registered."""
    hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values(),
             *module._backward_pre_hooks.values(), *module._backward_hooks.values()]
    functions = [getattr(hook, "func", hook) for hook in hooks]
    return [getattr(f, "__qualname__", repr(f)) for f in functions
            if not getattr(f, "__module__", "").startswith(_LIBRARY_HOOKS)]


def _warn_hooks_traced_through(model: nn.Module, gm: fx.GraphModule) -> None:
    """A module that the capture traced through (not kept as one call) runs its hooks at most once,
    while it is captured (the root not even then): what a hook returns is part of the graph, but a
    hook that records or logs (activation statistics) does not run at the program's calls."""
    called = {node.target for node in gm.graph.nodes if node.op == "call_module"}
    hooked = {path: names for path, module in model.named_modules()
              if path not in called and (names := _user_hooks(module))}
    if hooked:
        path, names = next(iter(hooked.items()))
        where = f"'{path}' of {type(model).__name__}" if path else f"{type(model).__name__} itself"
        more = f" and on {len(hooked) - 1} more module(s)" if len(hooked) > 1 else ""
        warn_user(f"the hook(s) {names} on {where}{more} do not run at the program's calls: the capture traced "
                  f"through the module (a hook that ran while capturing is in the graph with what it returns, not "
                  f"with what it records); to run a hook at every call, keep its module as one call "
                  f"(Plan(leaf_modules=[...]) for an fx capture, not an MoE block), or register it on a module "
                  f"that is one")


def capture_in_mode(model: nn.Module, example_inputs: Sequence[Any], example_kwargs: dict,
                    leaf_modules: Iterable[str | type], training: bool) -> fx.GraphModule:
    """``capture`` with every module of ``model`` in training mode or in eval mode; each module's
    own flag is put back after (modules a program shares may be in another mode than the model),
    and the capture's warnings, given at compile, are not repeated."""
    flags = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return capture(model, example_inputs, example_kwargs, leaf_modules)
    finally:
        for module, flag in flags:
            module.training = flag


@contextlib.contextmanager
def _noting_activation_checkpoints(seen: list):
    """Note in ``seen`` every ``torch.utils.checkpoint.checkpoint`` call while capturing: capture
    runs through it (both variants: the reentrant Function and the non-reentrant generator), so
    its recomputation is not kept."""
    import torch.utils.checkpoint as checkpointing

    def noting(original: Callable) -> Callable:
        def noted(*args: Any, **kwargs: Any) -> Any:
            seen.append(True)
            return original(*args, **kwargs)
        return noted
    originals = {name: getattr(checkpointing, name) for name in ("CheckpointFunction",
                                                                 "_checkpoint_without_reentrant_generator")
                 if hasattr(checkpointing, name)}
    if "CheckpointFunction" in originals:
        checkpointing.CheckpointFunction = type("NotedCheckpointFunction", (), {
            "apply": staticmethod(noting(originals["CheckpointFunction"].apply))})
    if "_checkpoint_without_reentrant_generator" in originals:
        checkpointing._checkpoint_without_reentrant_generator = noting(
            originals["_checkpoint_without_reentrant_generator"])
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(checkpointing, name, original)


def _checkpointing_flag(model: nn.Module) -> bool:
    return any(getattr(model, name, False) is True for name in ("is_activation_checkpointing",
                                                               "is_gradient_checkpointing"))


def _capture(model: nn.Module, example_inputs: Sequence[Any], example_kwargs: dict,
             leaf_modules: Iterable[str | type]) -> fx.GraphModule:
    tracer = MoesysTracer(leaf_modules)
    with contextlib.ExitStack() as stack:
        adapters = (adapt(model, example_inputs, example_kwargs) for adapt in CAPTURE_ADAPTERS)
        entered = [stack.enter_context(cm) for cm in adapters if cm is not None]
        export_error: Optional[BaseException] = None
        if any(entered):
            try:
                gm = export_trace(model, example_inputs, example_kwargs)
            except Exception as exc:  # noqa: BLE001 - fall through to fx; both errors are then reported
                export_error = exc
            else:
                _warn_unused_leaves(model, leaf_modules)
                return gm
        try:
            return fx_trace(model, example_inputs, example_kwargs, tracer)
        except UntraceableModelError:
            raise
        except Exception as fx_error:
            if export_error is None:
                try:
                    return export_trace(model, example_inputs, example_kwargs)
                except Exception as exc:  # noqa: BLE001
                    export_error = exc
            error = untraceable_error(model, fx_error, tracer, export_error, export_first=any(entered))
            error.__cause__ = fx_error
    raise failing_eagerly_too(model, example_inputs, example_kwargs) or error    # the adapters undone: as the user runs it


def _warn_unused_leaves(model: nn.Module, leaf_modules: Iterable[str | type]) -> None:
    leaves = list(leaf_modules)
    if leaves:
        warn_user(f"Plan.leaf_modules {leaves} has no effect on {type(model).__name__}: it is captured by "
                  f"torch.export (fx cannot trace its forward), which traces into every module")


def expose_aux_loss(gm: fx.GraphModule) -> int:
    """Make the graph return ``(model_output, aux_loss)``: the sum of every load-balancing loss
    node (None without MoE layers). Returns how many such nodes were found."""
    from ..ir import is_op

    graph = gm.graph
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    losses = [n for n in graph.nodes if is_op(n, "load_balancing_loss")]
    total = None
    with graph.inserting_before(output):
        for loss in losses:
            total = loss if total is None else graph.call_function(operator.add, (total, loss))
    output.args = ((output.args[0], total),)
    gm.recompile()
    return len(losses)
