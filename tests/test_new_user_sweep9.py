"""What the ninth new-user sweep (the training side) found, each refused or fixed now:

- ``model.to(torch.bfloat16)`` (or to another device) after compiling at expert_parallel > 1 cast
  the model's expert weights but not the rank's expert shards, which viewed the old tensors: the
  next forward failed inside the experts kernel, telling the user to cast the expert weights they
  had just cast. The shards now view the model's cast rows at the next forward, as the dense
  parameters (shared with the model) follow the cast at once and as at expert_parallel=1.
- ``moesys-compile train --lr inf`` was accepted and trained every weight to NaN (``--lr nan`` and
  negative rates were refused); it is refused now, before the model is built.
- A model that fails on its example when run eagerly too (``hf:mixtral --config hidden_size=36``,
  whose head size of 9 does not fit the rotary embedding; a user's Linear of the wrong width) was
  reported as a capture problem: "uses RuntimeError ... fix: express it with tensor ops
  (torch.where, masking, torch.cond)", or "shapes cannot be propagated ... make that module a
  leaf". Compile now runs the model eagerly once where capture fails, and says that the model
  itself fails, in which module, at which line, and to check the config's sizes and the inputs.
- A buffer the forward assigns rather than changes in place (``self.steps += 1``, ``self.ema =
  0.9 * self.ema + 0.1 * ...``) was left holding torch.fx's Proxy after compile: the model was
  broken (its buffer no tensor), and the program never updated the buffer (compile failed with a
  VerifyError inside ``decompose_moe`` where the value was used twice). Capture puts the buffers
  back and writes such an assignment into the buffer in place, as eager's ``+=`` does.
- ``torch.amp.GradScaler`` at expert_parallel > 1: each rank decided alone whether a step
  overflowed, and the ranks hold different experts' gradients, so a rank whose experts overflowed
  skipped the step the others took and the dense weights drifted apart. ``program.grad_scaler()``
  gives a scaler that decides over every rank (torch's ``ShardedGradScaler`` there).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moesys_compile as mc
from moesys_compile import train

sys.path.insert(0, str(Path(__file__).parent))
from dist_utils import run_ranks  # noqa: E402

TRAIN = ["--model", "tiny-moe", "--override", "n_layers=1", "--batch-size", "2", "--seq-len", "8", "--log-every", "0"]
CONFIG = dict(vocab_size=64, dim=16, n_layers=2, n_heads=2, ffn_dim=24, num_experts=4, top_k=2, moe_ffn_dim=12)


def _tiny_moe() -> torch.nn.Module:
    torch.manual_seed(0)
    return mc.models.build("tiny-moe", **CONFIG)


def _global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, CONFIG["vocab_size"], (4, 9), generator=torch.Generator().manual_seed(100 + step))
    return ids[:, :-1], ids[:, 1:]


def _rank_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(t[rank * 2:(rank + 1) * 2] for t in _global_batch(step))


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def _cast_after_compile(rank, world):
    """Two SGD steps of a program whose model was cast to bfloat16 after compile at
    expert_parallel=2, and of the eager model cast alike on the global batch."""
    model = _tiny_moe()
    reference = copy.deepcopy(model).to(torch.bfloat16)
    program = mc.compile(model, mc.Plan(mode="train", world_size=2, expert_parallel=2), (_rank_batch(0, rank)[0],))
    model.to(torch.bfloat16)
    optimizer = torch.optim.SGD(program.parameters(), lr=0.05)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    losses = []
    for step in range(2):
        ids, targets = _rank_batch(step, rank)
        loss = _cross_entropy(program(ids), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ids, targets = _global_batch(step)
        reference_loss = _cross_entropy(reference(ids), targets)
        reference_loss.backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad()
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean)
        losses.append((float(mean) / 2, float(reference_loss)))
    shard = program.get_parameter("graph_module.layers.0.ffn.w_up")
    full = model.get_parameter("layers.0.ffn.w_up")
    views_model = shard.data_ptr() == full[rank * 2].data_ptr()
    state = program.full_state_dict()
    worst = max(float((state[name].float() - tensor.float()).abs().max() / tensor.float().abs().max())
                for name, tensor in reference.state_dict().items())     # relative to the tensor's scale
    return losses, shard.dtype, views_model, worst


def test_casting_the_model_after_compile_reaches_the_expert_shards():
    for losses, dtype, views_model, worst in run_ranks(_cast_after_compile, 2):
        assert dtype == torch.bfloat16 and views_model
        for loss, reference_loss in losses:
            assert abs(loss - reference_loss) < 5e-3
        assert worst < 2e-2


@pytest.fixture
def no_launch(monkeypatch):
    """``train.main`` in this process as rank 0 of one; launching ranks fails the test."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(train, "launch", lambda *a, **k: pytest.fail("ranks were launched"))


def _train_error(capsys, argv: list[str]) -> str:
    assert train.main(argv) == 2
    return capsys.readouterr().err


def test_train_refuses_an_infinite_learning_rate_before_any_step(no_launch, monkeypatch, capsys):
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("the model was built before the check"))
    assert "--lr (inf) must be a finite number >= 0" in _train_error(capsys, TRAIN + ["--lr", "inf"])


