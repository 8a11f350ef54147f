"""The modes a captured graph runs in: the module's training/eval mode and autograd's grad mode.

Tracing freezes ``self.training``: a capture holds the code of one mode. ``mode_signature``
reduces a graph to one record per node, with every dropout call an alias of its input (and the
masks of the experts' dropout, ``moesys.expert_dropout_keep``, left out with the argument that
reads them), so that the captures of a model in the two modes have equal signatures exactly when
the model's code differs between them by dropout alone (which ``programs.train_mode`` makes
follow ``program.train()`` / ``program.eval()``).

fx tracing does not see grad mode either (``torch.no_grad()`` changes autograd's state, not the
graph): ``recording_grad_mode`` keeps each such region of the traced code as two graph calls, so
that a buffer the model updates under ``no_grad`` (an EMA, running statistics) gets no autograd
history in the program and no gradient flows through it, as in eager::

    before = enter_grad_mode(False)     # at the ``with torch.no_grad():``
    ...                                 # the region's nodes
    exit_grad_mode(before)              # at its end: back to the mode of the call, not the capture's

(torch.export keeps these regions itself, as ``wrap_with_set_grad_enabled`` calls.)
"""

from __future__ import annotations

import contextlib
import operator
import threading
from typing import Any, Callable, Iterator, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..ir import canonical_target

aten = torch.ops.aten

# the masks of the dropout inside the experts (``moesys.expert_dropout_keep``): not aliases of an input
_MASKS = {torch.ops.moesys.expert_dropout_keep, torch.ops.moesys.expert_dropout_keep.default}
# op -> (position, keyword, default) of its dropout probability; the ops whose training flag is an
# argument too are skipped when that flag was traced as False
DROPOUT_ARG: dict[Any, tuple[int, str, float]] = {
    F.dropout: (1, "p", 0.5),
    aten.dropout.default: (1, "p", 0.0),
    F.scaled_dot_product_attention: (4, "dropout_p", 0.0),
    aten.scaled_dot_product_attention.default: (4, "dropout_p", 0.0),
    **{mask: (3, "p", 0.0) for mask in _MASKS},
}
TRAINING_ARG: dict[Any, tuple[int, str, bool]] = {F.dropout: (2, "training", True),
                                                  aten.dropout.default: (2, "train", True)}
_ATTENTION = {F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default}
# calls whose output holds their input's values once dropout is off: dropout itself, and
# ``contiguous``, which torch.export records only where the input's strides need it (attention
# with dropout returns other strides than without)
_ALIAS_CALLS = (set(DROPOUT_ARG) - _ATTENTION - _MASKS) | {aten.native_dropout.default, torch.dropout,
                                                   aten.contiguous.default}


def _is_alias(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.modules.dropout._DropoutNd)
    return (node.op == "call_function" and node.target in _ALIAS_CALLS) or (
        node.op == "call_method" and node.target == "contiguous")


def _pure(node: fx.Node) -> bool:
    """A read or a call that mutates nothing (a module call may: it is never taken as pure)."""
    if node.op == "get_attr":
        return True
    if node.op not in ("call_function", "call_method"):
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return not schema.is_mutable
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return not name.endswith("_")


def _dead(gm: fx.GraphModule) -> set[fx.Node]:
    """Pure nodes whose results reach no output: the code of a branch that computes values it never
    uses (torch.export records the arguments of a mamba mixer's kernel call in training mode even
    when the kernel is missing and the mixer falls back to the code it runs in eval mode)."""
    dead: set[fx.Node] = set()
    for node in reversed(gm.graph.nodes):
        if _pure(node) and all(user in dead for user in node.users):
            dead.add(node)
    return dead


