"""Dropout that follows ``program.train()`` / ``program.eval()``.

Tracing freezes ``self.training`` of the model's code: a model captured in training mode calls
``F.dropout(x, p, training=True)`` or ``scaled_dot_product_attention(..., dropout_p=p)`` with
constants, so ``program.eval()`` alone would keep dropping activations. ``follow_train_mode``
routes each such call through a ``TrainOnlyDropout`` submodule of the graph module, which passes
the traced probability in training mode and 0 in eval mode (``nn.Dropout`` modules, kept as
``call_module`` nodes, already follow the mode).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

aten = torch.ops.aten

# op -> (position, keyword, default) of its dropout probability; the ops whose training flag is an
# argument too are skipped when that flag was traced as False
DROPOUT_ARG: dict[Any, tuple[int, str, float]] = {
    F.dropout: (1, "p", 0.5),
    aten.dropout.default: (1, "p", 0.0),
    F.scaled_dot_product_attention: (4, "dropout_p", 0.0),
    aten.scaled_dot_product_attention.default: (4, "dropout_p", 0.0),
}
TRAINING_ARG: dict[Any, tuple[int, str, bool]] = {F.dropout: (2, "training", True),
                                                  aten.dropout.default: (2, "train", True)}


def _argument(node: fx.Node, position: int, keyword: str, default: Any) -> Any:
    return node.args[position] if len(node.args) > position else node.kwargs.get(keyword, default)


class TrainOnlyDropout(nn.Module):
    """Calls ``op`` as traced in training mode, with its dropout probability 0 in eval mode."""

    def __init__(self, op: Callable, position: int, keyword: str):
        super().__init__()
        self.op, self.position, self.keyword = op, position, keyword

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.training:
            if len(args) > self.position:
                args = args[:self.position] + (0.0,) + args[self.position + 1:]
            else:
                kwargs = {**kwargs, self.keyword: 0.0}
        return self.op(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"op={getattr(self.op, '__name__', self.op)}, {self.keyword} in eval mode: 0"


def follow_train_mode(gm: fx.GraphModule) -> int:
    """Route the graph's traced dropout calls (nonzero probability, training on) through
    ``TrainOnlyDropout`` submodules; returns how many were routed. Each new node keeps the
    replaced node's ``meta``."""
    routed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in DROPOUT_ARG:
            continue
        position, keyword, default = DROPOUT_ARG[node.target]
        flag = TRAINING_ARG.get(node.target)
        if not _argument(node, position, keyword, default) or (flag and not _argument(node, *flag)):
            continue
        name = f"train_only_dropout_{routed}"
        gm.add_submodule(name, TrainOnlyDropout(node.target, position, keyword))
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, node.args, node.kwargs)
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        routed += 1
    if routed:
        gm.recompile()
    return routed
