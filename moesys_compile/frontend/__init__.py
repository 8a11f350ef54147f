"""Frontend: canonicalize MoE blocks -> capture with torch.fx (export fallback) -> annotate."""

from .annotation import B, S, Annotation, Cost, annotate, flatten_example
from .canonicalize import RECOGNIZERS, BlockReport, Recognition, canonicalize, is_canonical_moe, moe_modules
from .tracing import MoesysTracer, capture

__all__ = ["B", "S", "Annotation", "Cost", "annotate", "flatten_example", "RECOGNIZERS", "BlockReport",
           "Recognition", "canonicalize", "is_canonical_moe", "moe_modules", "MoesysTracer", "capture"]
