"""Annotate a captured graph: FakeTensor shape propagation with symbolic batch (B) and sequence
(S) sizes, then a cost record per node whose fields are sympy expressions in B and S.

    node.meta["val"]                 FakeTensor (or tuple of them) with symbolic sizes
    node.meta["moesys"]["module"]    qualified path of the module the node belongs to
    node.meta["moesys"]["layer"]     integer layer index (first integer in that path) or None
    node.meta["moesys"]["cost"]      Cost(flops, param_bytes, activation_bytes, comm_bytes)
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch._decomp import decomposition_table
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import (DataDependentOutputException, FakeTensor, FakeTensorMode,
                                          unset_fake_temporarily)
from torch.fx.experimental.symbolic_shapes import (DimDynamic, GuardOnDataDependentSymNode, ShapeEnv,
                                                   StatelessSymbolicContext, free_unbacked_symbols)
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils._pytree import tree_leaves, tree_map

from .empty_weights import fake_like
from .modes import GRAD_MODE_CALLS, grad_mode_kept
from ..errors import UntraceableModelError, torch_logs_silenced
from ..ir import fetch, is_op, layer_of_path, module_path_of, moesys_meta, tensors_in, value_signature

B = sympy.Symbol("B", positive=True, integer=True)
S = sympy.Symbol("S", positive=True, integer=True)
ZERO = sympy.Integer(0)

# torch's integer functions that symbolic sizes hold (a mamba layer's chunk count is a FloorDiv),
# as Python, for sympy.lambdify
_SIZE_FUNCTIONS = {
    "FloorDiv": operator.floordiv, "CleanDiv": operator.floordiv, "CeilDiv": lambda a, b: -(-a // b),
    "ModularIndexing": lambda x, div, mod: (x // div) % mod, "PythonMod": operator.mod, "Mod": operator.mod,
    "Max": max, "Min": min, "IntTrueDiv": operator.truediv, "FloatTrueDiv": operator.truediv,
    "TruncToInt": math.trunc, "FloorToInt": math.floor, "CeilToInt": math.ceil, "RoundToInt": round,
    "ToFloat": float, "Identity": lambda x: x, "PowByNatural": operator.pow, "FloatPow": operator.pow,
    "Where": lambda cond, a, b: a if cond else b,
}


def size_function(exprs: Any) -> Any:
    """``sympy.lambdify`` of size expressions over (B, S), knowing torch's integer functions."""
    return sympy.lambdify((B, S), exprs, [_SIZE_FUNCTIONS, "math"])


@dataclass
class Cost:
    """Per-node cost; every field a sympy expression in B and S (integers when static)."""
    flops: sympy.Expr = ZERO
    param_bytes: sympy.Expr = ZERO
    activation_bytes: sympy.Expr = ZERO
    comm_bytes: sympy.Expr = ZERO

    FIELDS = ("flops", "param_bytes", "activation_bytes", "comm_bytes")

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(getattr(self, f) + getattr(other, f) for f in self.FIELDS))

    def evaluate(self, batch: int, seq: int) -> dict[str, int]:
        values = {B: batch, S: seq}
        return {f: int(sympy.sympify(getattr(self, f)).xreplace(values)) for f in self.FIELDS}


@dataclass
class Annotation:
    """What annotate() learned, kept on the CompileContext for passes and inspect."""
    fake_mode: FakeTensorMode
    symbolic: bool                      # False: static shapes (symbolic propagation failed)
    symbol_map: dict = field(default_factory=dict)  # shape-env symbol -> B or S
    example_batch: int = 1
    example_seq: int = 1
    static_reason: Optional[str] = None
    unbacked_bounds: dict = field(default_factory=dict)  # data-dependent size u0, u1 ... -> its bound in B, S
    input_dims: list = field(default_factory=list)       # per graph input: {dim: its size in B and S}

    def batch_and_seq(self, flat_inputs: Sequence[Any]) -> tuple[int, int]:
        """B and S of a call: the sizes of the first input dims that are B and S themselves."""
        return batch_and_seq(flat_inputs, self.input_dims)

    def expr(self, size: Any) -> sympy.Expr:
        """A size (int or SymInt) as a sympy expression in B and S; a data-dependent size (the
        count of ``torch.where``, ``nonzero``, a boolean mask) as its upper bound."""
        if isinstance(size, torch.SymInt):
            node = size.node
            expr = node.shape_env.replace(node.expr) if node.shape_env is not None else node.expr
            return sympy.sympify(expr).xreplace(self.symbol_map).xreplace(self.unbacked_bounds)
        return sympy.Integer(int(size))


