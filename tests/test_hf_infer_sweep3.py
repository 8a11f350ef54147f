"""Hugging Face models through infer and train programs, as a sweep found them: an example whose
labels are its input ids (one tensor), a weights_checkpoint without a ring, the minimum budget a
``generate`` refusal states, and ``generate``'s ``input_ids=``/``max_length`` and config defaults."""

from __future__ import annotations

import re

import pytest
import torch

import moesys_compile as mc
from moesys_compile.infer import model_bytes

transformers = pytest.importorskip("transformers")

from moesys_compile.models.hf import build_hf  # noqa: E402


def ids_of(seed: int, batch: int = 2, seq: int = 6) -> torch.Tensor:
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def ring_plan(model) -> mc.Plan:
    return mc.Plan(mode="infer", device_budget=model_bytes(model) // 2 + 2**18)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return build_hf("llama").eval()


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_an_example_whose_labels_are_its_input_ids_serves_calls_with_other_labels(llama, mode):
    """``example_kwargs=dict(labels=ids)`` with ``ids`` the example's own input ids (the idiom
    ``model(ids, labels=ids)``): the graph embeds the input ids, not the labels, so other labels,
    -100 among them, give eager's logits and loss."""
    ids = ids_of(2)
    plan = ring_plan(llama) if mode == "infer" else mc.Plan(mode="train")
    program = mc.compile(llama, plan, example_inputs=(ids,), example_kwargs=dict(labels=ids))
    other = ids_of(3)
    ignored = ids.clone()
    ignored[:, :2] = -100
    for labels in (other, ignored, ids):
        with torch.no_grad():
            want, got = llama(ids, labels=labels), program(ids, labels=labels)
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-4, atol=1e-4)
    if mode == "infer":
        program.close()


@pytest.mark.parametrize("empty", [False, True])
def test_a_weights_checkpoint_without_a_device_budget_is_refused_at_compile(tmp_path, empty):
    """Only a ring stages weights from weights_checkpoint: without a device_budget the program
    would compute with the model's own weights (or fail on meta tensors at the first call)."""
    build_hf("llama", seed=1).save_pretrained(str(tmp_path))
    if empty:
        with mc.empty_weights():
            model = build_hf("llama").eval()
    else:
        model = build_hf("llama", seed=2).eval()
    plan = mc.Plan(mode="infer", weights_checkpoint=str(tmp_path))
    with pytest.raises(mc.PlanError, match=r"weights_checkpoint \(.*\) is read by a ring, and without a "
                                           r"device_budget there is none.*set device_budget"):
        mc.compile(model, plan, example_inputs=(ids_of(2),))


def test_one_retry_at_the_minimum_a_generate_refusal_states_decodes():
    """The refusal states the largest minimum of the prefill and of the step over the longest
    cache (not the prefill's alone), so a program compiled at it decodes as model.generate."""
    torch.manual_seed(0)
    model = build_hf("qwen3").eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    example, prompt = ids_of(11, 1, 4), ids_of(12, 1, 12)
    roomy = mc.compile(model, mc.Plan(mode="infer", device_budget=2**40), example_inputs=(example,))
    least = roomy.context.extras["ring"].min_budget      # the forward at the example: the smallest ring
    roomy.close()
    program = mc.compile(model, mc.Plan(mode="infer", device_budget=least), example_inputs=(example,))
    with pytest.raises(mc.PlanError, match=r"max_new_tokens=10.*the minimum for decoding is \d+ bytes") as refused:
        program.generate(prompt, 10)
    program.close()
    stated = int(re.search(r"minimum for decoding is (\d+) bytes", str(refused.value)).group(1))
    program = mc.compile(model, mc.Plan(mode="infer", device_budget=stated), example_inputs=(example,))
    with torch.inference_mode():
        want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False)
    assert torch.equal(program.generate(prompt, 10), want)
    program.close()


@pytest.fixture(scope="module")
def qwen3_program():
    torch.manual_seed(0)
    model = build_hf("qwen3").eval()
    model.generation_config = transformers.GenerationConfig(eos_token_id=None, pad_token_id=0)
    ids = ids_of(5)
    program = mc.compile(model, ring_plan(model), example_inputs=(ids,))
    yield model, program, ids
    program.close()


def eager(model, ids, **settings) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, **settings)


def test_generate_takes_input_ids_and_max_length_as_model_generate(qwen3_program):
    model, program, ids = qwen3_program
    assert torch.equal(program.generate(ids, max_length=9), eager(model, ids, max_length=9))
    assert torch.equal(program.generate(input_ids=ids, max_new_tokens=3), eager(model, ids, max_new_tokens=3))
    with pytest.raises(ValueError, match=r"max_length \(6, passed to generate\) leaves no new token after prompts "
                                         r"of 6 tokens"):
        program.generate(ids, max_length=6)
    with pytest.raises(ValueError, match="give one of them"):
        program.generate(ids, 3, max_length=9)
    with pytest.raises(TypeError, match="prompts were given twice"):
        program.generate(ids, 3, input_ids=ids)


@pytest.mark.parametrize("setting", [dict(max_new_tokens=3), dict(max_length=10)])
def test_generate_without_max_new_tokens_takes_the_generation_config_s(qwen3_program, setting):
    model, program, ids = qwen3_program
    model.generation_config = transformers.GenerationConfig(eos_token_id=None, pad_token_id=0, **setting)
    try:
        got = program.generate(ids)
        assert torch.equal(got, eager(model, ids))
        assert got.shape[1] == setting.get("max_length", ids.shape[1] + setting.get("max_new_tokens", 0))
    finally:
        model.generation_config = transformers.GenerationConfig(eos_token_id=None, pad_token_id=0)


def test_a_built_in_model_without_max_new_tokens_is_refused_by_name():
    torch.manual_seed(0)
    model = mc.models.build("tiny-gpt").eval()
    ids = torch.randint(0, 64, (1, 4))
    program = mc.compile(model, mc.Plan(mode="infer", device_budget=model_bytes(model) // 2 + 2**18),
                         example_inputs=(ids,))
    with pytest.raises(TypeError, match="max_new_tokens is missing, and Transformer has no generation_config"):
        program.generate(ids)
    program.close()
