"""Hugging Face families as a sweep under transformers 5.24 found them: ``program.generate`` of a
model whose cache is not one key and one value tensor per layer says which layers keep what (it
named an ``IndexError`` of the cache's layer list, or the model's own cache error, before) and
still decodes the tokens of transformers, while models whose layers keep keys and values only
(sliding windows included) are not refused."""

from __future__ import annotations

import inspect

import pytest
import torch

import moesys_compile as mc
from moesys_compile.infer import model_bytes

transformers = pytest.importorskip("transformers")

from moesys_compile.hf_decode import NotCacheable, refuse_cache_layers  # noqa: E402
from moesys_compile.models.hf import build_hf  # noqa: E402

needs_cache_config = pytest.mark.skipif(
    "config" not in inspect.signature(transformers.DynamicCache.__init__).parameters,
    reason="this transformers' DynamicCache takes no config: the layers are not checked ahead")


def prompts(batch: int = 2, seq: int = 6) -> torch.Tensor:
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(0))


@needs_cache_config
@pytest.mark.parametrize("family,overrides,says", [
    ("jamba", dict(attn_layer_period=2, attn_layer_offset=1),
     r"layer\(s\) \[0\] \(LinearAttentionLayer\) keep convolution and recurrent states, not only one key and one "
     r"value tensor"),
    ("granitemoehybrid", {}, r"layer\(s\) \[0\] \(LinearAttentionLayer\) keep convolution and recurrent states"),
    ("inkling", {}, r"layer\(s\) \[0, 1\] \(LinearAttentionAndSlidingWindowAttentionLayer\) keep convolution"),
    ("deepseek_v32", {}, r"layer\(s\) \[0, 1\] \(DynamicIndexedLayer\) keep indexer keys, not only one key"),
    ("nemotron_h", {}, r"layer\(s\) \[0\] \(DummyLayer\) keep a cache of another kind"),
])
def test_a_cache_of_other_layers_is_refused_by_layer(family, overrides, says):
    with pytest.raises(NotCacheable, match=says):
        refuse_cache_layers(build_hf(family, **overrides))


@needs_cache_config
@pytest.mark.parametrize("family,overrides", [("gemma3", dict(sliding_window=4)), ("llama", {})])
def test_key_value_layers_with_or_without_a_window_are_not_refused(family, overrides):
    refuse_cache_layers(build_hf(family, **overrides))


@needs_cache_config
def test_generate_of_a_mamba_hybrid_names_its_state_layers_and_decodes_as_transformers():
    """Jamba with a Mamba layer first: generate warns that layer 0 keeps recurrent states (not an
    IndexError from inside the model) and recomputes, giving the tokens of model.generate."""
    torch.set_num_threads(1)
    model = build_hf("jamba", attn_layer_period=2, attn_layer_offset=1).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    ids = prompts()
    plan = mc.Plan(mode="infer", device="cpu", device_budget=model_bytes(model) // 2 + 16 * 2**20)
    program = mc.compile(model, plan, example_inputs=(ids,))
    with torch.inference_mode():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    says = r"JambaForCausalLM cannot decode .* \(NotCacheable: its cache layer\(s\) \[0\] \(LinearAttentionLayer\)"
    with pytest.warns(UserWarning, match=says) as seen:
        got = program.generate(ids, 2)
    assert not any("IndexError" in str(w.message) for w in seen)
    assert torch.equal(got, want)
    assert program.stats["decode"] == "recompute"
    program.close()
