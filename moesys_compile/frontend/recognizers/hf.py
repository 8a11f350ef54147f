"""Recognise routed MoE blocks by structure: the shape Hugging Face transformers v5 gives every MoE
family (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, ...) and most hand-written models share.

    block
      ├─ <router>   one [E, D] weight; called on [T, D] it returns top-k ids and weights
      ├─ experts    stacked 3-D weights (gate_up_proj [E, 2F, D], down_proj [E, D, F], or transposed)
      │             or a ModuleList of bias-free MLPs (gate/up/down, w1/w3/w2, Linear-act-Linear)
      ├─ shared_expert(s)        optional dense MLP added to the routed output
      └─ shared_expert_gate      optional [1, D] gate, sigmoid-scaled (Qwen2-MoE)

Class names are only used for the report. The router's rule (softmax/sigmoid, renormalisation,
correction bias, group-limited top-k, routed scaling) is found by probing it; a rule that
``moesys.route`` cannot express keeps the router as the model's own traced code. The whole block is
then probed against its canonical form, and only an exact match is swapped in.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..canonicalize import Recognition
from .block import BlockProbe, CanonicalMoEBlock, block_kind
from .structure import (ROUTER_NAMES, SHARED_GATE_NAMES, SHARED_NAMES, analyze_router, experts_candidates,
                        leave, on_meta)


def _has_stacked_experts(module: nn.Module) -> bool:
    return isinstance(module, nn.ModuleList) and len(module) > 0 or any(
        p.dim() == 3 for p in module.parameters(recurse=False))


def _experts_child(block: nn.Module) -> Optional[str]:
    names = [name for name, child in block.named_children()
             if "expert" in name and name not in SHARED_NAMES + SHARED_GATE_NAMES and _has_stacked_experts(child)]
    if "experts" in names:
        return "experts"
    return names[0] if len(names) == 1 else None


def _num_experts(experts: nn.Module) -> int:
    if isinstance(experts, nn.ModuleList):
        return len(experts)
    return next(p.shape[0] for p in experts.parameters(recurse=False) if p.dim() == 3)


def _router_child(block: nn.Module, num_experts: int, taken: set[str]) -> Optional[str]:
    def scores_experts(child: nn.Module) -> bool:
        return sum(p.dim() == 2 and p.shape[0] == num_experts for p in child.parameters()) == 1
    names = [name for name, child in block.named_children() if name not in taken and scores_experts(child)]
    preferred = [name for name in names if name in ROUTER_NAMES]
    return (preferred or names or [None])[0]


def _optional_child(block: nn.Module, names: tuple[str, ...]) -> Optional[str]:
    return next((name for name in names if isinstance(getattr(block, name, None), nn.Module)), None)


def recognize_routed_block(module: nn.Module, path: str) -> Optional[Recognition]:
    """Recognizer for structurally routed MoE blocks (see the module docstring). A block it cannot
    analyse is left as the model's own code, with the reason; recognition never fails a compile."""
    experts_name = _experts_child(module)
    if experts_name is None or isinstance(module, CanonicalMoEBlock):
        return None
    try:
        return _recognize(module, path, experts_name)
    except Exception as exc:  # noqa: BLE001 - an unforeseen structure is reported, not raised
        return leave(path, block_kind(module), f"not analysable ({type(exc).__name__}: {exc})")


def _recognize(module: nn.Module, path: str, experts_name: str) -> Optional[Recognition]:
    kind = block_kind(module)
    experts = getattr(module, experts_name)
    num_experts = _num_experts(experts)
    shared = _optional_child(module, SHARED_NAMES)
    shared_gate = _optional_child(module, SHARED_GATE_NAMES)
    router_name = _router_child(module, num_experts, {experts_name, shared, shared_gate})
    if router_name is None:
        return leave(path, kind, f"no child scores tokens against {num_experts} experts (a [{num_experts}, D] weight)")
    extra = [name for name, child in module.named_children()
             if name not in (experts_name, router_name, shared, shared_gate) and any(True for _ in child.parameters())]
    if extra:
        return leave(path, kind, f"child(ren) {extra} are neither router, experts nor shared expert")
    if getattr(module, "jitter_noise", 0) or 0:
        return leave(path, kind, f"router jitter noise ({module.jitter_noise}) randomises training inputs; "
                                 f"set the config's router_jitter_noise=0 to canonicalize it")
    if on_meta(module):
        return leave(path, kind, "parameters are on the meta device; materialise the model before compiling")
    router = getattr(module, router_name)
    dim = next(p for p in router.parameters() if p.dim() == 2 and p.shape[0] == num_experts).shape[1]
    router_spec, router_why = analyze_router(router, router_name, dim)
    if router_spec is None:
        return leave(path, kind, router_why)
    candidates = experts_candidates(experts, experts_name, dim)
    if not candidates:
        return leave(path, kind, f"experts '{experts_name}' are neither stacked 3-D [E, H, D]/[E, D, F] weights "
                                 f"nor a list of bias-free Linear MLPs")
    best, probe = float("inf"), BlockProbe(module, dim)
    for experts_spec in candidates:
        replacement = CanonicalMoEBlock(module, router_spec, experts_spec, shared, shared_gate)
        ok, diff = probe.matches(replacement)
        if ok:
            return Recognition(kind=kind, replacement=replacement, details=replacement.details())
        best = min(best, diff)
    return leave(path, kind, f"{router_why}; no canonical form of its experts reproduces the block's output "
                             f"(closest max abs diff {best:.3g} over {len(candidates)} layouts)")
