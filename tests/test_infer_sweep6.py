"""``program.generate`` called as ``model.generate`` is: a streamer, the other arguments of
``model.generate`` (refused by name), and prompts or masks of the wrong shape or dtype (refused
before any lowering, not by an error from inside the model)."""

from __future__ import annotations

import re

import pytest
import torch

import moesys_compile as mc
from moesys_compile.generate import eager_generate
from moesys_compile.infer import model_bytes

pytest.importorskip("transformers")

from moesys_compile.models.hf import build_hf  # noqa: E402


def ids_of(seed: int, batch: int = 2, seq: int = 6) -> torch.Tensor:
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def ring_plan(model) -> mc.Plan:
    return mc.Plan(mode="infer", device_budget=model_bytes(model) // 2 + 2**18)


class RecordingStreamer:
    """A transformers ``BaseStreamer`` that keeps what it is given."""

    def __init__(self):
        self.puts, self.ends = [], 0

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.clone())

    def end(self) -> None:
        self.ends += 1


@pytest.fixture(scope="module")
def qwen3():
    torch.manual_seed(0)
    model = build_hf("qwen3_moe").eval()
    program = mc.compile(model, ring_plan(model), example_inputs=(ids_of(0),))
    yield model, program
    program.close()


def test_a_streamer_is_given_what_model_generate_gives_it(qwen3):
    """The prompts, then each step's tokens (the pad id after a row's end-of-sequence id), then
    one ``end()``: the same calls, in the same order, as ``model.generate`` makes."""
    model, program = qwen3
    ids = ids_of(1)
    with torch.inference_mode():
        free = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    settings = dict(max_new_tokens=6, eos_token_id=int(free[0, 8]), pad_token_id=0)
    theirs, ours = RecordingStreamer(), RecordingStreamer()
    with torch.inference_mode():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, streamer=theirs, **settings)
    assert torch.equal(program.generate(ids, streamer=ours, **settings), want)
    assert (want[0, 9:] == 0).all() and len(theirs.puts) == 7 and theirs.ends == 1
    assert len(ours.puts) == len(theirs.puts) and ours.ends == 1
    assert all(torch.equal(a, b) for a, b in zip(ours.puts, theirs.puts))


def test_a_built_in_model_streams_its_tokens_too():
    torch.manual_seed(0)
    model = mc.models.build("tiny-moe").eval()
    ids = ids_of(2, seq=4)
    program = mc.compile(model, ring_plan(model), example_inputs=(ids,))
    streamer = RecordingStreamer()
    out = program.generate(ids, 5, streamer=streamer)
    assert torch.equal(out, eager_generate(model, ids, 5))
    assert torch.equal(streamer.puts[0], ids) and streamer.ends == 1
    assert torch.equal(torch.stack(streamer.puts[1:], dim=1), out[:, 4:])
    program.close()


@pytest.mark.parametrize("argument", ["logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn",
                                      "inputs_embeds"])
def test_arguments_of_model_generate_it_does_not_take_are_refused_by_name(qwen3, argument):
    """Not 'not a generation setting', as if misspelt; None, as leaving them out, is taken."""
    _, program = qwen3
    with pytest.raises(ValueError, match=f"generate\\({argument}=...\\): program.generate does not take this "
                                         f"argument of model.generate"):
        program.generate(ids_of(3), 2, **{argument: [object()]})
    assert program.generate(ids_of(3), 2, **{argument: None}).shape == (2, 8)


def test_inputs_embeds_alone_is_told_that_generate_decodes_from_token_ids(qwen3):
    _, program = qwen3
    with pytest.raises(TypeError, match="no prompts given.*not inputs_embeds"):
        program.generate(inputs_embeds=torch.zeros(1, 3, 32), max_new_tokens=2)


@pytest.mark.parametrize("shape", [(2, 5), (3, 6), (2, 1, 6)])
def test_a_mask_of_another_shape_than_the_prompts_is_refused_by_name(qwen3, shape):
    """It failed inside the model ('upper bound and lower bound inconsistent with step sign', or a
    trace error of the attention) after lowering graphs for it."""
    _, program = qwen3
    with pytest.raises(ValueError, match=re.escape(f"attention_mask=...): the mask is {tuple(shape)} but the prompts "
                                                   f"are (2, 6)")):
        program.generate(ids_of(4), 2, attention_mask=torch.ones(shape, dtype=torch.long))


def test_prompts_that_are_no_integer_token_ids_are_refused_by_name(qwen3):
    _, program = qwen3
    with pytest.raises(TypeError, match="ids must be integer token ids \\(got torch.float32\\); pass ids.long"):
        program.generate(ids_of(5).float(), 2)
    with pytest.raises(ValueError, match="got a list\\); pass torch.tensor"):
        program.generate([[5, 6, 7]], 2)


def test_a_streamed_batch_the_budget_cannot_hold_at_once_is_refused_with_the_reason():
    """Without a streamer such a batch is decoded in groups (``test_new_user_infer.py``); with one
    it would stream group by group, so it is refused, saying why and what to do."""
    model = build_hf("qwen3_moe", num_hidden_layers=1).eval()
    plan = mc.Plan(mode="infer", device_budget=model_bytes(model) // 2 + 2**17)
    program = mc.compile(model, plan, example_inputs=(ids_of(6, batch=1, seq=4),))
    ids, streamer = ids_of(7, batch=8, seq=32), RecordingStreamer()
    with pytest.raises(mc.MoesysError, match="a streamer is given the tokens of all 8 prompts at each step, so a "
                                             "batch with a streamer is decoded at once.*pass fewer prompts per call"):
        program.generate(ids, 2, streamer=streamer, eos_token_id=None)
    assert streamer.ends == 0
    program.close()


def test_a_decoding_mode_of_the_generation_config_passed_is_blamed_on_it(qwen3):
    """Not on the model's generation_config, which does not set it."""
    from transformers import GenerationConfig
    _, program = qwen3
    with pytest.raises(ValueError, match="num_beams \\(in the generation_config passed to generate\\) asks for beam "
                                         "search"):
        program.generate(ids_of(9), generation_config=GenerationConfig(num_beams=2, max_new_tokens=2))
    with pytest.raises(TypeError, match="a transformers GenerationConfig is expected \\(got a dict\\)"):
        program.generate(ids_of(9), generation_config={"max_new_tokens": 2})


@pytest.mark.parametrize("kind", ["0-d tensor", "numpy integer"])
def test_an_end_of_sequence_id_given_as_a_scalar_tensor_or_numpy_integer_stops_as_in_transformers(qwen3, kind):
    """``eos_token_id=out[0, 8]`` (a 0-d tensor) or a NumPy integer: 'iteration over a 0-d tensor'
    or "'numpy.int64' object is not iterable" before; ``model.generate`` takes both."""
    np = pytest.importorskip("numpy")
    model, program = qwen3
    ids = ids_of(10)
    with torch.inference_mode():
        free = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    eos = free[0, 8] if kind == "0-d tensor" else np.int64(free[0, 8])
    with torch.inference_mode():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              eos_token_id=eos, pad_token_id=0)
    assert (want[0, 9:] == 0).all()
    assert torch.equal(program.generate(ids, 6, eos_token_id=eos, pad_token_id=0), want)
