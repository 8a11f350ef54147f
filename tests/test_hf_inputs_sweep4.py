"""Hugging Face models called as a sweep found them: packed-sequence position ids without a
padding mask (read as eager's default call reads them), boolean flags called with another value
than the compiled one, ``use_cache=True``, and ``generate`` with right-padded prompts."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import moesys_compile as mc
from moesys_compile.infer import model_bytes
from moesys_compile.programs.binding import CapturedSizeError

transformers = pytest.importorskip("transformers")

from moesys_compile.models.hf import build_hf  # noqa: E402

TINY = {
    "mixtral": dict(hidden_size=48, vocab_size=200, num_hidden_layers=2, num_local_experts=6, intermediate_size=40),
    "qwen3_moe": dict(hidden_size=48, vocab_size=200, num_hidden_layers=2, num_experts=6, moe_intermediate_size=24),
}


def tiny(family: str, **config) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_hf(family, **TINY[family], **config).eval()


def ids_of(seed: int, batch: int = 2, seq: int = 9) -> torch.Tensor:
    return torch.randint(3, 200, (batch, seq), generator=torch.Generator().manual_seed(seed))


def ring_plan(model) -> mc.Plan:
    return mc.Plan(mode="infer", device_budget=model_bytes(model) // 2 + 2**17)


def compile_quietly(model, plan, **examples):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mc.compile(model, plan, **examples)


PACKED = torch.cat([torch.arange(4), torch.arange(5)]).unsqueeze(0).repeat(2, 1)


def grads_of(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_cache", [True, False])
def test_packed_position_ids_train_as_eager_default_call(use_cache):
    """Position ids restarting mid-row, no mask: eager with ``config.use_cache`` on builds a cache
    and attends causally over the whole row; with it off, transformers reads packed sequences
    (a block-diagonal mask). The training program computes the same loss and gradients."""
    model = tiny("mixtral", use_cache=use_cache)
    model.train()
    eager = copy.deepcopy(model)
    ids = ids_of(0)
    program = compile_quietly(model, mc.Plan(mode="train"),
                              example_kwargs=dict(input_ids=ids, position_ids=PACKED, labels=ids))
    got = program(input_ids=ids, position_ids=PACKED, labels=ids)
    want = eager(input_ids=ids, position_ids=PACKED, labels=ids)
    got.loss.backward()
    want.loss.backward()
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss)
    got_grads, want_grads = grads_of(model), grads_of(eager)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], msg=name)


@pytest.mark.parametrize("use_cache", [True, False])
def test_packed_position_ids_infer_on_a_ring_as_eager_default_call(use_cache):
    model = tiny("qwen3_moe", use_cache=use_cache)
    eager = copy.deepcopy(model)
    ids = ids_of(1)
    program = compile_quietly(model, ring_plan(model), example_kwargs=dict(input_ids=ids, position_ids=PACKED))
    with torch.no_grad():
        torch.testing.assert_close(program(input_ids=ids, position_ids=PACKED).logits,
                                   eager(input_ids=ids, position_ids=PACKED).logits)


@pytest.fixture(scope="module")
def mixtral():
    return tiny("mixtral")


@pytest.mark.parametrize("flag, compiled", [("output_hidden_states", True), ("return_dict", False),
                                            ("output_attentions", True)])
def test_a_flag_called_with_another_value_than_compiled_is_refused_by_name(mixtral, flag, compiled):
    """A bool the example gave is a constant of the exported graph: another value is refused
    naming the argument, its compiled value and the fix, not blamed on the input sizes."""
    ids = ids_of(2, seq=8)
    program = compile_quietly(copy.deepcopy(mixtral), mc.Plan(mode="train"),
                              example_kwargs={"input_ids": ids, flag: compiled})
    with pytest.raises(ValueError, match=rf"{flag} is {not compiled}, but the program was compiled with "
                                         rf"{flag}={compiled}.*pass {flag}={compiled}, or compile again") as caught:
        program(input_ids=ids, **{flag: not compiled})
    assert not isinstance(caught.value, CapturedSizeError)
    program(input_ids=ids, **{flag: compiled})


def test_use_cache_true_is_refused_at_call_and_in_the_example(mixtral):
    """Programs are captured without a KV cache: ``use_cache=True`` is refused as such, pointing
    at ``program.generate``, whether a call or the example gives it."""
    ids = ids_of(3, seq=8)
    program = compile_quietly(copy.deepcopy(mixtral), mc.Plan(mode="train"), example_inputs=(ids,))
    with pytest.raises(ValueError, match=r"use_cache=True in this call.*without a KV cache.*program\.generate"):
        program(ids, use_cache=True)
    with pytest.raises(ValueError, match=r"use_cache=True in example_kwargs.*without a KV cache.*program\.generate"):
        compile_quietly(copy.deepcopy(mixtral), mc.Plan(mode="train"),
                        example_kwargs=dict(input_ids=ids, use_cache=True))
    compiled_off = compile_quietly(copy.deepcopy(mixtral), mc.Plan(mode="train"),
                                   example_kwargs=dict(input_ids=ids, use_cache=False))
    with pytest.raises(ValueError, match=r"use_cache=True in this call"):
        compiled_off(input_ids=ids, use_cache=True)
    compiled_off(input_ids=ids, use_cache=False)


def test_generation_positions_follow_transformers_generate():
    """The prompt's positions come from its mask (0 at pads); later tokens continue from the
    prompt's last position: a right-padded prompt's from its last pad's, a left-padded one's
    from its count."""
    from moesys_compile.hf_decode import generation_positions
    right = torch.tensor([[1, 1, 1, 0, 0, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    assert generation_positions(right, prompt_length=5).tolist() == [[0, 1, 2, 0, 0, 1, 2]]
    assert generation_positions(left, prompt_length=5).tolist() == [[0, 0, 0, 1, 2, 3, 4]]
    assert generation_positions(left).tolist() == [[0, 0, 0, 1, 2, 3, 4]]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_generate_with_padded_prompts_gives_model_generate_tokens(padding_side):
    """``program.generate`` with a padded prompt among others decodes the tokens
    ``model.generate`` does (right padding: positions carried on from the prompt's last one)."""
    model = tiny("qwen3_moe")
    eager = copy.deepcopy(model)
    ids = ids_of(0, batch=3, seq=7)
    mask = torch.ones_like(ids)
    if padding_side == "right":
        mask[1, 4:] = 0
    else:
        mask[1, :3] = 0
    ids = ids.masked_fill(mask == 0, 0)
    program = compile_quietly(model, ring_plan(model), example_inputs=(ids,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = program.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0)
        want = eager.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, do_sample=False)
    assert got.tolist() == want.tolist()
