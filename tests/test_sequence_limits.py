"""Positions. Inputs longer than the model's config allows: compiling at such a size, or calling
a ring program with one, names the config field and the numbers in one ValueError (it raised an
``UntraceableModelError`` about a broadcast in the position table, after a page of torch's
fake-tensor log). A model that runs past its nominal length (rotary positions) is not refused,
and rotary scalings compile unless they depend on the positions' values."""

from __future__ import annotations

import pytest
import torch

import moesys_compile as mc


def ids(seq: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(0))


LONGER = r"sequence length 600 are longer than Transformer's config allows \(config.max_seq_len = 512\)"


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_compiling_at_a_length_past_max_seq_len_names_the_config_field(mode, capfd):
    model = mc.models.build("tiny-moe")
    plan = mc.Plan(mode="infer", device_budget=1 << 20) if mode == "infer" else mc.Plan(mode="train")
    with pytest.raises(ValueError, match=LONGER + r"; pass at most 512 positions, or build the model with "
                                                  r"max_seq_len >= 600"):
        mc.compile(model, plan, example_inputs=(ids(600),))
    assert "failed while attempting to run meta" not in capfd.readouterr().err


def test_a_ring_call_past_max_seq_len_is_refused_and_the_program_still_serves():
    model = mc.models.build("tiny-moe").eval()
    program = mc.compile(model, mc.Plan(mode="infer", device_budget=1 << 20), example_inputs=(ids(16),))
    with pytest.raises(ValueError, match=LONGER):
        program(ids(600))
    short = ids(24, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(program(short), model(short), rtol=1e-6, atol=1e-6)


def test_a_rotary_model_past_max_position_embeddings_still_compiles():
    pytest.importorskip("transformers")
    from moesys_compile.models.hf import build_hf
    model = build_hf("qwen3_moe", max_position_embeddings=16).eval()
    long = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    program = mc.compile(model, mc.Plan(mode="infer", device_budget=1 << 30), example_inputs=(long,))
    with torch.no_grad():
        torch.testing.assert_close(program(long).logits, model(long).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,scaling", [
    ("qwen3_moe", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    ("mixtral", {"rope_type": "linear", "factor": 2.0}),
    ("qwen2_moe", {"rope_type": "dynamic", "factor": 2.0}),
])
def test_rotary_scalings_compile_unless_they_depend_on_the_positions_values(family, scaling):
    """As the README states: linear and yarn scaling equal eager; dynamic scaling, which picks its
    frequencies from the largest position, is refused naming the rotary module."""
    pytest.importorskip("transformers")
    from moesys_compile.errors import UntraceableModelError
    from moesys_compile.models.hf import build_hf
    model = build_hf(family, max_position_embeddings=64, rope_scaling=scaling).eval()
    short = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    plan = mc.Plan(mode="infer", device_budget=1 << 30)
    if scaling["rope_type"] == "dynamic":
        with pytest.raises(UntraceableModelError, match="module 'model.rotary_emb' uses a branch or shape that "
                                                        "depends on tensor values"):
            mc.compile(model, plan, example_inputs=(short,))
        return
    program = mc.compile(model, plan, example_inputs=(short,))
    with torch.no_grad():
        torch.testing.assert_close(program(short).logits, model(short).logits, rtol=1e-5, atol=1e-5)
