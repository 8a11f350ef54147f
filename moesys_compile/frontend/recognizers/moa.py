"""Mixture of attention heads (JetMoE's ``JetMoeMoA``) in a traceable form.

JetMoE routes each token to top-k *query projections*: ``map`` projects the token with each chosen
expert's input weight (one [H] query per slot, no combine), attention runs on the K slots, and
``reduce`` projects every slot back with that expert's output weight and sums the slots weighted
by the gates. The original groups tokens with ``expert_size.tolist()`` and ``split``, a
data-dependent shape that neither fx nor torch.export can capture, so the whole model would be
untraceable. The stand-in keeps the module's parameters under their names and its ``map`` /
``reduce`` contract, routes with ``moesys.route`` (the rule found by probing) and projects with
``moesys::expert_linear``, one custom op per projection (a single node in the captured graph).

It is not an MoE block in the dispatch -> MLP -> combine sense: expert parallelism leaves its
weights dense (replicated), and ``inspect`` reports it as "replaced" with its own kind.

Shape legend: T tokens · N = T*K slots · D model dim · H expert output rows · E experts · K top-k.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops.autocast import follow_autocast
from ...ops.first_order import register_autograd
from ..canonicalize import Recognition
from .block import adopt, block_kind
from .hf import router_child, split_experts
from .router_rules import analyze_router, rule_candidates, settled_rule
from .structure import (RouterSpec, close, fetch, first_param, generator, leave, on_meta, route_known, router_logits,
                        router_randomized)

# ---------------------------------------------------------------------------------------------
# moesys::expert_linear: y_NO[n] = w_EOI[ids_N[n]] @ x_NI[n]
# ---------------------------------------------------------------------------------------------


def _expert_rows(ids_N: Tensor, num_experts: int) -> list[tuple[int, Tensor]]:
    """(expert, row indices) for every expert with rows; one host sync per call."""
    order_N = torch.argsort(ids_N, stable=True)
    counts = torch.bincount(ids_N, minlength=num_experts).tolist()
    bounds, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            bounds.append((expert, order_N[start:start + count]))
        start += count
    return bounds


def expert_linear_reference(x_NI: Tensor, ids_N: Tensor, w_EOI: Tensor) -> Tensor:
    """Deliberately naive: one weight gather per row."""
    return torch.einsum("ni,noi->no", x_NI, w_EOI[ids_N])


@torch.library.custom_op("moesys::expert_linear", mutates_args=())
def expert_linear(x_NI: Tensor, ids_N: Tensor, w_EOI: Tensor) -> Tensor:
    y_NO = x_NI.new_empty((x_NI.shape[0], w_EOI.shape[1]))
    for expert, rows in _expert_rows(ids_N, w_EOI.shape[0]):
        y_NO[rows] = F.linear(x_NI[rows], w_EOI[expert])
    return y_NO


@expert_linear.register_fake
def _expert_linear_fake(x_NI, ids_N, w_EOI):
    return x_NI.new_empty((x_NI.shape[0], w_EOI.shape[1]))


def _expert_linear_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _expert_linear_backward(ctx, grad_y_NO):
    x_NI, ids_N, w_EOI = ctx.saved_tensors
    grad_x_NI = torch.ops.moesys.expert_linear(grad_y_NO, ids_N, w_EOI.transpose(1, 2))
    grad_w_EOI = torch.zeros_like(w_EOI)
    for expert, rows in _expert_rows(ids_N, w_EOI.shape[0]):
        grad_w_EOI[expert] = grad_y_NO[rows].t() @ x_NI[rows]
    return grad_x_NI, None, grad_w_EOI


register_autograd(expert_linear, _expert_linear_backward, setup_context=_expert_linear_setup)


# ---------------------------------------------------------------------------------------------
# the stand-in
# ---------------------------------------------------------------------------------------------


class CanonicalMoA(nn.Module):
    """``map(x_BSD) -> (q_BSKH, router_logits_TE, topo)`` and ``reduce(a_BSKH, topo) -> y_BSD``,
    the contract of JetMoE's attention experts; ``topo`` is (weights_TK, ids_TK)."""

    _moesys_moa = True

    def __init__(self, original: nn.Module, router: RouterSpec, w_in: str, w_out: str, bias: Optional[str]):
        super().__init__()
        adopt(self, original)
        self.router_spec, self.w_in, self.w_out, self.bias_name = router, w_in, w_out, bias
        self.num_experts, self.top_k = router.num_experts, router.top_k
        self.kind = block_kind(original)

    def map(self, x_BSD: Tensor):
        batch, seq, dim = x_BSD.shape
        x_TD = x_BSD.reshape(-1, dim)
        router = self.get_submodule(self.router_spec.path)
        logits_TE = router_logits(router, self.router_spec, x_TD).float()
        weights_TK, ids_TK, _ = route_known(router, self.router_spec, x_TD, logits_TE=logits_TE)
        x_ND = x_TD.repeat_interleave(self.top_k, dim=0)
        q_ND = torch.ops.moesys.expert_linear(x_ND, ids_TK.reshape(-1), fetch(self, self.w_in))
        return q_ND.view(batch, seq, self.top_k, -1), logits_TE, (weights_TK.to(x_BSD.dtype), ids_TK)

    def reduce(self, a_BSKH: Tensor, topo: tuple[Tensor, Tensor]) -> Tensor:
        batch, seq, top_k, hidden = a_BSKH.shape
        weights_TK, ids_TK = topo
        y_ND = torch.ops.moesys.expert_linear(a_BSKH.reshape(-1, hidden), ids_TK.reshape(-1), fetch(self, self.w_out))
        y_TD = (y_ND.view(batch * seq, top_k, -1) * weights_TK.unsqueeze(-1)).sum(1)
        if self.bias_name:
            y_TD = y_TD + getattr(self, self.bias_name)
        return y_TD.view(batch, seq, -1)

    def details(self) -> dict:
        w_in = fetch(self, self.w_in)
        return dict(num_experts=self.num_experts, top_k=self.top_k, dim=w_in.shape[2], head_rows=w_in.shape[1],
                    router=self.router_spec.describe(), experts="attention query/output projections")


