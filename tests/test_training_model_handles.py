"""What users do through the model after compiling it at expert_parallel=2, where each rank trains
its rows of the stacked expert weights as a shard of its own (``programs/sharded_weights.py``):
``model.zero_grad()`` and freezing through the model reach the shards, and a model whose experts
were stepped on shards (the other ranks' rows stale on this rank) warns when read and is refused
when compiled onto other rows, until the trained state is loaded into it. Also
``program.clip_grad_norm_`` with torch's own arguments and an empty optimizer group's resume.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import moesys_compile as mc

sys.path.insert(0, str(Path(__file__).parent))
from dist_utils import run_ranks  # noqa: E402

CONFIG = dict(vocab_size=64, dim=16, n_layers=2, n_heads=2, ffn_dim=24, num_experts=4, top_k=2, moe_ffn_dim=12)


def build():
    torch.manual_seed(0)
    return mc.models.build("tiny-moe", **CONFIG)


def batch(step: int, rank: int = 0):
    ids = torch.randint(0, 64, (4, 7), generator=torch.Generator().manual_seed(100 + step))
    ids = ids[rank * 2:(rank + 1) * 2]
    return ids[:, :-1], ids[:, 1:]


def loss_of(program, step, rank):
    ids, targets = batch(step, rank)
    return F.cross_entropy(program(ids).flatten(0, 1), targets.flatten()) + program.aux_loss


def compile_ep2(model, rank):
    return mc.compile(model, mc.Plan(mode="train", world_size=2, expert_parallel=2), (batch(0, rank)[0],))


def _second_step_gradient(rank, zero_grad_of):
    """The shard's gradient after a step, ``zero_grad_of(model, optimizer)``, and another backward;
    the warnings of that backward's forward."""
    model = build()
    program = compile_ep2(model, rank)
    optimizer = torch.optim.SGD(program.parameters(), lr=0.5)
    loss_of(program, 0, rank).backward()
    optimizer.step()
    zero_grad_of(model, optimizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss_of(program, 1, rank).backward()
    return program.get_parameter("graph_module.layers.0.ffn.w_up").grad, [str(w.message) for w in caught]


def _zero_grad_through_model(rank, world):
    through_model, caught = _second_step_gradient(rank, lambda model, optimizer: model.zero_grad())
    expected, _ = _second_step_gradient(rank, lambda model, optimizer: optimizer.zero_grad())
    return float((through_model - expected).abs().max()), [m for m in caught if "zero_grad" in m]


def test_model_zero_grad_clears_the_expert_shards_gradients():
    for difference, messages in run_ranks(_zero_grad_through_model, 2):
        assert difference < 1e-6
        assert len(messages) == 1 and "optimizer.zero_grad()" in messages[0]


def _freeze_through_model(rank, world):
    model = build()
    program = compile_ep2(model, rank)
    optimizer = torch.optim.SGD(program.parameters(), lr=0.5)
    model.layers[0].ffn.w_up.requires_grad_(False)
    shard = program.get_parameter("graph_module.layers.0.ffn.w_up")
    before = shard.detach().clone()
    loss_of(program, 0, rank).backward()
    optimizer.step()
    frozen = (shard.requires_grad, shard.grad is None, torch.equal(shard.detach(), before))
    model.layers[0].ffn.w_up.requires_grad_(True)
    optimizer.zero_grad()
    loss_of(program, 1, rank).backward()
    return frozen, shard.requires_grad and shard.grad is not None


def test_freezing_through_the_model_reaches_the_shard():
    for frozen, unfrozen in run_ranks(_freeze_through_model, 2):
        assert frozen == (False, True, True)
        assert unfrozen


def _stale_model(rank, world, directory):
    model = build()
    program = compile_ep2(model, rank)
    fresh = model.state_dict()               # nothing stepped yet: no warning
    optimizer = torch.optim.SGD(program.parameters(), lr=0.5)
    loss_of(program, 0, rank).backward()
    optimizer.step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.state_dict()
        model(batch(0, rank)[0])
    stale_warnings = [str(w.message) for w in caught if "rank shards" in str(w.message)]
    refusals = []
    for plan in (mc.Plan(mode="train", world_size=2, expert_parallel=1), mc.Plan(mode="infer")):
        with pytest.raises(mc.PlanError) as refused:
            mc.compile(model, plan, (batch(0, rank)[0],))
        refusals.append(str(refused.value))
    again = compile_ep2(model, rank)         # the same rows: allowed, and still stale
    del again
    program.save(directory)
    trained = program.full_state_dict()
    model.load_state_dict(trained)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.state_dict()
        whole = mc.compile(model, mc.Plan(mode="train", world_size=2, expert_parallel=1), (batch(0, rank)[0],))
    synced = whole.full_state_dict()
    mc.load_into(build(), directory)
    return (len(fresh), stale_warnings, refusals, [str(w.message) for w in caught if "rank shards" in str(w.message)],
            max(float((synced[k] - trained[k]).abs().max()) for k in trained))


def test_a_model_trained_as_shards_is_stale_until_the_trained_state_is_loaded(tmp_path):
    for rank, (n_fresh, stale, refusals, after_load, difference) in enumerate(
            run_ranks(_stale_model, 2, str(tmp_path / "ckpt"))):
        assert n_fresh > 0
        assert len(stale) == 2 and "model.state_dict()" in stale[0] and "a forward of the model" in stale[1], stale
        assert all("expert_parallel=2" in r and "model.load_state_dict(program.full_state_dict())" in r
                   for r in refusals), refusals
        assert "expert_parallel=1" in refusals[0] and "mode=infer" in refusals[1]
        assert after_load == [] and difference == 0.0


def test_clip_grad_norm_takes_torchs_arguments():
    model = build()
    program = mc.compile(model, mc.Plan(mode="train"), (batch(0)[0],))
    reference = build()
    for norm_type in ("inf", 1.0, 2.0):
        program.zero_grad()
        reference.zero_grad()
        loss_of(program, 0, 0).backward()
        ids, targets = batch(0)
        eager = F.cross_entropy(reference(ids).flatten(0, 1), targets.flatten())
        (eager + sum(layer.ffn.aux_loss for layer in reference.layers)).backward()
        total = program.clip_grad_norm_(0.01, norm_type=norm_type, foreach=True)
        expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.01, norm_type=norm_type)
        torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-7)
        for (name, param), mine in zip(reference.named_parameters(), program.parameters()):
            torch.testing.assert_close(mine.grad, param.grad, rtol=1e-4, atol=1e-7, msg=name)
    next(iter(program.parameters())).grad[0].fill_(math.nan)
    with pytest.raises(RuntimeError, match="non-finite"):
        program.clip_grad_norm_(1.0, error_if_nonfinite=True)
    total = program.clip_grad_norm_(1.0)
    assert math.isnan(float(total))
    assert all(torch.isnan(p.grad).all() for p in program.parameters() if p.grad is not None)   # as torch


def test_an_empty_optimizer_group_resumes_without_a_warning(tmp_path):
    model = build()
    program = mc.compile(model, mc.Plan(mode="train"), (batch(0)[0],))

    def adamw():
        biases = [p for n, p in program.named_parameters() if n.endswith(".bias")]     # tiny-moe has none
        others = [p for n, p in program.named_parameters() if not n.endswith(".bias")]
        return torch.optim.AdamW([dict(params=others), dict(params=biases, weight_decay=0.0)], lr=1e-3)
    optimizer = adamw()
    loss_of(program, 0, 0).backward()
    optimizer.step()
    program.save(str(tmp_path / "ckpt"), optimizer=optimizer)
    resumed = adamw()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        program.load(str(tmp_path / "ckpt"), optimizer=resumed)
    assert resumed.param_groups[1]["weight_decay"] == 0.0
