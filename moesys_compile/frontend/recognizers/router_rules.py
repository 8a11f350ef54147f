"""Which routing rule a router follows: every rule ``moesys.route`` expresses is tried on a
randomised copy of the router (``analyze_router``), and one is taken only when no rule that routes
otherwise reproduces the probed router too (``settled_rule``). Where random tokens cannot tell two
rules apart (group-limited top-k), the probe adds tokens designed to (``group_probe_tokens``).

Shape legend: T tokens · D model dim · E experts · K top-k · G groups.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import ops
from ...ir import fetch
from .structure import (GROUP_ATTRS, SCALING_ATTRS, TOP_K_ATTRS, RouterSpec, find_choice_bias, find_router_weight,
                        sorted_routes, split_router_outputs, close, first_param, generator, number_attr,
                        randomized, random_like, route_known, router_values)


def group_attrs(router: nn.Module) -> tuple[int, int]:
    """(n_groups, topk_groups) the router holds for group-limited top-k ((1, 1): none)."""
    return number_attr(router, GROUP_ATTRS[0], 1), number_attr(router, GROUP_ATTRS[1], 1)


def _candidates(router: nn.Module, spec: RouterSpec, args: dict) -> list[dict]:
    groups = group_attrs(router)
    scaling = float(number_attr(router, SCALING_ATTRS, 1.0))
    bias = find_choice_bias(router, spec.num_experts, spec.logit_bias, args)
    low_precision = fetch(router, spec.weight).dtype not in (torch.float32, torch.float64)
    options = itertools.product(ops.SCORE_FUNCS, (True, False), {None, bias}, {(1, 1), groups}, {1.0, scaling},
                                (True, False) if low_precision else (True,))
    return [dict(score_func=s, renormalize=r, choice_bias=b, n_groups=g[0], topk_groups=g[1], routed_scaling=c,
                 fp32_logits=f)
            for s, r, b, g, c, f in options if g[0] >= 1 and (g[0] == 1 or spec.num_experts % g[0] == 0)]


def same_routing(a: RouterSpec, b: RouterSpec) -> bool:
    """Whether two rules route every input alike: they differ at most in the dtype of the logits
    (rounding, within the probe's tolerance, is all that tells these apart, and the first is
    taken), in renormalising a softmax over all experts (top_k == E: its weights sum to 1), in
    group limits that keep every group, or, for a renormalised top-1 without bias or groups, in
    the score function (the weight is 1, the expert the one of the largest logit either way).

        >>> rule = RouterSpec("gate", 2, 8, score_func="softmax")
        >>> same_routing(rule, replace(rule, fp32_logits=False)), same_routing(rule, replace(rule, renormalize=False))
        (True, False)
    """
    return _essence(a) == _essence(b)


def _essence(rule: RouterSpec) -> RouterSpec:
    """``rule`` with what does not change its routes made the same for every rule."""
    renormalize = rule.renormalize or (rule.score_func == "softmax" and rule.top_k == rule.num_experts)
    groups = (rule.n_groups, rule.topk_groups) if rule.topk_groups < rule.n_groups else (1, 1)
    unit_top1 = renormalize and rule.top_k == 1 and rule.choice_bias is None and groups == (1, 1)
    return replace(rule, fp32_logits=True, renormalize=renormalize, n_groups=groups[0], topk_groups=groups[1],
                   score_func="softmax" if unit_top1 else rule.score_func)


def settled_rule(rules: Sequence[RouterSpec],
                 reproduces: Callable[[RouterSpec], bool]) -> tuple[Optional[RouterSpec], str]:
    """(the first of ``rules`` that ``reproduces`` the probed router, ""), when no rule that routes
    otherwise (``same_routing``) reproduces it too; (None, "") when no rule does; (None, why) when
    rules that route otherwise all do: the probe's tokens do not tell them apart (scores too peaked
    make a renormalised top-k equal a plain one), and a guess could compute otherwise on the
    model's own tokens."""
    found = next((rule for rule in rules if reproduces(rule)), None)
    if found is None:
        return None, ""
    tied = [rule for rule in rules if not same_routing(rule, found) and reproduces(rule)]
    if not tied:
        return found, ""
    names = [rule.describe() for rule in (found, *tied)]
    return None, f"matches the rules {names} alike: the probe's tokens do not tell them apart"


