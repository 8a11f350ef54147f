"""Recognise routed MoE blocks by structure: the shape Hugging Face transformers v5 gives every MoE
family (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, ...) and most hand-written models share.

    block
      ├─ <router>   one [E, D] weight; called on [T, D] (or [1, T, D]) it returns top-k ids and
      │             weights, or only logits (JetMoE, DBRX: the rule is then found on the block),
      │             or a top-1 dispatch mask with its own capacity applied (Switch Transformers:
      │             kept as traced code, called on the block's [B, S, D] input, so its capacity
      │             counts per sequence as in eager; tokens past it get weight 0);
      │             it may take the block's own [E] tensors (MiniMax-M2's correction bias)
      ├─ experts    stacked 3-D weights (gate_up_proj [E, 2F, D], down_proj [E, D, F], or transposed;
      │             optionally [E, H] / [E, D] biases and a clamped, interleaved SwiGLU: gpt-oss),
      │             two children holding one 3-D weight each (JetMoE), flat [E*F, D] matrices (DBRX),
      │             or a ModuleList or ModuleDict of MLPs (gate/up/down, w1/w3/w2, Linear-act-Linear;
      │             with or without biases, which are stacked like the weights; dropout between
      │             the projections only while it is off)
      ├─ shared_expert(s)        optional dense MLP added to (or averaged with) the routed output
      ├─ shared_expert_gate      optional [1, D] gate, sigmoid-scaled (Qwen2-MoE)
      ├─ <norm child>            optional norm of the block's output, [D] parameters only (A.X-K1)
      └─ <own [D] parameter>     optional output bias (JetMoE)

Class names are only used for the report. The router's rule (softmax/sigmoid, renormalisation,
correction bias, group-limited top-k, routed scaling) is found by probing it; a rule that
``moesys.route`` cannot express keeps the router as the model's own traced code. The whole block is
then probed against its canonical forms, and only an exact match is swapped in (``probe.exact_form``):
the probe's tokens are scaled so that the experts' activations leave their linear range, where a
clamp or a softcap would hide, and so that they cross the range where near activations differ
(exact and tanh GELU, quick GELU); an activation near one of ours but none of them keeps the block
as it is. Crowds of tokens that all choose one expert show a block that drops tokens past a
capacity: it is taken with its own ``capacity_factor`` where probing establishes that capacity
(top-1, ``probe.block_capacity``), else left as it is. A block whose forward takes more than the
hidden states is left as it is. The experts module of a block left as it is may still be
canonicalized alone, when the block calls it with its routing (``routed_experts``).
"""

from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import replace
from typing import Optional

from torch import Tensor, nn

from ..canonicalize import Recognition
from .block import CanonicalMoEBlock, block_kind
from .experts import activation_hint, dropouts_off, expert_dropouts, expert_modules, experts_candidates
from .probe import CROWD_DIFFERS, NO_CAPACITY, BlockProbe, block_capacity, exact_form, token_scales
from .router_rules import analyze_router, rule_candidates
from .structure import (CLAMP_ATTRS, ROUTER_NAMES, SCALING_ATTRS, SHARED_GATE_NAMES, SHARED_NAMES, TOP_K_ATTRS, fetch,
                        generator, leave, number_attr, on_meta, router_randomized)


def _has_stacked_experts(module: nn.Module) -> bool:
    """A ModuleList or ModuleDict of experts, 3-D [E, ., .] weights, or two or three flat [E*F, D]
    matrices (DBRX)."""
    params = list(module.parameters())
    return bool(expert_modules(module)) or any(
        p.dim() == 3 for p in module.parameters(recurse=False)) or (
        2 <= len(params) <= 3 and all(p.dim() == 2 and p.shape == params[0].shape for p in params))


_CONV = nn.modules.conv._ConvNd   # 3-D weights that are kernels, not experts (Inkling's short convolutions)


def split_experts(block: nn.Module) -> Optional[tuple[str, str]]:
    """Two children that each hold exactly one 3-D [E, ., .] weight with the same E (JetMoE's
    ``input_linear`` and ``output_linear``; not convolution kernels), or else the block's own two
    3-D parameters (a hand-written block with ``w1`` [E, D, F] and ``w2`` [E, F, D], next to a
    router child): the experts are the block itself, their weights those two."""
    names = [f"{name}.{pname}" for name, child in block.named_children()
             for pname, p in child.named_parameters() if p.dim() == 3 and len(list(child.parameters())) == 1
             and not isinstance(child.get_submodule(pname.rpartition(".")[0]), _CONV)]
    if len(names) != 2 or fetch(block, names[0]).shape[0] != fetch(block, names[1]).shape[0]:
        own = [(name, p) for name, p in block.named_parameters(recurse=False) if p.dim() == 3]
        names = [name for name, _ in own] if len(own) == 2 and router_child(block, own[0][1].shape[0], set()) else []
    return (names[0], names[1]) if len(names) == 2 else None


