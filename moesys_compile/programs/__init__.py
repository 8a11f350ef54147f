"""Programs built from a lowered graph. ``build_program`` picks one from the plan."""

from __future__ import annotations

import torch.fx as fx

from .base import Program
from .binding import InputBinder, fixed_input_sizes, flatten_export_codegen


def build_program(gm: fx.GraphModule, ctx) -> Program:
    """Train mode: a TrainingProgram at every world size (one process too), so clip_grad_norm_,
    save/load and no_sync work the same with or without torchrun. Infer mode with a device budget:
    a RingProgram; otherwise the plain Program."""
    if ctx.plan.mode == "train":
        from .training import TrainingProgram
        return TrainingProgram(gm, ctx)
    if ctx.plan.mode == "infer" and ctx.plan.device_budget is not None:
        from .ring import RingProgram
        return RingProgram(gm, ctx)
    return Program(gm, ctx)


__all__ = ["Program", "InputBinder", "build_program", "fixed_input_sizes", "flatten_export_codegen"]