GROUP_PROBE_LEVELS = (0.3, -0.2, -4.0)   # logits: one high, two medium, low (see group_probe_logits)


def group_probe_logits(num_experts: int, n_groups: int, topk_groups: int) -> Optional[Tensor]:
    """[G, E] router logits on which ranking groups by their best score (DeepSeek-V2's
    ``group_limited_greedy``) and by the sum of their two best (DeepSeek-V3, ``moesys.route``)
    keep different groups; None when the two rules cannot differ. Row ``a``: group ``a`` holds one
    high logit, the next ``topk_groups`` groups two medium ones each (two medium scores outweigh
    a high and a low one, under softmax and sigmoid alike), every other logit is low. The best-score
    rule keeps group ``a`` and picks its high expert; the top-2 rule drops it. All logits are
    distinct, so no choice rests on a tie.

        >>> group_probe_logits(4, 2, 1)
        tensor([[ 0.3000, -5.0000, -0.2000, -0.2400],
                [-0.2000, -0.2400,  0.3000, -7.0000]], dtype=torch.float64)
    """
    per_group = num_experts // max(n_groups, 1)
    if n_groups < 2 or per_group < 2 or not 1 <= topk_groups < n_groups or num_experts % n_groups:
        return None
    high, medium, low = GROUP_PROBE_LEVELS
    medium_M = medium - 0.08 * torch.arange(2 * topk_groups, dtype=torch.float64) / (2 * topk_groups)
    rows = []
    for a in range(n_groups):
        logits_GP = (low - 4.0 * torch.arange(num_experts, dtype=torch.float64) / num_experts).view(n_groups, -1)
        logits_GP[a, 0] = high
        for i in range(topk_groups):
            logits_GP[(a + 1 + i) % n_groups, :2] = medium_M[2 * i:2 * i + 2]
        rows.append(logits_GP.reshape(-1))
    return torch.stack(rows)


def group_probe_tokens(probe: nn.Module, weight: str, logit_bias: Optional[str], num_experts: int) -> Tensor:
    """[G, D] tokens on which the randomised ``probe`` router gives the logits of
    ``group_probe_logits`` (no rows when it holds no group-limited top-k): the unit tokens e_0 ..
    e_{G-1}, after the first G columns of the probe's [E, D] weight are set to those logits (less
    its logit bias), which any E and D allow. Random tokens alone may leave a wrong group rule
    unnoticed: their scores are too peaked for the rules to disagree."""
    weight_ED = fetch(probe, weight)
    designed_GE = group_probe_logits(num_experts, *group_attrs(probe))
    if designed_GE is None or designed_GE.shape[0] > weight_ED.shape[1]:
        return weight_ED.new_zeros((0, weight_ED.shape[1])).detach()
    if logit_bias:
        designed_GE = designed_GE - fetch(probe, logit_bias).detach().double().cpu()
    n_groups = designed_GE.shape[0]
    with torch.no_grad():
        weight_ED[:, :n_groups] = designed_GE.T.to(weight_ED)
    return torch.eye(n_groups, weight_ED.shape[1], device=weight_ED.device, dtype=weight_ED.dtype)


def _call_probe(probe: nn.Module, x_TD: Tensor, args: Sequence[Tensor]) -> tuple[Any, bool]:
    """(outputs, batched): called on [T, D] tokens, or on [1, T, D] when the router wants a batch."""
    try:
        return probe(x_TD, *args), False
    except Exception:  # noqa: BLE001 - retried batched; that error is the one reported
        return probe(x_TD.unsqueeze(0), *args), True


