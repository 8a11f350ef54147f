"""Hugging Face models under the distributed programs: EP=2 training on 2 gloo ranks equals one
eager process on the global batch for 3 SGD steps (losses and full state, under the HF names), with
each rank holding half of every expert parameter (gpt-oss: its expert biases too); a dense Llama
trains data-parallel."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import moesys_compile as mc

pytest.importorskip("transformers")

from moesys_compile.models.hf import build_hf  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from blocks import randomize_expert_biases  # noqa: E402
from dist_utils import global_mean, optimizer_steps, run_ranks  # noqa: E402

BATCH, SEQ, STEPS, LR, VOCAB = 4, 8, 3, 0.5, 128
RTOL, ATOL = 1e-4, 1e-5
# family -> expert_parallel; A.X-K1: a block with its own output norm, Kolibri: a router kept as traced code,
# Llama 4: top-k weights on the experts' inputs, DeepSeek-V4: a block left as traced code (token-id hash
# routing) around canonical experts
CASES = {"mixtral": 2, "qwen2_moe": 2, "olmoe": 2, "deepseek_v3": 2, "jetmoe": 2, "gpt_oss": 2, "axk1": 2,
         "kolibri1": 2, "llama4": 2, "deepseek_v4": 2, "llama": 1}
# the stacked expert weights each family's MoE blocks hold (JetMoE's attention experts stay replicated)
EXPERT_WEIGHTS = {"jetmoe": (".mlp.input_linear.", ".mlp.output_linear.")}


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    return ids[:, :-1], ids[:, 1:]


def hf_model(family: str):
    """The family's tiny model in train mode, with random expert biases where it has them (gpt-oss)."""
    return randomize_expert_biases(build_hf(family).train())


def cross_entropy(logits, targets):
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def reference_run(family: str):
    """The Hugging Face model itself, eager, one process, global batch (CE loss only)."""
    model = hf_model(family)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ids, targets = global_batch()
    losses = optimizer_steps(lambda: cross_entropy(model(ids).logits, targets), opt, STEPS)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_on_ranks(model, rank: int, world: int, ep: int, steps: int = STEPS):
    """Compile ``model`` for this rank (EP ``ep``, small buckets) and take ``steps`` SGD steps on its
    share of the global batch; (program, losses averaged over the ranks)."""
    ids, targets = global_batch()
    local = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    plan = mc.Plan(mode="train", world_size=world, expert_parallel=ep, bucket_mb=0.01)
    program = mc.compile(model, plan, example_inputs=(ids[local],))
    opt = torch.optim.SGD(program.parameters(), lr=LR)
    losses = optimizer_steps(lambda: cross_entropy(program(ids[local]).logits, targets[local]), opt, steps)
    return program, [global_mean(loss) for loss in losses]


def distributed_run(rank: int, world: int, family: str, ep: int):
    program, losses = train_on_ranks(hf_model(family), rank, world, ep)
    held = dict(program.graph_module.named_parameters())
    shards = {name: (held[name].shape[0], hi - lo, total) for name, (lo, hi, total)
              in program.context.extras.get("expert_shards", {}).items()}
    state = program.full_state_dict()
    return losses, (state if rank == 0 else None), shards


def all_families(rank: int, world: int):
    return {family: distributed_run(rank, world, family, ep) for family, ep in CASES.items()}


@pytest.fixture(scope="module")
def results():
    return run_ranks(all_families, 2, timeout=600)


@pytest.mark.parametrize("family", list(CASES))
def test_two_ranks_match_the_eager_hf_model(results, family):
    ref_losses, ref_state = reference_run(family)
    losses, state, shards = results[0][family]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL)
    assert ref_losses[-1] < ref_losses[0], "the loss should fall over the steps"
    assert list(state) == list(ref_state), "full_state_dict uses the Hugging Face names"
    for name, tensor in ref_state.items():
        torch.testing.assert_close(state[name], tensor, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
    if CASES[family] == 1:
        assert shards == {}
        return
    for rank_result in results:
        rank_shards = rank_result[family][2]
        markers = EXPERT_WEIGHTS.get(family, (".experts.",))
        expert_names = {n for n in ref_state if any(m in n for m in markers)}
        assert set(rank_shards) == expert_names
        for name, (held_rows, local_rows, total) in rank_shards.items():
            assert held_rows == local_rows == total // 2, name
