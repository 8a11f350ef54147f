"""What the eighth new-user sweep found, each refused or fixed now:

- A Hugging Face model compiled with the ``num_items_in_batch`` keyword the HF Trainer passes (it
  reaches ``forward``'s ``**kwargs``) was captured with the example's batch and sequence fixed:
  torch.export cannot keep sizes symbolic for keywords given through ``**kwargs``. The Trainer's
  evaluation at another batch size, or a last partial batch, then failed with a CapturedSizeError.
"""

from __future__ import annotations

import copy

import pytest
import torch

import moesys_compile as mc

VOCAB = 128


def _ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_a_keyword_through_kwargs_keeps_batch_and_sequence_symbolic():
    pytest.importorskip("transformers")
    from moesys_compile.models.hf import build_hf

    model = build_hf("qwen3_moe").train()
    eager = copy.deepcopy(model)
    ids = _ids(4, 8)
    example = dict(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(4 * 7))
    program = mc.compile(model, mc.Plan(mode="train"), example_kwargs=example)
    for batch, seq in ((2, 8), (3, 5)):
        call = dict(input_ids=_ids(batch, seq, 1), labels=_ids(batch, seq, 1),
                    num_items_in_batch=torch.tensor(batch * (seq - 1)))
        torch.testing.assert_close(program(**call).loss, eager(**call).loss, rtol=1e-5, atol=1e-6)

