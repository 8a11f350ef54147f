"""What a first-time user of ring inference runs into beyond the model families: ``generate`` as
transformers does it, models in half precision, ``Plan.dtype``, checkpoints as Hugging Face users
have them (``pytorch_model.bin``, bfloat16, tensors of the wrong shape or missing), hand-written
and MoE blocks written by hand (command-line options: ``test_cli_options.py``)."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import pytest

import moesys_compile as mc
from moesys_compile.errors import PlanError
from moesys_compile.frontend.recognizers import canonicalize
from moesys_compile.generate import eager_generate
from moesys_compile.infer import model_bytes
from moesys_compile.programs.ring import RingBudgetError
from moesys_compile.runtime.storage import StorageError

pytest.importorskip("transformers")

from moesys_compile.models.hf import build_hf  # noqa: E402


def example_ids(batch: int = 2, seq: int = 8, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


def ring_plan(model: nn.Module, **fields) -> mc.Plan:
    return mc.Plan(mode="infer", device_budget=model_bytes(model) // 2 + 2**16, **fields)


# ---------------------------------------------------------------------------------------------
# decoding and dtypes
# ---------------------------------------------------------------------------------------------


def test_generate_decodes_a_half_precision_model_past_the_example_length():
    """The KV cache of ``generate`` takes the dtype of the weights the ring streams (it was the
    plan's float32, which a bfloat16 model's attention refused)."""
    torch.manual_seed(0)
    model = mc.models.build("tiny-moe").eval().to(torch.bfloat16)
    ids = example_ids(batch=3, seq=4, vocab=256)
    program = mc.compile(model, ring_plan(model), example_inputs=(ids,))
    out = program.generate(ids, max_new_tokens=10)
    assert out.shape == (3, 14)
    assert torch.equal(out, eager_generate(model, ids, 10))
    program.close()


def test_generate_of_a_hugging_face_model_equals_its_greedy_generate():
    """Batch 3, more new tokens than the example's length, a sliding window shorter than the
    sequence, and an end-of-sequence id that one row produces: token for token as transformers."""
    model = build_hf("mistral", num_hidden_layers=1, sliding_window=4).eval()
    ids = example_ids(batch=3, seq=5)
    program = mc.compile(model, ring_plan(model), example_inputs=(ids,))
    with torch.inference_mode():
        free = model.generate(ids, max_new_tokens=9, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = int(free[1, 8]), 0
    with torch.inference_mode():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=9, do_sample=False)
    assert want.shape == (3, 14) and (want[1, 9:] == 0).all()
    assert torch.equal(program.generate(ids, max_new_tokens=9), want)
    assert program.stats["decode"] == "kv_cache"
    assert program.stats["steps"] == 9 and program.stats["peak_device_bytes"] <= program.stats["budget_bytes"]
    with torch.inference_mode():                   # the forward ring is back after generate
        torch.testing.assert_close(program(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    program.close()


def test_generate_of_left_padded_prompts_equals_transformers():
    """The mask grows by one per step and gives the positions, as in ``generate`` (GPT-2's
    absolute positions: with the row's own positions instead, these tokens differ)."""
    model = build_hf("gpt2", n_layer=1).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :3] = mask[2, :5] = 0
    ids = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(1)).masked_fill(mask == 0, 0)
    plan = mc.Plan(mode="infer", device_budget=model_bytes(model) // 2 + 2**17)   # activations at seq 14 too
    program = mc.compile(model, plan, example_inputs=(ids,), example_kwargs={"attention_mask": mask})
    with torch.inference_mode():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(program.generate(ids, max_new_tokens=8, attention_mask=mask), want)
    assert program.stats["decode"] == "kv_cache"
    program.close()


def test_the_first_generate_captures_the_prefill_and_the_step_once_each(monkeypatch):
    """Lowering the prefill again, with the workspace it shares with the step and the forward
    graph, runs the pipeline over a copy of its capture: two captures, three lowerings (it
    captured three times), and the tokens of transformers."""
    from moesys_compile import api
    model = build_hf("qwen3_moe", num_hidden_layers=2).eval()
    ids = example_ids(1, 8)
    program = mc.compile(model, mc.Plan(mode="infer", device_budget=2**30), example_inputs=(ids,))
    captures, lowerings = [], []
    capture_and_annotate, lower_prepared = api._capture_and_annotate, api.lower_prepared
    monkeypatch.setattr(api, "_capture_and_annotate",
                        lambda *a, **k: captures.append(1) or capture_and_annotate(*a, **k))
    monkeypatch.setattr(api, "lower_prepared", lambda *a: lowerings.append(1) or lower_prepared(*a))
    with torch.inference_mode():
        want = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(program.generate(ids, max_new_tokens=5), want)
    assert (len(captures), len(lowerings)) == (2, 3)
    program.close()


def test_generate_without_a_mask_masks_the_pad_id_as_transformers_does():
    """``model.generate`` infers the mask from a pad id that is no end-of-sequence id."""
    model = build_hf("olmoe", num_hidden_layers=1).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 2, 1
    ids = example_ids(batch=2, seq=7)
    ids[ids <= 2] = 5
    ids[0, :3] = 1                             # left padding, no mask passed
    program = mc.compile(model, ring_plan(model), example_inputs=(ids,))
    with torch.inference_mode():
        want = model.generate(ids, max_new_tokens=5, do_sample=False)
        unmasked = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert not torch.equal(want, unmasked)     # the padding changes these tokens
    assert torch.equal(program.generate(ids, max_new_tokens=5), want)
    program.close()


def test_a_one_token_prompt_decodes_with_the_cache_and_so_do_later_calls():
    """Export fixes the step for caches of 2 positions or more here; the prefill fills the one
    cache shorter than that, and later calls still decode with the cache."""
    model = build_hf("llama", num_hidden_layers=1).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    program = mc.compile(model, ring_plan(model), example_inputs=(example_ids(),))
    for prompt in (1, 5):
        ids = example_ids(batch=1, seq=prompt)
        with torch.inference_mode():
            want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")         # no fallback to recomputing
            assert torch.equal(program.generate(ids, max_new_tokens=4), want)
        assert program.stats["decode"] == "kv_cache"
    program.close()


def test_graphs_whose_export_conditions_refuse_the_call_are_lowered_at_its_own_sizes():
    """Doge's step, lowered at the cache rounded up to 16, records ``keys.size()[3] >= 16``: the
    pair is lowered again at the call's sizes, and a first step shorter than that fills its cache
    through the prefill."""
    model = build_hf("doge", num_hidden_layers=1).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    ids = example_ids(batch=2, seq=5)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    program = mc.compile(model, ring_plan(model), example_inputs=(ids,))
    with torch.inference_mode():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(program.generate(ids, max_new_tokens=6, attention_mask=mask), want)
    assert program.stats["decode"] == "kv_cache"
    program.close()


def test_generate_of_more_prompts_than_the_budget_holds_decodes_them_in_groups():
    """Eight prompts of 32 tokens do not fit the ring at once (their KV caches alone): they are
    decoded in groups of as many as it holds (more than one, fewer than eight), each equal to
    transformers; one prompt whose cache does not fit is refused with the fix."""
    model = build_hf("qwen3_moe", num_hidden_layers=1).eval()
    model.generation_config.eos_token_id = None
    plan = mc.Plan(mode="infer", device_budget=model_bytes(model) // 2 + 2**17)
    program = mc.compile(model, plan, example_inputs=(example_ids(batch=1, seq=4),))
    ids = example_ids(batch=8, seq=32)
    with torch.inference_mode():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    assert torch.equal(program.generate(ids, max_new_tokens=2), want)
    assert 1 < program.stats["prompt_groups"] < 8
    assert program.stats["steps"] == 2 * program.stats["prompt_groups"]
    assert program.stats["peak_device_bytes"] <= program.stats["budget_bytes"]
    with pytest.raises(PlanError, match=r"generate\(max_new_tokens=2\) of 1 prompt\(s\) of 256 tokens: the prompts "
                                        r"or the last decoding step.* lower max_new_tokens, pass shorter prompts"):
        program.generate(example_ids(batch=2, seq=256), max_new_tokens=2)
    program.close()


def test_a_model_left_in_training_mode_is_put_in_eval_mode_for_inference():
    """GPT-2 built from its config is in training mode (dropout 0.1): captured so, every call
    would drop out at random."""
    model = build_hf("gpt2", n_layer=1, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1).train()
    ids = example_ids()
    with pytest.warns(UserWarning, match=r"GPT2LMHeadModel was in training mode \(.*0\.1.*\): an infer program "
                                         r"runs it in eval mode"):
        program = mc.compile(model, ring_plan(model), example_inputs=(ids,))
    assert not model.training
    with torch.inference_mode():
        torch.testing.assert_close(program(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(program(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    program.close()


def test_a_program_compiled_with_a_mask_takes_calls_without_one_as_transformers_does():
    """attention_mask=None (or no mask) means every position counts, as in transformers: the
    program passes ones shaped as the call's ids. Another input compiled as a tensor and passed
    as None is named."""
    model = build_hf("gpt2", n_layer=1).eval()
    ids = example_ids()
    padded = torch.ones_like(ids)
    padded[0, :3] = 0
    program = mc.compile(model, ring_plan(model), example_inputs=(ids,),
                         example_kwargs={"attention_mask": padded, "token_type_ids": torch.zeros_like(ids)})
    with torch.inference_mode():
        for call in (ids, ids[:1, :5]):
            types = torch.zeros_like(call)
            want = model(call, token_type_ids=types).logits
            torch.testing.assert_close(program(call, token_type_ids=types).logits, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(program(call, attention_mask=None, token_type_ids=types).logits, want,
                                       rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(program(ids, attention_mask=padded, token_type_ids=torch.zeros_like(ids)).logits,
                                   model(ids, attention_mask=padded, token_type_ids=torch.zeros_like(ids)).logits,
                                   rtol=1e-5, atol=1e-5)
        with pytest.raises(TypeError, match=r"token_type_ids is None, but it was compiled with a tensor there"):
            program(ids, token_type_ids=None)
    program.close()


def test_a_program_compiled_with_labels_sizes_each_call_by_its_own_shape():
    """A causal LM's loss pads its labels, and that op's fake kernel fixed B and S to the
    example's while propagating shapes: every call was then estimated at the example's
    activations, and a large one ran in one piece past the budget, unseen in the stats."""
    model = build_hf("llama", num_hidden_layers=1).eval()
    ids = example_ids()
    program = mc.compile(model, ring_plan(model), example_inputs=(ids,), example_kwargs={"labels": ids})
    assert program.context.annotation.symbolic
    big = example_ids(batch=64, seq=64)
    with pytest.raises(RingBudgetError, match=r"this call \(batch 64, seq 64\) needs about \d+ bytes"):
        program(big, labels=big)
    with torch.inference_mode():
        for call in (ids, ids[:1, :5]):
            got, want = program(call, labels=call), model(call, labels=call)
            torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
            assert program.stats["peak_device_bytes"] <= program.stats["budget_bytes"]
    program.close()


def test_keywords_the_model_takes_through_its_kwargs_are_refused_unless_compiled_in():
    """transformers passes output_hidden_states, return_dict and any misspelt name through
    forward's **kwargs: the program used to drop them in silence (no hidden states, a dict for
    return_dict=False). Compiled in through example_kwargs, they are taken, and required."""
    model = build_hf("llama", num_hidden_layers=1).eval()
    ids = example_ids()
    program = mc.compile(model, ring_plan(model), example_inputs=(ids,))
    for keyword in ({"output_hidden_states": True}, {"return_dict": False}, {"some_typo": 1}):
        with pytest.raises(ValueError, match=rf"keyword argument\(s\) \['{next(iter(keyword))}'\] were not given "
                                             rf"when the model was compiled.*pass them in example_kwargs"):
            program(ids, **keyword)
    program.close()
    program = mc.compile(model, ring_plan(model), example_inputs=(ids,), example_kwargs={"output_hidden_states": True})
    with torch.inference_mode():
        got, want = program(ids, output_hidden_states=True), model(ids, output_hidden_states=True)
    assert len(got.hidden_states) == len(want.hidden_states) == 2
    torch.testing.assert_close(got.hidden_states[-1], want.hidden_states[-1], rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match=r"\['output_hidden_states'\] were given when the model was compiled"):
        program(ids)
    program.close()


def test_ids_with_another_number_of_dims_than_the_example_are_named():
    """A 1-D prompt used to fail deep in the graph (IndexError, or a view of the wrong size);
    both capture kinds now name the input, the dims and the fix, for infer and train programs."""
    model = build_hf("qwen3_moe", num_hidden_layers=1).eval()
    ids = example_ids()
    for program in (mc.compile(model, ring_plan(model), example_inputs=(ids,)),
                    mc.compile(mc.models.build("tiny-moe").eval(), mc.Plan(mode="train"),
                               example_inputs=(example_ids(vocab=256),))):
        name = "input_ids" if program.context.capture == "export" else "ids_BS"
        with pytest.raises(ValueError, match=rf"{name} has 1 dims \(shape \(8,\)\), but the model was compiled "
                                             rf"with 2 \(example shape \(2, 8\)\); pass {name}\[None\]"):
            program(ids[0])
        with pytest.raises(ValueError, match=rf"{name} has 3 dims .*pass it shaped as the example"):
            program(ids[None])


@pytest.mark.parametrize("family,decode", [("qwen3_moe", "kv_cache"), ("minimax", "recompute")])
def test_generate_of_one_prompt_equals_transformers_with_or_without_a_captured_cache(family, decode):
    """One prompt (export widens its batch of 1 and keeps it symbolic); MiniMax keeps a cache
    class of its own, which cannot be filled from tensors: it recomputes, and says so."""
    model = build_hf(family, num_hidden_layers=1).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    ids = example_ids(batch=1, seq=4)
    program = mc.compile(model, ring_plan(model), example_inputs=(ids,))
    with torch.inference_mode():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.equal(program.generate(ids, max_new_tokens=6), want)
    said = [str(w.message) for w in caught if "KV cache" in str(w.message)]
    assert program.stats["decode"] == decode and program.stats["steps"] == 6
    assert bool(said) == (decode == "recompute"), said
    assert program.stats["peak_device_bytes"] <= program.stats["budget_bytes"]
    if decode == "kv_cache":       # prefill and step share one ring layout: switching keeps the slot memory
        step_slots = next(iter(program._runtimes.values())).pool.reservoir
        program.generate(ids, max_new_tokens=1)                             # the prefill graph alone
        assert next(iter(program._runtimes.values())).pool.reservoir is step_slots
    else:                          # a shorter call reuses the graph lowered for the longest step
        graph = program._decode_lowered[("recompute", False)]
        shorter = example_ids(batch=2, seq=3)
        with torch.inference_mode():
            want = model.generate(shorter, attention_mask=torch.ones_like(shorter), max_new_tokens=4, do_sample=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert torch.equal(program.generate(shorter, max_new_tokens=4), want)
        assert program._decode_lowered[("recompute", False)] is graph
    program.close()


def test_later_generate_calls_reuse_the_decoding_graphs_while_they_fit(monkeypatch):
    """The prefill and step graphs keep batch, prompt and cache length symbolic (the step's cache
    is S positions, its mask S + 1), so calls of other sizes up to those they were lowered at
    (the first call's, rounded up to powers of two) reuse them; a longer one lowers them again.
    Every call equals transformers, within the budget."""
    from moesys_compile import generate as decoding
    lowerings = []
    lower_cached = decoding.lower_cached
    monkeypatch.setattr(decoding, "lower_cached", lambda *args: lowerings.append(args[1].shape) or lower_cached(*args))
    model = build_hf("qwen3_moe", num_hidden_layers=1).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    program = mc.compile(model, ring_plan(model), example_inputs=(example_ids(batch=1, seq=4),))
    calls = [(2, 5, 6, 0), (2, 3, 5, 2), (1, 8, 2, 0), (3, 4, 4, 1), (2, 14, 12, 3)]   # batch, prompt, new, padding
    for batch, prompt, new, padding in calls:
        ids = example_ids(batch=batch, seq=prompt)
        mask = torch.ones_like(ids)
        mask[0, :padding] = 0
        with torch.inference_mode():
            want = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
        assert torch.equal(program.generate(ids, max_new_tokens=new, attention_mask=mask), want), (batch, prompt)
        assert program.stats["decode"] == "kv_cache"
        assert program.stats["peak_device_bytes"] <= program.stats["budget_bytes"]
    assert lowerings == [(2, 5), (2, 14)]        # lowered at prompt 8 and cache 16, then at 16 and 32
    _, (prefill, step) = program._decode_lowered["cached"]
    assert prefill[1].annotation.symbolic and step[1].annotation.symbolic
    program.close()


def test_an_odd_token_count_fits_the_ring_after_lowering():
    """At batch 3, seq 7 the fused experts need a little more workspace than ring_partition sized,
    and the slots had taken the rest of the budget: the sections' unused room in their slots now
    holds it (every such budget used to be refused, and raising it did not help)."""
    model = build_hf("qwen3_moe").eval()
    ids = example_ids(batch=3, seq=7)
    budget = int(model_bytes(model) * 0.6) + 2**16
    program = mc.compile(model, mc.Plan(mode="infer", device_budget=budget), example_inputs=(ids,))
    with torch.inference_mode():
        torch.testing.assert_close(program(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert program.stats["peak_device_bytes"] <= budget
    program.close()


def test_plan_dtype_cannot_recast_an_exported_graph():
    """torch.export writes float32 into the graph: a bfloat16 plan on a float32 HF model is refused
    with the fix, and the fix (casting the model) runs within bfloat16 rounding of float32."""
    model = build_hf("llama", num_hidden_layers=1).eval()
    ids = example_ids()
    with torch.inference_mode():
        want = model(ids).logits
    with pytest.raises(PlanError, match=r"dtype \('bfloat16'\) cannot be applied to LlamaForCausalLM: torch\.export "
                                        r"captured it with float32 parameters.*model\.to\(torch\.bfloat16\)"):
        mc.compile(model, ring_plan(model, dtype="bfloat16"), example_inputs=(ids,))
    model.to(torch.bfloat16)
    program = mc.compile(model, ring_plan(model, dtype="bfloat16"), example_inputs=(ids,))
    got = program(ids).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0, atol=0.05 * want.abs().max().item())


def test_plan_dtype_without_a_ring_is_refused_not_ignored():
    with pytest.raises(PlanError, match=r"dtype \('float16'\) is not applied without a device_budget.*"
                                        r"model\.to\(torch\.float16\)"):
        mc.compile(mc.models.build("tiny-moe"), mc.Plan(mode="infer", dtype="float16"),
                   example_inputs=(example_ids(vocab=256),))


def test_compiling_a_hugging_face_model_without_example_inputs_says_what_to_pass():
    from moesys_compile.errors import UntraceableModelError
    with pytest.raises(UntraceableModelError, match=r"MixtralForCausalLM\.forward needs argument\(s\) \['input_ids'\]"
                                                    r".*example_inputs=\(torch\.randint\(0, 128, \(2, 128\)\),\)"):
        mc.compile(build_hf("mixtral").eval(), mc.Plan(mode="train"))


def test_generate_past_the_budget_names_max_new_tokens():
    model = mc.models.build("tiny-moe").eval()
    ids = example_ids(1, 6, vocab=256)
    program = mc.compile(model, mc.Plan(mode="infer", device_budget=model_bytes(model) // 4), example_inputs=(ids,))
    assert program.generate(ids, 2).shape == (1, 8)
    with pytest.raises(PlanError, match=r"generate\(max_new_tokens=400\) of 1 prompt\(s\) of 6 tokens: the prompts "
                                        r"or the last decoding step, which holds its KV cache at 405 positions, do "
                                        r"not fit .*lower max_new_tokens"):
        program.generate(ids, 400)
    program.close()


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------


def _ring_from(checkpoint, tmp_path, family="llama"):
    fresh = build_hf(family, seed=2, num_hidden_layers=1).eval()
    plan = mc.Plan(mode="infer", device_budget=model_bytes(fresh), weights="disk",
                   offload_dir=str(tmp_path / "off"), weights_checkpoint=str(checkpoint))
    return mc.compile(fresh, plan, example_inputs=(example_ids(),))


@pytest.mark.parametrize("layout", ["bin", "bfloat16"])
def test_ring_reads_a_pytorch_bin_or_a_bfloat16_checkpoint(layout, tmp_path):
    source = build_hf("llama", seed=1, num_hidden_layers=1).eval()
    with torch.inference_mode():
        want = source(example_ids()).logits
    if layout == "bin":
        torch.save(source.state_dict(), tmp_path / "pytorch_model.bin")
    else:
        source.to(torch.bfloat16).save_pretrained(tmp_path)
    program = _ring_from(tmp_path, tmp_path)
    tol = 1e-5 if layout == "bin" else 0.05 * want.abs().max().item()
    torch.testing.assert_close(program(example_ids()).logits, want, rtol=0, atol=tol)
    program.close()


def test_a_tensor_of_the_wrong_shape_is_named_and_nothing_is_left_in_offload_dir(tmp_path):
    build_hf("llama", seed=1, num_hidden_layers=1, intermediate_size=48).save_pretrained(tmp_path / "ckpt")
    with pytest.raises(StorageError, match=r"holds 'model\.layers\.0\.mlp\.gate_proj\.weight' with shape \[48, 32\], "
                                           r"but LlamaForCausalLM has it as \[64, 32\].*config saved with it"):
        _ring_from(tmp_path / "ckpt", tmp_path)
    assert list((tmp_path / "off").iterdir()) == []


def test_a_missing_tensor_is_not_blamed_on_the_hub_layout(tmp_path):
    from safetensors.torch import load_file, save_file
    build_hf("llama", seed=1, num_hidden_layers=1).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.0.self_attn.o_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(StorageError) as info:
        _ring_from(tmp_path, tmp_path)
    message = str(info.value)
    assert "has no tensor 'model.layers.0.self_attn.o_proj.weight'; it does not fit LlamaForCausalLM" in message
    assert "model.save_pretrained(DIR)" in message and "hub layout" not in message
    assert list((tmp_path / "off").iterdir()) == []


def _unused_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "match no tensor" in str(w.message)]


def test_checkpoint_tensors_the_model_does_not_hold_are_named_in_a_warning(tmp_path):
    from safetensors.torch import load_file, save_file
    build_hf("llama", seed=1, num_hidden_layers=1).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].clone()
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"1 tensor\(s\) match no tensor of LlamaForCausalLM and are not used: "
                                         r"model\.layers\.1\.mlp\.up_proj\.weight; check"):
        _ring_from(tmp_path, tmp_path).close()


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_a_matching_checkpoint_warns_of_nothing_unused(family, tmp_path):
    """qwen3_moe is saved in the hub layout (one tensor per expert), read through conversions."""
    build_hf(family, seed=1, num_hidden_layers=1).save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _ring_from(tmp_path, tmp_path, family).close()
    assert _unused_warnings(record) == []


# ---------------------------------------------------------------------------------------------
# hand-written MoE blocks
# ---------------------------------------------------------------------------------------------


class StackedMoE(nn.Module):
    """Router Linear, softmax top-k, expert weights as the block's own [E, D, F] / [E, F, D]
    parameters, every expert computed densely with einsum and combined by the top-k weights."""

    def __init__(self, dim=32, ffn=48, experts=4, top_k=2):
        super().__init__()
        self.gate = nn.Linear(dim, experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(experts, dim, ffn) * 0.1)
        self.w2 = nn.Parameter(torch.randn(experts, ffn, dim) * 0.1)
        self.top_k = top_k

    def forward(self, x):
        x_TD = x.reshape(-1, x.shape[-1])
        weights_TK, ids_TK = self.gate(x_TD).softmax(-1).topk(self.top_k, dim=-1)
        combine_TE = torch.zeros(x_TD.shape[0], self.w1.shape[0]).scatter(-1, ids_TK, weights_TK)
        y_ETD = torch.einsum("etf,efd->etd", F.silu(torch.einsum("td,edf->etf", x_TD, self.w1)), self.w2)
        return torch.einsum("te,etd->td", combine_TE, y_ETD).reshape(x.shape)


class LoopMoE(nn.Module):
    """Mish experts (no canonical activation) run in a Python loop over ``torch.where``."""

    def __init__(self, dim=32, ffn=48, experts=4, top_k=2):
        super().__init__()
        self.router = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, ffn), nn.Mish(), nn.Linear(ffn, dim))
                                     for _ in range(experts))
        self.top_k = top_k

    def forward(self, x):
        x_TD = x.reshape(-1, x.shape[-1])
        weights_TK, ids_TK = self.router(x_TD).softmax(-1).topk(self.top_k, dim=-1)
        out_TD = torch.zeros_like(x_TD)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(ids_TK == e)
            out_TD = out_TD.index_add(0, token, expert(x_TD[token]) * weights_TK[token, slot, None])
        return out_TD.reshape(x.shape)


class MaskMoE(LoopMoE):
    """The same experts on the tokens a boolean mask selects, written back in place (torch.export
    captures it, with data-dependent sizes of its own)."""

    def forward(self, x):
        x_TD = x.reshape(-1, x.shape[-1])
        weights_TK, ids_TK = self.router(x_TD).softmax(-1).topk(self.top_k, dim=-1)
        out_TD = torch.zeros_like(x_TD)
        for e, expert in enumerate(self.experts):
            hit_T = (ids_TK == e).any(-1)
            out_TD[hit_T] += expert(x_TD[hit_T]) * (weights_TK * (ids_TK == e)).sum(-1)[hit_T, None]
        return out_TD.reshape(x.shape)


class Net(nn.Module):
    def __init__(self, block, layers=2):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(128, 32)
        self.blocks = nn.ModuleList(block() for _ in range(layers))
        self.head = nn.Linear(32, 128)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


@pytest.mark.parametrize("block,action", [(StackedMoE, "replaced"), (LoopMoE, "left"), (MaskMoE, "left")])
def test_hand_written_moe_blocks_run_through_the_ring(block, action):
    """The stacked block is recognised (its own 3-D weights are the experts); the loops over
    ``torch.where`` or a boolean mask stay traced code, and their data-dependent sizes are bounded
    by the tokens, so the ring can size its workspace."""
    model = Net(block).eval()
    reports = canonicalize(Net(block))
    assert [r.action for r in reports] == [action, action]
    ids = example_ids()
    with torch.inference_mode():
        want = model(ids)
    program = mc.compile(model, mc.Plan(mode="infer", device_budget=model_bytes(model) // 2 + 2**15),
                         example_inputs=(ids,))
    assert program.stats == {} and len(program.context.extras["ring"].sections) > 1
    torch.testing.assert_close(program(ids), want, rtol=1e-5, atol=1e-5)
    assert program.stats["peak_device_bytes"] <= program.stats["budget_bytes"]
    program.close()


def test_an_untraceable_unrecognised_hugging_face_block_is_named_without_a_leaf_hint():
    """NLLB-MoE: its sparse MLP is not recognised (its forward takes the padding mask), then its
    expert loop is data-dependent; export traces every module, so the error says which block was
    not recognised instead of offering leaf_modules."""
    from transformers import NllbMoeConfig, NllbMoeForConditionalGeneration
    from moesys_compile.errors import UntraceableModelError
    config = NllbMoeConfig(vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_experts=4,
                           encoder_sparse_step=2, decoder_sparse_step=2, max_position_embeddings=64)
    model = NllbMoeForConditionalGeneration(config).eval()
    ids = example_ids(vocab=64)
    with pytest.raises(UntraceableModelError) as info:
        mc.compile(model, mc.Plan(mode="infer"), example_kwargs=dict(
            input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=ids[:, :4]))
    message = str(info.value)
    assert "module 'model.encoder.layers.1.ffn.experts' uses a branch or shape that depends on tensor values" in message
    assert "Plan.leaf_modules does not apply" in message and "Plan(leaf_modules=" not in message
    assert "the MoE block 'model.encoder.layers.1.ffn' (hf.NllbMoeSparseMLP) around it was not recognised" in message


def test_leaf_modules_of_an_exported_model_are_reported_as_without_effect():
    model = build_hf("llama", num_hidden_layers=1).eval()
    with pytest.warns(UserWarning, match=r"Plan\.leaf_modules \['model\.layers\.0\.mlp'\] has no effect on "
                                         r"LlamaForCausalLM: it is captured by torch\.export"):
        mc.compile(model, mc.Plan(mode="train", leaf_modules=["model.layers.0.mlp"]), example_inputs=(example_ids(),))


def test_an_unmatched_moe_block_is_told_the_structure_recognizers_expect():
    class RenamedMoE(nn.Module):                   # experts under a name no recognizer looks at
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(32, 4, bias=False)
            self.ffns = nn.ModuleList(nn.Linear(32, 32, bias=False) for _ in range(4))

    (report,) = canonicalize(nn.Sequential(RenamedMoE()))
    assert report.action == "left" and "a router child with one [E, D] weight and a child named like " \
                                       "'experts' holding a ModuleList of Linear MLPs" in report.reason