def _experts_child(block: nn.Module) -> Optional[str]:
    """Name of the child holding the experts; "" when the block itself holds them (split weights)."""
    names = [name for name, child in block.named_children()
             if "expert" in name and name not in SHARED_NAMES + SHARED_GATE_NAMES and _has_stacked_experts(child)]
    if "experts" in names:
        return "experts"
    if len(names) == 1:
        return names[0]
    return "" if not names and split_experts(block) else None


def _num_experts(experts: nn.Module, split: Optional[tuple[str, str]]) -> int:
    """E; for flat [E*F, D] matrices only the experts module's own count says it (0: unknown)."""
    if split:
        return fetch(experts, split[0]).shape[0]
    listed = expert_modules(experts)
    if listed:
        return len(listed)
    stacked = [p.shape[0] for p in experts.parameters(recurse=False) if p.dim() == 3]
    return stacked[0] if stacked else number_attr(experts, ("num_experts", "moe_num_experts", "num_local_experts"), 0)


def router_child(block: nn.Module, num_experts: int, taken: set[str]) -> Optional[str]:
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


def _output_bias(module: nn.Module, dim: int, taken: set[str]) -> tuple[Optional[str], list[str]]:
    """The block's own [D] parameter added to its output (JetMoE ``bias``), and any other own
    parameters besides ``taken`` (the router's arguments, own expert weights), which the canonical
    form has no place for."""
    own = {name: p for name, p in module.named_parameters(recurse=False) if name not in taken}
    bias = next((name for name, p in own.items() if p.shape == (dim,)), None)
    return bias, [name for name in own if name != bias]


def _router_shapes(module: nn.Module, taken: set[str]) -> str:
    """What the child named like a router scores with instead (ZAYA's MLP router ends in [E + 1, .]
    for a skip expert; Inkling's scores the shared expert with the routed ones)."""
    name = next((n for n in ROUTER_NAMES if n not in taken and isinstance(getattr(module, n, None), nn.Module)), None)
    if name is None:
        return ""
    shapes = [list(p.shape) for p in getattr(module, name).parameters() if p.dim() == 2]
    return f"; its router '{name}' holds the 2-D weights {shapes}" if shapes else ""


def _extra_inputs(module: nn.Module) -> list[str]:
    """Parameters of the block's forward besides the hidden states (DeepSeek-V4 passes the token
    ids, ZAYA the previous layer's router state): the canonical form takes the hidden states only."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return []
    return [("**" if p.kind is p.VAR_KEYWORD else "*" if p.kind is p.VAR_POSITIONAL else "") + p.name
            for p in params[1:]]


def _output_norm(module: nn.Module, extra: list[str], dim: int) -> Optional[str]:
    """The one extra child that may normalise the block's output: it holds only [D] parameters (an
    RMSNorm/LayerNorm; A.X-K1's ``post_mlp_layernorm``). The probe decides whether it does."""
    if len(extra) != 1:
        return None
    shapes = {tuple(p.shape) for p in module.get_submodule(extra[0]).parameters()}
    return extra[0] if shapes == {(dim,)} else None


def _clamped_only(experts: nn.Module, candidates: list) -> tuple[list, Optional[float]]:
    """Experts holding a finite clamp ``limit`` (gpt-oss, DeepSeek-V4, HY-V4) only match clamped
    activations. The probe's scaled tokens reach such a clamp too (``token_scales``); the explicit
    limit makes the reason plain, and a form that only misses the clamp is never tried."""
    limit = number_attr(experts, CLAMP_ATTRS, None)
    if limit is None or not math.isfinite(limit):   # Step 3.7's experts hold limit inf: no clamp
        return candidates, None
    return [c for c in candidates if "clamp" in c.activation], limit


def _router_args(module: nn.Module, router: nn.Module, num_experts: int) -> Optional[dict[str, Tensor]]:
    """The block's own [E] tensors its router takes after the tokens (MiniMax-M2 passes
    ``e_score_correction_bias``, LFM2-MoE an optional ``expert_bias``); None when the router wants
    arguments the block has no match for."""
    params = [p for p in inspect.signature(router.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]
    required = sum(p.default is p.empty for p in params)
    optional = sum(p.default is None for p in params)
    tensors = itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))
    found = {name: t for name, t in tensors if t.shape == (num_experts,)}
    if required <= len(found) <= required + optional:
        return found
    return {} if not required else None


