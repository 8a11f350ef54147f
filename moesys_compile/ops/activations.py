"""Expert activations and capacity: the small helpers the canonical ops and the kernels share.

Activations are named by strings (they are arguments of the custom ops):

    swiglu, geglu      gated: h = [gate | up] halves, act(gate) * up
    geglu_tanh         gated, with the tanh-approximate GELU
    gelu, silu, relu   act(h)
    gelu_tanh          F.gelu(h, approximate="tanh"); transformers' gelu_pytorch_tanh, gelu_new,
                       gelu_fast, gelu_accurate and gelu_python_tanh compute the same formula
                       (equal to fp32 rounding)
    relu2              relu(h)^2 (Nemotron-H)
    clamped_swiglu:limit=L
                       gated, halves: silu(min(gate, L)) * clamp(up, -L, L) (HY-V4)
    clamped_swiglu:alpha=A:limit=L
                       gated, gate and up interleaved (h[:, 0::2], h[:, 1::2]):
                       g = min(gate, L); u = clamp(up, -L, L); (u + 1) * g * sigmoid(A * g) (gpt-oss)
    softcapped_swiglu:gate=G:up=U
                       gated, halves: cap(gate, G) * sigmoid(gate) * cap(up, U), with
                       cap(x, c) = c * tanh(x / c) (Inkling 2)

``clamped_swiglu(alpha, limit)`` and ``softcapped_swiglu(gate, up)`` build the parametrised names.
The canonical ops and the torch kernels (``kernels/experts_torch.py``) implement every activation;
the Triton kernels fuse ``TRITON_ACTIVATIONS`` into their GEMMs.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh", "gelu", "gelu_tanh", "silu", "relu", "relu2")
TRITON_ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh", "gelu", "gelu_tanh", "silu", "relu")
GATED = ("swiglu", "geglu", "geglu_tanh")
# parametrised activations: kind -> the parameter sets it takes
_PARAMETRISED = {"clamped_swiglu": ({"limit"}, {"alpha", "limit"}), "softcapped_swiglu": ({"gate", "up"},)}


def clamped_swiglu(alpha: Optional[float], limit: float) -> str:
    """The name of a clamped SwiGLU: interleaved gpt-oss form with ``alpha``, halves without."""
    alpha_field = "" if alpha is None else f":alpha={float(alpha)!r}"
    return f"clamped_swiglu{alpha_field}:limit={float(limit)!r}"


def softcapped_swiglu(gate_cap: float, up_cap: float) -> str:
    """The name of a SwiGLU whose gate factor and up are softcapped (see the module docstring)."""
    return f"softcapped_swiglu:gate={float(gate_cap)!r}:up={float(up_cap)!r}"


@functools.lru_cache(maxsize=64)
def _parse(activation: str) -> tuple[str, dict[str, float]]:
    """(kind, parameters) of an activation name; ValueError naming the accepted forms."""
    if activation in ACTIVATIONS:
        return activation, {}
    kind, *fields = activation.split(":")
    values = dict(field.partition("=")[::2] for field in fields)
    if kind not in _PARAMETRISED or set(values) not in _PARAMETRISED[kind]:
        raise ValueError(f"activation {activation!r} is not supported; use one of {ACTIVATIONS}, "
                         f"'clamped_swiglu[:alpha=<float>]:limit=<float>' or "
                         f"'softcapped_swiglu:gate=<float>:up=<float>'")
    try:
        return kind, {name: float(value) for name, value in values.items()}
    except ValueError:
        raise ValueError(f"activation {activation!r}: its parameters must be numbers, e.g. "
                         f"{clamped_swiglu(1.702, 7.0)!r}") from None


def check_activation(activation: str) -> None:
    _parse(activation)


def has_triton_kernel(activation: str) -> bool:
    """The Triton expert kernels implement this activation (the torch ones implement all)."""
    return activation in TRITON_ACTIVATIONS


def is_gated(activation: str) -> bool:
    return activation in GATED or _parse(activation)[0] in _PARAMETRISED


def up_rows(ffn_dim: int, activation: str) -> int:
    """Rows H of the up projection for an expert hidden size F."""
    return 2 * ffn_dim if is_gated(activation) else ffn_dim


def _softcap(x: Tensor, cap: float) -> Tensor:
    return torch.tanh(x / cap) * cap


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


# the elementwise function of each plain activation, and of the gate of each gated one
_SCALAR = {"swiglu": F.silu, "silu": F.silu, "geglu": F.gelu, "gelu": F.gelu, "geglu_tanh": _gelu_tanh,
           "gelu_tanh": _gelu_tanh, "relu": F.relu}


def apply_activation(h_NH: Tensor, activation: str) -> Tensor:
    kind, params = _parse(activation)
    if kind in GATED:
        gate, up = h_NH.chunk(2, dim=-1)
        return _SCALAR[kind](gate) * up
    if kind in _SCALAR:
        return _SCALAR[kind](h_NH)
    if kind == "relu2":
        return F.relu(h_NH).square()
    if kind == "softcapped_swiglu":
        gate, up = h_NH.chunk(2, dim=-1)
        return _softcap(gate, params["gate"]) * torch.sigmoid(gate) * _softcap(up, params["up"])
    limit = params["limit"]
    if "alpha" not in params:
        gate, up = h_NH.chunk(2, dim=-1)
        return F.silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)
    gate, up = h_NH[..., 0::2].clamp(max=limit), h_NH[..., 1::2].clamp(-limit, limit)
    return (up + 1) * (gate * torch.sigmoid(params["alpha"] * gate))


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """GShard capacity per expert: ceil(factor * T * K / E), at least 1 when there are tokens."""
    if capacity_factor <= 0:
        return num_tokens * top_k
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts)) if num_tokens else 0
