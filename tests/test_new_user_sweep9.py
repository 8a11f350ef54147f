"""What the ninth new-user sweep (the training side) found, each refused or fixed now:

- ``model.to(torch.bfloat16)`` (or to another device) after compiling at expert_parallel > 1 cast
  the model's expert weights but not the rank's expert shards, which viewed the old tensors: the
  next forward failed inside the experts kernel, telling the user to cast the expert weights they
  had just cast. The shards now view the model's cast rows at the next forward, as the dense
  parameters (shared with the model) follow the cast at once and as at expert_parallel=1.
- ``moesys-compile train --lr inf`` was accepted and trained every weight to NaN (``--lr nan`` and
  negative rates were refused); it is refused now, before the model is built.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

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