def _records(gm: fx.GraphModule) -> tuple[list[tuple[Any, ...]], list[fx.Node]]:
    """(records, the node of each record): see ``mode_signature``."""
    position: dict[fx.Node, Optional[int]] = {}
    records: list[tuple[Any, ...]] = []
    nodes: list[fx.Node] = []

    def normalized(value: Any) -> Any:
        return fx.node.map_aggregate(value, lambda v: ("node", position[v]) if isinstance(v, fx.Node) else v)

    dead = _dead(gm)
    for node in gm.graph.nodes:
        if node in dead:
            continue
        source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if _is_alias(gm, node) or (node.target is operator.getitem and source is not None
                                   and source.target is aten.native_dropout.default):
            position[node] = position.get(source) if source is not None else None
            continue
        if node.target in _MASKS:      # drawn in training mode only; the experts call reads it
            position[node] = None
            continue
        args, kwargs = _without_mask(node)
        if node.target in _ATTENTION:
            index, keyword, _ = DROPOUT_ARG[node.target]
            args = args[:index] + args[index + 1:]
            kwargs.pop(keyword, None)
        target = node.target if node.op == "call_function" else str(node.target)
        position[node] = len(records)
        records.append((node.op, target, normalized(args), normalized(kwargs)))
        nodes.append(node)
    return records, nodes


def _without_mask(node: fx.Node) -> tuple[tuple, dict]:
    """(args, kwargs) of ``node``; an experts call that takes a dropout mask (``keep_NF``) by its
    arguments' names without it, and without the defaults a call without it leaves out."""
    schema = getattr(canonical_target(node.target), "_schema", None)
    names = [argument.name for argument in schema.arguments] if schema is not None else []
    if "keep_NF" not in names:
        return node.args, dict(node.kwargs)
    given = {**dict(zip(names, node.args)), **node.kwargs}
    defaults = {argument.name: argument.default_value for argument in schema.arguments
                if argument.has_default_value()}

    def defaulted(name: str, value: Any) -> bool:
        plain = value is None or isinstance(value, (bool, int, float, str))
        return name in defaults and plain and value == defaults[name]
    return (), {name: value for name, value in given.items() if name != "keep_NF" and not defaulted(name, value)}


