"""Hugging Face output switches (``use_cache``, ``return_dict``, ``output_hidden_states``, ...)
restated in a call at the value the program was compiled with: accepted as the model takes them,
as a training loop's ``model(ids, labels=ids, use_cache=False)`` does; another value is refused."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import moesys_compile as mc
from moesys_compile.infer import model_bytes

transformers = pytest.importorskip("transformers")

from moesys_compile.models.hf import build_hf  # noqa: E402

TINY = dict(hidden_size=48, vocab_size=200, num_hidden_layers=2, num_local_experts=4, intermediate_size=40)


def tiny_mixtral(**config) -> torch.nn.Module:
    return build_hf("mixtral", **TINY, **config).eval()


def ids_of(seed: int, batch: int = 2, seq: int = 8) -> torch.Tensor:
    return torch.randint(3, 200, (batch, seq), generator=torch.Generator().manual_seed(seed))


def compile_quietly(model, plan, **examples):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mc.compile(model, plan, **examples)


@pytest.fixture(scope="module")
def trained():
    """A training program of a model whose config leaves every switch at transformers' default."""
    model = tiny_mixtral().train()
    eager = copy.deepcopy(model)
    ids = ids_of(0)
    return compile_quietly(model, mc.Plan(mode="train"), example_inputs=(ids,), example_kwargs={"labels": ids}), eager


@pytest.mark.parametrize("switch", [dict(use_cache=False), dict(return_dict=True), dict(output_hidden_states=False),
                                    dict(output_attentions=False), dict(output_router_logits=False),
                                    dict(use_cache=None, return_dict=None)])
def test_a_switch_restated_at_its_compiled_value_runs_as_eager(trained, switch):
    program, eager = trained
    ids = ids_of(1)
    got, want = program(ids, labels=ids, **switch), eager(ids, labels=ids, **switch)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss)


@pytest.mark.parametrize("switch, message", [
    (dict(output_hidden_states=True), r"\['output_hidden_states'\] were not given when the model was compiled"),
    (dict(return_dict=False), r"\['return_dict'\] were not given when the model was compiled"),
    (dict(output_router_logits=True), r"'output_router_logits' was fixed to None"),
    (dict(use_cache=True), r"use_cache=True in this call")])
def test_a_switch_at_another_value_is_still_refused(trained, switch, message):
    program, _ = trained
    ids = ids_of(2)
    with pytest.raises(ValueError, match=message):
        program(ids, labels=ids, **switch)


def test_switches_the_example_gave_at_their_defaults_may_be_left_out():
    """An example with ``use_cache=False, return_dict=True`` compiles a program that calls may
    make with or without them; a switch the example set away from its default must be given."""
    model = tiny_mixtral()
    ids = ids_of(3)
    program = compile_quietly(copy.deepcopy(model), mc.Plan(mode="train"),
                              example_kwargs=dict(input_ids=ids, use_cache=False, return_dict=True,
                                                  output_hidden_states=True))
    want = model(ids, output_hidden_states=True)
    for call in [dict(), dict(use_cache=False), dict(return_dict=True, use_cache=None)]:
        got = program(input_ids=ids, output_hidden_states=True, **call)
        torch.testing.assert_close(got.logits, want.logits)
        assert len(got.hidden_states) == len(want.hidden_states)
    with pytest.raises(TypeError, match=r"\['output_hidden_states'\] were given when the model was compiled"):
        program(input_ids=ids)


def test_a_switch_the_config_turns_on_may_be_restated_on():
    """The default a left-out switch takes is the config's: with ``output_hidden_states`` on in
    the config, ``output_hidden_states=True`` restates it and False is refused."""
    model = tiny_mixtral(output_hidden_states=True)
    ids = ids_of(4)
    program = compile_quietly(copy.deepcopy(model), mc.Plan(mode="infer"), example_inputs=(ids,))
    want = model(ids)
    got = program(ids, output_hidden_states=True)
    assert len(got.hidden_states) == len(want.hidden_states) == TINY["num_hidden_layers"] + 1
    torch.testing.assert_close(got.hidden_states[-1], want.hidden_states[-1])
    with pytest.raises(ValueError, match=r"\['output_hidden_states'\] were not given"):
        program(ids, output_hidden_states=False)


def test_use_cache_restated_on_a_ring_program():
    model = tiny_mixtral()
    ids = ids_of(5)
    program = compile_quietly(copy.deepcopy(model), mc.Plan(mode="infer", device_budget=model_bytes(model) // 2),
                              example_inputs=(ids,))
    with torch.no_grad():
        torch.testing.assert_close(program(ids, use_cache=False, return_dict=True).logits,
                                   model(ids, use_cache=False).logits)


def test_use_cache_that_would_change_how_packed_position_ids_read_is_refused():
    """transformers reads position ids restarting mid-row as packed sequences only without a
    cache: with such ids, a call whose ``use_cache`` resolves otherwise than the example's is
    refused, naming both and the fix, rather than computed with the example's reading; with ids
    that count up, both readings agree and it runs."""
    model = tiny_mixtral(use_cache=True)
    ids = ids_of(6)
    counting, packed = torch.arange(8).repeat(2, 1), torch.cat([torch.arange(3), torch.arange(5)]).repeat(2, 1)
    program = compile_quietly(copy.deepcopy(model), mc.Plan(mode="infer"),
                              example_kwargs=dict(input_ids=ids, position_ids=counting))
    with pytest.raises(ValueError, match=r"use_cache resolves to False in this call but to True in the example, and "
                                         r"its position_ids restart mid-row.*leave use_cache out"):
        program(input_ids=ids, position_ids=packed, use_cache=False)
    torch.testing.assert_close(program(input_ids=ids, position_ids=counting, use_cache=False).logits,
                               model(input_ids=ids, position_ids=counting, use_cache=False).logits)
    torch.testing.assert_close(program(input_ids=ids, position_ids=packed).logits,
                               model(input_ids=ids, position_ids=packed).logits)
