"""``program.generate`` with the generation settings of ``model.generate(do_sample=False)``: the
model's ``generation_config`` and per-call settings give the same tokens as transformers; what it
does not implement, and models transformers does not decode, are refused by name."""

from __future__ import annotations

import pytest
import torch

import moesys_compile as mc
from moesys_compile.infer import model_bytes

transformers = pytest.importorskip("transformers")

from moesys_compile.models.hf import build_hf  # noqa: E402

NEW = 8
VOCAB = 24                     # small, so that greedy decoding repeats tokens of the prompt


def ring_plan(model, extra: int = 2**18) -> mc.Plan:
    return mc.Plan(mode="infer", device="cpu", device_budget=model_bytes(model) // 2 + extra)


def left_padded(batch: int = 3, seq: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, :2] = mask[2, :4] = 0
    ids = torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1)).masked_fill(mask == 0, 0)
    return ids, mask


def prompts(batch: int = 2, seq: int = 6, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


def hf_greedy(model, ids, mask, **settings) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, **settings)


@pytest.fixture(scope="module")
def llama():
    """A 1-layer llama, its ring program and left-padded prompts (compiled once for the module)."""
    torch.set_num_threads(1)
    model = build_hf("llama", num_hidden_layers=1, vocab_size=VOCAB, seed=5).eval()
    model.generation_config = transformers.GenerationConfig(eos_token_id=None, pad_token_id=0)
    ids, mask = left_padded()
    program = mc.compile(model, ring_plan(model), example_inputs=(ids,), example_kwargs={"attention_mask": mask})
    yield model, program, ids, mask
    program.close()


def settings_that_change_the_tokens(plain: torch.Tensor, prompt: int) -> dict[str, dict]:
    """Each setting with a value that changes what plain greedy decoding (``plain``) picks."""
    early_eos = int(plain[0, prompt + 1])                  # row 0 ends at its second new token
    return {"repetition_penalty": {"repetition_penalty": 1.8},
            "no_repeat_ngram_size": {"no_repeat_ngram_size": 1},
            "min_new_tokens": {"eos_token_id": early_eos, "min_new_tokens": 5},
            "suppress_tokens": {"suppress_tokens": [int(plain[0, prompt]), int(plain[1, prompt])]},
            "begin_suppress_tokens": {"begin_suppress_tokens": [int(plain[2, prompt])]},
            "forced_eos_token_id": {"forced_eos_token_id": 7},
            "combined": {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "eos_token_id": early_eos,
                         "min_new_tokens": 3, "suppress_tokens": [int(plain[1, prompt])]}}


def test_generation_config_settings_give_the_tokens_of_transformers(llama):
    """Set on ``model.generation_config`` (as hub checkpoints ship them), each setting changes the
    tokens of transformers' greedy decoding, and the ring's are the same, on left-padded prompts."""
    model, program, ids, mask = llama
    plain = hf_greedy(model, ids, mask)
    for name, settings in settings_that_change_the_tokens(plain, ids.shape[1]).items():
        model.generation_config = transformers.GenerationConfig(**{"eos_token_id": None, "pad_token_id": 0,
                                                                   **settings})
        want = hf_greedy(model, ids, mask)
        assert not torch.equal(want, plain), f"{name} does not change transformers' tokens: the check cannot fail"
        assert torch.equal(program.generate(ids, NEW, attention_mask=mask), want), name
    model.generation_config = transformers.GenerationConfig(eos_token_id=None, pad_token_id=0)


def test_per_call_settings_go_over_the_models_config_as_in_transformers(llama):
    """``eos_token_id=``, ``repetition_penalty=`` ... and ``generation_config=`` passed to
    ``generate`` override the model's ``generation_config``, as ``model.generate`` merges them."""
    model, program, ids, mask = llama
    plain = hf_greedy(model, ids, mask)
    per_call = {"eos_token_id": int(plain[1, ids.shape[1] + 1]), "repetition_penalty": 1.5}
    want = hf_greedy(model, ids, mask, **per_call)
    assert not torch.equal(want, plain)
    assert torch.equal(program.generate(ids, NEW, attention_mask=mask, **per_call), want)
    config = transformers.GenerationConfig(no_repeat_ngram_size=1)
    want = hf_greedy(model, ids, mask, generation_config=config)
    assert not torch.equal(want, plain)
    assert torch.equal(program.generate(ids, NEW, attention_mask=mask, generation_config=config), want)


