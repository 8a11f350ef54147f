"""More Hugging Face transformers families taken as they are (tiny random configs, nothing
downloaded). Every MoE family is either canonicalized with its exact routing rule or left as
traced code with the reason, and canonicalizing does not change the logits; single-device compile
equals eager (logits within 1e-4, fp32) for JetMoE, a few other families and a dense one.
``MOESYS_HF_ALL_FAMILIES=1`` compiles every family (about 3 s of CPU each). The families of
tests/test_hf_models.py (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, PhiMoE, gpt-oss, Llama, Qwen2,
GPT-2) are not repeated here."""

from __future__ import annotations

import os

import pytest
import sympy
import torch

import moesys_compile as mc

transformers = pytest.importorskip("transformers")

from moesys_compile.frontend.recognizers import CanonicalMoA, CanonicalMoEBlock  # noqa: E402
from moesys_compile.ir import is_op, moesys_meta  # noqa: E402
from moesys_compile.models.hf import DENSE_FAMILIES, MOE_FAMILIES, build_hf  # noqa: E402

# family -> {(block kind, action, routing rule)} that inspect reports; "left" blocks run as traced code
EXPECTED = {
    "jetmoe": {("hf.JetMoeMoE", "replaced", "softmax-top2-renorm"),
               ("hf.JetMoeMoA", "replaced", "softmax-top2-renorm")},
    "dbrx": {("hf.DbrxFFN", "replaced", "softmax-top2-renorm")},
    "granitemoe": {("hf.GraniteMoeMoE", "replaced", "softmax-top2-renorm")},
    "granitemoeshared": {("hf.GraniteMoeSharedMoE", "replaced", "softmax-top2-renorm")},
    "granitemoehybrid": {("hf.GraniteMoeHybridMoE", "replaced", "softmax-top2-renorm")},
    "qwen3_next": {("hf.Qwen3NextSparseMoeBlock", "replaced", "softmax-top2-renorm")},
    "qwen3_5_moe": {("hf.Qwen3_5MoeSparseMoeBlock", "replaced", "softmax-top2-renorm")},
    "glm4_moe": {("hf.Glm4MoeMoE", "replaced", "sigmoid-top2-bias-renorm")},
    "glm4_moe_lite": {("hf.Glm4MoeLiteMoE", "replaced", "sigmoid-top2-bias-renorm-x1.8")},
    "dots1": {("hf.Dots1MoE", "replaced", "sigmoid-top2-bias")},
    "deepseek_v2": {("hf.DeepseekV2Moe", "replaced", "softmax-top2")},
    "ernie4_5_moe": {("hf.Ernie4_5_MoeSparseMoeBlock", "replaced", "own router 'gate' (traced)")},
    "hunyuan_v1_moe": {("hf.HunYuanMoEV1Moe", "replaced", "softmax-top2-renorm")},
    "minimax": {("hf.MiniMaxSparseMoeBlock", "replaced", "softmax-top2-renorm")},
    "minimax_m2": {("hf.MiniMaxM2SparseMoeBlock", "replaced", "sigmoid-top2-bias-renorm")},
    "afmoe": {("hf.AfmoeSparseMoeBlock", "replaced", "sigmoid-top2-bias-renorm")},
    "cohere2_moe": {("hf.Cohere2MoeSparseMoeBlock", "replaced", "softmax-top2-renorm")},
    "exaone_moe": {("hf.ExaoneMoeSparseMoEBlock", "replaced", "sigmoid-top2-bias-renorm-x2.5")},
    "solar_open": {("hf.SolarOpenMoE", "replaced", "sigmoid-top2-bias-renorm")},
    "mimo_v2_flash": {("hf.MiMoV2FlashMoE", "replaced", "sigmoid-top2-bias-renorm")},
    "llama4": {("hf.Llama4TextMoe", "left", None)},
    "lfm2_moe": {("hf.Lfm2MoeSparseMoeBlock", "replaced", "sigmoid-top2-bias-renorm")},
    "flex_olmo": {("hf.FlexOlmoSparseMoeBlock", "replaced", "softmax-top2")},
    "laguna": {("hf.LagunaSparseMoeBlock", "replaced", "sigmoid-top2-bias-renorm")},
    "granitemoe_swa": {("hf.GraniteMoeSWAMoE", "replaced", "softmax-top2-renorm")},
    "hy_v3": {("hf.HYV3MoE", "replaced", "own router 'gate' (traced)")},
}
# one layer, and that layer sparse (presets put a dense layer first where the family does);
# Qwen3-Next/3.5 use a full-attention layer: their linear-attention layers take minutes to export
ONE_LAYER = {
    "glm4_moe": dict(first_k_dense_replace=0), "dots1": dict(first_k_dense_replace=0),
    "deepseek_v2": dict(first_k_dense_replace=0), "exaone_moe": dict(first_k_dense_replace=0),
    "glm4_moe_lite": dict(mlp_layer_types=["sparse"]), "mimo_v2_flash": dict(mlp_layer_types=["sparse"]),
    "afmoe": dict(num_dense_layers=0), "ernie4_5_moe": dict(moe_layer_start_index=0),
    "qwen3_next": dict(layer_types=["full_attention"]), "qwen3_5_moe": dict(layer_types=["full_attention"]),
    "granitemoehybrid": dict(num_hidden_layers=2, layer_types=["mamba", "attention"]),
    "lfm2_moe": dict(num_dense_layers=0, layer_types=["full_attention"]),
    "laguna": dict(mlp_layer_types=["sparse"]), "hy_v3": dict(mlp_layer_types=["sparse"]),
}
# what the report of a left block must say
LEFT_BECAUSE = {"llama4": ("returns logits but no [tokens, k] ids", "the block returns a tuple")}
COVERED_ELSEWHERE = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "phimoe", "gpt_oss",
                     "llama", "qwen2", "gpt2"}
