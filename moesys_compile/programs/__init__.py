"""Programs built from a lowered graph. ``build_program`` picks one from the plan."""

from __future__ import annotations

import torch.fx as fx

from .base import Program
from .binding import InputBinder, flatten_export_codegen


def build_program(gm: fx.GraphModule, ctx) -> Program:
    """Single-device program for now; distributed training and ring inference plug in here."""
    return Program(gm, ctx)


__all__ = ["Program", "InputBinder", "build_program", "flatten_export_codegen"]
