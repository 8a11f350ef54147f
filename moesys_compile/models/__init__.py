"""Built-in models: ``build(name, **overrides)`` with named presets.

    >>> from moesys_compile import models
    >>> model = models.build("tiny-moe", n_layers=2, num_experts=4)
    >>> sorted(models.PRESETS)
    ['small-moe', 'tiny-gpt', 'tiny-moe']
"""

from __future__ import annotations

import dataclasses

from .transformer import ModelConfig, Transformer

PRESETS: dict[str, dict] = {
    "tiny-gpt": dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, ffn_dim=128),
    "tiny-moe": dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, ffn_dim=128, num_experts=4, top_k=2,
                     moe_ffn_dim=64),
    "small-moe": dict(vocab_size=4096, dim=256, n_layers=4, n_heads=8, ffn_dim=512, num_experts=8, top_k=2,
                      moe_ffn_dim=256),
}


def build(name: str, **overrides) -> Transformer:
    """Build a preset with field overrides (``vocab_size``, ``dim``, ``n_layers``, ``num_experts``, ...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; built-in models: {', '.join(sorted(PRESETS))}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for {name!r}; known: {sorted(known)}")
    return Transformer(ModelConfig(**{**PRESETS[name], **overrides}))


__all__ = ["ModelConfig", "PRESETS", "Transformer", "build"]