# compiled by default: a router taking a block tensor (MiniMax-M2), a left block (Llama 4), a dense
# family; JetMoE (attention experts, split experts, output bias, logits-only router) is compiled in
# train mode below. The other recognition paths are compiled in tests/test_recognizers.py.
COMPILED = ["minimax_m2", "llama4", "phi3"]
if os.environ.get("MOESYS_HF_ALL_FAMILIES") == "1":
    COMPILED = sorted(EXPECTED) + [f for f in DENSE_FAMILIES if f not in COVERED_ELSEWHERE]


def ids(batch: int = 2, seq: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def tiny(family: str):
    return build_hf(family, **{"num_hidden_layers": 1, **ONE_LAYER.get(family, {})}).eval()


def block_facts(reports) -> set:
    return {(r.kind, r.action, r.details.get("router")) for r in reports}


def test_every_moe_family_has_an_expectation():
    assert set(MOE_FAMILIES) - COVERED_ELSEWHERE == set(EXPECTED)


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_moe_family_is_canonicalized_or_left_with_the_reason(family):
    model = tiny(family)
    want = model(ids()).logits
    reports = mc.frontend.canonicalize(model)
    assert block_facts(reports) == EXPECTED[family]
    for report in reports:
        assert report.reason and (report.action == "replaced") == (report.details.get("router") is not None)
        assert all(why in report.reason for why in LEFT_BECAUSE.get(family, ()))
    torch.testing.assert_close(model(ids()).logits, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", COMPILED)
def test_family_compiles_to_eager(family):
    model = tiny(family)
    examples = (ids(), ids(3, 5, seed=1))                  # the example shape and another one
    want = [model(x).logits for x in examples]
    program = mc.compile(model, mc.Plan(), example_inputs=(ids(),))
    for x, logits in zip(examples, want):
        torch.testing.assert_close(program(x).logits, logits, rtol=1e-4, atol=1e-4)
    reports = program.context.blocks
    assert block_facts(reports) == EXPECTED.get(family, set())
    replaced = [m for m in model.modules() if isinstance(m, (CanonicalMoEBlock, CanonicalMoA))]
    assert len(replaced) == sum(r.action == "replaced" for r in reports)


def test_jetmoe_blocks_are_found_canonical_the_second_time():
    model = tiny("jetmoe")
    want = model(ids()).logits
    mc.frontend.canonicalize(model)
    reports = mc.frontend.canonicalize(model)
    assert {(r.kind, r.action) for r in reports} == {("hf.JetMoeMoE", "canonical"), ("hf.JetMoeMoA", "canonical")}
    torch.testing.assert_close(model(ids()).logits, want, rtol=1e-5, atol=1e-6)


def test_jetmoe_trains_like_eager_with_its_own_aux_loss():
    """JetMoE in train mode with output_router_logits: the program returns HF's loss (CE + its
    aux loss over the MoA and MoE routers) and every gradient equals eager, including the expert
    projections of the attention experts (moesys::expert_linear's backward)."""
    import copy

    model = build_hf("jetmoe", num_hidden_layers=1, output_router_logits=True).train()
    with torch.no_grad():                         # zero-initialised output biases would hide a missing bias
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    eager = copy.deepcopy(model)
    example = ids(seed=2)
    program = mc.compile(model, mc.Plan(mode="train"), example_inputs=(ids(),), example_kwargs={"labels": ids()})
    got, want = program(example, labels=example), eager(example, labels=example)
    assert len(got.router_logits) == len(want.router_logits) == 3
    projections = [n for n in program.graph_module.graph.nodes if is_op(n, "expert_linear")]
    assert projections, "the attention experts' projections are moesys::expert_linear nodes"
    for node in projections:                      # 2 * rows * out * in, symbolic in B and S
        rows_out, (_, _, inner) = node.meta["val"].shape, node.args[2].meta["val"].shape
        want_flops = 2 * program.context.annotation.expr(rows_out[0]) * rows_out[1] * inner
        assert sympy.simplify(moesys_meta(node)["cost"].flops - want_flops) == 0, node.name
    for name in ("loss", "aux_loss", "logits"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-5)
    got.loss.backward()
    want.loss.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_family_that_cannot_be_captured_fails_naming_the_module_and_line():
    """LongCat-Flash routes to zero-computation (identity) experts, which the canonical form does
    not express, and its own expert loop iterates over the experts that got tokens (a data-
    dependent length): export fails there, and the error says so, not fx's unrelated failure."""
    model = build_hf("longcat_flash", vocab_size=128, hidden_size=32, num_layers=1, num_attention_heads=4,
                     num_key_value_heads=4, ffn_hidden_size=64, expert_ffn_hidden_size=16, n_routed_experts=4,
                     zero_expert_num=2, moe_topk=2, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                     qk_nope_head_dim=8, head_dim=8, v_head_dim=8, max_position_embeddings=128).eval()
    with pytest.raises(mc.UntraceableModelError) as info:
        mc.compile(model, mc.Plan(), example_inputs=(ids(),))
    message = str(info.value)
    assert "module 'model.layers.0.mlp.experts'" in message and "modeling_longcat_flash.py" in message
    assert "for expert_idx_tensor in expert_hit" in message and "fx fallback also failed" in message
