"""Positions. Inputs longer than the model's config allows: compiling at such a size, or calling
a ring program with one, names the config field and the numbers in one ValueError (it raised an
``UntraceableModelError`` about a broadcast in the position table, after a page of torch's
fake-tensor log). A model that runs past its nominal length (rotary positions) is not refused,
and rotary scalings compile unless they depend on the positions' values (PhiMoE's longrope,
whose branch on them capture takes as a ``torch.where``, aside)."""

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


def phimoe_longrope(max_positions: int = 64, original: int = 16):
    """PhiMoE with a ``longrope`` config shaped as Phi-3.5-MoE's (short and long factors and
    mscales), its original length ``original``."""
    from moesys_compile.models.hf import build_hf, hf_config
    config = hf_config("phimoe", {})
    half = config.hidden_size // config.num_attention_heads // 2
    scaling = {"rope_type": "longrope", "short_factor": [1.0 + i / half for i in range(half)],
               "long_factor": [2.0 + i / half for i in range(half)], "original_max_position_embeddings": original,
               "short_mscale": 1.0, "long_mscale": 1.2}
    return build_hf("phimoe", max_position_embeddings=max_positions, rope_scaling=scaling)


def test_phimoe_longrope_runs_as_eager_on_either_side_of_its_original_length():
    """Its rotary module picks the long or short mscale with a Python branch on the largest
    position; capture takes it as a ``torch.where``: the ring equals eager below and past the
    original 16 positions, and greedy decoding that crosses it gives transformers' tokens."""
    pytest.importorskip("transformers")
    model = phimoe_longrope().eval()
    short = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    program = mc.compile(model, mc.Plan(mode="infer", device_budget=1 << 30), example_inputs=(short,))
    with torch.no_grad():
        for ids in (short, torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1)), short):
            torch.testing.assert_close(program(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        want = model.generate(short, max_new_tokens=12, do_sample=False)
    assert torch.equal(program.generate(short, max_new_tokens=12), want)


def test_phimoe_longrope_trains_as_eager_past_its_original_length():
    pytest.importorskip("transformers")
    model = phimoe_longrope().eval()                  # eval: PhiMoE's training-mode router samples
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    program = mc.compile(model, mc.Plan(mode="train"), example_inputs=(ids,), example_kwargs={"labels": ids})
    loss = program(ids, labels=ids).loss
    torch.testing.assert_close(loss, model(ids, labels=ids).loss, rtol=1e-5, atol=1e-5)


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