def _run_moa(module: nn.Module, x_BSD: Tensor, a_BSKH: Tensor) -> tuple[Tensor, Tensor]:
    q_BSKH, _, topo = module.map(x_BSD)
    return q_BSKH, module.reduce(a_BSKH, topo)


def _matches(original: nn.Module, candidate: nn.Module, x_BSD: Tensor, a_BSKH: Tensor) -> bool:
    with torch.no_grad():
        try:
            want, got = _run_moa(original, x_BSD, a_BSKH), _run_moa(candidate, x_BSD, a_BSKH)
        except Exception:  # noqa: BLE001 - a candidate that cannot run is wrong
            return False
    return all(close(g, w)[0] for g, w in zip(got, want))


def recognize_moa(module: nn.Module, path: str) -> Optional[Recognition]:
    """A module with ``map``/``reduce`` methods, a router and two 3-D expert projections."""
    if isinstance(module, CanonicalMoA):          # compiling the same model twice
        return Recognition(kind=module.kind, details=module.details())
    cls = type(module)
    if not (callable(getattr(cls, "map", None)) and callable(getattr(cls, "reduce", None))):
        return None
    split = split_experts(module)
    if split is None:
        return None
    kind = block_kind(module)
    w_in, w_out = fetch(module, split[0]), fetch(module, split[1])
    num_experts, rows, dim = w_in.shape
    router_name = router_child(module, num_experts, {name.split(".")[0] for name in split})
    own = dict(module.named_parameters(recurse=False))
    bias = next((name for name, p in own.items() if p.shape == (dim,)), None)
    if router_name is None or w_out.shape != (num_experts, dim, rows) or set(own) - {bias} or on_meta(module):
        return leave(path, kind, f"map/reduce experts: expected a router, input [E, H, D] and output [E, D, H] "
                                 f"projections and at most a [D] bias; found {[n for n, _ in module.named_children()]}")
    router = getattr(module, router_name)
    spec, why = analyze_router(router, router_name, dim)
    if spec is None or spec.top_k < 1:
        return leave(path, kind, why)
    gen = generator()
    param = first_param(module)
    x_BSD = torch.randn(2, 4, dim, generator=gen).to(device=param.device, dtype=param.dtype)
    a_BSKH = torch.randn(2, 4, spec.top_k, rows, generator=gen).to(device=param.device, dtype=param.dtype)
    with router_randomized(module, router_name, gen):
        rules = [spec] if spec.known else rule_candidates(getattr(module, router_name), spec)
        found, tie = settled_rule(rules, lambda rule: _matches(module, CanonicalMoA(module, rule, *split, bias),
                                                               x_BSD, a_BSKH))
    if found is None:
        what = f"its map/reduce {tie}" if tie else "no rule moesys.route expresses reproduces its map/reduce"
        return leave(path, kind, f"{why}; {what}")
    replacement = CanonicalMoA(module, found, *split, bias)
    return Recognition(kind=kind, replacement=replacement, details=replacement.details(),
                       note="routing and expert projections now moesys ops; attention runs between map and reduce")


# torch.autocast: expert matmuls in the autocast dtype, the rest on their inputs as they come
follow_autocast("moesys::expert_linear", cast=True)
