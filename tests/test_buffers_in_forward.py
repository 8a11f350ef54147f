"""Buffers a model updates in its forward (an EMA under ``torch.no_grad()``, BatchNorm's running
statistics) and grad-mode regions: compiling never writes the model, and the program updates its
buffers as eager does, without autograd history, step after step."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import moesys_compile as mc
from moesys_compile.frontend.modes import enter_grad_mode, exit_grad_mode
from moesys_compile.infer import model_bytes

D, V = 16, 64     # model dim, vocabulary


def _ffn(moe: bool) -> nn.Module:
    return mc.nn.MoE(dim=D, ffn_dim=24, num_experts=4, top_k=2) if moe else nn.Linear(D, D)


class EmaNet(nn.Module):
    """A running norm of the hidden states, updated in place under no_grad in training mode."""

    def __init__(self, moe: bool = False):
        super().__init__()
        self.emb, self.ffn, self.head = nn.Embedding(V, D), _ffn(moe), nn.Linear(D, V)
        self.register_buffer("running_norm", torch.ones(()))

    def forward(self, ids):
        x = self.emb(ids)
        x = x + self.ffn(x)
        if self.training:
            with torch.no_grad():
                self.running_norm.mul_(0.9).add_(0.1 * x.norm(dim=-1).mean())
        return self.head(x / self.running_norm)


class BnNet(nn.Module):
    """BatchNorm over the hidden dim (a leaf: its running statistics update in its own forward)."""

    def __init__(self, momentum: float | None = 0.1, moe: bool = False):
        super().__init__()
        self.emb, self.ffn, self.head = nn.Embedding(V, D), _ffn(moe), nn.Linear(D, V)
        self.bn = nn.BatchNorm1d(D, momentum=momentum)

    def forward(self, ids):
        x = self.emb(ids)
        x = x + self.ffn(x)
        return self.head(self.bn(x.transpose(1, 2)).transpose(1, 2))


class BranchyNet(EmaNet):
    """EmaNet with BatchNorm and a branch on a size, which fx cannot trace: torch.export captures it."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(D)

    def forward(self, ids):
        if ids.shape[1] > 1:
            ids = ids.flip(1)
        return super().forward(ids) + self.bn(self.emb(ids).transpose(1, 2)).transpose(1, 2).sum(-1, keepdim=True)


MODELS = {
    "ema": lambda: EmaNet(),
    "ema-moe": lambda: EmaNet(moe=True),
    "bn": lambda: BnNet(),
    "bn-cumulative": lambda: BnNet(momentum=None),
    "bn-moe": lambda: BnNet(moe=True),
    "export": lambda: BranchyNet(),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]()


def ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, V, (batch, seq))


def state(model: nn.Module) -> dict:
    """Every parameter and buffer: its values, version, requires_grad and grad_fn."""
    return {name: (t.detach().clone(), t._version, t.requires_grad, t.grad_fn)
            for name, t in itertools.chain(model.named_parameters(), model.named_buffers())}


def assert_same_state(model: nn.Module, before: dict) -> None:
    after = state(model)
    assert after.keys() == before.keys()
    for name, (value, version, requires_grad, grad_fn) in before.items():
        now = after[name]
        assert torch.equal(now[0], value), f"{name} changed: {value} -> {now[0]}"
        assert (now[1], now[2], now[3]) == (version, requires_grad, grad_fn), \
            f"{name}: (version, requires_grad, grad_fn) {(version, requires_grad, grad_fn)} -> {now[1:]}"


@pytest.mark.parametrize("how", ["trace", "lower", "compile"])
@pytest.mark.parametrize("name", ["ema", "bn", "bn-cumulative", "export"])
def test_compiling_does_not_change_the_model(name, how):
    model = build(name)
    before = state(model)
    example = (ids(2, 8),)
    if how == "trace":
        mc.trace(model, example)
    elif how == "lower":
        mc.lower(model, mc.Plan(mode="train"), example)
    else:
        mc.compile(model, mc.Plan(mode="train"), example_inputs=example)
    assert_same_state(model, before)
    assert model.training


