"""Structural analysis of MoE blocks we did not write: the router's spec and outputs, randomised
copies to probe, and running a router by its rule (which rule a router follows is found in
``router_rules.py``, the expert weight layouts in ``experts.py``). Facts are read from shapes and
then checked by running the module on a few random tokens (a *probe*), so a family nobody listed
is recognised when it computes what we think it computes, and left alone when it does not.

Shape legend: T tokens · D model dim · F expert hidden · H up rows (2F gated) · E experts · K top-k.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from ...ir import fetch

ROUTER_NAMES = ("gate", "router", "wg", "gating", "switch")
SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp", "shared")
SHARED_GATE_NAMES = ("shared_expert_gate", "shared_gate")
GROUP_ATTRS = (("n_group", "num_group", "n_groups", "num_groups"), ("topk_group", "topk_groups"))
SCALING_ATTRS = ("routed_scaling_factor", "routed_scaling", "scaling_factor", "route_scale")
TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "k")
CAPACITY_ATTRS = ("capacity_factor", "cf")   # a block's GShard capacity factor (Switch-style dropping)
CLAMP_ATTRS = ("limit", "swiglu_limit")   # an experts module's activation clamp (gpt-oss, DeepSeek-V4)
PROBE_SEED = 1234


_LEFT: dict[str, tuple[str, str]] = {}   # path -> (kind, reason) of blocks seen and not canonicalized


def leave(path: str, kind: str, reason: str) -> None:
    """Record why the block at ``path`` stays as it is (for its BlockReport); recognizers then return
    this None, meaning "no recognition"."""
    _LEFT[path] = (kind, reason)


def left_around(path: str) -> Optional[tuple[str, str]]:
    """(path, reason) of the innermost block around ``path`` that a recognizer left as it is."""
    inner = max((outer for outer in _LEFT if path.startswith(outer + ".")), key=len, default=None)
    return None if inner is None else (inner, _LEFT[inner][1])


def take_left() -> dict[str, tuple[str, str]]:
    taken = dict(_LEFT)
    _LEFT.clear()
    return taken


def generator() -> torch.Generator:
    """Probes use their own generator: recognising a model must not move the user's RNG."""
    return torch.Generator().manual_seed(PROBE_SEED)


def first_param(module: nn.Module) -> Optional[Tensor]:
    return next(iter(module.parameters()), None)


def on_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


def close(a: Tensor, b: Tensor) -> tuple[bool, float]:
    """Equal up to the rounding of the dtype (the probe's verdict) and the max abs difference."""
    if a.shape != b.shape:
        return False, float("inf")
    tol = max({torch.float64: 1e-9, torch.float32: 2e-5}.get(t.dtype, 2e-2) for t in (a, b))
    a, b = a.detach().double(), b.detach().double()
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    scale = max(b.abs().max().item() if b.numel() else 0.0, 1.0)
    return diff <= tol * scale, diff


# ---------------------------------------------------------------------------------------------
# routers
# ---------------------------------------------------------------------------------------------


