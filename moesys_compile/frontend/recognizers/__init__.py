"""Recognizers for MoE blocks users bring as they are: Hugging Face transformers families (and any
block with the same structure), their experts modules alone where such a block is not recognised
(``routed_experts``: the experts called with their routing), and ``deepspeed.moe.layer.MoE``.
Neither library is imported here: the recognizers look at module structure, and the DeepSpeed one
only runs when DeepSpeed is already loaded (a model holding its layers has imported it).

    >>> from moesys_compile.frontend.recognizers import canonicalize
    >>> reports = canonicalize(model)                      # doctest: +SKIP
    >>> print("\\n".join(r.describe() for r in reports))   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..canonicalize import RECOGNIZERS as BASE_RECOGNIZERS
from ..canonicalize import BlockReport, Recognizer, outermost
from ..canonicalize import canonicalize as base_canonicalize
from ..empty_weights import Source
from .block import CanonicalMoEBlock, adopt, recognize_canonical_block
from .deepspeed import CanonicalDeepSpeedMoE, recognize_deepspeed_moe
from .hf import recognize_routed_block
from .moa import CanonicalMoA, recognize_moa
from .routed_experts import CanonicalRoutedExperts, recognize_routed_experts
from .experts import ExpertsSpec
from .probe import BlockProbe
from .router_rules import analyze_router
from .structure import RouterSpec, take_left

RECOGNIZERS: list[Recognizer] = [recognize_canonical_block, recognize_deepspeed_moe, recognize_moa,
                                  recognize_routed_block, recognize_routed_experts]


def install() -> None:
    """Append these recognizers to ``canonicalize.RECOGNIZERS`` (once)."""
    for recognizer in RECOGNIZERS:
        if recognizer not in BASE_RECOGNIZERS:
            BASE_RECOGNIZERS.append(recognizer)


def canonicalize(model: nn.Module, recognizers: Optional[list[Recognizer]] = None,
                 weights: Optional[Source] = None) -> list[BlockReport]:
    """``frontend.canonicalize.canonicalize`` plus the reason each block was left as it is: the
    base reports a block that looks like MoE as "left" with a generic reason; the recognizers here
    know why (router rule, expert layout, probe mismatch). Blocks they inspected that the base
    heuristic does not flag are reported too, and the parts of a left block are not listed again.
    ``weights``: as in the base, for a model built under ``empty_weights``."""
    take_left()
    reports = {r.path: r for r in base_canonicalize(model, recognizers, weights)}
    done = [path for path, r in reports.items() if r.action != "left"]
    for path, (kind, reason) in take_left().items():
        if not any(path == p or path.startswith(p + ".") for p in done):
            reports[path] = BlockReport(path, kind, "left", reason)
    order = {path: i for i, (path, _) in enumerate(model.named_modules())}
    return outermost(sorted(reports.values(), key=lambda r: order.get(r.path, len(order))))


__all__ = ["RECOGNIZERS", "install", "canonicalize", "CanonicalMoEBlock", "CanonicalDeepSpeedMoE", "CanonicalMoA",
           "CanonicalRoutedExperts", "adopt", "BlockProbe", "RouterSpec", "ExpertsSpec", "analyze_router",
           "recognize_routed_block", "recognize_deepspeed_moe", "recognize_moa", "recognize_routed_experts"]
