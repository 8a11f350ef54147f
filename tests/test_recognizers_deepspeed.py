"""``deepspeed.moe.layer.MoE`` compiled as it is: the canonical form returns DeepSpeed's own
(output, l_aux, exp_counts), equal to eager (forward and gradients) for top-1/2/3 gating, and the
configurations whose result depends on randomness or DeepSpeed's capacity order are left with why;
an expert's dropout on its activation is applied as the canonical experts' dropout."""

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


def dropout_expert(after_the_down_projection: bool = False) -> nn.Module:
    layers = [nn.Linear(D, FF, bias=False), nn.GELU(), nn.Dropout(0.25), nn.Linear(FF, D, bias=False)]
    if after_the_down_projection:
        layers[2:] = layers[:1:-1]
    return nn.Sequential(*layers)


def test_dropout_between_the_experts_projections_trains_and_follows_eval():
    """A user's expert with dropout on its activation: the canonical experts apply it in training
    (another random state, another mask), and program.eval() turns it off."""
    net, eager = make(dropout_expert, 2)
    program = mc.compile(net, mc.Plan(), example_inputs=(ids(),))
    (report,) = program.context.blocks
    assert report.action == "replaced" and "p=0.25 between the projections" in report.details["expert_dropout"]
    outputs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outputs.append(program(ids(seed=1))[0])
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])
    outputs[0].square().mean().backward()
    assert all(p.grad is not None for p in net.moe.parameters())
    program.eval()
    eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(program(ids(seed=1))[0], eager(ids(seed=1))[0], rtol=1e-5, atol=1e-6)


def test_dropout_after_the_experts_down_projection_is_left_with_why():
    from moesys_compile.frontend.recognizers import canonicalize
    net, _ = make(lambda: dropout_expert(after_the_down_projection=True), 2)
    (report,) = [r for r in canonicalize(net) if r.path == "moe"]
    assert report.action == "left"
    assert "do not act as one dropout of the activation between the projections" in report.reason