@dataclass
class RouterSpec:
    """How a router turns tokens into (weights_TK, ids_TK). ``score_func`` None: an unusual router,
    run as the model's own (traced) code; its outputs are picked by position."""
    path: str                          # child name of the router inside the block
    top_k: int
    num_experts: int
    weight: str = "weight"             # dotted attribute of the [E, D] weight inside the router
    logit_bias: Optional[str] = None   # dotted attribute of a [E] bias added to the logits (Linear bias)
    score_func: Optional[str] = None
    renormalize: bool = True
    choice_bias: Optional[str] = None  # e.g. DeepSeek-V3 ``e_score_correction_bias``
    n_groups: int = 1
    topk_groups: int = 1
    routed_scaling: float = 1.0
    fp32_logits: bool = True           # False: logits in the weight's dtype (softmax still in fp32)
    # positions in its output: {"weights": i, "ids": j, "logits": k}, or "dispatch" in place of "ids"
    outputs: dict = field(default_factory=dict)
    arity: int = 0                                # length of the router's output tuple (0: not a tuple)
    args: tuple[str, ...] = ()         # the block's own [E] tensors the router takes after the tokens (MiniMax-M2)
    batched: bool = False              # the router is called on [1, T, D], not [T, D] (AFMoE)
    # the router is called on the block's input as it comes ([B, S, D]): a router returning a
    # capacity-masked dispatch mask counts its capacity per sequence (Switch Transformers)
    per_sequence: bool = False

    @property
    def known(self) -> bool:
        return self.score_func is not None

    def describe(self) -> str:
        if not self.known:
            per_sequence = ", per sequence" if self.per_sequence else ""
            return f"own router '{self.path}' (traced{per_sequence})"
        parts = [f"{self.score_func}", f"top{self.top_k}"]
        if self.n_groups > 1:
            parts.append(f"groups {self.topk_groups}/{self.n_groups}")
        if self.choice_bias:
            parts.append("bias")
        if self.renormalize:
            parts.append("renorm")
        if self.routed_scaling != 1.0:
            parts.append(f"x{self.routed_scaling:g}")
        return "-".join(parts)


def find_router_weight(router: nn.Module, dim: int) -> Optional[tuple[str, Optional[str], int]]:
    """(weight attr, logit-bias attr, E): the single [E, D] matrix a router scores tokens with."""
    found = [(name, p) for name, p in router.named_parameters() if p.dim() == 2 and p.shape[1] == dim]
    if len(found) != 1:
        return None
    name, weight = found[0]
    owner = name.rpartition(".")[0]
    bias_name = f"{owner}.bias" if owner else "bias"
    bias = dict(router.named_parameters()).get(bias_name)
    return name, (bias_name if bias is not None and bias.shape == (weight.shape[0],) else None), weight.shape[0]


def number_attr(router: nn.Module, names: Sequence[str], default: Any) -> Any:
    return next((getattr(router, n) for n in names if isinstance(getattr(router, n, None), (int, float))), default)


def find_choice_bias(router: nn.Module, num_experts: int, logit_bias: Optional[str], args: dict) -> Optional[str]:
    tensors = itertools.chain(router.named_buffers(), router.named_parameters(), args.items())
    return next((name for name, t in tensors if name != logit_bias and "bias" in name.rsplit(".", 1)[-1]
                 and t.shape == (num_experts,)), None)


def router_values(outputs: Any) -> list:
    """A router's outputs by position: the items of its tuple (JetMoE's holds a list of counts),
    or the leaves of any other structure."""
    return list(outputs) if isinstance(outputs, tuple) else tree_leaves(outputs)


def _is_dispatch_mask(leaf: Any, num_tokens: int, num_experts: int) -> bool:
    """An integer or boolean [T, E] tensor of zeros and ones, at most one per token: a top-1 router's
    one-hot choice with the tokens past an expert's capacity zeroed (Switch Transformers)."""
    if not isinstance(leaf, Tensor) or leaf.is_floating_point() or leaf.shape != (num_tokens, num_experts):
        return False
    values = leaf.long()
    return bool(((values == 0) | (values == 1)).all()) and bool((values.sum(-1) <= 1).all())


def _dispatch_outputs(leaves: list, num_tokens: int, num_experts: int) -> Optional[dict]:
    """Positions of a dispatch mask [T, E], the top-1 weight [T, 1] and any logits [T, E]: the
    outputs of a top-1 router that applies its own capacity; None for any other router."""
    masks = [i for i, leaf in enumerate(leaves) if _is_dispatch_mask(leaf, num_tokens, num_experts)]
    floats = [(i, leaf) for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor) and leaf.is_floating_point()]
    weights = [i for i, leaf in floats if leaf.shape == (num_tokens, 1)]
    logits = [i for i, leaf in floats if leaf.shape == (num_tokens, num_experts)]
    if len(masks) != 1 or len(weights) != 1 or len(logits) > 1:
        return None
    return {"dispatch": masks[0], "weights": weights[0], **({"logits": logits[0]} if logits else {})}