@pytest.mark.parametrize("name", sorted(MODELS))
def test_training_steps_equal_eager(name):
    """Outputs, gradients and buffers equal eager's over three SGD steps at changing sizes; the
    buffers carry no autograd history (a second backward would fail through them)."""
    model = build(name)
    eager = copy.deepcopy(model)
    program = mc.compile(model, mc.Plan(mode="train"), example_inputs=(ids(2, 8),))
    assert program.context.capture == ("export" if name == "export" else "fx")
    optimizer = torch.optim.SGD(program.parameters(), lr=0.1)
    eager_optimizer = torch.optim.SGD(eager.parameters(), lr=0.1)
    for step, (batch, seq) in enumerate([(3, 12), (2, 5), (4, 9)]):
        x = ids(batch, seq)
        out, expected = program(x), eager(x)
        torch.testing.assert_close(out, expected, msg=f"step {step}")
        out.logsumexp(-1).mean().backward()
        expected.logsumexp(-1).mean().backward()
        eager_params = dict(eager.named_parameters())
        for pname, param in model.named_parameters():
            torch.testing.assert_close(param.grad, eager_params[pname].grad, msg=f"step {step}: grad of {pname}")
        eager_buffers = dict(eager.named_buffers())
        for bname, buffer in model.named_buffers():
            torch.testing.assert_close(buffer, eager_buffers[bname], msg=f"step {step}: buffer {bname}")
            assert buffer.grad_fn is None and not buffer.requires_grad, bname
        optimizer.step(), eager_optimizer.step()
        optimizer.zero_grad(), eager_optimizer.zero_grad()


def test_no_grad_region_is_kept_in_the_graph():
    """Structure: the EMA's in-place updates lie between one enter_grad_mode(False) and its exit;
    the eval-mode capture has neither the update nor the region."""
    model = build("ema")
    gm = mc.trace(model, (ids(2, 8),))
    nodes = list(gm.graph.nodes)
    enters = [n for n in nodes if n.target is enter_grad_mode]
    exits = [n for n in nodes if n.target is exit_grad_mode]
    assert len(enters) == len(exits) == 1 and enters[0].args == (False,) and exits[0].args == (enters[0],)
    inplace = [i for i, n in enumerate(nodes) if n.op == "call_method" and n.target in ("mul_", "add_")]
    assert len(inplace) == 2 and nodes.index(enters[0]) < min(inplace) and max(inplace) < nodes.index(exits[0])
    eval_gm = mc.trace(model.eval(), (ids(2, 8),))
    assert not [n for n in eval_gm.graph.nodes if n.target in (enter_grad_mode, exit_grad_mode, "mul_", "add_")]


class Counting(nn.Module):
    """Reads a value into Python (so shape propagation runs it on real zeros, as a leaf) and counts
    its calls and the positive rows it saw in buffers."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("positive", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        positive = int((x.sum(-1) > 0).sum())
        self.calls.add_(1)
        self.positive.add_(positive)
        return self.lin(x) * (1 + positive / x.shape[0])


class CountingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.counting, self.head = nn.Embedding(V, D), Counting(), nn.Linear(D, V)

    def forward(self, ids):
        return self.head(self.counting(self.emb(ids)))


def test_a_leaf_run_on_real_values_while_propagating_writes_copies_of_its_buffers():
    model = CountingNet()
    eager = copy.deepcopy(model)
    before = state(model)
    program = mc.compile(model, mc.Plan(mode="train", leaf_modules=["counting"]), example_inputs=(ids(2, 8),))
    assert_same_state(model, before)
    for batch, seq in [(3, 12), (2, 5)]:
        x = ids(batch, seq)
        torch.testing.assert_close(program(x), eager(x))
    assert model.counting.calls.item() == eager.counting.calls.item() == 2
    assert model.counting.positive.item() == eager.counting.positive.item()


class GradForms(nn.Module):
    """Gradients turned off (and on again) in the ways a forward does: ``b`` is trained only
    through ``tracked``; ``scale`` and ``shift`` pass no gradient."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)

    @torch.no_grad()
    def scale_of(self, h):
        return h.norm(dim=-1, keepdim=True)

    def forward(self, x):
        h = self.a(x)
        scale = self.scale_of(h)
        with torch.set_grad_enabled(False):
            shift = self.b(h).mean()
            with torch.enable_grad():
                tracked = self.b(h).mean()
        return h / scale + shift + tracked


