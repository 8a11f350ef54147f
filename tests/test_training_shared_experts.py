"""Expert parameters with more than one name.

One MoE layer of stacked experts called twice per forward trains at expert_parallel=2 like one
eager process. Two MoE layers sharing one ModuleList of experts (each with its own router) train at
expert_parallel=2 like one eager process, and save, load and gather under both layers' names: the
checkpoint stores the experts once and records the tie in meta.json's ``aliases``, so it reloads at
expert_parallel=1 and into an eager model with the tie intact. A dense layer tied to an expert's
weight trains at expert_parallel=1 and is refused at expert_parallel=2 before any collective, by
a PlanError naming both names.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moesys_compile as mc

sys.path.insert(0, str(Path(__file__).parent))
from blocks import SwiGLUExpert  # noqa: E402
from dist_utils import optimizer_steps, run_ranks  # noqa: E402

D, FF, E, K, VOCAB = 8, 12, 4, 2, 32
BATCH, SEQ, STEPS, LR = 4, 6, 2, 0.5
RTOL, ATOL = 1e-5, 1e-6


class ModuleListMoE(nn.Module):
    """A router and a ModuleList of experts (``experts``: another layer's, to share them)."""

    def __init__(self, experts: nn.ModuleList | None = None):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.top_k = K
        self.experts = experts if experts is not None else nn.ModuleList(SwiGLUExpert(D, FF) for _ in range(E))

    def forward(self, h):
        x_TD = h.reshape(-1, D)
        weights_TK, ids_TK = self.gate(x_TD).softmax(-1).topk(self.top_k, dim=-1)
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        y_TD = torch.zeros_like(x_TD)
        for e, expert in enumerate(self.experts):
            y_TD = y_TD + expert(x_TD) * (weights_TK * (ids_TK == e)).sum(-1, keepdim=True)
        return y_TD.reshape(h.shape)


class SharedExperts(nn.Module):
    """moe2 routes over moe1's experts with a router of its own."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.moe1 = ModuleListMoE()
        self.moe2 = ModuleListMoE(experts=self.moe1.experts)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.moe1(h)
        return self.head(h + self.moe2(F.gelu(h)))


class DenseTiedToExpert(nn.Module):
    """``proj`` shares its weight with expert 0's first projection; ``dense_first``: proj is
    registered before the MoE layer, so the parameter's first name is the dense one."""

    def __init__(self, dense_first: bool = False):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        if dense_first:
            self.proj = nn.Linear(D, FF, bias=False)
        self.moe = ModuleListMoE()
        if dense_first:
            self.moe.experts[0].w1.weight = self.proj.weight
        else:
            self.proj = nn.Linear(D, FF, bias=False)
            self.proj.weight = self.moe.experts[0].w1.weight
        self.down = nn.Linear(FF, D, bias=False)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.moe(h)
        return self.head(h + self.down(F.relu(self.proj(h))))


class LoopedMoE(nn.Module):
    """One MoE layer of stacked experts called twice per forward (a looped layer, as Inkling 2 Loop
    runs its middle layers several passes)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.moe = mc.nn.MoE(D, FF, E, K)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        h = self.emb(ids)
        for _ in range(2):
            h = h + self.moe(h)
        return self.head(h)


SHARED = [(f"moe2.experts.{e}.{w}.weight", f"moe1.experts.{e}.{w}.weight") for e in range(E) for w in ("w1", "w2", "w3")]


def make(cls=SharedExperts, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return cls(**kwargs)


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    return ids[:, :-1], ids[:, 1:]


def objective(logits, targets):
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def reference_state(cls=SharedExperts, **kwargs) -> dict[str, torch.Tensor]:
    """The eager model trained in one process on the global batch."""
    model = make(cls, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    ids, targets = global_batch()
    optimizer_steps(lambda: objective(model(ids), targets), opt, STEPS)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_close(got: dict, want: dict, rtol=RTOL, atol=ATOL) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def assert_tied(state: dict[str, torch.Tensor]) -> None:
    """moe2's experts are moe1's tensors in ``state``, as in the model."""
    for alias, name in SHARED:
        assert state[alias] is state[name], f"{alias} is not tied to {name}"


def shared_experts_rank(rank: int, world: int, root: str) -> dict:
    """Train at expert_parallel=2, gather the full state, save with the optimizer, wipe the
    program's weights and load them back."""
    ids, targets = global_batch()
    local = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    program = mc.compile(make(), mc.Plan(mode="train", world_size=world, expert_parallel=2), (ids[local],))
    opt = torch.optim.SGD(program.parameters(), lr=LR, momentum=0.9)
    optimizer_steps(lambda: objective(program(ids[local]), targets[local]), opt, STEPS)
    full = program.full_state_dict()
    assert_tied(full)
    program.save(root, optimizer=opt, step=STEPS)
    with torch.no_grad():
        for param in program.parameters():
            param.zero_()
    program.load(root, optimizer=opt)
    return {"full": full, "reloaded": program.full_state_dict(),
            "held": sorted(n for n, shard in program.expert_layout.items() if shard.held)}


def test_layers_sharing_experts_save_and_load_at_any_expert_parallel(tmp_path):
    root = str(tmp_path / "ckpt")
    first, second = run_ranks(shared_experts_rank, 2, root)
    assert first["held"] != second["held"]                  # each rank holds its own two experts
    reference = reference_state()
    for result in (first, second):
        assert_state_close(result["full"], reference)
        assert_state_close(result["reloaded"], result["full"], rtol=0, atol=0)

    # the experts are stored once, the tie recorded; eager and expert_parallel=1 get it back
    meta = json.loads((tmp_path / "ckpt" / "meta.json").read_text())
    assert dict(SHARED).items() <= meta["aliases"].items()
    assert not any(name.startswith("moe2.experts") for name in meta["experts"])
    eager = mc.load_into(make(seed=7), root)
    assert_state_close(eager.state_dict(), reference)
    program = mc.compile(make(seed=7), mc.Plan(mode="train"), (global_batch()[0],))
    program.load(root)
    assert_state_close(program.full_state_dict(), reference)


@pytest.mark.parametrize("dense_first", [False, True])
def test_dense_layer_tied_to_an_expert_trains_and_saves_at_expert_parallel_1(tmp_path, dense_first):
    model = make(DenseTiedToExpert, dense_first=dense_first)
    ids, targets = global_batch()
    program = mc.compile(model, mc.Plan(mode="train"), (ids,))
    opt = torch.optim.SGD(program.parameters(), lr=LR, momentum=0.9)
    optimizer_steps(lambda: objective(program(ids), targets), opt, STEPS)
    reference = reference_state(DenseTiedToExpert, dense_first=dense_first)
    assert_state_close(program.full_state_dict(), reference)
    program.save(str(tmp_path / "ckpt"))
    eager = mc.load_into(make(DenseTiedToExpert, seed=7, dense_first=dense_first), str(tmp_path / "ckpt"))
    assert_state_close(eager.state_dict(), reference)


@pytest.mark.parametrize("dense_first", [False, True])
def test_dense_layer_tied_to_an_expert_is_refused_at_expert_parallel_2(dense_first):
    """Refused while lowering, on every rank alike: no rank reaches the first broadcast."""
    plan = mc.Plan(mode="train", world_size=2, expert_parallel=2)
    model = make(DenseTiedToExpert, dense_first=dense_first)
    for rank in (0, 1):
        with pytest.raises(mc.PassError) as caught:
            mc.lower(model, plan, (global_batch()[0],), rank=rank)
        assert isinstance(caught.value.cause, mc.PlanError)
        message = str(caught.value.cause)
        assert "'proj.weight' is the same parameter as expert weight 'moe.experts.0.w1.weight'" in message
        assert "expert_parallel=2" in message and "sharded across the EP ranks" in message
        assert "needs the whole tensor on every rank" in message
        assert "untie them" in message and "or use expert_parallel=1" in message


def looped_rank(rank: int, world: int, root: str) -> dict:
    ids, targets = global_batch()
    local = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    program = mc.compile(make(LoopedMoE), mc.Plan(mode="train", world_size=world, expert_parallel=2), (ids[local],))
    opt = torch.optim.SGD(program.parameters(), lr=LR, momentum=0.9)
    optimizer_steps(lambda: objective(program(ids[local]), targets[local]) + program.aux_loss, opt, STEPS)
    program.save(root)
    return program.full_state_dict()


def test_a_layer_called_twice_shards_its_experts_once_and_trains_like_eager(tmp_path):
    """Before, the second call counted the experts from the weights the first call had already
    sharded (2 of 4) and refused them as "needed as rows (0, 2) and as rows (0, 1)". The program's
    aux_loss holds the load-balancing losses of both calls."""
    model = make(LoopedMoE)
    ids, targets = global_batch()
    calls = []
    model.moe.register_forward_hook(lambda module, args, output: calls.append(module.aux_loss))

    def eager_loss():
        calls.clear()
        loss = objective(model(ids), targets)
        assert len(calls) == 2
        return loss + sum(calls)

    optimizer_steps(eager_loss, torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), STEPS)
    for state in run_ranks(looped_rank, 2, str(tmp_path / "ckpt")):
        assert_state_close(state, model.state_dict())
    assert_state_close(mc.load_into(make(LoopedMoE, seed=7), str(tmp_path / "ckpt")).state_dict(), model.state_dict())
