"""Map a call's (args, kwargs) to the captured graph's inputs, and its outputs back to the
model's output structure."""

from __future__ import annotations

import inspect
from typing import Any, Optional, Sequence

import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree


class InputBinder:
    """Binds calls the way the example was bound when the model was captured.

    fx capture: one graph input per traced forward argument (the argument itself, whatever its
    structure); arguments the example did not give were pinned to their defaults and must stay so.
    export capture: the graph takes the flattened leaves; ``out_spec`` rebuilds the output.
    """

    def __init__(self, model: nn.Module, traced_names: Sequence[str], capture: str,
                 out_spec: Optional[pytree.TreeSpec] = None):
        self.signature = inspect.signature(model.forward)
        self.model_name = type(model).__name__
        self.traced_names = list(traced_names)
        self.capture = capture
        self.out_spec = out_spec
        self.pinned = {name: p.default for name, p in self.signature.parameters.items()
                       if name not in self.traced_names and p.default is not inspect.Parameter.empty}

    def graph_inputs(self, args: Sequence[Any], kwargs: dict) -> list[Any]:
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.model_name}.forward: {exc}") from None
        for name, default in self.pinned.items():
            if name in bound.arguments and bound.arguments[name] is not default and bound.arguments[name] != default:
                raise ValueError(f"argument '{name}' was fixed to {default!r} when the model was compiled; "
                                 f"pass it in example_inputs/example_kwargs to compile it as an input")
        missing = [name for name in self.traced_names if name not in bound.arguments]
        if missing:
            raise TypeError(f"{self.model_name}.forward: missing argument(s) {missing} that were traced as inputs")
        values = [bound.arguments[name] for name in self.traced_names]
        return pytree.tree_leaves(values) if self.capture == "export" else values

    def model_output(self, graph_output: Any) -> Any:
        if self.out_spec is None:
            return graph_output
        return pytree.tree_unflatten(list(graph_output), self.out_spec)


def flatten_export_codegen(gm: fx.GraphModule) -> Optional[pytree.TreeSpec]:
    """Give an exported module a plain flat signature; return its output spec (None for fx graphs)."""
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is None:
        return None
    gm.graph._codegen = fx.graph.CodeGen()
    gm._forward_pre_hooks.clear()
    gm.recompile()
    return info.out_spec