def split_router_outputs(outputs: Any, num_tokens: int, num_experts: int) -> Optional[dict]:
    """Positions of ids [T,K] (integer), weights [T,K] (float) and logits [T,E] in the outputs, or
    of a dispatch mask in place of the ids (``_dispatch_outputs``)."""
    leaves = router_values(outputs)
    dispatch = _dispatch_outputs(leaves, num_tokens, num_experts)
    if dispatch is not None:
        return dispatch
    found: dict = {}
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, Tensor) or leaf.dim() != 2 or leaf.shape[0] != num_tokens:
            continue
        if not leaf.is_floating_point():
            found.setdefault("ids", i)
        elif leaf.shape[1] == num_experts and "logits" not in found:
            found["logits"] = i
        else:
            found.setdefault("weights", i)
    if "ids" not in found:
        return {"logits": found["logits"]} if "logits" in found else None   # logits only (JetMoE)
    top_k = leaves[found["ids"]].shape[1]
    if "weights" not in found and top_k == num_experts and "logits" in found:
        found["weights"] = found.pop("logits")   # K == E: the [T, E] float output is the weights
    return found if "weights" in found else None


def dispatched_routes(dispatch_TE: Tensor, weight_T1: Tensor,
                      logits_TE: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(weights_TK, ids_TK), K = 1, read from a top-1 router's dispatch mask and weight: a token
    the mask keeps goes to its expert with its weight; a token past the expert's capacity (an
    all-zero row) keeps its choice (the largest logit, where the router returns logits) with
    weight 0, so the block's output for it is zero, as the block's own code makes it, and its
    gradients are too."""
    dispatch_TE = dispatch_TE.long()
    kept_T1 = dispatch_TE.sum(-1, keepdim=True) > 0
    ids_T1 = dispatch_TE.argmax(-1, keepdim=True)
    if logits_TE is not None:
        ids_T1 = torch.where(kept_T1, ids_T1, logits_TE.argmax(-1, keepdim=True))
    return weight_T1 * kept_T1, ids_T1


def sorted_routes(weights_TK: Tensor, ids_TK: Tensor) -> tuple[Tensor, Tensor]:
    ids_sorted, order = ids_TK.long().sort(dim=-1)
    return weights_TK.gather(1, order), ids_sorted


def random_like(name: str, t: Tensor, gen: torch.Generator) -> Tensor:
    """Random values for a router tensor. A matrix is scaled by 1 / sqrt(its fan-in, the last
    dim), so that on the probe's unit tokens the logits spread about 1: unit weights would spread
    them about sqrt(D), and scores that peaked make rules agree within rounding (the top-k of a
    softmax over 8 experts then holds all but 1e-6 of the mass, so renormalised weights equal
    plain ones). Biases are as large as the logits' spread, so that a bias, and where it is added
    (to the scores or to the raw logits, Kolibri's), decides some choices; other 1-D tensors (norm
    weights) stay small.

        >>> random_like("weight", torch.empty(8, 64), generator()).std().item() < 0.2
        True
    """
    if t.dim() >= 2:
        scale = t.shape[-1] ** -0.5 if t.shape[-1] else 1.0
    else:
        scale = 1.0 if "bias" in name.rsplit(".", 1)[-1] else 0.1
    return torch.randn(t.shape, generator=gen).to(device=t.device, dtype=t.dtype) * scale


def randomized(router: nn.Module, gen: torch.Generator) -> nn.Module:
    """A copy of the router with random weights and biases: zero-initialised routers tie every
    score, which would make any routing rule look like any other."""
    probe = copy.deepcopy(router)
    with torch.no_grad():
        for name, t in itertools.chain(probe.named_parameters(), probe.named_buffers()):
            if t.is_floating_point():
                t.copy_(random_like(name, t, gen))
    return probe


@contextlib.contextmanager
def router_randomized(block: nn.Module, router_path: str, gen: torch.Generator, dim: int = 0):
    """Within the block, the router at ``router_path`` (dotted) is a ``randomized`` copy; restored on
    exit. Yields ``rescale(token_scale)``: the probe's tokens are then that much larger, and the
    copy's [., dim] weights are divided by it, so its logits stay those of unit tokens (a power of
    two keeps this exact)."""
    owner_path, _, name = router_path.rpartition(".")
    owner = block.get_submodule(owner_path)
    router = getattr(owner, name)
    probe = randomized(router, gen)
    unit = {key: p.detach().clone() for key, p in probe.named_parameters() if p.dim() == 2 and p.shape[1] == dim}

    def rescale(token_scale: float) -> None:
        with torch.no_grad():
            for key, p in probe.named_parameters():
                if key in unit:
                    p.copy_(unit[key] / token_scale)

    setattr(owner, name, probe)
    try:
        yield rescale
    finally:
        setattr(owner, name, router)


def router_logits(router: nn.Module, spec: RouterSpec, x_TD: Tensor) -> Tensor:
    """Router logits in fp32 (DeepSeek-V3, DeepSpeed) or in the weight's dtype (Mixtral, Qwen),
    whichever the probe found the router to use; scores are always computed in fp32."""
    weight = fetch(router, spec.weight)
    bias = fetch(router, spec.logit_bias) if spec.logit_bias else None
    if spec.fp32_logits:
        return F.linear(x_TD.float(), weight.float(), None if bias is None else bias.float())
    return F.linear(x_TD.to(weight.dtype), weight, bias)


def call_router(router: nn.Module, spec: RouterSpec, x_TD: Tensor, args: Sequence[Tensor] = ()) -> Any:
    """The router's own forward on the tokens (and the block tensors it takes)."""
    return router(x_TD.unsqueeze(0) if spec.batched else x_TD, *args)


