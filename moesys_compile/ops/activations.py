"""Expert activations and capacity: the small helpers the canonical ops and the kernels share."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("swiglu", "geglu", "gelu", "silu", "relu")


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not supported; use one of {ACTIVATIONS}")


def is_gated(activation: str) -> bool:
    return activation in ("swiglu", "geglu")


def up_rows(ffn_dim: int, activation: str) -> int:
    """Rows H of the up projection for an expert hidden size F."""
    return 2 * ffn_dim if is_gated(activation) else ffn_dim


def apply_activation(h_NH: Tensor, activation: str) -> Tensor:
    if activation == "swiglu":
        gate, up = h_NH.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "geglu":
        gate, up = h_NH.chunk(2, dim=-1)
        return F.gelu(gate) * up
    if activation == "gelu":
        return F.gelu(h_NH)
    if activation == "silu":
        return F.silu(h_NH)
    if activation == "relu":
        return F.relu(h_NH)
    check_activation(activation)
    raise AssertionError("unreachable")


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """GShard capacity per expert: ceil(factor * T * K / E), at least 1 when there are tokens."""
    if capacity_factor <= 0:
        return num_tokens * top_k
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts)) if num_tokens else 0
