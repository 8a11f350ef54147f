"""Helpers for the one IR, ``torch.fx.GraphModule``: our facts live in ``node.meta["moesys"]``.

Keys written by the frontend: ``layer`` (int or None), ``module`` (qualified path of the module
that produced the node), ``cost`` (a Cost of sympy expressions in the batch/sequence symbols).
Passes add their own keys (e.g. ``lowered_to``, ``section``, ``bucket``) and document them.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def moesys_meta(node: fx.Node) -> dict[str, Any]:
    """The node's ``meta["moesys"]`` dict, created empty when missing."""
    return node.meta.setdefault("moesys", {})


def layer_of_path(path: Optional[str]) -> Optional[int]:
    """``layers.3.ffn.router`` -> 3 (the first integer component of a module path)."""
    if not path:
        return None
    match = _LAYER_INDEX.search(path)
    return int(match.group(1)) if match else None


def module_path_of(node: fx.Node) -> Optional[str]:
    """Qualified path of the innermost module a node was traced in, or of the attribute it reads."""
    if node.op in ("call_module", "get_attr"):
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return path.removeprefix("L['self'].").removeprefix("L__self__.") if isinstance(path, str) else None
    return None


def is_op(node: Any, *names: str, namespace: str = "moesys") -> bool:
    """True if ``node`` is an fx node calling ``torch.ops.<namespace>.<name>`` for one of ``names``,
    through the packet (``torch.ops.moesys.route``) or any of its overloads (``.default``, ...).

    >>> is_op(node, "moe_experts")                                   # doctest: +SKIP
    >>> is_op(node, "route_topk", namespace="moesys_kernels")        # doctest: +SKIP
    """
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        target = target.overloadpacket
    if not isinstance(target, torch._ops.OpOverloadPacket):
        return False
    return target._qualified_op_name in {f"{namespace}::{name}" for name in names}


def fetch(root: torch.nn.Module, target: str) -> Any:
    """The attribute a ``get_attr`` / ``call_module`` target names: ``fetch(gm, "layers.0.ffn.w_up")``."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def region_body(root: torch.nn.Module, node: fx.Node) -> Optional[fx.GraphModule]:
    """The graph a ``get_attr`` node names when it is the body of a region (export's
    ``wrap_with_autocast`` and ``wrap_with_set_grad_enabled`` calls take theirs so); else None."""
    if node.op != "get_attr":
        return None
    value = fetch(root, str(node.target))
    return value if isinstance(value, fx.GraphModule) else None


def canonical_target(target: Any) -> Any:
    """Resolve an OpOverloadPacket (``torch.ops.moesys.route``) to its ``.default`` overload."""
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.default
    return target


def bound_args(node: fx.Node) -> dict[str, Any]:
    """A call's arguments by schema name, defaults filled in."""
    schema = canonical_target(node.target)._schema
    args: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            args[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            args[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            args[arg.name] = arg.default_value
    return args


# arguments of the expert ops whose dim 0 is the expert: what expert parallelism shards
EXPERT_TENSOR_ARGS = ("w_up_EHD", "w_down_EDF", "b_up_EH", "b_down_ED")


def expert_tensors(node: fx.Node) -> list[fx.Node]:
    """The expert weights (and biases, when the experts have them) a ``grouped_mlp`` /
    ``moe_experts`` node reads, in ``EXPERT_TENSOR_ARGS`` order."""
    args = bound_args(node)
    return [args[name] for name in EXPERT_TENSOR_ARGS if isinstance(args.get(name), fx.Node)]


def expert_biases(args: dict[str, Any]) -> tuple:
    """The (up, down) expert-bias arguments of an experts call's ``bound_args`` (``b_up_EH``/
    ``b_down_ED``, or a ring group's ``b_up_GH``/``b_down_GD``), or () when the experts have none."""
    names = [n for n in args if n.startswith(("b_up_", "b_down_"))]
    return tuple(args[n] for n in names) if any(isinstance(args[n], fx.Node) for n in names) else ()


def val(node: Any) -> Any:
    """``meta["val"]`` of a node; non-nodes are returned as they are."""
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def value_signature(value: Any) -> Any:
    """A hashable description of a value's metadata (tensors: sizes, strides, dtype, device), so
    that computations on equal signatures can share one fake result."""
    if isinstance(value, torch.Tensor):
        return ("T", tuple(_size_key(s) for s in value.shape), tuple(_size_key(s) for s in value.stride()),
                value.dtype, str(value.device), isinstance(value, torch.nn.Parameter))
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("S", value.node.expr)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(value_signature(v) for v in value))
    if isinstance(value, dict):
        return ("D", tuple((k, value_signature(v)) for k, v in value.items()))
    if isinstance(value, slice):
        return ("slice", value_signature(value.start), value_signature(value.stop), value_signature(value.step))
    try:
        hash(value)
        return value
    except TypeError:
        return ("id", id(value))


def _size_key(size: Any) -> Any:
    return size.node.expr if isinstance(size, torch.SymInt) else int(size)


def infer_val(node: fx.Node, fake_mode) -> Any:
    """Compute ``meta["val"]`` for a call_function node from its inputs' vals (for new nodes).
    Results are shared between nodes with the same target and input metadata."""
    args = tree_map(val, node.args)
    kwargs = tree_map(val, node.kwargs)
    memo = fake_mode.__dict__.setdefault("_moesys_val_memo", {})
    key = (node.target, value_signature(args), value_signature(kwargs))
    if key not in memo:
        with fake_mode:
            memo[key] = node.target(*args, **kwargs)
    node.meta["val"] = memo[key]
    return memo[key]


def tensors_in(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from tensors_in(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from tensors_in(item)


def target_name(node: fx.Node) -> str:
    """Short readable name of what a node runs."""
    target = node.target
    if node.op in ("placeholder", "output", "get_attr", "call_module"):
        return str(target)
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target).removesuffix(".default")
    if node.op == "call_method":
        return f".{target}"
    name = getattr(target, "__name__", None) or str(target)
    module = getattr(target, "__module__", None) or ""
    if module.startswith("torch") or type(target).__name__ == "builtin_function_or_method" and hasattr(torch, name):
        return f"torch.{name}" if getattr(torch, name, None) is target else name
    return name
