"""Hugging Face transformers models compiled as they are (tiny random configs, nothing downloaded):
single-device compile equals eager (logits within 1e-4, fp32), the model's own output type comes
back, MoE blocks are canonicalized with the family's exact routing rule, names are unchanged."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

import moesys_compile as mc

sys.path.insert(0, str(Path(__file__).parent))
from blocks import randomize_expert_biases  # noqa: E402

transformers = pytest.importorskip("transformers")

from moesys_compile.frontend.recognizers import CanonicalMoEBlock  # noqa: E402
from moesys_compile.ir import is_op  # noqa: E402
from moesys_compile.models.hf import DENSE_FAMILIES, FAMILIES, MOE_FAMILIES, build_hf  # noqa: E402
from moesys_compile.models.spec import load_model  # noqa: E402

# family -> (routing rule inspect must report, shared expert description or None)
EXPECTED_ROUTER = {
    "mixtral": ("softmax-top2-renorm", None),
    "qwen2_moe": ("softmax-top2", "shared_expert*sigmoid(shared_expert_gate)"),
    "olmoe": ("softmax-top2", None),
    "deepseek_v3": ("sigmoid-top2-groups 1/2-bias-renorm-x2.5", "shared_experts"),
}


def ids(batch: int = 2, seq: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=("mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "llama", "gpt2"))
def compiled(request):
    """(family, eager copy, model, program): compiled once per family for the tests below."""
    family = request.param
    model = build_hf(family).eval()
    eager = copy.deepcopy(model)
    names = list(model.state_dict())
    program = mc.compile(model, mc.Plan(mode="train"), example_inputs=(ids(),))
    assert list(model.state_dict()) == names
    return family, eager, model, program


def test_compiled_equals_eager_with_the_models_output_type(compiled):
    family, eager, model, program = compiled
    for example in (ids(), ids(3, 5, seed=1)):              # the example shape and another one
        want = eager(example)
        got = program(example)
        assert type(got) is type(want)
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
    assert model.config.use_cache is True                    # turned off only while capturing


def test_moe_blocks_are_canonicalized_with_the_familys_routing(compiled):
    family, eager, model, program = compiled
    reports = program.context.blocks
    if family in DENSE_FAMILIES:
        assert reports == [] and program.aux_loss is None
        return
    router, shared = EXPECTED_ROUTER[family]
    moe_layers = [m for m in model.modules() if isinstance(m, CanonicalMoEBlock)]
    assert reports and len(moe_layers) == len(reports)
    for report in reports:
        assert report.action == "replaced" and report.kind.startswith("hf.")
        assert report.details["router"] == router
        assert report.details.get("shared") == shared
        assert report.details["experts"] == "swiglu, stacked views"
    graph = program.graph_module.graph
    routed = [n for n in graph.nodes if "moesys" in str(n.target)]
    assert routed, "the canonical ops are in the captured graph"
    assert program.aux_loss is not None and program.aux_loss.ndim == 0


def test_expert_weights_are_the_hf_parameters_not_copies(compiled):
    family, eager, model, program = compiled
    for block in (m for m in model.modules() if isinstance(m, CanonicalMoEBlock)):
        w_up_EHD, w_down_EDF = block.expert_weights()
        assert w_up_EHD.data_ptr() == block.experts.gate_up_proj.data_ptr()
        assert w_down_EDF.data_ptr() == block.experts.down_proj.data_ptr()


def test_training_with_the_models_own_loss_and_save_pretrained_round_trip(tmp_path):
    """Train mode, output_router_logits=True and labels: the program returns HF's own loss
    (CE + router_aux_loss_coef x its aux loss), gradients equal eager, and the trained weights
    save under the HF names and reload with transformers."""
    model = build_hf("mixtral", output_router_logits=True).train()
    eager = copy.deepcopy(model)
    example = ids(seed=2)
    program = mc.compile(model, mc.Plan(mode="train"), example_inputs=(ids(),), example_kwargs={"labels": ids()})
    got, want = program(example, labels=example), eager(example, labels=example)
    assert len(got.router_logits) == len(want.router_logits) == 2
    for name in ("loss", "aux_loss", "logits"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-5)
    got.loss.backward()
    want.loss.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    torch.optim.SGD(program.parameters(), lr=0.5).step()
    program.eval()
    model.save_pretrained(tmp_path)                # the trained weights, under the HF names
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded.model.layers[0].mlp).__name__ == "MixtralSparseMoeBlock"
    torch.testing.assert_close(reloaded(example).logits, program(example, labels=example).logits, rtol=1e-5, atol=1e-6)


def test_keyword_inputs_padding_mask_and_the_models_aux_coefficient():
    model = build_hf("olmoe", router_aux_loss_coef=0.5).eval()
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0                                # left padding in the second row
    want = model(input_ids=ids(), attention_mask=mask).logits
    program = mc.compile(model, mc.Plan(), example_kwargs={"input_ids": ids(), "attention_mask": mask})
    torch.testing.assert_close(program(ids()).logits, model(ids()).logits, rtol=1e-4, atol=1e-4)   # no mask: ones
    got = program(input_ids=ids(), attention_mask=mask)
    torch.testing.assert_close(got.logits, want, rtol=1e-4, atol=1e-4)
    blocks = [m for m in model.modules() if isinstance(m, CanonicalMoEBlock)]
    assert {m.aux_loss_coef for m in blocks} == {0.5}
    model(input_ids=ids(), attention_mask=mask)    # eager canonical blocks record their own losses
    torch.testing.assert_close(program.aux_loss, sum(m.aux_loss for m in blocks))


@pytest.mark.parametrize("overrides, router, experts", [
    (dict(norm_topk_prob=True), "softmax-top2-renorm", "swiglu, stacked views"),
    (dict(hidden_act="gelu"), "softmax-top2", "geglu, stacked views"),
])
def test_config_variants_are_read_from_behaviour(overrides, router, experts):
    model = build_hf("qwen2_moe", **overrides).eval()
    want = model(ids()).logits
    reports = mc.frontend.canonicalize(model)
    assert {(r.details["router"], r.details["experts"]) for r in reports} == {(router, experts)}
    torch.testing.assert_close(model(ids()).logits, want, rtol=1e-5, atol=1e-6)


def test_bf16_models_keep_their_routing_rule():
    """bf16 routers score in bf16 (Mixtral, Qwen) or fp32 (DeepSeek-V3); the probe finds which."""
    for family, (router, _) in EXPECTED_ROUTER.items():
        model = build_hf(family).eval().to(torch.bfloat16)
        want = model(ids()).logits
        reports = mc.frontend.canonicalize(model)
        assert {(r.action, r.details["router"]) for r in reports} == {("replaced", router)}, family
        torch.testing.assert_close(model(ids()).logits, want, rtol=2e-2, atol=2e-2, msg=family)


def test_a_family_not_named_in_the_issue_is_recognised_too():
    model = build_hf("qwen3_moe").eval()
    want = model(ids()).logits
    reports = mc.frontend.canonicalize(model)
    assert reports and {(r.action, r.details["router"]) for r in reports} == {("replaced", "softmax-top2")}
    torch.testing.assert_close(model(ids()).logits, want, rtol=1e-5, atol=1e-6)


def test_unusual_router_stays_the_models_code():
    model = build_hf("phimoe").eval()              # PhiMoE's sparsemixer router is no moesys.route rule
    want = model(ids()).logits
    program = mc.compile(model, mc.Plan(), example_inputs=(ids(),))
    routers = {(r.action, r.details["router"]) for r in program.context.blocks}
    assert routers == {("replaced", "own router 'router' (traced)")}
    torch.testing.assert_close(program(ids()).logits, want, rtol=1e-4, atol=1e-4)


def test_gpt_oss_biased_clamped_experts_are_canonicalized_and_train_like_eager():
    # biased experts, gate/up interleaved, a clamped SwiGLU (limit low enough to clamp), a router
    # with a logit bias, and a block that returns (output, router scores)
    model = randomize_expert_biases(build_hf("gpt_oss", swiglu_limit=0.5).train())
    eager = copy.deepcopy(model)
    want = eager(ids()).logits
    program = mc.compile(model, mc.Plan(mode="train"), example_inputs=(ids(),))
    facts = {(r.action, r.details["router"], r.details["experts"], r.details["returns"]) for r in program.context.blocks}
    assert facts == {("replaced", "softmax-top2-renorm", "clamped_swiglu:alpha=1.702:limit=0.5, stacked views, "
                      "up/down biases", "(output, router weights)")}
    got = program(ids()).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    got.square().mean().backward()
    want.square().mean().backward()
    grads = dict(eager.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    lowered = {n.meta["moesys"].get("lowered_to") for n in program.graph_module.graph.nodes
               if is_op(n, "fused_experts", namespace="moesys_kernels")}
    assert lowered == {"torch:moe_fused"}          # the torch experts kernel takes the biases


def test_router_jitter_leaves_the_block_with_the_fix_around_canonical_experts():
    model = build_hf("mixtral", router_jitter_noise=0.1)
    reports = mc.frontend.canonicalize(model)
    assert reports and all((r.kind, r.action) == ("hf.MixtralExperts", "replaced") for r in reports)
    assert all("router_jitter_noise=0" in r.reason for r in reports)        # why the block stays traced code


def test_model_specs():
    loaded = load_model("hf:mixtral", {"num_hidden_layers": 1, "seed": 3})
    assert type(loaded.model).__name__ == "MixtralForCausalLM" and loaded.model.config.num_hidden_layers == 1
    (example,) = loaded.example_inputs(2, 6)
    assert example.shape == (2, 6) and int(example.max()) < 128
    with pytest.raises(ValueError, match=r"\['bogus'\] are not fields of MixtralConfig"):
        load_model("hf:mixtral", {"bogus": 1})
    with pytest.raises(ValueError, match="hub names are not downloaded"):
        load_model("hf:mistralai/Mixtral-8x7B-v0.1", {})
    assert set(MOE_FAMILIES + DENSE_FAMILIES) <= set(FAMILIES)


def test_local_directory_round_trip(tmp_path):
    model = build_hf("olmoe", seed=5).eval()
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), {})
    loaded.model.eval()
    torch.testing.assert_close(loaded.model(ids()).logits, model(ids()).logits)
    assert "local weights" in loaded.description
