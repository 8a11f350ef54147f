"""Code that depends on ``self.training``: a program keeps the mode it was captured in (beyond the
dropout it switches), and says so on the first switch to the other mode where the model's code
differs there; dropout inside a data-dependent expert loop compiles."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moesys_compile as mc
from moesys_compile.errors import UntraceableModelError

D, FF, E = 12, 20, 4


class LoopBlock(nn.Module):
    """An expert loop over ``torch.where`` (left as traced code: the experts have a dropout or
    the router jitters its input in training mode)."""

    def __init__(self, jitter: float = 0.0, expert_dropout: str = "", top_k: int = 2):
        super().__init__()
        self.router = nn.Linear(D, E, bias=False)
        self.jitter, self.expert_dropout, self.top_k = jitter, expert_dropout, top_k
        dropout = [nn.Dropout(0.1)] if expert_dropout == "module" else []
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(D, FF), nn.ReLU(), *dropout, nn.Linear(FF, D))
                                     for _ in range(E))

    def forward(self, x):
        shape, x = x.shape, x.reshape(-1, D)
        routed = x * (1 + self.jitter * torch.randn_like(x)) if self.training and self.jitter else x
        weights, ids = self.router(routed).softmax(-1).topk(self.top_k, -1)
        out = torch.zeros_like(x)
        for e in range(E):
            tok, slot = torch.where(ids == e)
            h = self.experts[e](x[tok])
            if self.expert_dropout == "functional":
                h = F.dropout(h, 0.1, self.training)
            out = out.index_add(0, tok, h * weights[tok, slot, None])
        return out.reshape(shape)


class Net(nn.Module):
    def __init__(self, **block):
        super().__init__()
        self.inp, self.block, self.out = nn.Linear(6, D), LoopBlock(**block), nn.Linear(D, 6)
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.drop(h + self.block(h)))


def switch_warnings(program: nn.Module, training: bool) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program.train(training)
    return [str(w.message) for w in caught if "computes differently" in str(w.message)]


def test_program_eval_warns_once_where_the_model_jitters_its_router_in_training():
    torch.manual_seed(0)
    model, x = Net(jitter=0.1), torch.randn(2, 5, 6)
    program = mc.compile(model, mc.Plan(mode="train"), example_inputs=(x,))
    [message] = switch_warnings(program, False)
    assert "Net computes differently in eval mode" in message and "block" in message
    assert "model.eval() before mc.compile" in message
    assert switch_warnings(program, True) == switch_warnings(program, False) == []
    # the capture in eval mode changed no module's flag: the program's own are as set
    assert not any(m.training for m in program.modules())


def test_dropout_alone_does_not_warn_and_follows_the_mode():
    torch.manual_seed(0)
    model, x = Net(expert_dropout="module"), torch.randn(2, 5, 6)
    program = mc.compile(model, mc.Plan(mode="train"), example_inputs=(x,))
    assert switch_warnings(program, False) == []
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(program(x), model(x), rtol=0, atol=1e-6)


def test_a_program_compiled_in_eval_mode_warns_when_put_in_training_mode():
    torch.manual_seed(0)
    model, x = Net(jitter=0.1).eval(), torch.randn(2, 5, 6)
    program = mc.compile(model, mc.Plan(mode="train"), example_inputs=(x,))
    [block] = [b for b in program.context.blocks if b.path == "block"]   # its experts have a canonical form,
    assert block.action == "left" and "computes differently in training mode" in block.reason   # not its jitter
    program.eval()
    [message] = switch_warnings(program, True)
    assert "computes differently in training mode than in the eval mode" in message


@pytest.mark.parametrize("kind", ["module", "functional"])
def test_dropout_in_a_data_dependent_expert_loop_compiles_with_symbolic_shapes(kind):
    torch.manual_seed(0)
    model, x = Net(expert_dropout=kind), torch.randn(2, 5, 6)
    program = mc.compile(model, mc.Plan(mode="train"), example_inputs=(x,))
    assert program.context.annotation.symbolic
    torch.manual_seed(1)
    got = program(x)
    torch.manual_seed(1)
    torch.testing.assert_close(got, model(x), rtol=0, atol=1e-6)
    model.eval(), program.eval()
    with torch.no_grad():
        bigger = torch.randn(3, 9, 6)
        torch.testing.assert_close(program(bigger), model(bigger), rtol=0, atol=1e-6)


class EvalTopOneBlock(LoopBlock):
    """Recognisable in training mode (softmax, top-2, renormalised, ReLU experts), top-1 in eval."""

    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(D, FF, bias=False), nn.ReLU(),
                                                   nn.Linear(FF, D, bias=False)) for _ in range(E))

    def forward(self, x):
        shape, x = x.shape, x.reshape(-1, D)
        weights, ids = self.router(x).softmax(-1).topk(2 if self.training else 1, -1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(E):
            tok, slot = torch.where(ids == e)
            out = out.index_add(0, tok, self.experts[e](x[tok]) * weights[tok, slot, None])
        return out.reshape(shape)


def test_a_block_that_routes_otherwise_in_eval_mode_is_left_as_its_own_code():
    """Probed in training mode alone it would be replaced, in the user's model too, by a top-2
    form: the model's own eval mode would change."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(D, D), EvalTopOneBlock()), torch.randn(6, D)
    want_eval = model.eval()(x)
    program = mc.compile(model.train(), mc.Plan(mode="train"), example_inputs=(x,))
    [block] = [b for b in program.context.blocks if b.path == "1"]
    assert block.action == "left" and "computes differently in eval mode" in block.reason
    assert type(model[1]) is EvalTopOneBlock
    torch.testing.assert_close(program(x), model(x), rtol=0, atol=1e-6)
    assert len(switch_warnings(program, False)) == 1
    torch.testing.assert_close(model.eval()(x), want_eval, rtol=0, atol=0)   # the user's model unchanged


