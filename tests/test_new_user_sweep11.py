"""What the eleventh new-user sweep (kernels, custom ops and the compile API) found, each refused
or fixed now:

- ``mc.nn.MoE(dim=10)`` given tokens of another width ([5, 12]) returned a [5, 12] result: its
  ``reshape(-1, dim)`` regrouped the 60 elements into 6 tokens of 10 and routed those. A block
  that ``mc.compile`` had canonicalized did the same where the user's own block had raised (its
  router Linear refused the width). Both refuse such an input now, naming the layer and the dim.
- The canonical ops (``torch.ops.moesys.*``) took what the kernel ops (``moesys_kernels.*``)
  refuse, some silently: ``moe_experts`` with fewer ids than tokens returned as many rows as ids
  (its fake implementation said as many as tokens); ``permute`` with ids past E returned a
  ``counts_E`` longer than E; ``route`` with group-limited routing and a top_k above the experts
  the kept groups hold picked masked experts, with nonzero weights; ``grouped_mlp`` with counts
  past its rows ran on the rows there were. The rest failed deep inside with an IndexError or a
  matmul size error. They share the kernels' checks now (``moesys_compile/ops/checks.py``) and
  raise ``OpInputError`` (a ValueError) naming the tensor and the sizes.
- ``moesys-compile inspect`` listed an ``nn.MoE`` by its sizes alone, where a recognised block's
  line names its router, capacity and shared expert: a sigmoid router without renormalisation
  and a capacity-dropping layer read as the defaults. Its line names them now.
- ``mc.nn.MoE(aux_loss_coef=None)`` or ``capacity_factor="1.25"`` failed with a TypeError of a
  comparison, ``capacity_factor=float("inf")`` with an OverflowError at the first forward, and
  ``capacity_factor=True`` or ``renormalize="no"`` were taken (as 1.0 and as True). Each is refused
  at construction by name.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moesys_compile as mc
import moesys_compile.kernels  # noqa: F401  (registers torch.ops.moesys_kernels)
from moesys_compile.errors import OpInputError
from moesys_compile.frontend.recognizers import canonicalize

ops = torch.ops.moesys


class LoopBlock(nn.Module):
    """A user's top-k block: router Linear, softmax over the top-k logits, index_add over experts."""

    def __init__(self, dim=10, ffn=6, experts=4, top_k=2):
        super().__init__()
        self.gate = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, ffn), nn.SiLU(), nn.Linear(ffn, dim))
                                     for _ in range(experts))
        self.top_k = top_k

    def forward(self, x):
        x_TD = x.reshape(-1, x.shape[-1])
        top_logits_TK, ids_TK = self.gate(x_TD).topk(self.top_k, -1)
        weights_TK = top_logits_TK.softmax(-1)
        out_TD = torch.zeros_like(x_TD)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(ids_TK == e)
            out_TD = out_TD.index_add(0, token, expert(x_TD[token]) * weights_TK[token, slot, None])
        return out_TD.reshape(x.shape)


def test_a_moe_layer_refuses_tokens_of_another_width():
    """A reshape to [-1, dim] took a [5, 12] input as 6 tokens of 10 (the result had the input's
    shape, so nothing showed it)."""
    torch.manual_seed(0)
    layer = mc.nn.MoE(dim=10, ffn_dim=6, num_experts=4, top_k=2)
    with pytest.raises(OpInputError, match=r"MoE\(dim=10, num_experts=4\) takes tokens of width dim \(10\), "
                                           r"got an input of shape \(5, 12\): pass it \[\.\.\., 10\]"):
        layer(torch.randn(5, 12))
    assert layer(torch.randn(2, 3, 10)).shape == (2, 3, 10)

    model = nn.Sequential(LoopBlock())
    with pytest.raises(RuntimeError):               # the user's own block refuses the width
        model(torch.randn(5, 12))
    assert [r.action for r in canonicalize(model)] == ["replaced"]
    with pytest.raises(OpInputError, match=r"the canonicalized MoE block .*LoopBlock takes tokens of width "
                                           r"dim \(10\), got an input of shape \(5, 12\)"):
        model(torch.randn(5, 12))


T, E, D, F, K = 6, 4, 10, 5, 2


def op_inputs():
    gen = torch.Generator().manual_seed(0)
    x_TD = torch.randn(T, D, generator=gen)
    ids_TK = torch.argsort(torch.rand(T, E, generator=gen), dim=1)[:, :K]
    weights_TK = torch.rand(T, K, generator=gen)
    w_up_EHD, w_down_EDF = torch.randn(E, 2 * F, D, generator=gen), torch.randn(E, D, F, generator=gen)
    return x_TD, ids_TK, weights_TK, w_up_EHD, w_down_EDF