@pytest.mark.parametrize("compiled_under_no_grad", [False, True])
def test_gradients_follow_the_grad_mode_regions(compiled_under_no_grad):
    """Gradients equal eager's (without the regions ``b``'s would double, and ``a``'s change),
    also for a program compiled under ``torch.no_grad()`` and called with gradients on."""
    torch.manual_seed(0)
    model = GradForms()
    eager = copy.deepcopy(model)
    x = torch.randn(3, 5, D)
    with torch.set_grad_enabled(not compiled_under_no_grad):
        program = mc.compile(model, mc.Plan(mode="train"), example_inputs=(x,))
    assert torch.is_grad_enabled()
    out, expected = program(x), eager(x)
    torch.testing.assert_close(out, expected)
    assert torch.is_grad_enabled()
    (out ** 2).sum().backward()
    (expected ** 2).sum().backward()
    for (pname, param), eager_param in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(param.grad, eager_param.grad, msg=pname)
    with torch.no_grad():
        assert not program(x).requires_grad
        assert not torch.is_grad_enabled()


class SeenTokens(nn.Module):
    """Marks the token ids it has seen, under no_grad, before embedding them."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(V, D), nn.Linear(D, V)
        self.register_buffer("seen", torch.zeros(V, dtype=torch.bool))

    def forward(self, ids):
        with torch.no_grad():
            self.seen.index_fill_(0, ids.flatten(), True)
        return self.head(self.emb(ids))


def test_a_call_that_fails_inside_a_no_grad_region_leaves_grad_mode_on():
    model = SeenTokens()
    program = mc.compile(model, mc.Plan(mode="train"), example_inputs=(ids(2, 8),))
    assert not model.seen.any()
    x = ids(2, 8)
    program(x)
    assert model.seen.nonzero().flatten().tolist() == sorted(set(x.flatten().tolist()))
    with pytest.raises((IndexError, RuntimeError)):
        program(torch.full((2, 8), V + 3))
    assert torch.is_grad_enabled()


class RingNet(nn.Module):
    """BatchNorm, an EMA in training mode only, and a no_grad region in both modes (wider than
    the others, so that half of it leaves room for the ring's activations)."""

    def __init__(self, dim: int = 64, vocab: int = 256):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, vocab)
        self.ffn = mc.nn.MoE(dim=dim, ffn_dim=96, num_experts=4, top_k=2)
        self.mid, self.bn = nn.Linear(dim, dim), nn.BatchNorm1d(dim)
        self.register_buffer("running_norm", torch.ones(()))

    def forward(self, ids):
        x = self.emb(ids)
        x = x + self.ffn(x)
        with torch.no_grad():
            scale = x.norm(dim=-1, keepdim=True) + 1
        x = self.bn(self.mid(x / scale).transpose(1, 2)).transpose(1, 2)
        if self.training:
            with torch.no_grad():
                self.running_norm.mul_(0.9).add_(0.1 * x.norm(dim=-1).mean())
        return self.head(x / self.running_norm)


def test_ring_inference_leaves_buffers_untouched(tmp_path):
    """A ring program of a model in eval mode computes what eager does and writes no buffer, at
    compile or at a call."""
    torch.manual_seed(0)
    model = RingNet().eval()
    with torch.no_grad():                 # running statistics of a trained model
        model.bn.running_mean.uniform_(-0.5, 0.5), model.bn.running_var.uniform_(0.5, 2.0)
        model.running_norm.fill_(1.7)
    before = state(model)
    x = ids(2, 8)
    expected = model(x)
    plan = mc.Plan(mode="infer", device="cpu", device_budget=model_bytes(model) // 2,
                   offload_dir=str(tmp_path / "offload"))
    program = mc.compile(model, plan, example_inputs=(x,))
    assert_same_state(model, before)
    assert len(program.forward_runtime().sections) > 1
    for batch, seq in [(2, 8), (1, 5)]:
        x = ids(batch, seq)
        torch.testing.assert_close(program(x), model(x))
    assert_same_state(model, before)