def analyze_router(router: nn.Module, path: str, dim: int,
                   args: Optional[dict[str, Tensor]] = None) -> tuple[Optional[RouterSpec], str]:
    """Identify the routing rule of ``router`` (a child of an MoE block) by probing a randomised
    copy against every rule ``moesys.route`` can express, on random tokens and, for a group-limited
    router, the ``group_probe_tokens``; a rule is taken only when no rule that routes otherwise
    matches too (``settled_rule``). ``args``: the block's tensors the router takes after the
    tokens, by name (randomised for the probe too). Returns (spec, why); a spec without a rule
    keeps the router as the model's own code."""
    weight = find_router_weight(router, dim)
    if weight is None:
        return None, f"'{path}' has no single [num_experts, {dim}] weight"
    weight_name, logit_bias, num_experts = weight
    gen = generator()
    probe = randomized(router, gen)
    args = {name: random_like(name, t, gen) for name, t in (args or {}).items()}
    param = first_param(router)
    x_TD = torch.randn(16, dim, generator=gen).to(device=param.device, dtype=param.dtype)
    x_TD = torch.cat([x_TD, group_probe_tokens(probe, weight_name, logit_bias, num_experts).to(x_TD)])
    with torch.no_grad():
        try:
            outputs, batched = _call_probe(probe, x_TD, tuple(args.values()))
        except Exception as exc:  # noqa: BLE001 - any failure means "not a router we can call on [T, D]"
            return None, f"'{path}' cannot be called on [tokens, {dim}]: {type(exc).__name__}: {exc}"
        positions = split_router_outputs(outputs, x_TD.shape[0], num_experts)
        if positions is None:
            return None, f"'{path}' does not return top-k ids and weights"
        leaves = router_values(outputs)
        positions = _with_logits_found(positions, leaves, x_TD, probe, weight_name, logit_bias)
        arity = len(outputs) if isinstance(outputs, tuple) else 0
        shape = dict(outputs=positions, arity=arity, args=tuple(args), batched=batched)
        if "dispatch" in positions:
            return RouterSpec(path, 1, num_experts, weight_name, logit_bias, **shape, per_sequence=True), (
                f"router '{path}' returns a top-1 dispatch mask with its own capacity; it stays the model's own "
                f"code, called on the block's [batch, seq, dim] input as the block calls it")
        if "ids" not in positions:
            top_k = number_attr(router, TOP_K_ATTRS, 0)
            return RouterSpec(path, top_k, num_experts, weight_name, logit_bias, **shape), (
                f"router '{path}' returns logits but no [tokens, k] ids and weights (top_k={top_k})")
        top_k = leaves[positions["ids"]].shape[1]
        spec = RouterSpec(path, top_k, num_experts, weight_name, logit_bias, **shape)
        expected = sorted_routes(leaves[positions["weights"]], leaves[positions["ids"]])
        rules = rule_candidates(probe, spec, args)
        found, tie = settled_rule(rules, lambda rule: _routes_alike(probe, rule, x_TD, args, expected))
    if found is None:
        return spec, f"router '{path}' {tie or 'matches no rule moesys.route expresses'}; it stays the model's own code"
    return found, f"router '{path}': {found.describe()}"


def _with_logits_found(positions: dict, leaves: list, x_TD: Tensor, probe: nn.Module, weight: str,
                       logit_bias: Optional[str]) -> dict:
    """``positions`` with "logits" at the [T, E] output that is the tokens times the router's
    weight (plus its bias), where there are several [T, E] outputs: Llama 4's router returns its
    sparse sigmoid scores first and its logits second. Unchanged where no output is that."""
    if "logits" not in positions:
        return positions
    shape = leaves[positions["logits"]].shape
    bias = fetch(probe, logit_bias).double() if logit_bias else None
    logits_TE = F.linear(x_TD.double(), fetch(probe, weight).double(), bias)
    found = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor) and leaf.is_floating_point()
             and leaf.shape == shape and close(leaf, logits_TE)[0]]
    return dict(positions, logits=found[0]) if found else positions


def _routes_alike(probe: nn.Module, rule: RouterSpec, x_TD: Tensor, args: dict[str, Tensor],
                  expected: tuple[Tensor, Tensor]) -> bool:
    """Whether ``rule`` gives the probed router's own routes on ``x_TD`` (``expected``, sorted by
    expert): the same ids, weights equal within rounding."""
    weights_TK, ids_TK, _ = route_known(probe, rule, x_TD, tuple(args.values()))
    got = sorted_routes(weights_TK, ids_TK)
    return torch.equal(got[1], expected[1]) and close(got[0], expected[0])[0]


def rule_candidates(router: nn.Module, spec: RouterSpec, args: Optional[dict[str, Tensor]] = None) -> list[RouterSpec]:
    """Every rule ``moesys.route`` expresses for a router whose own outputs do not show its choice
    (``spec.outputs`` has logits only): the block probe decides between them."""
    return [replace(spec, **option) for option in _candidates(router, spec, args or {})]