def mode_signature(gm: fx.GraphModule) -> list[tuple[Any, ...]]:
    """One (op, target, args, kwargs) record per node: inputs by position, every dropout call
    (and a ``getitem`` of ``native_dropout``) and ``contiguous`` an alias of its input, attention
    without its dropout probability, dead code (``_dead``) left out.
    Equal signatures mean equal computations once dropout is off."""
    return _records(gm)[0]


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Records equal; where constants are tensors (``==`` is elementwise), their reprs."""
    try:
        return bool(a == b)
    except RuntimeError:
        return repr(a) == repr(b)


def first_difference(signature: list[tuple[Any, ...]], other: fx.GraphModule) -> Optional[fx.Node]:
    """The first node of ``other`` whose record differs from ``signature`` (its last node where
    ``other`` is shorter); None when the two compute the same with dropout off."""
    records, nodes = _records(other)
    for index, (mine, theirs) in enumerate(zip(signature, records)):
        if not _same(mine, theirs):
            return nodes[index]
    if len(signature) != len(records):
        return nodes[min(len(signature), len(records))] if len(records) > len(signature) else nodes[-1]
    return None


# ---------------------------------------------------------------------------------------------
# grad mode
# ---------------------------------------------------------------------------------------------


@fx.node.has_side_effect
def enter_grad_mode(enabled: bool) -> bool:
    """Turn gradients on or off; returns the mode before, for ``exit_grad_mode``."""
    before = torch.is_grad_enabled()
    torch._C._set_grad_enabled(enabled)
    return before


@fx.node.has_side_effect
def exit_grad_mode(before: bool) -> None:
    torch._C._set_grad_enabled(before)


GRAD_MODE_CALLS = frozenset({enter_grad_mode, exit_grad_mode, torch._C._set_grad_enabled})


@contextlib.contextmanager
def recording_grad_mode(tracer: fx.Tracer) -> Iterator[None]:
    """While fx traces with ``tracer`` in this thread, each grad-mode region the traced code enters
    (``torch.no_grad()``, ``enable_grad()``, ``set_grad_enabled(mode)``, also as decorators or
    called as a function) becomes an ``enter_grad_mode`` / ``exit_grad_mode`` pair in the graph.
    ``inference_mode()`` is recorded as ``no_grad()``: the same values and gradients (the tensors
    it makes are not inference tensors). Grad mode itself still changes as the code says."""
    grad_mode = torch.autograd.grad_mode
    thread, busy = threading.get_ident(), [False]
    open_regions: dict[int, list[fx.Proxy]] = {}    # id(context manager) -> its enter calls, innermost last

    def enter(manager: Any, enabled: bool) -> None:
        call = tracer.create_proxy("call_function", enter_grad_mode, (enabled,), {})
        open_regions.setdefault(id(manager), []).append(call)

    def leave(manager: Any, *exc_info: Any) -> None:
        calls = open_regions.get(id(manager))
        if calls:     # (a region entered before the capture began is not the graph's)
            tracer.create_proxy("call_function", exit_grad_mode, (calls.pop(),), {})

    def enter_set_grad_enabled(manager: Any, *args: Any) -> None:
        if not open_regions.get(id(manager)):    # ``with`` on one made earlier; __init__ enters otherwise
            enter(manager, bool(manager.mode))

    records: list[tuple[type, str, Callable]] = [
        (grad_mode.no_grad, "__enter__", lambda manager: enter(manager, False)),
        (grad_mode.no_grad, "__exit__", leave),
        (grad_mode.enable_grad, "__enter__", lambda manager: enter(manager, True)),
        (grad_mode.enable_grad, "__exit__", leave),
        (grad_mode.set_grad_enabled, "__init__", lambda manager, *args: enter(manager, bool(manager.mode))),
        (grad_mode.set_grad_enabled, "__enter__", enter_set_grad_enabled),
        (grad_mode.set_grad_enabled, "__exit__", leave),
        (grad_mode.set_grad_enabled, "__call__", leave),       # as a decorator: undoes what __init__ set
        (grad_mode.inference_mode, "__enter__", lambda manager: enter(manager, False) if manager.mode else None),
        (grad_mode.inference_mode, "__exit__", leave),
    ]

    def recorded(original: Callable, record: Callable) -> Callable:
        def method(manager: Any, *args: Any, **kwargs: Any) -> Any:
            if busy[0] or threading.get_ident() != thread:   # no_grad's own set_grad_enabled: not a region
                return original(manager, *args, **kwargs)
            busy[0] = True
            try:
                result = original(manager, *args, **kwargs)
                record(manager, *args)
            finally:
                busy[0] = False
            return result
        return method

    originals = [(cls, name, cls.__dict__[name]) for cls, name, _ in records]
    for (cls, name, original), (_, _, record) in zip(originals, records):
        setattr(cls, name, recorded(original, record))
    try:
        yield
    finally:
        for cls, name, original in originals:
            setattr(cls, name, original)


def drop_empty_grad_regions(graph: fx.Graph) -> None:
    """Erase every ``enter_grad_mode`` immediately followed by its ``exit_grad_mode``: a region
    that computes nothing (tracing's own ``no_grad``, one around Python-only code)."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is exit_grad_mode and node.prev is node.args[0]:
            enter = node.args[0]
            graph.erase_node(node)
            graph.erase_node(enter)


@contextlib.contextmanager
def modules_in_eval_mode(module: nn.Module) -> Iterator[None]:
    """``module``'s submodules in eval mode for the block, then as they were: the model's own
    modules that a graph calls (``nn.Dropout``, ``BatchNorm``) read their ``training`` flag when
    they run, and a training program of the same model (its ``train()``) or ``model.train()``
    may have turned it on since an infer program was compiled."""
    training = [m for m in module.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield
    finally:
        for m in training:
            m.training = True


@contextlib.contextmanager
def grad_mode_kept() -> Iterator[None]:
    """Grad mode as it was on entering, also after a run of a graph that stopped inside one of its
    grad-mode regions."""
    enabled = torch.is_grad_enabled()
    try:
        yield
    finally:
        torch._C._set_grad_enabled(enabled)
