"""Frontend: canonicalize MoE blocks -> capture with torch.fx (export fallback) -> annotate."""

from .annotation import B, S, Annotation, Cost, annotate, flatten_example
from .canonicalize import RECOGNIZERS, BlockReport, Recognition, is_canonical_moe, moe_modules
from .hf_capture import hf_capture_adapter
from .recognizers import canonicalize, install as _install_recognizers
from .tracing import CAPTURE_ADAPTERS, MoesysTracer, capture

# Recognizers for models users bring as they are (HF transformers families, DeepSpeed MoE layers)
# and the Hugging Face capture adapter; neither imports transformers or DeepSpeed.
_install_recognizers()
CAPTURE_ADAPTERS.append(hf_capture_adapter)

__all__ = ["B", "S", "Annotation", "Cost", "annotate", "flatten_example", "RECOGNIZERS", "BlockReport",
           "Recognition", "canonicalize", "is_canonical_moe", "moe_modules", "MoesysTracer", "capture"]
