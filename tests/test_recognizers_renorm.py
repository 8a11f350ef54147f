"""A router's top-k weights are taken renormalised only when the block renormalises them. A
Mixtral-style user block (``nn.Linear`` router, a ModuleList of SwiGLU experts, ``softmax`` then
``topk``) with or without ``w / w.sum()`` compiles to the rule it computes, with 8 and 16 experts,
top-2 and top-3, with and without a router bias, and equals eager, outputs and every gradient; a
plain softmax or sigmoid top-1 keeps its weight too. The probe's randomised router scores tokens at
logits of spread about 1, so that plain top-k weights differ visibly from renormalised ones; where
the probe's tokens still cannot tell two rules that route otherwise apart, the router or block
stays the model's own code, with the rules named."""

from __future__ import annotations

import copy
import itertools
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

import moesys_compile as mc
from moesys_compile.frontend.recognizers import analyze_router, canonicalize, structure
from moesys_compile.frontend.recognizers.router_rules import same_routing, settled_rule
from moesys_compile.frontend.recognizers.structure import RouterSpec

sys.path.insert(0, str(Path(__file__).parent))
from blocks import SwiGLUExpert  # noqa: E402

D, FF, V = 32, 48, 96
TOL = 1e-5


def scores_topk(logits_TE: torch.Tensor, top_k: int, renorm: bool,
                score: str = "softmax") -> tuple[torch.Tensor, torch.Tensor]:
    scores_TE = logits_TE.softmax(-1) if score == "softmax" else logits_TE.sigmoid()
    weights_TK, ids_TK = scores_TE.topk(top_k, dim=-1)
    return (weights_TK / weights_TK.sum(-1, keepdim=True) if renorm else weights_TK), ids_TK


class MixtralStyleBlock(nn.Module):
    """``softmax(gate(x)).topk(k)`` (or sigmoid), renormalised only where asked, over listed SwiGLU
    experts."""

    def __init__(self, num_experts: int, top_k: int, renorm: bool, bias: bool, score: str = "softmax"):
        super().__init__()
        self.gate = nn.Linear(D, num_experts, bias=bias)
        self.experts = nn.ModuleList(SwiGLUExpert(D, FF) for _ in range(num_experts))
        self.top_k, self.renorm, self.score = top_k, renorm, score

    def forward(self, x_BSD):
        x_TD = x_BSD.reshape(-1, D)
        weights_TK, ids_TK = scores_topk(self.gate(x_TD), self.top_k, self.renorm, self.score)
        y_TD = torch.zeros_like(x_TD)
        for e, expert in enumerate(self.experts):
            y_TD = y_TD + ((ids_TK == e).to(x_TD.dtype) * weights_TK).sum(-1, keepdim=True) * expert(x_TD)
        return y_TD.reshape(x_BSD.shape)


class Net(nn.Module):
    def __init__(self, **block):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.moe, self.head = nn.Embedding(V, D), MixtralStyleBlock(**block), nn.Linear(D, V)

    def forward(self, ids):
        x = self.embed(ids)
        return self.head(x + self.moe(x))


def token_ids() -> torch.Tensor:
    return torch.randint(0, V, (4, 16), generator=torch.Generator().manual_seed(0))   # every expert chosen


def compiles_to(net: Net, rule: str, router_learns: bool = True) -> None:
    """``net`` compiles for training with its block replaced under ``rule``, and its outputs and
    every gradient equal an eager copy's (the router's are all zero where its weights are
    constant: a renormalised top-1)."""
    eager = copy.deepcopy(net)
    program = mc.compile(net, mc.Plan(mode="train"), example_inputs=(token_ids(),))
    [block] = program.context.blocks
    assert (block.action, block.details["router"]) == ("replaced", rule), block.reason
    got, want = program(token_ids()), eager(token_ids())
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)
    got.square().sum().backward()
    want.square().sum().backward()
    for (name, p), (_, q) in zip(net.named_parameters(), eager.named_parameters()):
        if router_learns or not name.startswith("moe.gate"):
            assert q.grad is not None and q.grad.abs().sum() > 0, f"{name}: no eager gradient, the check proves nothing"
        torch.testing.assert_close(p.grad, q.grad, rtol=TOL, atol=TOL, msg=lambda m: f"{name}: {m}")


CONFIGS = list(itertools.product((8, 16), (2, 3), (False, True), (False, True)))


@pytest.mark.parametrize("num_experts, top_k, renorm, bias", CONFIGS,
                         ids=[f"E{e}-top{k}-{'renorm' if r else 'plain'}{'-bias' if b else ''}"
                              for e, k, r, b in CONFIGS])
