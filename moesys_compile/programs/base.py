"""Program: the compiled model as an ``nn.Module`` that shares the model's parameters."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn


class Program(nn.Module):
    """Runs the compiled graph; ``program(*args, **kwargs)`` returns what the model returns.

    ``program.aux_loss`` holds the summed load-balancing loss of the last forward (inside the
    autograd graph; None for a model without MoE layers). ``program.graph_module`` is the final
    fx graph, ``program.context`` the compile context (snapshots, notes, annotation).
    """

    def __init__(self, gm: fx.GraphModule, ctx):
        super().__init__()
        self.graph_module = gm
        self.plan = ctx.plan
        self.aux_loss: Optional[torch.Tensor] = None
        object.__setattr__(self, "context", ctx)   # not a submodule: keep it out of state_dict

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        binder = self.context.extras["binder"]
        output, aux_loss = self.graph_module(*binder.graph_inputs(args, kwargs))
        self.aux_loss = aux_loss
        return binder.model_output(output)
