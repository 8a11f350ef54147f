"""Group-limited routers the probe must tell apart: DeepSeek-V2's ``group_limited_greedy`` ranks
groups by their best score, DeepSeek-V3 (and ``moesys.route``) by the sum of their two best. On
random tokens the scores are too peaked for the two to disagree, so the probe adds tokens designed
to separate them; a V2 router must never be taken for the V3 rule (it stays traced code), and a
V3 router keeps its rule, at any expert count (E < D and E > D).

Shape legend: T tokens · D model dim · E experts · G groups · K top-k.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moesys_compile as mc
from moesys_compile.frontend.recognizers import analyze_router
from moesys_compile.frontend.recognizers.router_rules import group_probe_logits
from moesys_compile.ops import route_reference

GROUP_SHAPES = [(4, 2, 1), (8, 4, 2), (16, 4, 2), (64, 8, 4), (160, 8, 3), (256, 8, 4)]   # (E, G, topk_groups)


def best_score_groups(scores_TE: torch.Tensor, n_groups: int, topk_groups: int, top_k: int) -> torch.Tensor:
    """DeepSeek-V2 ``group_limited_greedy``: groups ranked by their best score; sorted ids [T, K]."""
    group_scores_TG = scores_TE.view(scores_TE.shape[0], n_groups, -1).max(-1).values
    keep_TG = torch.zeros_like(group_scores_TG).scatter_(1, group_scores_TG.topk(topk_groups, -1).indices, 1.0)
    mask_TE = keep_TG.repeat_interleave(scores_TE.shape[1] // n_groups, dim=1).bool()
    return scores_TE.masked_fill(~mask_TE, float("-inf")).topk(top_k, -1).indices.sort(-1).values


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("num_experts,n_groups,topk_groups", GROUP_SHAPES)
def test_every_designed_probe_token_separates_best_score_from_top2_sum(num_experts, n_groups, topk_groups,
                                                                      score_func):
    logits_GE = group_probe_logits(num_experts, n_groups, topk_groups)
    assert logits_GE.shape == (n_groups, num_experts)
    assert all(len(set(row.tolist())) == num_experts for row in logits_GE)    # no choice rests on a tie
    scores_GE = logits_GE.softmax(-1) if score_func == "softmax" else logits_GE.sigmoid()
    for top_k in (1, 2, topk_groups * 2):
        _, ids_GK, _ = route_reference(logits_GE, top_k, score_func, False, None, n_groups, topk_groups)
        v2_GK = best_score_groups(scores_GE, n_groups, topk_groups, top_k)
        assert (ids_GK.sort(-1).values != v2_GK).any(-1).all(), (top_k, ids_GK, v2_GK)


def test_no_designed_tokens_where_the_group_rules_cannot_differ():
    assert group_probe_logits(8, 1, 1) is None       # no groups
    assert group_probe_logits(4, 4, 1) is None       # one expert per group: best score == top-2 sum
    assert group_probe_logits(8, 2, 2) is None       # every group kept


class GroupRouter(nn.Module):
    """A DeepSeek-style grouped router returning (logits, weights, ids); ``best_score``: V2's
    ``group_limited_greedy`` (softmax, groups by their best score), else V3's rule (sigmoid,
    correction bias, groups by their two best biased scores, renormalized)."""

    def __init__(self, dim: int, num_experts: int, n_group: int, topk_group: int, top_k: int, best_score: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_experts, dim) * 0.02)
        if not best_score:
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))
        self.n_group, self.topk_group, self.top_k, self.best_score = n_group, topk_group, top_k, best_score

    def forward(self, x_TD):
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        if self.best_score:
            scores_TE = logits_TE.softmax(-1)
            ids_TK = best_score_groups(scores_TE, self.n_group, self.topk_group, self.top_k)
            return logits_TE, scores_TE.gather(1, ids_TK), ids_TK
        weights_TK, ids_TK, _ = route_reference(logits_TE, self.top_k, "sigmoid", True, self.e_score_correction_bias,
                                                self.n_group, self.topk_group)
        return logits_TE, weights_TK, ids_TK


ROUTER_SHAPES = [(16, 4, 2, 1, 2), (16, 16, 4, 2, 4), (8, 64, 8, 4, 8)]   # (D, E, G, topk_groups, K): E < D, E > D


@pytest.mark.parametrize("dim,num_experts,n_group,topk_group,top_k", ROUTER_SHAPES)
def test_a_best_score_group_router_is_never_taken_for_the_top2_sum_rule(dim, num_experts, n_group, topk_group,
                                                                        top_k):
    router = GroupRouter(dim, num_experts, n_group, topk_group, top_k, best_score=True)
    spec, why = analyze_router(router, "gate", dim)
    assert spec is not None and not spec.known, why
    assert "matches no rule" in why


@pytest.mark.parametrize("dim,num_experts,n_group,topk_group,top_k", ROUTER_SHAPES)
def test_a_top2_sum_group_router_keeps_its_rule(dim, num_experts, n_group, topk_group, top_k):
    router = GroupRouter(dim, num_experts, n_group, topk_group, top_k, best_score=False)
    spec, why = analyze_router(router, "gate", dim)
    assert spec.known, why
    assert (spec.score_func, spec.n_groups, spec.topk_groups, spec.choice_bias) == (
        "sigmoid", n_group, topk_group, "e_score_correction_bias"), why


def test_the_designed_tokens_leave_the_users_router_untouched():
    router = GroupRouter(16, 4, 2, 1, 2, best_score=False)
    before = copy.deepcopy(router.state_dict())
    analyze_router(router, "gate", 16)
    assert all(torch.equal(before[name], t) for name, t in router.state_dict().items())


def test_deepseek_v2_group_limited_greedy_compiles_to_eager():
    """The tester's repro: 4 experts in 2 groups, topk_group 1. The router stays traced code and
    the program's logits are eager's in train and infer mode."""
    from moesys_compile.models.hf import build_hf

    model = build_hf("deepseek_v2", 0, num_hidden_layers=1, first_k_dense_replace=0,
                     topk_method="group_limited_greedy", n_group=2, topk_group=1).eval()
    eager = copy.deepcopy(model)
    x = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = eager(x).logits
    for mode in ("train", "infer"):
        program = mc.compile(copy.deepcopy(model), mc.Plan(mode=mode), example_inputs=(x[:2],))
        assert [r.details.get("router") for r in program.context.blocks] == ["own router 'gate' (traced)"]
        with torch.no_grad():
            torch.testing.assert_close(program(x).logits, want, rtol=0, atol=1e-5)