def _recognize(module: nn.Module, path: str, experts_name: str) -> Optional[Recognition]:
    kind = block_kind(module)
    experts = module.get_submodule(experts_name)
    split = split_experts(module) if experts_name == "" else None
    num_experts = _num_experts(experts, split)
    if not num_experts:
        return leave(path, kind, f"experts '{experts_name}' hold flat 2-D weights and no num_experts attribute")
    shared = _optional_child(module, SHARED_NAMES)
    shared_gate = _optional_child(module, SHARED_GATE_NAMES)
    taken = {experts_name, shared, shared_gate} | {name.split(".")[0] for name in split or ()}
    router_name = router_child(module, num_experts, taken)
    if router_name is None:
        return leave(path, kind, f"no child scores tokens against {num_experts} experts (a [{num_experts}, D] "
                                 f"weight){_router_shapes(module, taken)}")
    inputs = _extra_inputs(module)
    if inputs:
        return leave(path, kind, f"its forward takes {inputs} besides the hidden states; the canonical form takes "
                                 f"the hidden states only")
    extra = [name for name, child in module.named_children()
             if name not in taken | {router_name} and any(True for _ in child.parameters())]
    if getattr(module, "jitter_noise", 0) or 0:
        return leave(path, kind, f"router jitter noise ({module.jitter_noise}) randomises training inputs; "
                                 f"set the config's router_jitter_noise=0 to canonicalize it")
    if on_meta(module):
        return leave(path, kind, "parameters are on the meta device; materialise the model before compiling")
    dropouts = expert_dropouts(experts, experts_name)
    router = getattr(module, router_name)
    dim = next(p for p in router.parameters() if p.dim() == 2 and p.shape[0] == num_experts).shape[1]
    output_norm = _output_norm(module, extra, dim)
    if extra and output_norm is None:
        return leave(path, kind, f"child(ren) {extra} are neither router, experts, shared expert nor a norm of "
                                 f"the [{dim}] output")
    args = _router_args(module, router, num_experts)
    if args is None:
        return leave(path, kind, f"router '{router_name}' takes arguments besides the tokens that are not the "
                                 f"block's own [{num_experts}] tensors")
    output_bias, own = _output_bias(module, dim, set(args) | set(split or ()))
    if own:
        return leave(path, kind, f"its own parameter(s) {own} are neither router, experts nor an output bias")
    router_spec, router_why = analyze_router(router, router_name, dim, args)
    if router_spec is None:
        return leave(path, kind, router_why)
    candidates = experts_candidates(experts, experts_name, dim, split, num_experts)
    if not candidates:
        return leave(path, kind, _no_layout(experts, experts_name))
    candidates, limit = _clamped_only(experts, candidates)
    if not candidates:
        return leave(path, kind, f"experts '{experts_name}' clamp their activations (limit {limit:g}) and no "
                                 f"canonical activation clamps that way (clamped SwiGLU needs both alpha and "
                                 f"limit)")
    if router_spec.top_k < 1:   # a logits-only router whose block holds k (DBRX)
        router_spec = replace(router_spec, top_k=number_attr(module, TOP_K_ATTRS, 0))
    if router_spec.top_k < 1:
        return leave(path, kind, f"{router_why}; neither the router nor the block has a top_k attribute")
    own_choice = "ids" in router_spec.outputs or "dispatch" in router_spec.outputs
    rules = [router_spec] if own_choice else rule_candidates(router, router_spec, args)
    rules += _block_scaled(module, rules)
    with dropouts_off(dropouts.values()):   # while probed: the canonical form draws its mask otherwise
        capacity, crowds, capacity_note = block_capacity(module, router_spec.top_k, num_experts)
        # the top-k weights on the experts' outputs, else on their inputs (Llama 4), tried last
        forms = [dict(router=rule, experts=layout, output_scale=scale, capacity_factor=factor,
                      weights_on_input=on_input, **norm)
                 for on_input in (False, True) for rule in rules for layout in candidates
                 for scale in ((1.0, 0.5) if shared else (1.0,))
                 for norm in ([dict(output_norm=output_norm)] if output_norm else [{}])
                 for factor in ((0.0, capacity) if capacity else (0.0,))]
        fixed = dict(shared=shared, shared_gate=shared_gate, output_bias=output_bias)
        weights = [fetch(module, name) for name in split] if split else [
            p for p in experts.parameters() if p.dim() >= 2]
        found, best, problem = _probe_forms(module, router_name, dim, forms, fixed, weights, crowds)
    if found is None:
        what = "its experts" if len(rules) == 1 else f"any of {len(rules)} routing rules with its experts"
        closest = problem or f"closest max abs diff {best:.3g} over {len(forms)} forms"
        if problem == CROWD_DIFFERS or capacity_note:   # the capacity it holds (or lacks) is why
            closest += f"; {capacity_note or NO_CAPACITY}"
        closest += activation_hint(experts)
        return leave(path, kind, f"{router_why}; no canonical form of {what} reproduces the block's output "
                                 f"({closest})")
    recognition = _recognition(module, kind, found, fixed)
    refusal = recognition.replacement.expert_dropout_refusal()
    return leave(path, kind, refusal) if refusal else recognition


