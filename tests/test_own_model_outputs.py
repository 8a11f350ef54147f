"""Users' own models (not Hugging Face, not built in) whose forward returns a dict, a namedtuple
or a dataclass: ring calls, micro-batches, ``generate``, optional inputs and static shapes."""

import dataclasses
import warnings
from collections import namedtuple
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moesys_compile as mc
from moesys_compile.errors import MoesysError
from moesys_compile.generate import first_tensor
from moesys_compile.programs.ring import RingBudgetError

V, D, F_, E = 96, 32, 48, 4

Out = namedtuple("Out", "logits hidden embedded")


@dataclasses.dataclass
class DOut:
    logits: torch.Tensor
    hidden: torch.Tensor
    embedded: Optional[torch.Tensor] = None
    aux: Optional[torch.Tensor] = None


class SwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w3 = nn.Linear(D, F_, bias=False), nn.Linear(D, F_, bias=False)
        self.w2 = nn.Linear(F_, D, bias=False)

    def forward(self, x_TD):
        return self.w2(F.silu(self.w1(x_TD)) * self.w3(x_TD))


class UserMoE(nn.Module):
    """Mixtral-style: top-2 of 4 SwiGLU experts, renormalised, as a dense masked loop."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(SwiGLU() for _ in range(E))
        self.k = 2

    def forward(self, x):
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        weights_TK, ids_TK = self.gate(x_TD).softmax(-1).topk(self.k, dim=-1)
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        y_TD = torch.zeros_like(x_TD)
        for e, expert in enumerate(self.experts):
            mask_T1 = ((ids_TK == e).to(x_TD.dtype) * weights_TK).sum(-1, keepdim=True)
            y_TD = y_TD + mask_T1 * expert(x_TD)
        return y_TD.reshape(shape)


class TinyLM(nn.Module):
    """Embedding, an MoE block and a head; ``returns`` picks the output structure: "dict", "list",
    "namedtuple", "dataclass" or "dataclass_mean" (a scalar field, not batch-first)."""

    def __init__(self, returns="dict"):
        super().__init__()
        torch.manual_seed(0)
        self.returns = returns
        self.embed = nn.Embedding(V, D)
        self.moe = UserMoE()
        self.head = nn.Linear(D, V)

    def forward(self, ids, *, scale=None):
        x = self.embed(ids)
        if scale is not None:
            x = x * scale.unsqueeze(-1)
        h = x + self.moe(x)
        logits = self.head(h)
        return {"dict": lambda: {"logits": logits, "hidden": h, "embedded": x},
                "list": lambda: [logits, h],
                "namedtuple": lambda: Out(logits, h, x),
                "dataclass": lambda: DOut(logits, h, x),
                "dataclass_mean": lambda: DOut(logits, h, aux=h.mean())}[self.returns]()


def ids_of(batch, seq=7, seed=0):
    return torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


def tight_ring(returns, example):
    """A ring program whose budget is the least that holds ``example``: a larger call exceeds the
    workspace."""
    _, ctx = mc.lower(TinyLM(returns).eval(), mc.Plan(mode="infer", device_budget=2 ** 40), example_inputs=(example,))
    least = ctx.extras["ring"].min_budget
    return mc.compile(TinyLM(returns).eval(), mc.Plan(mode="infer", device_budget=least), example_inputs=(example,))


def logits_of(output):
    return output["logits"] if isinstance(output, dict) else output.logits


# --- the output's structure through the ring -----------------------------------------------------------


@pytest.mark.parametrize("returns", ["namedtuple", "dataclass", "dict"])
def test_structured_output_of_a_call_past_the_workspace_runs_in_micro_batches(returns):
    """Every field is [B, S, ...]: the call runs in micro-batches, each field joined over the
    batch, the structure as the model's (``embedded`` comes from an earlier section than the
    structure, ``hidden`` from its own)."""
    program = tight_ring(returns, ids_of(3))
    big = ids_of(5, seed=1)
    with torch.inference_mode():
        want = TinyLM(returns).eval()(big)
    got = program(big)
    stats = program.stats
    assert stats["micro_batches"] > 1 and stats["peak_device_bytes"] <= stats["budget_bytes"]
    assert type(got) is type(want)
    fields = (lambda o: o) if returns == "dict" else (lambda o: o._asdict()) if returns == "namedtuple" else \
        dataclasses.asdict
    got_fields, want_fields = fields(got), fields(want)
    assert got_fields.keys() == want_fields.keys()
    for name, value in want_fields.items():
        torch.testing.assert_close(got_fields[name], value, atol=1e-5, rtol=1e-5, msg=name)
    program.close()


def test_a_field_without_the_batch_first_is_refused_by_its_name():
    """A dataclass with a scalar field (a mean over the batch) cannot be split: the refusal names
    that field, not the dataclass."""
    program = tight_ring("dataclass_mean", ids_of(3))
    with pytest.raises(RingBudgetError,
                       match=r"the output dout\.aux \(\(\)\) does not have the batch as its first dimension"):
        program(ids_of(5, seed=1))
    program.close()


@pytest.mark.parametrize("returns,kind", [("dict", dict), ("list", list)])
def test_ring_output_containers_are_plain(returns, kind):
    """A ring program returns the dict or list the model returns, which the caller may change."""
    ids = ids_of(2)
    program = mc.compile(TinyLM(returns).eval(), mc.Plan(mode="infer", device_budget=2 ** 30), example_inputs=(ids,))
    out = program(ids)
    assert type(out) is kind
    if kind is dict:
        out["probs"] = out["logits"].softmax(-1)
    else:
        out.append(out[0].softmax(-1))
    program.close()


# --- generate ------------------------------------------------------------------------------------------


def eager_greedy(model, ids, steps):
    for _ in range(steps):
        with torch.inference_mode():
            token = logits_of(model(ids))[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], dim=1)
    return ids


@pytest.mark.parametrize("returns", ["dict", "namedtuple", "dataclass"])
def test_generate_on_an_own_model_takes_the_logits_and_says_why_it_recomputes(returns):
    """The logits are the dict's "logits" (or the first tensor); a model that is no Hugging Face
    model has no KV cache to capture, which a short note says (no internal error)."""
    ids = ids_of(2, 5)
    program = mc.compile(TinyLM(returns).eval(), mc.Plan(mode="infer", device_budget=2 ** 30), example_inputs=(ids,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = program.generate(ids, 4)
    assert torch.equal(out, eager_greedy(TinyLM(returns).eval(), ids, 4))
    assert program.stats["decode"] == "recompute"
    said = [str(w.message) for w in caught if "generate" in str(w.message)]
    assert said == ["generate: no KV cache for TinyLM: it is not a Hugging Face model "
                    "(transformers.PreTrainedModel); each step recomputes the whole sequence"], said
    program.close()


def test_first_tensor_reads_logits_by_name_else_the_first_tensor():
    logits, hidden = torch.zeros(1, 2, 3), torch.ones(1, 2, 4)
    assert first_tensor({"hidden": hidden, "logits": logits}) is logits
    assert first_tensor({"scores": logits, "hidden": hidden}) is logits
    assert first_tensor(DOut(logits, hidden)) is logits
    assert first_tensor((None, [logits, hidden])) is logits
    with pytest.raises(MoesysError, match=r"the model's output \(dict\) holds no tensor to take as the logits"):
        first_tensor({"loss": None})


# --- inputs ------------------------------------------------------------------------------------------------


def test_none_for_an_input_compiled_as_a_tensor_is_refused_by_name():
    """fx capture, as export capture: an optional argument compiled with a tensor and called with
    None is named, rather than failing inside the graph's code."""
    ids = ids_of(3)
    program = mc.compile(TinyLM("dict"), mc.Plan(mode="train"), example_inputs=(ids,),
                         example_kwargs={"scale": torch.rand(3, 7)})
    assert program.context.capture == "fx"
    with pytest.raises(TypeError, match=r"TinyLM.forward: scale is None, but it was compiled with a tensor there"):
        program(ids, scale=None)


# --- static shapes -----------------------------------------------------------------------------------------


class WithGRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.rnn = nn.GRU(D, D, batch_first=True)
        self.head = nn.Linear(D, V)

    def forward(self, ids):
        x = self.embed(ids)
        return self.head(x + self.rnn(x)[0])


def test_static_shapes_name_the_module_that_fixed_the_sizes():
    _, ctx = mc.lower(WithGRU().eval(), mc.Plan(mode="infer"), example_inputs=(ids_of(3),))
    assert not ctx.annotation.symbolic
    assert "to the example's sizes while propagating shapes, at %rnn" in ctx.annotation.static_reason
    assert "(module rnn)" in ctx.annotation.static_reason