# ---------------------------------------------------------------------------------------------
# symbolic inputs
# ---------------------------------------------------------------------------------------------


def _dynamic_dims(t: torch.Tensor) -> dict[int, sympy.Symbol]:
    """dim 0 is the batch; dim 1 is the sequence for token ids [B, S] and for [B, S, ...] inputs."""
    dims: dict[int, sympy.Symbol] = {}
    if t.dim() >= 1:
        dims[0] = B
    if t.dim() >= 3 or (t.dim() == 2 and not t.is_floating_point()):
        dims[1] = S
    return dims


def input_dims(gm: fx.GraphModule, flat_inputs: Sequence[Any], named: dict) -> list[dict[int, sympy.Expr]]:
    """Per graph input, its symbolic dims as sizes in B and S: those the captured module names
    for that argument in ``named`` (its ``symbolic_dims``, e.g. a KV cache whose length is S and
    a mask of S + 1 positions), else batch and sequence by ``_dynamic_dims``."""
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return [dict(named[name]) if name in named else _dynamic_dims(value) if isinstance(value, torch.Tensor) else {}
            for name, value in zip(names, flat_inputs)]


def batch_and_seq(flat_inputs: Sequence[Any], dims: Sequence[dict]) -> tuple[int, int]:
    """The sizes of the first input dims that are B and S themselves (1 where none is)."""
    def size_of(symbol: sympy.Symbol) -> int:
        return next((int(t.shape[d]) for t, sizes in zip(flat_inputs, dims) for d, size in sizes.items()
                     if size == symbol and isinstance(t, torch.Tensor)), 1)
    return size_of(B), size_of(S)


def _symbolic_inputs(flat_inputs: Sequence[Any], dims: Sequence[dict], mode: FakeTensorMode) -> tuple[list, dict]:
    fakes, symbol_map, first = [], {}, {}
    batch, seq = batch_and_seq(flat_inputs, dims)
    hints = {B: max(2, batch), S: max(2, seq)}
    for value, sizes in zip(flat_inputs, dims):
        if not isinstance(value, torch.Tensor):
            fakes.append(value)
            continue
        # sizes 0 and 1 would be specialised by the shape env: trace with a hint of at least 2 (a
        # size that is an expression, S + 1, at the hints of its symbols, so that they agree)
        hint_shape = [s if d not in sizes else max(2, s) if sizes[d].is_Symbol else int(sizes[d].xreplace(hints))
                      for d, s in enumerate(value.shape)]
        hint = torch.empty(hint_shape, dtype=value.dtype, device=value.device)
        context = StatelessSymbolicContext(
            dynamic_sizes=[DimDynamic.DYNAMIC if d in sizes else DimDynamic.STATIC for d in range(value.dim())])
        fake = mode.from_tensor(hint, symbolic_context=context)
        for d, size in sizes.items():
            # inputs of one example size share one symbol (tokens and their labels: a loss's
            # ``logits.view(-1, V)`` against ``labels.view(-1)`` then needs no guard on products)
            if (size, hint_shape[d]) in first:
                torch._check(fake.shape[d] == first[size, hint_shape[d]])
            else:
                first[size, hint_shape[d]] = fake.shape[d]
            symbol_map[fake.shape[d].node.expr] = size
        fakes.append(fake)
    return fakes, symbol_map


