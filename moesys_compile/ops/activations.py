"""Expert activations and capacity: the small helpers the canonical ops and the kernels share.

Activations are named by strings (they are arguments of the custom ops):

    swiglu, geglu      gated: h = [gate | up] halves, act(gate) * up
    gelu, silu, relu   act(h)
    clamped_swiglu:alpha=A:limit=L
                       gated, gate and up interleaved (h[:, 0::2], h[:, 1::2]):
                       g = min(gate, L); u = clamp(up, -L, L); (u + 1) * g * sigmoid(A * g)
                       (gpt-oss experts; ``clamped_swiglu(alpha, limit)`` builds the name)

The canonical ops and the torch kernels (``kernels/experts_torch.py``) implement every activation;
the Triton kernels fuse ``TRITON_ACTIVATIONS`` into their GEMMs.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("swiglu", "geglu", "gelu", "silu", "relu")
TRITON_ACTIVATIONS = ACTIVATIONS
CLAMPED_SWIGLU = "clamped_swiglu"


def clamped_swiglu(alpha: float, limit: float) -> str:
    """The activation name of a clamped, interleaved SwiGLU (see the module docstring)."""
    return f"{CLAMPED_SWIGLU}:alpha={float(alpha)!r}:limit={float(limit)!r}"


@functools.lru_cache(maxsize=64)
def _clamped_params(activation: str) -> tuple[float, float]:
    """(alpha, limit) of a ``clamped_swiglu:alpha=A:limit=L`` name; ValueError if malformed."""
    kind, *fields = activation.split(":")
    values = dict(field.partition("=")[::2] for field in fields)
    if kind != CLAMPED_SWIGLU or set(values) != {"alpha", "limit"}:
        raise ValueError(f"activation {activation!r} is not supported; use one of {ACTIVATIONS} or "
                         f"'{CLAMPED_SWIGLU}:alpha=<float>:limit=<float>'")
    try:
        return float(values["alpha"]), float(values["limit"])
    except ValueError:
        raise ValueError(f"activation {activation!r}: alpha and limit must be numbers, e.g. "
                         f"{clamped_swiglu(1.702, 7.0)!r}") from None


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        _clamped_params(activation)


def has_triton_kernel(activation: str) -> bool:
    """The Triton expert kernels implement this activation (the torch ones implement all)."""
    return activation in TRITON_ACTIVATIONS


def is_gated(activation: str) -> bool:
    return activation in ("swiglu", "geglu") or activation.startswith(CLAMPED_SWIGLU + ":")


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
    alpha, limit = _clamped_params(activation)
    gate, up = h_NH[..., 0::2].clamp(max=limit), h_NH[..., 1::2].clamp(-limit, limit)
    return (up + 1) * (gate * torch.sigmoid(alpha * gate))


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """GShard capacity per expert: ceil(factor * T * K / E), at least 1 when there are tokens."""
    if capacity_factor <= 0:
        return num_tokens * top_k
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts)) if num_tokens else 0