def route_known(router: nn.Module, spec: RouterSpec, x_TD: Tensor, args: Sequence[Tensor] = (),
                logits_TE: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(weights_TK, ids_TK, scores_TE) by ``moesys.route``; ``args``: the tensors named by ``spec.args``;
    ``logits_TE``: ``router_logits`` when the caller needs them too."""
    bias = None
    if spec.choice_bias in spec.args:            # the block's own tensor, passed to the router
        bias = args[spec.args.index(spec.choice_bias)]
    elif spec.choice_bias:
        bias = fetch(router, spec.choice_bias)
    logits_TE = router_logits(router, spec, x_TD) if logits_TE is None else logits_TE
    routed = torch.ops.moesys.route(logits_TE, spec.top_k, spec.score_func, spec.renormalize, bias,
                                    spec.n_groups, spec.topk_groups, spec.routed_scaling)
    _run_forward_hooks(router, spec, (x_TD, *args), {"logits": logits_TE, "weights": routed[0], "ids": routed[1]})
    return routed


def _run_forward_hooks(router: nn.Module, spec: RouterSpec, inputs: tuple, values: dict) -> None:
    """The router module is no longer called, but hooks on it still expect its output: Hugging Face
    records router logits that way (``output_router_logits=True`` feeds the model's own aux loss).
    Hooks see the router's output rebuilt from the canonical values: its tuple, or the one tensor
    a router returning a bare tensor (DBRX's logits) gave."""
    if not router._forward_hooks:
        return
    if spec.arity:
        rebuilt = [None] * spec.arity
        for name, position in spec.outputs.items():
            rebuilt[position] = values.get(name)
        output = tuple(rebuilt)
    elif len(spec.outputs) == 1:
        output = values.get(next(iter(spec.outputs)))
    else:
        return
    for hook_id, hook in list(router._forward_hooks.items()):
        if hook_id in router._forward_hooks_with_kwargs:
            hook(router, inputs, {}, output)
        else:
            hook(router, inputs, output)
