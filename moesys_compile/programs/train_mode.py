"""Dropout that follows ``program.train()`` / ``program.eval()``, and a warning where more than
dropout would have to.

Tracing freezes ``self.training`` of the model's code: a model captured in training mode calls
``F.dropout(x, p, training=True)`` or ``scaled_dot_product_attention(..., dropout_p=p)`` with
constants, so ``program.eval()`` alone would keep dropping activations. ``follow_train_mode``
routes each such call through a ``TrainOnlyDropout`` submodule of the graph module, which passes
the traced probability in training mode and 0 in eval mode (``nn.Dropout`` modules, kept as
``call_module`` nodes, already follow the mode). Code that differs between the modes in more
than dropout (router jitter, a sampling router, another top-k in eval) stays as captured:
``warn_if_mode_changes_code`` says so on the first switch to the other mode.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.fx as fx
from torch import nn

from ..errors import warn_user
from ..frontend.modes import DROPOUT_ARG, TRAINING_ARG, first_difference
from ..ir import module_path_of


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


def _mode(training: bool) -> str:
    return "training" if training else "eval"


def warn_if_mode_changes_code(gm: fx.GraphModule, training: bool, model_name: str) -> None:
    """On the first switch of a program to the mode it was not captured in: capture the model in
    that mode (once) and warn if its code computes more than dropout differently there, naming
    the first place. Nothing for graphs that were not captured (no signature in ``meta``)."""
    captured, recapture = gm.meta.get("moesys_captured_training"), gm.meta.get("moesys_recapture")
    checked = gm.meta.setdefault("moesys_modes_checked", set())
    if recapture is None or training == captured or training in checked:
        return
    checked.add(training)
    try:
        where = first_difference(gm.meta["moesys_mode_signature"], recapture(training))
    except Exception as exc:  # noqa: BLE001 - the other mode's code cannot even be captured: it differs
        where = f"its capture fails: {type(exc).__name__}"
    if where is None:
        return
    if isinstance(where, fx.Node):
        where = where.target if where.op == "call_module" else \
            f"{module_path_of(where) or '(model)'}, {getattr(where.target, '__name__', where.target)}"
    warn_user(f"{model_name} computes differently in {_mode(training)} mode than in the {_mode(captured)} mode "
              f"it was compiled in, beyond dropout (first at {where}): the program keeps the {_mode(captured)}-"
              f"mode code, and program.{'train' if training else 'eval'}() switches its dropout only. To run the "
              f"{_mode(training)}-mode code, compile from the model in that mode "
              f"(model.{'train' if training else 'eval'}() before mc.compile)")