def _block_scaled(module: nn.Module, rules: list) -> list:
    """``rules`` again with the block's own routed scaling, for those that scale nothing: Beam's
    router returns unscaled weights and its block multiplies the experts' sum by its
    ``routed_scaling_factor`` (the same as scaling the weights; the probe tells which holds)."""
    scaling = float(number_attr(module, SCALING_ATTRS, 1.0))
    scaled = [replace(rule, routed_scaling=scaling) for rule in rules if rule.routed_scaling == 1.0 != scaling]
    return [rule for index, rule in enumerate(scaled) if rule not in rules and rule not in scaled[:index]]


def _recognition(module: nn.Module, kind: str, form: dict, fixed: dict) -> Recognition:
    """The block in the canonical ``form`` the probe found; its twins take the same form."""
    replacement = _build(module, form, fixed)
    replacement.expert_dropout_problem()     # checked now: a training call may come while the model is traced
    return Recognition(kind=kind, replacement=replacement, details=replacement.details(),
                       for_twin=lambda twin: _recognition(twin, block_kind(twin), form, fixed))


def _no_layout(experts: nn.Module, name: str) -> str:
    own = dict(experts.named_parameters(recurse=False))
    stacked = [n for n, p in own.items() if p.dim() == 3]
    if stacked and len(own) > len(stacked):
        return (f"experts '{name}' hold {sorted(set(own) - set(stacked))} besides the stacked weights {stacked}: "
                f"only [E, H] up and [E, D] down biases have a place in moesys.moe_experts")
    return (f"experts '{name}' are neither stacked 3-D [E, H, D]/[E, D, F] weights nor a list of Linear MLPs "
            f"(up Linears all biased or all bias-free)")


def _probe_forms(module: nn.Module, router_name: str, dim: int, forms: list[dict], fixed: dict,
                 expert_weights: list[Tensor], crowds: list[tuple[int, int]]) -> tuple[Optional[dict], float, str]:
    """``probe.exact_form`` of the block: the router is randomised while probing (zero-initialised
    routers tie every rule), and the tokens are scaled so that the experts' activations leave
    their linear range and cross the range where near activations differ (``token_scales``; the
    router's copy is scaled down to match, so its scores do not saturate); ``crowds`` of tokens that
    choose the same expert tell a block that drops tokens from a dropless one (``block_capacity``).
    The form found is then built on the block as it is."""
    scales = token_scales(expert_weights, dim)
    with router_randomized(module, router_name, generator(), dim) as rescale:
        return exact_form(module, forms, lambda form: _build(module, form, fixed),
                          lambda: BlockProbe(module, dim, scales=scales, rescale=rescale, crowds=crowds))


class OutputNormMoEBlock(CanonicalMoEBlock):
    """A canonical block whose output then goes through the block's own norm child (A.X-K1's
    ``post_mlp_layernorm``); the norm keeps its name, so ``state_dict`` keys do not change."""

    def __init__(self, original: nn.Module, output_norm: str, **form):
        super().__init__(original, **form)
        self.output_norm = output_norm

    def forward(self, hidden_states: Tensor):
        out = super().forward(hidden_states)
        norm = self.get_submodule(self.output_norm)
        return norm(out) if isinstance(out, Tensor) else (norm(out[0]), *out[1:])

    def details(self) -> dict:
        return {**super().details(), "output_norm": self.output_norm}


def _build(module: nn.Module, form: dict, fixed: dict) -> CanonicalMoEBlock:
    """The canonical block of ``form`` (with an output norm when the form names one)."""
    return (OutputNormMoEBlock if form.get("output_norm") else CanonicalMoEBlock)(module, **form, **fixed)
