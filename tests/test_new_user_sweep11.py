"""What the eleventh new-user sweep (kernels, custom ops and the compile API) found, each refused
or fixed now:

- ``mc.nn.MoE(dim=10)`` given tokens of another width ([5, 12]) returned a [5, 12] result: its
  ``reshape(-1, dim)`` regrouped the 60 elements into 6 tokens of 10 and routed those. A block
  that ``mc.compile`` had canonicalized did the same where the user's own block had raised (its
  router Linear refused the width). Both refuse such an input now, naming the layer and the dim.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moesys_compile as mc
from moesys_compile.errors import OpInputError
from moesys_compile.frontend.recognizers import canonicalize


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

