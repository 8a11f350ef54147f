"""Positions. Inputs longer than the model's config allows: compiling at such a size, or calling
a ring program with one, names the config field and the numbers in one ValueError (it raised an
``UntraceableModelError`` about a broadcast in the position table, after a page of torch's
fake-tensor log). A model that runs past its nominal length (rotary positions) is not refused,
and rotary scalings compile: those that branch on the positions' values (PhiMoE's longrope
mscale, dynamic NTK scaling) are captured as ``torch.where``s over the call's length."""

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
def test_rotary_scalings_compile_to_eager(family, scaling):
    pytest.importorskip("transformers")
    from moesys_compile.models.hf import build_hf
    model = build_hf(family, max_position_embeddings=64, rope_scaling=scaling).eval()
    short = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    program = mc.compile(model, mc.Plan(mode="infer", device_budget=1 << 30), example_inputs=(short,))
    with torch.no_grad():
        torch.testing.assert_close(program(short).logits, model(short).logits, rtol=1e-5, atol=1e-5)


def dynamic_ntk(family: str):
    from moesys_compile.models.hf import build_hf
    return build_hf(family, num_hidden_layers=2, max_position_embeddings=16,
                    rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}).eval()


def test_dynamic_ntk_scaling_runs_as_eager_below_and_past_the_original_length():
    """Eager picks the frequencies with Python branches on the largest position; capture computes
    them from each call's length. Calls of rising length past the original 16, one within it and
    one past it again equal an eager copy called alike (ring and training program), and greedy
    decoding that crosses 16 gives transformers' tokens."""
    pytest.importorskip("transformers")
    import copy
    model = dynamic_ntk("qwen3_moe")
    example = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    programs = {mode: mc.compile(model, plan, example_inputs=(example,)) for mode, plan in
                (("infer", mc.Plan(mode="infer", device_budget=1 << 30)), ("train", mc.Plan(mode="train")))}
    for program in programs.values():
        eager = copy.deepcopy(model)
        with torch.no_grad():
            for length in (8, 17, 40, 12, 30):
                ids = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(length))
                torch.testing.assert_close(program(ids).logits, eager(ids).logits, rtol=1e-5, atol=1e-5)
    prompt = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    want = copy.deepcopy(model).generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(programs["infer"].generate(prompt, max_new_tokens=12), want)


def test_dynamic_ntk_scaling_after_a_longer_call_is_the_calls_own_as_the_readme_states():
    """Eager keeps a longer call's frequencies for a shorter one still past the original length;
    the program computes the shorter one's, as a fresh eager model does."""
    pytest.importorskip("transformers")
    import copy
    model = dynamic_ntk("llama")
    longer, shorter = (torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(n)) for n in (60, 30))
    fresh = copy.deepcopy(model)
    program = mc.compile(model, mc.Plan(mode="infer", device_budget=1 << 30), example_inputs=(shorter,))
    with torch.no_grad():
        program(longer)
        torch.testing.assert_close(program(shorter).logits, fresh(shorter).logits, rtol=1e-5, atol=1e-5)


def test_dynamic_ntk_scaling_of_one_layer_type_leaves_the_others_rope_to_transformers():
    """Gemma 3 keeps a rope per layer type: dynamic for its full-attention layers, the default
    for its sliding ones; past the original length the program still equals eager."""
    pytest.importorskip("transformers")
    from moesys_compile.models.hf import build_hf
    ropes = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
             "full_attention": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000.0}}
    model = build_hf("gemma3", num_hidden_layers=2, max_position_embeddings=16, rope_parameters=ropes,
                     layer_types=["sliding_attention", "full_attention"]).eval()
    example = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    program = mc.compile(model, mc.Plan(mode="infer", device_budget=1 << 30), example_inputs=(example,))
    with torch.no_grad():
        for length in (8, 40):
            ids = torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(length))
            torch.testing.assert_close(program(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_the_model_called_after_its_dynamic_ntk_program_keeps_its_own_frequencies():
    """The program reads its frequencies without writing the model's buffer (a training program
    shares the model's tensors): a longer call through the program leaves eager's next short call
    as a fresh model computes it."""
    pytest.importorskip("transformers")
    import copy
    model = dynamic_ntk("llama")
    fresh = copy.deepcopy(model)
    short, longer = (torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(n)) for n in (8, 60))
    program = mc.compile(model, mc.Plan(mode="train"), example_inputs=(short,))
    with torch.no_grad():
        program(longer)
        torch.testing.assert_close(model(short).logits, fresh(short).logits, rtol=0, atol=0)