def test_sampling_settings_in_the_config_decode_greedily_as_do_sample_false(llama):
    """A checkpoint that ships ``do_sample=True`` with a temperature decodes as
    ``model.generate(do_sample=False)``: greedy, not refused."""
    model, program, ids, mask = llama
    model.generation_config = transformers.GenerationConfig(eos_token_id=None, pad_token_id=0, do_sample=True,
                                                            temperature=0.7, top_k=5, top_p=0.9)
    try:
        assert torch.equal(program.generate(ids, NEW, attention_mask=mask), hf_greedy(model, ids, mask))
    finally:
        model.generation_config = transformers.GenerationConfig(eos_token_id=None, pad_token_id=0)


@pytest.mark.parametrize("where, settings, named", [
    ("config", {"num_beams": 4}, "num_beams"),
    ("config", {"guidance_scale": 2.0}, "guidance_scale"),
    ("config", {"max_time": 5.0}, "max_time"),
    ("call", {"num_beams": 2}, "num_beams"),
    ("call", {"num_return_sequences": 2}, "num_return_sequences"),
    ("call", {"max_length": 20}, "max_new_tokens"),
    ("call", {"token_type_ids": 1}, "token_type_ids"),
])
def test_settings_that_greedy_decoding_here_does_not_implement_are_refused_by_name(llama, where, settings, named):
    model, program, ids, mask = llama
    if where == "config":
        model.generation_config = transformers.GenerationConfig(eos_token_id=None, pad_token_id=0, **settings)
    try:
        with pytest.raises(ValueError, match=named):
            program.generate(ids, NEW, attention_mask=mask, **(settings if where == "call" else {}))
    finally:
        model.generation_config = transformers.GenerationConfig(eos_token_id=None, pad_token_id=0)


def test_the_built_in_models_take_no_generation_settings():
    torch.manual_seed(0)
    model = mc.models.build("tiny-gpt").eval()
    ids = prompts(batch=1, seq=4)
    program = mc.compile(model, ring_plan(model), example_inputs=(ids,))
    with pytest.raises(ValueError, match="built-in models .* no generation settings"):
        program.generate(ids, 3, repetition_penalty=1.2)
    program.close()


def test_a_model_that_transformers_cannot_generate_with_is_refused():
    """A masked LM has no next-token head: ``model.generate`` does not exist for it."""
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)).eval()
    ids = prompts(vocab=128)
    program = mc.compile(bert, ring_plan(bert), example_inputs=(ids,))
    with pytest.raises(ValueError, match="BertForMaskedLM cannot generate .*can_generate"):
        program.generate(ids, 3)
    program.close()


def test_an_encoder_decoder_model_is_refused_by_generate():
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1)).eval()
    ids = prompts(vocab=128)
    program = mc.compile(t5, ring_plan(t5), example_inputs=(ids,), example_kwargs={"decoder_input_ids": ids[:, :3]})
    with pytest.raises(ValueError, match="encoder-decoder models are not supported by generate"):
        program.generate(ids, 3)
    program.close()


def test_jamba_with_mamba_layers_generates_the_tokens_of_transformers():
    """The reference selective scan loops over the sequence, so export holds its length fixed: every
    step lowers a graph of its own length (with a warning) instead of being refused."""
    torch.set_num_threads(1)
    model = build_hf("jamba", attn_layer_period=2, attn_layer_offset=1).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    ids = prompts(vocab=128)
    program = mc.compile(model, ring_plan(model, extra=16 * 2**20), example_inputs=(ids,))
    with torch.inference_mode():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    with pytest.warns(UserWarning, match="sequence length fixed"):
        assert torch.equal(program.generate(ids, 3), want)
    assert program.stats["decode"] == "recompute"
    program.close()
