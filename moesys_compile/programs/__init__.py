"""Programs built from a lowered graph. ``build_program`` picks one from the plan."""

from __future__ import annotations

import torch.fx as fx

from .base import Program
from .binding import InputBinder, fixed_input_sizes, flatten_export_codegen


def build_program(gm: fx.GraphModule, ctx) -> Program:
    """Single-device program for now; distributed training and ring inference plug in here."""
    if ctx.plan.mode == "train" and (ctx.plan.world_size > 1 or _distributed()):
        from .training import TrainingProgram
        return TrainingProgram(gm, ctx)
    if ctx.plan.mode == "infer" and ctx.plan.device_budget is not None:
        from .ring import RingProgram
        return RingProgram(gm, ctx)
    return Program(gm, ctx)


def _distributed() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


__all__ = ["Program", "InputBinder", "build_program", "fixed_input_sizes", "flatten_export_codegen"]
