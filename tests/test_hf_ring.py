"""Ring inference of Hugging Face models at half the model size: the RingProgram's output (the
model's own ModelOutput) equals eager, and the device peak stays under the budget."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import moesys_compile as mc

sys.path.insert(0, str(Path(__file__).parent))
from blocks import randomize_expert_biases  # noqa: E402

pytest.importorskip("transformers")

from moesys_compile.infer import model_bytes  # noqa: E402
from moesys_compile.ir import is_op  # noqa: E402
from moesys_compile.models.hf import build_hf  # noqa: E402
from moesys_compile.programs import ring  # noqa: E402


GPT_OSS_4_LAYERS = {"num_hidden_layers": 4, "layer_types": ["full_attention"] * 4}


@pytest.mark.parametrize("family,overrides", [("mixtral", {}), ("qwen2_moe", {}), ("olmoe", {}), ("deepseek_v3", {}),
                                              ("gpt_oss", GPT_OSS_4_LAYERS), ("llama", {}), ("llama4", {}),
                                              ("gpt2", {"n_layer": 4})])   # 2 layers: slots+workspace > 1/2
def test_ring_at_half_the_model_equals_eager(family, overrides):
    model = randomize_expert_biases(build_hf(family, **overrides).eval())
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = {shape: model(ids[:shape[0], :shape[1]]) for shape in [(2, 8), (1, 5)]}
    budget = model_bytes(model) // 2
    program = mc.compile(model, mc.Plan(mode="infer", device_budget=budget, weights="host"), example_inputs=(ids,))
    assert isinstance(program, ring.RingProgram)
    for shape, expected in want.items():
        got = program(ids[:shape[0], :shape[1]])
        assert type(got) is type(expected)
        torch.testing.assert_close(got.logits, expected.logits, rtol=1e-4, atol=1e-4)
    stats = program.stats
    assert stats["peak_device_bytes"] <= stats["budget_bytes"] == budget
    assert stats["sections"] > stats["slots"]            # the weights really rotate through the ring
    if family == "gpt_oss":      # its biased, transposed experts are split into expert groups
        assert any(is_op(n, "expert_group_mlp", namespace="moesys_ring") for n in program.graph_module.graph.nodes)


@pytest.mark.parametrize("family", ["mixtral", "llama"])
def test_a_ring_compiled_from_one_prompt_runs_other_batches_and_lengths(family):
    """Capture keeps batch and sequence symbolic from a (1, 4) example; calls larger than its
    workspace run in micro-batches or on a ring lowered for them, within the same budget."""
    model = build_hf(family).eval()
    one = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(0))
    budget = model_bytes(model) // 2
    program = mc.compile(model, mc.Plan(mode="infer", device_budget=budget, weights="host"), example_inputs=(one,))
    assert program.context.annotation.symbolic
    past_the_example = []
    for shape in [(3, 6), (1, 4), (2, 7)]:
        ids = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.inference_mode():
            want = model(ids)
        torch.testing.assert_close(program(ids).logits, want.logits, rtol=1e-4, atol=1e-4)
        assert program.stats["peak_device_bytes"] <= budget
        past_the_example.append(program.stats["compiled_for"] != (1, 4) or program.stats["micro_batches"] > 1)
    assert past_the_example[0]          # (3, 6) does not fit the workspace sized at (1, 4)


def test_a_size_export_fixed_is_lowered_again_for_the_call():
    """Doge's router views its logits as (2, B*S, -1): export fixes the example's batch of 1, or
    guards an even one (checked before the ring runs); a call at another batch gets the ring
    lowered again at its own size instead of a refusal."""
    model = build_hf("doge", num_hidden_layers=2).eval()
    one = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(0))
    budget = model_bytes(model) * 3 // 4                   # streams the weights, with room for batch 6
    program = mc.compile(model, mc.Plan(mode="infer", device_budget=budget, weights="host"), example_inputs=(one,))
    for shape in [(1, 4), (3, 4), (6, 4), (1, 4)]:
        ids = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(shape[0]))
        with torch.inference_mode():
            want = model(ids)
        torch.testing.assert_close(program(ids).logits, want.logits, rtol=1e-4, atol=1e-4)
        assert program.stats["compiled_for"] == shape
