"""Reference MoE layer and MLP, written with the canonical ops.

    >>> import torch, moesys_compile as mc
    >>> moe = mc.nn.MoE(dim=16, ffn_dim=32, num_experts=4, top_k=2)
    >>> moe(torch.randn(2, 5, 16)).shape
    torch.Size([2, 5, 16])
    >>> moe.aux_loss.ndim   # load-balancing loss of the last eager forward
    0

Shape legend: T tokens · D dim · F expert hidden · H up rows (2F gated, F otherwise) · E experts · K top-k.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor, nn

from . import ops
from .errors import OpInputError


def _is_capturing() -> bool:
    """True under torch.fx symbolic tracing or torch.export/dynamo."""
    import torch.fx._symbolic_trace as symbolic_trace
    return symbolic_trace._is_fx_tracing_flag or torch.compiler.is_compiling()


def flatten_tokens(x: Tensor, dim: int, layer: str) -> Tensor:
    """``x`` [..., D] as x_TD [T, D]. Tokens of another width are refused naming ``layer``: a
    reshape to [-1, D] would regroup their elements into other tokens and compute on those. (A
    torch.fx proxy has no sizes to check; the capture's shape propagation meets the same reshape.)"""
    if isinstance(x, Tensor) and (x.dim() == 0 or x.shape[-1] != dim):
        raise OpInputError(f"{layer} takes tokens of width dim ({dim}), got an input of shape {tuple(x.shape)}: "
                           f"pass it [..., {dim}]")
    return x.reshape(-1, dim)


class MLP(nn.Module):
    """Dense feed-forward block: down(act(up(x))), gated activations split up's rows in two."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "swiglu", bias: bool = False):
        super().__init__()
        ops.check_activation(activation)
        self.activation = activation
        self.up = nn.Linear(dim, ops.up_rows(hidden_dim, activation), bias=bias)
        self.down = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(ops.apply_activation(self.up(x), self.activation))


def _check_moe_args(dim, ffn_dim, num_experts, top_k, capacity_factor, num_shared_experts, aux_loss_coef,
                    score_func, renormalize) -> None:
    """``MoE(...)``'s arguments, each refused by name at construction rather than at the first forward."""
    for name, value, least in (("dim", dim, 1), ("ffn_dim", ffn_dim, 1), ("num_experts", num_experts, 1),
                               ("num_shared_experts", num_shared_experts, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"MoE {name} ({value!r}) must be an int >= {least}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or not 1 <= top_k <= num_experts:
        raise ValueError(f"MoE top_k ({top_k!r}) must be an int in [1, num_experts ({num_experts})]")
    if capacity_factor is not None and not (_is_real(capacity_factor) and 0 < capacity_factor < math.inf):
        raise ValueError(f"MoE capacity_factor ({capacity_factor!r}) must be a finite number > 0, or None (dropless)")
    if not (_is_real(aux_loss_coef) and 0 <= aux_loss_coef < math.inf):
        raise ValueError(f"MoE aux_loss_coef ({aux_loss_coef!r}) must be a finite number >= 0 "
                         f"(0: no load-balancing loss)")
    if score_func not in ops.SCORE_FUNCS:
        raise ValueError(f"MoE score_func ({score_func!r}) must be one of {sorted(ops.SCORE_FUNCS)}")
    if not isinstance(renormalize, bool):
        raise ValueError(f"MoE renormalize ({renormalize!r}) must be True or False")


def _is_real(value) -> bool:
    """A real number that is not a bool (``True`` as a capacity factor is a slip, not 1.0)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class MoE(nn.Module):
    """Top-k routed mixture of experts with stacked expert weights.

    Parameters: ``router.weight`` [E, D]; ``w_up`` [E, H, D] (gated: gate rows, then up rows);
    ``w_down`` [E, D, F]; ``shared`` (an MLP of ``num_shared_experts * F`` hidden units) if any.
    Routing: ``score_func`` ("softmax" or "sigmoid") -> top-k -> renormalized weights.
    ``capacity_factor=None`` is dropless; a number drops slots past GShard capacity.
    After each eager forward ``self.aux_loss`` holds ``aux_loss_coef`` x load-balancing loss;
    compiled programs expose the same value as ``program.aux_loss``.
    """

    # what expert parallelism shards, and where the router lives (the canonical-module protocol)
    expert_param_names = ("w_up", "w_down")
    router_path = "router"

    def __init__(self, dim: int, ffn_dim: int, num_experts: int, top_k: int, activation: str = "swiglu",
                 capacity_factor: Optional[float] = None, num_shared_experts: int = 0,
                 aux_loss_coef: float = 0.01, score_func: str = "softmax", renormalize: bool = True):
        super().__init__()
        ops.check_activation(activation)
        _check_moe_args(dim=dim, ffn_dim=ffn_dim, num_experts=num_experts, top_k=top_k,
                        capacity_factor=capacity_factor, num_shared_experts=num_shared_experts,
                        aux_loss_coef=aux_loss_coef, score_func=score_func, renormalize=renormalize)
        self.dim, self.ffn_dim, self.num_experts, self.top_k = dim, ffn_dim, num_experts, top_k
        self.activation, self.capacity_factor = activation, capacity_factor
        self.aux_loss_coef, self.score_func, self.renormalize = aux_loss_coef, score_func, renormalize
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.w_up = nn.Parameter(torch.empty(num_experts, ops.up_rows(ffn_dim, activation), dim))
        self.w_down = nn.Parameter(torch.empty(num_experts, dim, ffn_dim))
        self.shared = MLP(dim, ffn_dim * num_shared_experts, activation) if num_shared_experts else None
        self.aux_loss: Optional[Tensor] = None
        self.reset_parameters()

    def __getstate__(self) -> dict:
        """Copies and pickles leave out the last forward's loss (a non-leaf tensor of that graph,
        which ``copy.deepcopy`` refuses)."""
        return {**super().__getstate__(), "aux_loss": None}

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_up, std=1 / math.sqrt(self.dim))
        nn.init.normal_(self.w_down, std=1 / math.sqrt(self.ffn_dim))

    def forward(self, x: Tensor) -> Tensor:
        x_TD = flatten_tokens(x, self.dim, f"MoE(dim={self.dim}, num_experts={self.num_experts})")
        logits_TE = self.router(x_TD)
        weights_TK, ids_TK, scores_TE = torch.ops.moesys.route(logits_TE, self.top_k, self.score_func,
                                                               self.renormalize)
        y_TD = torch.ops.moesys.moe_experts(x_TD, ids_TK, weights_TK, self.w_up, self.w_down, self.activation,
                                            self.capacity_factor or 0.0)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        aux_loss = torch.ops.moesys.load_balancing_loss(scores_TE, ids_TK, self.aux_loss_coef)
        if not _is_capturing():
            self.aux_loss = aux_loss
        return y_TD.reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, ffn_dim={self.ffn_dim}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"activation={self.activation!r}, capacity_factor={self.capacity_factor}")