def flatten_example(model: nn.Module, example_inputs: Sequence[Any], example_kwargs: dict) -> list[Any]:
    """Example values in the order of the captured graph's placeholders."""
    try:
        bound = inspect.signature(model.forward).bind_partial(*example_inputs, **example_kwargs)
        return tree_leaves(list(bound.arguments.values()))
    except (TypeError, ValueError):
        return tree_leaves([list(example_inputs), example_kwargs])


def _constant_pad(x: torch.Tensor, pad: Sequence[Any], mode: str = "constant", value: Optional[float] = None):
    if mode != "constant":
        return torch.ops.aten.pad.default(x, pad, mode, value)
    return decomposition_table[torch.ops.aten.constant_pad_nd.default](x, pad, 0 if value is None else value)


def _dropout_shaped(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.empty_like(x)


def _native_dropout_shaped(x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)


# ops whose fake kernel reads sizes as plain ints, fixing B and S to the example's (a causal LM's
# loss pads its labels): computed through their decompositions, which keep the sizes symbolic;
# dropout guards on its input being empty, which a routed token count cannot tell: its output is
# shaped as its input
_SYMBOLIC_FORMS = {torch.ops.aten.pad.default: _constant_pad, torch.ops.aten.constant_pad_nd.default: _constant_pad,
                   F.dropout: _dropout_shaped, torch.dropout: _dropout_shaped,
                   torch.ops.aten.dropout.default: _dropout_shaped,
                   torch.ops.aten.native_dropout.default: _native_dropout_shaped}


# the first size tried for a data-dependent dim when a leaf module runs on real zeros (a prime,
# so that it rarely equals another dim and its outputs' sizes map back to the right symbol)
UNBACKED_STAND_IN = 97


@contextlib.contextmanager
def _state_replaced(module: nn.Module, parameter: Callable[[torch.Tensor], torch.Tensor],
                    buffer: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """While inside, every parameter and buffer of ``module`` (and of its submodules) is
    ``parameter(t)`` / ``buffer(t)``; afterwards the very same tensors are back."""
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    for owner in module.modules():
        for table, make in ((owner._parameters, parameter), (owner._buffers, buffer)):
            for name, t in list(table.items()):
                if t is not None:
                    table[name] = make(t)
                    swapped.append((table, name, t))
    try:
        yield
    finally:
        for table, name, t in reversed(swapped):
            table[name] = t


class MemoFakeProp(FakeTensorProp):
    """FakeTensorProp that reuses the result of an identical earlier node (same op, same input
    metadata, same constants). Repeated layers are propagated once, which keeps annotation of
    deep models linear and cheap; every node still gets its own ``meta["val"]``.

    The model's parameters and buffers take part as fake tensors (on ``home``, the example inputs'
    device, for those on the meta device of a model built under ``empty_weights``): propagation
    never writes the model, though its code updates buffers in place (an EMA under ``no_grad``,
    BatchNorm's running statistics and ``num_batches_tracked += 1`` in a leaf)."""

    def __init__(self, module: fx.GraphModule, mode: FakeTensorMode, home: torch.device = torch.device("cpu")):
        super().__init__(module, mode)
        self.memo: dict = {}
        self.home = home
        self.current: Optional[fx.Node] = None   # the node being propagated (named when it fails)
        self.fixed_by: dict = {}                  # shape-env symbol -> the node that first fixed it to a number

    def fake(self, t: torch.Tensor) -> torch.Tensor:
        """The fake that stands in for the model's tensor ``t`` (one per tensor: tied weights stay tied)."""
        if isinstance(t, FakeTensor):
            return t
        if t.is_meta:
            return fake_like(t, self._mode, self.home)
        return self._mode.from_tensor(t, static_shapes=True)

    def fetch_attr(self, target: str) -> Any:
        value = super().fetch_attr(target)
        return self.fake(value) if isinstance(value, torch.Tensor) else value

    def call_module(self, target: str, args: Any, kwargs: Any) -> Any:
        with _state_replaced(self.module.get_submodule(target), self.fake, self.leaf_buffer):
            return super().call_module(target, args, kwargs)

    def leaf_buffer(self, t: torch.Tensor) -> torch.Tensor:
        """A leaf's buffer as a fake; a one-element buffer (BatchNorm's ``num_batches_tracked``,
        which its momentum=None average reads with ``float()``) as a fake that knows its value,
        from a copy that the leaf may update."""
        if t.numel() != 1 or t.is_meta or isinstance(t, FakeTensor):
            return self.fake(t)
        with unset_fake_temporarily():
            copy = t.detach().clone()
        return self._mode.fake_tensor_converter.from_real_tensor(self._mode, copy, make_constant=True)

    def leaf_state(self, t: torch.Tensor) -> torch.Tensor:
        """A leaf's real parameter or buffer as the leaf runs with it when it runs for real
        (``_run_leaf_for_real``): the tensor itself."""
        return t

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        symbolic_form = _SYMBOLIC_FORMS.get(target)
        if symbolic_form is not None:
            return symbolic_form(*args, **kwargs)
        return super().call_function(target, args, kwargs)

    def _key(self, node: fx.Node) -> Any:
        if node.op in ("placeholder", "output") or node.target in GRAD_MODE_CALLS:
            return None      # (grad mode must change at every region, as it will when the graph runs)
        if node.op == "get_attr":
            return ("get_attr", value_signature(fetch(self.module, node.target)))
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        if node.op == "call_module":
            module = self.module.get_submodule(node.target)
            params = tuple((n, value_signature(p)) for n, p in module.named_parameters())
            what = (type(module), module.extra_repr(), params)
        else:
            what = node.target
        return (node.op, what, value_signature(args), value_signature(kwargs))

    def run_node(self, node: fx.Node) -> Any:
        self.current = node
        result = self._run_node(node)
        for symbol in _fixed_symbols(self._mode) - self.fixed_by.keys():
            self.fixed_by[symbol] = node
        return result

    def _run_node(self, node: fx.Node) -> Any:
        key = self._key(node)
        if key is not None and key in self.memo:
            result, val = self.memo[key]
            node.meta["val"] = val
            return result
        try:
            result = super().run_node(node)
        except (DataDependentOutputException, GuardOnDataDependentSymNode):
            if node.op != "call_module":
                raise
            result = self._run_leaf_for_real(node)
            node.meta["val"] = result
        node.meta.setdefault("val", result)   # dtypes, devices, None: plain values are their own val
        if key is not None:
            self.memo[key] = (result, node.meta.get("val"))
        return result

    def _run_leaf_for_real(self, node: fx.Node) -> Any:
        """A leaf module whose code depends on tensor values (or guards on a data-dependent size,
        as dropout does on a routed token count) cannot run on fake tensors: run it on real zeros
        of the hinted sizes, then give the output symbolic sizes wherever an output size equals the
        hint of an input's symbolic size. A data-dependent size has no hint: it stands in as a
        size that no other dim of the inputs has. The leaf runs on copies of its buffers (what
        it updates there is dropped) and on its own parameters (which are not copied: a module
        that writes its parameters in forward would write them here too), each as ``leaf_state``
        gives it."""
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        tensors = [value for value in tree_leaves((args, kwargs)) if isinstance(value, torch.Tensor)]
        taken = {int(size) for value in tensors for size in value.shape if not isinstance(size, torch.SymInt)}
        taken |= {size.node.hint for value in tensors for size in value.shape
                  if isinstance(size, torch.SymInt) and size.node.hint is not None}
        by_hint: dict[int, Any] = {}
        hint_of: dict[Any, int] = {}
        for size in (s for value in tensors for s in value.shape if isinstance(s, torch.SymInt)):
            if size.node.expr not in hint_of:
                hint = size.node.hint
                if hint is None:
                    hint = next(n for n in itertools.count(UNBACKED_STAND_IN) if n not in taken)
                    taken.add(hint)
                hint_of[size.node.expr] = hint
                by_hint.setdefault(hint, size)

        def real(value):
            if isinstance(value, torch.Tensor):
                shape = [hint_of[s.node.expr] if isinstance(s, torch.SymInt) else s for s in value.shape]
                return torch.zeros(shape, dtype=value.dtype, device=value.device)
            return value

        module = self.module.get_submodule(node.target)
        copies: dict[int, torch.Tensor] = {}   # one copy per buffer: tied buffers stay tied
        with unset_fake_temporarily(), _state_replaced(module, self.leaf_state,
                                                       lambda t: copies.setdefault(id(t), self.leaf_state(t).clone())):
            output = module(*tree_map(real, args), **tree_map(real, kwargs))

        def fake(value):
            if isinstance(value, torch.Tensor):
                shape = [by_hint.get(s, s) for s in value.shape]
                with self._mode:
                    return torch.empty(shape, dtype=value.dtype, device=value.device)
            return value
        return tree_map(fake, output)


def _fixed_symbols(mode: FakeTensorMode) -> set:
    """The shape-env symbols that propagation has fixed to a number so far."""
    if mode.shape_env is None:
        return set()
    return {symbol for symbol, value in mode.shape_env.replacements.items() if sympy.sympify(value).is_number}


def _check_still_symbolic(mode: FakeTensorMode, symbol_map: dict, fixed_by: dict) -> None:
    """Raise where an op fixed B or S to the example's size while propagating (its fake kernel read
    the size as an int): the estimates would not grow with a call, so shapes are static instead.
    ``fixed_by``: the node that fixed each symbol (``MemoFakeProp.fixed_by``), named with its module."""
    fixed = {symbol: symbol_map[symbol] for symbol in _fixed_symbols(mode)
             if symbol in symbol_map and symbol_map[symbol].is_Symbol}
    if fixed:
        sizes = {str(size): int(mode.shape_env.replacements[symbol]) for symbol, size in fixed.items()}
        places = dict.fromkeys(_node_place(fixed_by.get(symbol)) for symbol in fixed)
        raise ValueError(f"an op fixed {sizes} to the example's sizes while propagating shapes, at "
                         f"{'; '.join(places)}")


@contextlib.contextmanager
def symbolic_propagation() -> Iterator[None]:
    """What propagation on symbolic sizes runs under: fake-tensor logs silenced, grad mode kept,
    and torch's composite ops (``linear``, ``matmul``) run as their Python decompositions, which
    keep sizes symbolic on every torch this supports (the C++ ``matmul`` of torch 2.11 reads
    ``numel()`` of a symbolic 3-d input and fails); ``rms_norm`` as ``_rms_norm_of_any_size``
    where torch's own fixes the sizes (torch 2.5)."""
    with torch_logs_silenced("torch._subclasses.fake_tensor"), grad_mode_kept(), enable_python_dispatcher():
        if not _rms_norm_fixes_sizes():
            yield
            return
        original = F.rms_norm
        F.rms_norm = _rms_norm_of_any_size
        try:
            yield
        finally:
            F.rms_norm = original


def _rms_norm_of_any_size(input: torch.Tensor, normalized_shape: Sequence[int], weight: Optional[torch.Tensor] = None,
                          eps: Optional[float] = None) -> torch.Tensor:
    """``F.rms_norm`` from elementwise ops and a mean, which keep sizes symbolic: the same shape and
    dtype as torch's (the input's), computed in float32 as torch computes it."""
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    upcast = input.float()
    out = upcast * torch.rsqrt(upcast.pow(2).mean(tuple(range(-len(normalized_shape), 0)), keepdim=True) + eps)
    return (out if weight is None else out * weight).type_as(input)


@functools.lru_cache(maxsize=None)
def _rms_norm_fixes_sizes() -> bool:
    """Whether torch's ``F.rms_norm`` fixes symbolic sizes to numbers (torch 2.5's does), probed
    once on a fake [s0, 4] input."""
    if not hasattr(F, "rms_norm"):
        return False
    mode = FakeTensorMode(shape_env=ShapeEnv(duck_shape=False))
    fake = mode.from_tensor(torch.zeros(3, 4), symbolic_context=StatelessSymbolicContext(
        dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC]))
    try:
        with mode, enable_python_dispatcher():
            F.rms_norm(fake, (4,))
    except Exception:  # noqa: BLE001 - torch's own cannot take symbolic sizes at all: use ours
        return True
    return bool(_fixed_symbols(mode))


def propagate_shapes(gm: fx.GraphModule, flat_inputs: Sequence[Any], named_dims: Optional[dict] = None) -> Annotation:
    """FakeTensor propagation, symbolic in B and S (the inputs' dims: ``input_dims``); static
    shapes when symbolic propagation fails."""
    dims = input_dims(gm, flat_inputs, named_dims or {})
    example_batch, example_seq = batch_and_seq(flat_inputs, dims)
    home = next((t.device for t in flat_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    mode = FakeTensorMode(shape_env=ShapeEnv(duck_shape=False), allow_non_fake_inputs=True)
    for node in gm.graph.nodes:   # torch.export's names for data-dependent sizes clash with this shape env's
        node.meta.pop("unbacked_bindings", None)
    symbolic = MemoFakeProp(gm, mode, home)
    try:
        with symbolic_propagation():   # a failure: static shapes
            fakes, symbol_map = _symbolic_inputs(flat_inputs, dims, mode)
            symbolic.propagate_dont_convert_inputs(*fakes)
            _check_still_symbolic(mode, symbol_map, symbolic.fixed_by)
        return Annotation(mode, True, symbol_map, example_batch, example_seq, input_dims=dims)
    except Exception as exc:  # e.g. a guard on a data-dependent size: fall back to static shapes
        static_mode = FakeTensorMode(allow_non_fake_inputs=True)
        static = MemoFakeProp(gm, static_mode, home)
        try:
            with torch_logs_silenced("torch._subclasses.fake_tensor"), grad_mode_kept():
                static.propagate(*flat_inputs)
        except Exception as static_exc:
            raise _propagation_error((symbolic.current, exc), (static.current, static_exc)) from static_exc
        return Annotation(static_mode, False, {}, example_batch, example_seq, input_dims=dims,
                          static_reason=_first_line(exc))


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _node_place(node: Optional[fx.Node]) -> str:
    return "?" if node is None else f"{node.format_node()} (module {module_path_of(node) or '(model)'})"


def _propagation_error(*failures: tuple[Optional[fx.Node], BaseException]) -> Exception:
    """Shapes could be propagated neither on symbolic sizes nor at the example's: name each
    failing node, its module and its error."""
    (symbolic_node, symbolic), (static_node, static) = failures
    return UntraceableModelError(
        f"the captured graph's shapes cannot be propagated: on symbolic sizes at {_node_place(symbolic_node)}, with "
        f"{_first_line(symbolic)}; at the example's sizes at {_node_place(static_node)}, with {_first_line(static)}. "
        f"Make that module a leaf (Plan(leaf_modules=[...]) with its path), or compute it without sizes "
        f"that depend on tensor values")


# ---------------------------------------------------------------------------------------------
# cost rules: (matcher, flops function) pairs, first match wins
# ---------------------------------------------------------------------------------------------

_ZERO_FLOP_TARGETS = {
    operator.getitem, getattr, torch.Tensor.size, torch.flatten, torch.reshape, torch.cat, torch.stack,
    torch.narrow, torch.chunk, torch.split, torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze,
    F.embedding, torch.ones, torch.zeros, torch.empty, torch.arange,
}
_ZERO_FLOP_METHODS = {
    "view", "reshape", "permute", "transpose", "contiguous", "size", "expand", "chunk", "split", "unsqueeze",
    "squeeze", "flatten", "to", "type", "float", "half", "bfloat16", "t", "view_as", "expand_as", "narrow",
    "dim", "numel", "clone", "detach", "unflatten",
}
_VIEW_LIKE = {operator.getitem, getattr, torch.Tensor.size, torch.reshape, torch.flatten, torch.narrow,
              torch.chunk, torch.split, torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze}
_MATMULS = {torch.matmul, torch.mm, torch.bmm, operator.matmul, F.linear}
_ATEN_MATMULS = {"mm", "bmm", "matmul", "linear", "addmm", "baddbmm"}
_ATEN_ZERO = {"view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "slice", "select",
              "unsqueeze", "squeeze", "split", "chunk", "cat", "clone", "contiguous", "embedding", "alias",
              "_to_copy", "to", "detach", "arange", "ones", "zeros", "empty", "full", "lift_fresh_copy"}


class CostModel:
    def __init__(self, gm: fx.GraphModule, annotation: Annotation):
        self.gm, self.ann = gm, annotation
        self.seen_state: set[int] = set()

    def numel(self, t: torch.Tensor) -> sympy.Expr:
        result = sympy.Integer(1)
        for size in t.shape:
            result = result * self.ann.expr(size)
        return result

    def out_bytes(self, node: fx.Node) -> sympy.Expr:
        return sum((self.numel(t) * t.element_size() for t in tensors_in(node.meta.get("val"))), ZERO)

    def state_bytes(self, tensors) -> sympy.Expr:
        total = 0
        for t in tensors:
            if id(t) not in self.seen_state:   # tied weights count once
                self.seen_state.add(id(t))
                total += t.numel() * t.element_size()
        return sympy.Integer(total)

    def flops(self, node: fx.Node) -> sympy.Expr:
        out = node.meta.get("val")
        args = [a.meta.get("val") if isinstance(a, fx.Node) else a for a in node.args]
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            if isinstance(module, nn.Linear) and isinstance(out, torch.Tensor):
                return 2 * self.numel(out) * module.in_features
            if isinstance(module, nn.Embedding):
                return ZERO
            return sum((self.numel(t) for t in tensors_in(out)), ZERO)
        if node.op == "call_method":
            if node.target in _ZERO_FLOP_METHODS:
                return ZERO
            return sum((self.numel(t) for t in tensors_in(out)), ZERO)
        if node.op != "call_function":
            return ZERO
        target = node.target
        if is_op(node, "moe_experts", "grouped_mlp"):
            if is_op(node, "moe_experts"):   # x_TD, ids_TK, weights_TK, w_up_EHD, w_down_EDF
                x, slots_per_row, w_up, w_down = args[0], args[1].shape[1], args[3], args[4]
            else:                            # x_ND, counts_E, w_up_EHD, w_down_EDF
                x, slots_per_row, w_up, w_down = args[0], 1, args[2], args[3]
            rows = self.ann.expr(x.shape[0]) * slots_per_row
            _, up_rows, dim = w_up.shape
            hidden = w_down.shape[2]
            return rows * (2 * dim * up_rows + 2 * hidden * dim + up_rows)
        if is_op(node, "expert_linear"):     # x_NI, ids_N, w_EOI: one [I] x [I, O] product per row
            return 2 * self.numel(out) * self.ann.expr(args[2].shape[2])
        if is_op(node, "route", "load_balancing_loss"):
            return 4 * self.numel(args[0])
        if is_op(node, "permute", "unpermute"):
            return sum((self.numel(t) for t in tensors_in(out)), ZERO)
        if target in _MATMULS or _aten_name(target) in _ATEN_MATMULS:
            first = args[1] if _aten_name(target) in ("addmm", "baddbmm") else args[0]
            if isinstance(out, torch.Tensor) and isinstance(first, torch.Tensor):
                return 2 * self.numel(out) * self.ann.expr(first.shape[-1])
        if target is F.scaled_dot_product_attention or _aten_name(target, "").startswith("scaled_dot_product"):
            q, k = args[0], args[1]
            return 4 * self.numel(q) * self.ann.expr(k.shape[-2])
        if target in _ZERO_FLOP_TARGETS or _aten_name(target) in _ATEN_ZERO:
            return ZERO
        return sum((self.numel(t) for t in tensors_in(out) if t.is_floating_point()), ZERO)

    def param_bytes(self, node: fx.Node) -> sympy.Expr:
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            return self.state_bytes(list(module.parameters()) + list(module.buffers()))
        if node.op == "get_attr":
            value = fetch(self.gm, node.target)
            return self.state_bytes([value]) if isinstance(value, torch.Tensor) else ZERO
        return ZERO

    def activation_bytes(self, node: fx.Node) -> sympy.Expr:
        if node.op in ("placeholder", "output", "get_attr"):
            return ZERO
        if node.op == "call_function" and (node.target in _VIEW_LIKE or _aten_name(node.target) in _ATEN_ZERO):
            return ZERO
        if node.op == "call_method" and node.target in _ZERO_FLOP_METHODS:
            return ZERO
        return self.out_bytes(node)

    def cost(self, node: fx.Node) -> Cost:
        return Cost(self.flops(node), self.param_bytes(node), self.activation_bytes(node), ZERO)


def _aten_name(target: Any, default: Optional[str] = None) -> Optional[str]:
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        return target._opname
    return default


def annotate_costs(gm: fx.GraphModule, annotation: Annotation) -> None:
    """Fill module / layer / cost in ``meta["moesys"]`` for every node (keeps existing comm costs)."""
    model = CostModel(gm, annotation)
    for node in gm.graph.nodes:
        meta = moesys_meta(node)
        path = module_path_of(node)
        meta.setdefault("module", path)
        meta.setdefault("layer", layer_of_path(path))
        cost = model.cost(node)
        if "cost" in meta:
            cost.comm_bytes = meta["cost"].comm_bytes
        meta["cost"] = cost


# op name ("moesys::ep_dispatch") -> rule(node, expr) giving {data-dependent size: its bound} for the
# sizes the op makes, where its inputs' element counts say little (a collective receives rows from
# every rank); ``expr`` turns a size of a fake value into an expression in B and S
UNBACKED_BOUND_RULES: dict[str, Callable[[fx.Node, Callable[[Any], sympy.Expr]], dict]] = {}


def register_unbacked_bound(op_name: str, rule: Callable[[fx.Node, Callable[[Any], sympy.Expr]], dict]) -> None:
    UNBACKED_BOUND_RULES[op_name] = rule


def _op_name(target: Any) -> Optional[str]:
    """``namespace::name`` of a custom op (an overload or its packet), else None."""
    name = getattr(target, "_qualified_op_name", None) or getattr(getattr(target, "_overloadpacket", None),
                                                                  "_qualified_op_name", None)
    return name


def bound_unbacked_sizes(gm: fx.GraphModule, annotation: Annotation) -> None:
    """Bound each data-dependent size in B and S, so that costs and the ring's activation workspace
    stay expressions bounded from above: by the op's own rule (``UNBACKED_BOUND_RULES``) where it
    has one, else by the element count of the node that made it: of its boolean inputs when it
    has some (``torch.where(mask)``, ``x[mask]`` find at most ``mask.numel()`` entries), else of
    its largest input (``nonzero(x)``)."""
    seen: set = set()
    costs = CostModel(gm, annotation)
    for node in gm.graph.nodes:
        sized = [v for v in tree_leaves(node.meta.get("val")) if isinstance(v, (torch.Tensor, torch.SymInt))]
        made = free_unbacked_symbols(sized) - seen
        if not made:
            continue
        rule = UNBACKED_BOUND_RULES.get(_op_name(node.target))
        own = rule(node, annotation.expr) if rule is not None else {}
        inputs = [t for n in node.all_input_nodes for t in tensors_in(n.meta.get("val"))]
        masks = [t for t in inputs if t.dtype == torch.bool]
        sizes = [costs.numel(t) for t in masks or inputs]
        bound = sympy.Max(*sizes) if sizes else sympy.Integer(0)
        annotation.unbacked_bounds.update((symbol, own.get(symbol, bound)) for symbol in made)
        seen |= made


def annotate(gm: fx.GraphModule, flat_inputs: Sequence[Any], named_dims: Optional[dict] = None) -> Annotation:
    """Shape propagation then costs. Returns the Annotation (fake mode, symbols) for the context.
    ``named_dims``: the captured module's ``symbolic_dims`` ({argument: {dim: size in B and S}})."""
    annotation = propagate_shapes(gm, flat_inputs, named_dims)
    bound_unbacked_sizes(gm, annotation)
    annotate_costs(gm, annotation)
    return annotation
