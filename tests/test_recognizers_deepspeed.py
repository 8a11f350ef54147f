"""``deepspeed.moe.layer.MoE`` compiled as it is: the canonical form returns DeepSpeed's own
(output, l_aux, exp_counts), equal to eager (forward and gradients) for top-1/2/3 gating, and the
configurations whose result depends on randomness or DeepSpeed's capacity order are left with why."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import moesys_compile as mc

deepspeed_layer = pytest.importorskip("deepspeed.moe.layer")

from moesys_compile.frontend.recognizers import CanonicalDeepSpeedMoE  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from blocks import SwiGLUExpert  # noqa: E402

D, FF, E, VOCAB = 16, 32, 4, 64


def GatedExpert() -> nn.Module:
    return SwiGLUExpert(D, FF)


def gelu_expert() -> nn.Module:
    return nn.Sequential(nn.Linear(D, FF, bias=False), nn.GELU(), nn.Linear(FF, D, bias=False))


class Net(nn.Module):
    def __init__(self, expert: nn.Module, k: int, **moe_kwargs):
        super().__init__()
        options = dict(drop_tokens=False, top2_2nd_expert_sampling=False)
        self.emb = nn.Embedding(VOCAB, D)
        self.moe = deepspeed_layer.MoE(D, expert, num_experts=E, k=k, **{**options, **moe_kwargs})
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        h, l_aux, exp_counts = self.moe(self.emb(ids))
        return self.head(h), l_aux, exp_counts


def make(expert_fn, k, **kwargs) -> tuple[Net, Net]:
    torch.manual_seed(0)
    net = Net(expert_fn(), k, **kwargs)
    torch.manual_seed(0)
    twin = Net(expert_fn(), k, **kwargs)
    twin.load_state_dict(net.state_dict())
    return net, twin


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("expert_fn, k, activation", [(gelu_expert, 1, "gelu"), (GatedExpert, 2, "swiglu"),
                                                      (GatedExpert, 3, "swiglu")])
def test_compiled_layer_equals_deepspeed(expert_fn, k, activation):
    net, eager = make(expert_fn, k)
    names = list(net.state_dict())
    program = mc.compile(net, mc.Plan(), example_inputs=(ids(),))
    (report,) = program.context.blocks
    assert (report.path, report.kind, report.action) == ("moe", "deepspeed.moe.layer.MoE", "replaced")
    assert report.details["activation"] == activation and report.details["top_k"] == k
    assert isinstance(net.moe, CanonicalDeepSpeedMoE) and list(net.state_dict()) == names
    example = ids(seed=1)
    logits, l_aux, counts = program(example)
    want_logits, want_aux, want_counts = eager(example)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l_aux, want_aux, rtol=1e-5, atol=1e-6)
    assert torch.equal(counts, want_counts)
    torch.testing.assert_close(program.aux_loss, want_aux, rtol=1e-5, atol=1e-6)
    (logits.square().mean() + l_aux).backward()
    (want_logits.square().mean() + want_aux).backward()
    for (name, p), (_, q) in zip(net.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kwargs, reason", [
    (dict(drop_tokens=True), "drop_tokens=True"),
    (dict(top2_2nd_expert_sampling=True), "Gumbel noise"),
    (dict(noisy_gate_policy="RSample"), "random noise"),
    (dict(use_residual=True), "use_residual=True"),
])
def test_random_or_capacity_dependent_layers_are_left(kwargs, reason):
    net, _ = make(GatedExpert, 2, **kwargs)
    reports = mc.frontend.canonicalize(net)
    assert [(r.path, r.action) for r in reports] == [("moe", "left")]
    assert reason in reports[0].reason
    assert not isinstance(net.moe, CanonicalDeepSpeedMoE)


def test_biased_experts_are_left():
    net, _ = make(lambda: nn.Sequential(nn.Linear(D, FF), nn.GELU(), nn.Linear(FF, D)), 1)
    (report,) = mc.frontend.canonicalize(net)
    assert report.action == "left" and "bias-free" in report.reason
