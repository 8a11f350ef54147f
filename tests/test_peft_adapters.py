"""PEFT adapters: a ``PeftModel`` (LoRA, prompt tuning) around a Hugging Face MoE model or one of
ours compiles as it is, trains its adapters like eager (also at expert_parallel=2, under the PEFT
names, LoRA on the stacked expert weights included), streams through a ring and decodes with a KV
cache; a call made with the adapters switched since compiling (disable_adapter, merge_adapter) is
refused."""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch

import moesys_compile as mc

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from moesys_compile.models import build  # noqa: E402
from moesys_compile.models.hf import build_hf  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import test_hf_parallel as parallel  # noqa: E402
from test_hf_training_habits import trainer_losses  # noqa: E402
from dist_utils import optimizer_steps, run_ranks  # noqa: E402

ATTENTION = ["q_proj", "v_proj"]


def ids(batch: int = 2, seq: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def with_lora(model: torch.nn.Module, **lora) -> torch.nn.Module:
    """``model`` under a LoRA adapter whose B matrices are random (PEFT starts them at zero, which
    would make the adapter a no-op that any program passes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, **lora))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return wrapped


def lora_qwen3(mode: str = "eval", **lora) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_hf("qwen3_moe", num_hidden_layers=2)
    return with_lora(model.train(mode == "train"), **{"target_modules": ATTENTION, **lora})


def trainable_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora, replaced", [(dict(target_modules=ATTENTION), "hf.Qwen3MoeSparseMoeBlock"),
                                            (dict(target_modules="all-linear"), "hf.Qwen3MoeExperts")],
                         ids=["attention", "all-linear"])
def test_a_lora_model_trains_like_eager(lora, replaced):
    """all-linear also puts LoRA on the router and the expert parameters (PEFT's ParamWrapper): the
    block is left as traced code, its experts canonical, computed on their weights with the
    adapter's update, each call once."""
    model = lora_qwen3("train", **lora)
    eager = copy.deepcopy(model)
    batch = ids()
    program = mc.compile(model, mc.Plan(mode="train"), example_inputs=(batch,), example_kwargs={"labels": batch})
    out, want = program(batch, labels=batch), eager(batch, labels=batch)
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    want.loss.backward()
    grads, want_grads = trainable_grads(model), trainable_grads(eager)
    assert list(grads) == list(want_grads) and any("lora_A" in name for name in grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert [(r.kind, r.action) for r in program.context.blocks] == [(replaced, "replaced")] * 2
    wrapped = lora["target_modules"] == "all-linear"       # the report names what adds the update
    assert all(("PEFT's ParamWrapper" in r.reason) == wrapped for r in program.context.blocks)
    assert not wrapped or "'base_model.model.model.layers.1.mlp.experts' adds its LoRA update to down_proj, " \
                          "gate_up_proj" in program.context.blocks[1].reason
    # registering the parametrization evaluates it once, for nothing: capture drops that region
    unread = [n.name for n in program.graph_module.graph.nodes
              if isinstance(n.target, torch._ops.HigherOrderOperator) and not n.users]
    assert unread == []


def test_a_lora_model_streams_through_a_ring_and_decodes_with_its_cache():
    model, eager = lora_qwen3(), lora_qwen3()
    budget = sum(p.numel() * p.element_size() for p in model.parameters()) // 2
    program = mc.compile(model, mc.Plan(mode="infer", device="cpu", device_budget=budget, weights="host"),
                         example_inputs=(ids(),))
    torch.testing.assert_close(program(ids(3, 5, seed=1)).logits, eager(ids(3, 5, seed=1)).logits,
                               rtol=1e-5, atol=1e-6)
    want = eager.generate(input_ids=ids(), max_new_tokens=4, do_sample=False)
    assert torch.equal(program.generate(ids(), max_new_tokens=4), want)
    assert program.stats["decode"] == "kv_cache"


def test_prompt_tuning_and_our_own_models_compile_too():
    torch.manual_seed(0)
    prompted = peft.get_peft_model(build_hf("qwen3_moe", num_hidden_layers=1).eval(),
                                   peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    program = mc.compile(prompted, mc.Plan(), example_inputs=(ids(),))
    torch.testing.assert_close(program(ids()).logits, prompted(ids()).logits, rtol=1e-5, atol=1e-6)
    own = with_lora(build("tiny-moe").eval(), target_modules=["qkv", "proj"])
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mc.compile(own, mc.Plan(), example_inputs=(tokens,))(tokens), own(tokens))


def test_a_call_with_the_adapters_switched_since_compiling_is_refused():
    """disable_adapter() (a reference pass) and merge_adapter() change what the PeftModel computes
    but not the captured graph; a program compiled with them disabled computes the base model."""
    model = lora_qwen3()
    program = mc.compile(model, mc.Plan(), example_inputs=(ids(),))
    with model.disable_adapter(), pytest.raises(RuntimeError, match=r"adapters are disabled \(active \['default'\]\) "
                                                                    r"now, but were enabled .* disable_adapter"):
        program(ids())
    model.merge_adapter()
    with pytest.raises(RuntimeError, match=r"\['default'\] merged into the base weights\) now"):
        program(ids())
    model.unmerge_adapter()
    with_adapters = program(ids()).logits
    torch.testing.assert_close(with_adapters, lora_qwen3()(ids()).logits, rtol=1e-5, atol=1e-6)
    with model.disable_adapter():
        base = mc.compile(model, mc.Plan(), example_inputs=(ids(),))
        without = base(ids()).logits
        torch.testing.assert_close(without, model(ids()).logits, rtol=1e-5, atol=1e-6)
    assert (without - with_adapters).abs().max() > 1e-2
    with pytest.raises(RuntimeError, match="now, but were disabled"):
        base(ids())


def reference_run():
    model = lora_qwen3("train", target_modules="all-linear")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=parallel.LR)
    batch, targets = parallel.global_batch()
    losses = optimizer_steps(lambda: parallel.cross_entropy(model(batch).logits, targets), opt, parallel.STEPS)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def distributed_run(rank: int, world: int):
    program, losses = parallel.train_on_ranks(lora_qwen3("train", target_modules="all-linear"), rank, world, ep=2)
    state = program.full_state_dict()
    return losses, (state if rank == 0 else None), program.context.extras["expert_shards"]


def test_two_expert_parallel_ranks_train_the_adapters_like_one_eager_process():
    """all-linear: LoRA on attention, router and the stacked expert weights. Each rank holds half of
    every expert stack and all of the adapters' matrices, and adds to its experts their rows of the
    update (the adapters' gradients, like those of any dense parameter, averaged over the ranks)."""
    results = run_ranks(distributed_run, 2, timeout=300)
    losses, state, _ = results[0]
    want_losses, want_state = reference_run()
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=parallel.RTOL, atol=parallel.ATOL)
    assert list(state) == list(want_state), "full_state_dict uses the PEFT names"
    for name, tensor in want_state.items():
        torch.testing.assert_close(state[name], tensor, rtol=parallel.RTOL, atol=parallel.ATOL,
                                   msg=lambda m: f"{name}: {m}")
    start = lora_qwen3("train", target_modules="all-linear").state_dict()
    assert all(not torch.equal(state[n], start[n]) for n in start if ".experts." in n and ".lora_" in n)
    for rank, (_, _, shards) in enumerate(results):
        assert sorted(shards) == sorted(n for n in want_state if n.endswith(("gate_up_proj", "down_proj")))
        assert set(shards.values()) == {(2 * rank, 2 * rank + 2, 4)}


def test_adapters_that_cannot_be_captured_are_refused_naming_the_method():
    """Prefix tuning hands its virtual tokens to the model as a KV cache; LoHa draws a random
    number for its module dropout in training mode (its eval mode compiles)."""
    torch.manual_seed(0)
    prefixed = peft.get_peft_model(build_hf("qwen3_moe", num_hidden_layers=1),
                                   peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(mc.UntraceableModelError, match=r"adapter 'default' is PREFIX_TUNING, .* KV cache"):
        mc.compile(prefixed, mc.Plan(), example_inputs=(ids(),))
    loha = peft.get_peft_model(build_hf("qwen3_moe", num_hidden_layers=1),
                               peft.LoHaConfig(r=4, target_modules=["q_proj"], init_weights=False)).train()
    with pytest.raises(mc.UntraceableModelError, match=r"fix: 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj' "
                                                       r"is a PEFT loha layer \(Linear\), whose training-mode forward "
                                                       r"cannot be captured: .* or compile in eval mode"):
        mc.compile(loha, mc.Plan(mode="train"), example_inputs=(ids(),))
    loha.eval()
    torch.testing.assert_close(mc.compile(loha, mc.Plan(), example_inputs=(ids(),))(ids()).logits, loha(ids()).logits)


def test_the_hf_trainer_trains_a_compiled_peft_model_as_it_trains_the_peft_model(tmp_path):
    """The Trainer reads a PEFT model's columns from its base model's forward (a PeftModel's own
    takes ``*args, **kwargs``); the program shows that signature too, so the batches keep their
    columns and the losses equal the PeftModel's."""
    pytest.importorskip("accelerate")
    rows = [ids(1, 8, seed)[0] for seed in range(4)]
    dataset = [dict(input_ids=row, labels=row) for row in rows]
    model = lora_qwen3("train", target_modules="all-linear")
    eager = copy.deepcopy(model)
    example = dict(input_ids=torch.stack(rows[:2]), labels=torch.stack(rows[:2]), num_items_in_batch=torch.tensor(14))
    program = mc.compile(model, mc.Plan(mode="train"), example_kwargs=example)
    got, want = (trainer_losses(m, dataset, tmp_path / "out", 2) for m in (program, eager))
    assert len(got) == 2
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)


def test_a_ring_does_not_stage_a_peft_model_from_its_base_checkpoint(tmp_path):
    """Under empty_weights the PeftModel's tensors are on meta, and a base checkpoint holds neither
    its PEFT names nor its adapter: refused naming both ways that work."""
    transformers = pytest.importorskip("transformers")
    base = build_hf("qwen3_moe", num_hidden_layers=1)
    base.save_pretrained(tmp_path / "base")
    with_lora(base, target_modules=ATTENTION).save_pretrained(tmp_path / "adapter")
    with mc.empty_weights():
        empty = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tmp_path / "base"))
    model = peft.PeftModel.from_pretrained(empty, tmp_path / "adapter")
    plan = mc.Plan(mode="infer", device="cpu", device_budget="64MiB", weights="disk", offload_dir=str(tmp_path / "off"),
                   weights_checkpoint=str(tmp_path / "base"))
    with pytest.raises(mc.StorageError, match=r"PeftModel cannot stage its weights from checkpoint .*compile it without "
                                              r"Plan\.weights_checkpoint .* or merge the adapter"):
        mc.compile(model, plan, example_inputs=(ids(),))