class _TooNarrowProjection(nn.Module):
    """An embedding of width 4 fed to a Linear that takes 6 features: fails eagerly as traced."""

    def __init__(self):
        super().__init__()
        self.embed, self.proj = nn.Embedding(10, 4), nn.Linear(6, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, ids):
        self.calls += 1
        return self.proj(self.embed(ids))


def test_a_model_that_fails_eagerly_is_named_as_failing_not_as_untraceable():
    model = _TooNarrowProjection()
    with pytest.raises(mc.UntraceableModelError) as info:
        mc.compile(model, mc.Plan(mode="train"), example_inputs=(torch.randint(0, 10, (2, 3)),))
    message = str(info.value)
    assert "fails on the example inputs when run eagerly too, in module 'proj' (Linear)" in message
    assert "mat1 and mat2 shapes cannot be multiplied" in message and "make that module a leaf" not in message
    assert info.value.module_path == "proj"
    assert float(model.calls) == 0      # the eager run leaves the buffers as they were


def test_a_config_whose_sizes_do_not_fit_is_named_with_the_module_and_line():
    pytest.importorskip("transformers")
    from moesys_compile.models.hf import build_hf
    model = build_hf("mixtral", hidden_size=36, num_local_experts=3, num_experts_per_tok=3)   # head size 9
    with pytest.raises(mc.UntraceableModelError) as info:
        mc.compile(model, mc.Plan(mode="train"), example_inputs=(torch.randint(0, 128, (2, 9)),))
    message = str(info.value)
    assert "fails on the example inputs when run eagerly too, in module 'model.layers.0.self_attn'" in message
    assert "modeling_mixtral.py" in message and "hidden_size / num_attention_heads" in message
    assert "torch.where" not in message


class _CountingNet(nn.Module):
    """Counts its training calls with ``+=`` and keeps an EMA of its hidden states by assignment."""

    def __init__(self):
        super().__init__()
        self.embed, self.ffn = nn.Embedding(CONFIG["vocab_size"], 16), mc.nn.MoE(dim=16, ffn_dim=24, num_experts=4, top_k=2)
        self.head = nn.Linear(16, CONFIG["vocab_size"])
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema", torch.zeros(16))

    def forward(self, ids):
        x = self.embed(ids)
        x = x + self.ffn(x)
        if self.training:
            self.steps += 1
            with torch.no_grad():
                self.ema = 0.9 * self.ema + 0.1 * x.mean((0, 1))
        return self.head(x + self.ema)


def test_buffers_the_forward_assigns_are_updated_and_the_model_is_left_intact():
    torch.manual_seed(0)
    model = _CountingNet()
    reference = copy.deepcopy(model)
    program = mc.compile(model, mc.Plan(mode="train"), (_global_batch(0)[0],))
    assert isinstance(model.steps, torch.Tensor) and int(model.steps) == 0 and not model.ema.any()
    for step in range(3):
        ids, targets = _global_batch(step)
        _cross_entropy(program(ids), targets).backward()
        _cross_entropy(reference(ids), targets).backward()
    assert int(model.steps) == int(reference.steps) == 3
    torch.testing.assert_close(model.ema, reference.ema)
    torch.testing.assert_close(model.embed.weight.grad, reference.embed.weight.grad)


def _scaled_steps(rank, world, kind):
    """Two float16-style scaled SGD steps at expert_parallel=2; the first with an overflow in rank
    0's expert gradients only. Returns whether the dense weights equal rank 0's after each step,
    whether they changed, and the scales."""
    model = _tiny_moe()
    program = mc.compile(model, mc.Plan(mode="train", world_size=2, expert_parallel=2), (_rank_batch(0, rank)[0],))
    optimizer = torch.optim.SGD(program.parameters(), lr=0.05)
    scaler = program.grad_scaler() if kind == "program" else torch.amp.GradScaler("cpu")
    dense = program.get_parameter("graph_module.embed.weight")
    seen = []
    for step in range(2):
        before = dense.detach().clone()
        ids, targets = _rank_batch(step, rank)
        scaler.scale(_cross_entropy(program(ids), targets)).backward()
        if step == 0 and rank == 0:
            program.get_parameter("graph_module.layers.0.ffn.w_up").grad[0, 0, 0] = float("inf")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        first = dense.detach().clone()
        torch.distributed.broadcast(first, 0)
        seen.append((bool(torch.equal(dense, first)), not torch.equal(dense, before), scaler.get_scale()))
    return seen


def test_the_programs_grad_scaler_keeps_expert_parallel_ranks_in_step():
    """A plain GradScaler lets the rank whose experts overflowed skip a step the other takes."""
    plain = run_ranks(_scaled_steps, 2, "plain")
    assert not plain[1][0][0], "a plain scaler lets the ranks drift apart"
    for steps in run_ranks(_scaled_steps, 2, "program"):
        (same0, changed0, scale0), (same1, changed1, scale1) = steps
        assert same0 and not changed0 and scale0 == 2.0 ** 15      # the overflow skips the step on both ranks
        assert same1 and changed1 and scale1 == scale0              # the next one is taken on both