def test_a_softmax_topk_block_compiles_to_the_rule_it_computes_and_equals_eager(num_experts, top_k, renorm, bias):
    net = Net(num_experts=num_experts, top_k=top_k, renorm=renorm, bias=bias)
    compiles_to(net, f"softmax-top{top_k}" + ("-renorm" if renorm else ""))


@pytest.mark.parametrize("score, renorm, rule", [
    ("softmax", False, "softmax-top1"),
    ("sigmoid", False, "sigmoid-top1"),
    ("softmax", True, "softmax-top1-renorm"),
    ("sigmoid", True, "softmax-top1-renorm"),     # weight 1, the largest logit's expert: either score function
], ids=["softmax", "sigmoid", "softmax-renorm", "sigmoid-renorm"])
def test_a_top1_block_keeps_its_score_function_and_weight(score, renorm, rule):
    """Peaked scores would make a top-1 weight 1 under every rule: a plain softmax or sigmoid
    top-1 would be taken for a renormalised one."""
    compiles_to(Net(num_experts=8, top_k=1, renorm=renorm, bias=True, score=score), rule, router_learns=not renorm)


class TopKRouter(nn.Module):
    """A router that returns its own (weights, ids), as Hugging Face v5 routers do."""

    def __init__(self, num_experts: int, top_k: int, renorm: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, D))
        self.top_k, self.renorm = top_k, renorm

    def forward(self, x_TD):
        return scores_topk(x_TD @ self.weight.T, self.top_k, self.renorm)


@pytest.mark.parametrize("renorm", [False, True], ids=["plain", "renorm"])
def test_a_router_returning_its_routes_is_read_with_its_renormalisation(renorm):
    spec, why = analyze_router(TopKRouter(16, 2, renorm), "router", D)
    assert spec.describe() == "softmax-top2" + ("-renorm" if renorm else ""), why


def peaked_like(name: str, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Router weights far past unit scale: logits spread about 100 sqrt(D), every softmax of the
    probe is one-hot in float32, and no probe token tells renormalised weights from plain ones."""
    return torch.randn(t.shape, generator=gen).to(device=t.device, dtype=t.dtype) * (100.0 if t.dim() > 1 else 0.1)


@pytest.mark.parametrize("renorm", [False, True], ids=["plain", "renorm"])
def test_rules_the_probe_cannot_tell_apart_leave_the_block_its_own_code_with_both_named(renorm, monkeypatch):
    monkeypatch.setattr(structure, "random_like", peaked_like)
    [report] = canonicalize(Net(num_experts=8, top_k=2, renorm=renorm, bias=False))
    assert report.action == "left"
    assert "do not tell these apart" in report.reason, report.reason
    assert "'softmax-top2-renorm'" in report.reason and "'softmax-top2'" in report.reason, report.reason


def test_a_router_whose_rules_tie_stays_the_models_own_code(monkeypatch):
    monkeypatch.setattr(structure, "random_like", peaked_like)
    spec, why = analyze_router(TopKRouter(8, 2, renorm=False), "router", D)
    assert not spec.known and "softmax-top2-renorm" in why and "it stays the model's own code" in why, why


def test_rules_that_route_alike_are_no_rivals_and_rules_that_do_not_are_refused_on_a_tie():
    rule = RouterSpec("gate", 2, 8, score_func="softmax")
    plain, over_all = replace(rule, renormalize=False), RouterSpec("gate", 8, 8, score_func="softmax")
    assert same_routing(rule, replace(rule, fp32_logits=False))
    assert same_routing(over_all, replace(over_all, renormalize=False))      # weights of all experts sum to 1
    assert not same_routing(rule, plain) and not same_routing(rule, replace(rule, score_func="sigmoid"))
    assert not same_routing(rule, replace(rule, routed_scaling=2.5))
    assert settled_rule([rule, plain], lambda r: r is plain) == (plain, "")
    found, why = settled_rule([rule, plain], lambda r: True)
    assert found is None and "'softmax-top2-renorm', 'softmax-top2'" in why
    assert settled_rule([over_all, replace(over_all, renormalize=False)], lambda r: True) == (over_all, "")
    assert settled_rule([rule], lambda r: False) == (None, "")
    top1 = RouterSpec("gate", 1, 8, score_func="softmax")
    assert same_routing(top1, replace(top1, score_func="sigmoid"))             # weight 1, the same expert
    assert not same_routing(replace(top1, renormalize=False), replace(top1, score_func="sigmoid", renormalize=False))
    assert not same_routing(replace(top1, choice_bias="bias"), replace(top1, score_func="sigmoid", choice_bias="bias"))
    grouped = replace(rule, n_groups=4, topk_groups=4)
    assert same_routing(rule, grouped) and not same_routing(rule, replace(grouped, topk_groups=2))