BAD_CALLS = {
    # silent before: as many rows as ids, a counts_E longer than E, masked experts picked, rows that are not there
    "moe_experts fewer ids than tokens": (lambda x, i, w, u, d: ops.moe_experts(x, i[:3], w[:3], u, d),
                                          r"x_TD has shape \(6, 10\) but ids_TK has 3 tokens"),
    "permute ids past E": (lambda x, i, w, u, d: ops.permute(x, i + E, E),
                           r"ids_TK\[0, 0\] is \d, outside \[0, num_experts \(4\)\)"),
    "route top_k past the kept groups": (lambda x, i, w, u, d: ops.route(torch.randn(3, 8), 5, "softmax", True, None,
                                                                         4, 2),
                                         r"top_k \(5\) exceeds the 2 x 2 experts left by group-limited routing"),
    "grouped_mlp counts past its rows": (lambda x, i, w, u, d: ops.grouped_mlp(x, torch.tensor([5, 5, 5, 5]), u, d),
                                         r"counts_E \[5, 5, 5, 5\] must be >= 0 and sum to at most the 6 rows"),
    # an IndexError or a matmul's sizes before
    "moe_experts ids past E": (lambda x, i, w, u, d: ops.moe_experts(x, i + E, w, u, d),
                               r"ids_TK\[0, 0\] is \d, outside \[0, num_experts \(4\)\)"),
    "moe_experts tokens of another width": (lambda x, i, w, u, d: ops.moe_experts(x[:, :7], i, w, u, d),
                                            r"x_TD has shape \(6, 7\), expected \[\*, 10\] \(D of w_up_EHD\)"),
    "moe_experts weights of another top-k": (lambda x, i, w, u, d: ops.moe_experts(x, i, w[:, :1], u, d),
                                             r"weights_TK has shape \(6, 1\) but ids_TK \(6, 2\)"),
    "moe_experts a gated stack with gelu": (lambda x, i, w, u, d: ops.moe_experts(x, i, w, u, d, "gelu"),
                                            r"w_up_EHD has 10 rows per expert but activation 'gelu'"),
    "moe_experts bf16 tokens, fp32 experts": (lambda x, i, w, u, d: ops.moe_experts(x.bfloat16(), i, w, u, d),
                                              r"must share a dtype; cast the expert weights to torch.bfloat16"),
    "route logits [B, S, E]": (lambda x, i, w, u, d: ops.route(torch.randn(2, 3, E), 2),
                               r"logits_TE must be \[T, E\], got shape \(2, 3, 4\)"),
    "route bias of another length": (lambda x, i, w, u, d: ops.route(torch.randn(3, 8), 2, "sigmoid", True,
                                                                     torch.zeros(5)),
                                     r"bias_E has shape \(5,\), expected \(8,\)"),
    "unpermute order of another length": (lambda x, i, w, u, d: ops.unpermute(torch.randn(T * K, D),
                                                                              torch.arange(T * K - 1), w),
                                          r"unpermute: y_ND \(12, 10\), order_N \(11,\) and weights_TK \(6, 2\)"),
}


@pytest.mark.parametrize("call,message", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_canonical_ops_refuse_inputs_they_cannot_take_by_name(call, message):
    with pytest.raises(OpInputError, match=message):
        call(*op_inputs())


def test_the_checks_leave_valid_calls_as_they_were():
    """int32 ids, an empty batch and group-limited routing that fits still run, and equal the reference."""
    x_TD, ids_TK, weights_TK, w_up_EHD, w_down_EDF = op_inputs()
    want = mc.ops.moe_experts_reference(x_TD, ids_TK, weights_TK, w_up_EHD, w_down_EDF)
    torch.testing.assert_close(ops.moe_experts(x_TD, ids_TK.int(), weights_TK, w_up_EHD, w_down_EDF), want)
    assert ops.moe_experts(x_TD[:0], ids_TK[:0], weights_TK[:0], w_up_EHD, w_down_EDF).shape == (0, D)
    logits_TE = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    _, ids, _ = ops.route(logits_TE, 4, "softmax", True, None, 4, 2)
    kept_groups = logits_TE.softmax(-1).view(3, 4, 2).sum(-1).topk(2, -1)[1]   # groups of 2: both scores count
    assert all(set((ids[t] // 2).tolist()) <= set(kept_groups[t].tolist()) for t in range(3))


def test_inspect_lists_the_routing_capacity_and_shared_experts_of_an_nn_moe():
    """A recognised block's line names its router, capacity and shared expert; an ``nn.MoE``'s
    named only its sizes, so a sigmoid, capacity-dropping layer read as a softmax, dropless one."""
    layer = mc.nn.MoE(dim=16, ffn_dim=8, num_experts=4, top_k=2, score_func="sigmoid", renormalize=False,
                      capacity_factor=1.25, num_shared_experts=1)
    (report,) = canonicalize(nn.Sequential(layer))
    assert report.action == "canonical"
    assert {k: report.details.get(k) for k in ("router", "capacity_factor", "shared")} == \
        {"router": "sigmoid-top2", "capacity_factor": 1.25, "shared": "shared"}
    (plain,) = canonicalize(nn.Sequential(mc.nn.MoE(dim=16, ffn_dim=8, num_experts=4, top_k=2)))
    assert plain.details["router"] == "softmax-top2-renorm" and "capacity_factor" not in plain.details
    assert "router=softmax-top2-renorm" in plain.describe()


@pytest.mark.parametrize("field, value, message", [
    ("aux_loss_coef", None, r"MoE aux_loss_coef \(None\) must be a finite number >= 0"),       # a TypeError of '>='
    ("capacity_factor", "1.25", r"MoE capacity_factor \('1.25'\) must be a finite number > 0"),  # a TypeError of '>'
    ("capacity_factor", float("inf"), r"MoE capacity_factor \(inf\) must be a finite number > 0"),  # OverflowError at forward
    ("capacity_factor", True, r"MoE capacity_factor \(True\) must be a finite number > 0"),     # taken as 1.0
    ("renormalize", "no", r"MoE renormalize \('no'\) must be True or False"),                 # taken as True
])
def test_moe_layer_arguments_of_the_wrong_kind_are_refused_by_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        mc.nn.MoE(dim=8, ffn_dim=8, num_experts=4, top_k=2, **{field: value})
