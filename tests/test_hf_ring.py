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
                                              ("gpt_oss", GPT_OSS_4_LAYERS), ("llama", {}),
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