class SplittingBlock(LoopBlock):
    def forward(self, x):
        weights, ids = self.router(x).softmax(-1).topk(2, -1)
        out = torch.zeros_like(x)
        for e in range(E):
            tok, slot = torch.where(ids == e)
            h = torch.cat(self.experts[e](x[tok]).split(2), 0)   # split guards on the routed count
            out = out.index_add(0, tok, h * weights[tok, slot, None])
        return out


def test_shapes_that_cannot_be_propagated_name_the_node_and_module():
    model = nn.Sequential(nn.Linear(D, D), SplittingBlock())
    with pytest.raises(UntraceableModelError, match=r"on symbolic sizes at %split.*\(module 1\).*leaf_modules"):
        mc.compile(model, mc.Plan(mode="train"), example_inputs=(torch.randn(6, D),))


transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("family, differs", [("phimoe", True), ("mixtral", False)])
def test_hf_models_captured_by_export(family, differs):
    """PhiMoE's router samples in training mode (sparsemixer); Mixtral differs only by attention
    dropout."""
    from moesys_compile.models.hf import build_hf

    model = build_hf(family, attention_dropout=0.1).train()
    ids = torch.randint(0, 100, (2, 8))
    program = mc.compile(model, mc.Plan(mode="train"), example_inputs=(ids,))
    assert program.context.capture == "export"
    messages = switch_warnings(program, False)
    assert len(messages) == int(differs)
    if differs:
        assert "model.layers.0.mlp" in messages[0]


class UnusedInTraining(nn.Module):
    """Computes a value in training mode that nothing uses (as a mamba mixer prepares the arguments
    of a kernel that is missing, then falls back to the same code as in eval mode)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        if self.training:
            unused = self.lin.weight.t() * 2  # noqa: F841
        return self.lin(x)


def test_values_computed_in_one_mode_and_never_used_do_not_warn():
    program = mc.compile(UnusedInTraining(), mc.Plan(mode="train"), example_inputs=(torch.randn(3, D),))
    assert switch_warnings(program, False) == []
