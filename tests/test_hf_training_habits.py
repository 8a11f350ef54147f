"""What a Hugging Face user does when training, on compiled MoE programs: ``out.loss`` from
``labels`` (with and without the model's own router aux loss), classification heads, gradient
checkpointing, padded batches with ``attention_mask``, ``torch.compile``, and capacity-limited
shared-expert models under both EP exchanges. Each is compared with the eager model in one process."""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import moesys_compile as mc

pytest.importorskip("transformers")

from moesys_compile.models.hf import build_hf  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from dist_utils import run_ranks  # noqa: E402

BATCH, SEQ, VOCAB = 4, 8, 128
RTOL, ATOL = 1e-4, 1e-6


def ids(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def padded_batch() -> dict[str, torch.Tensor]:
    """Right-padded rows (pad id 0, mask 0, label -100 on pads) of different lengths."""
    input_ids = ids(3, BATCH).clamp(min=1)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, 5:] = mask[2, 3:] = mask[3, 6:] = 0
    return dict(input_ids=input_ids.masked_fill(mask == 0, 0), attention_mask=mask,
                labels=input_ids.masked_fill(mask == 0, -100))


def assert_grads_equal(model, eager, local=None) -> None:
    """Every gradient of ``model`` (or of the program's local expert rows) equals eager's."""
    local = local or {}
    for (name, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        grad, want = (local[name].grad, q.grad[local[name].rows]) if name in local else (p.grad, q.grad)
        assert (grad is None) == (want is None), name
        if grad is not None:
            torch.testing.assert_close(grad, want, rtol=RTOL, atol=ATOL, msg=name)


@pytest.mark.parametrize("router_logits", [False, True])
def test_out_loss_is_the_models_loss_and_double_counting_the_aux_loss_warns(router_logits):
    """``out.loss`` is eager's loss: cross-entropy, plus router_aux_loss_coef x out.aux_loss when
    output_router_logits is on. Then program.aux_loss is a balance penalty a second time, and
    reading it warns; without the model's own aux loss it is silent."""
    model = build_hf("qwen3_moe", output_router_logits=router_logits).train()
    eager = copy.deepcopy(model)
    program = mc.compile(model, mc.Plan(mode="train"), example_inputs=(ids(),), example_kwargs={"labels": ids()})
    x = ids(2)
    got, want = program(x, labels=x), eager(x, labels=x)
    torch.testing.assert_close(got.loss, want.loss, rtol=RTOL, atol=1e-5)
    ce = F.cross_entropy(got.logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    if router_logits:
        torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=RTOL, atol=1e-5)
        torch.testing.assert_close(got.loss, ce + model.config.router_aux_loss_coef * got.aux_loss)
        with pytest.warns(UserWarning, match="counts it twice: train on out.loss alone"):
            assert program.aux_loss is not None
    else:
        assert got.aux_loss is None
        torch.testing.assert_close(got.loss, ce)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert program.aux_loss is not None and program.aux_loss.ndim == 0
    got.loss.backward()
    want.loss.backward()
    assert_grads_equal(model, eager)


@pytest.mark.parametrize("head", ["SequenceClassification", "TokenClassification"])
def test_a_classification_head_on_an_moe_model_trains_like_eager(head):
    """``AutoModelFor<head>`` of an MoE family on a padded batch: the sequence head pools at each
    row's last non-pad token, the token head scores every position; loss, logits and every
    gradient equal eager's."""
    import transformers

    from moesys_compile.models.hf import hf_config
    config = hf_config("qwen3_moe", {"num_labels": 3, "pad_token_id": 0})
    config.classifier_dropout = 0.0          # the token head's dropout: random draws would differ
    torch.manual_seed(0)
    model = getattr(transformers, f"AutoModelFor{head}").from_config(config).train()
    eager = copy.deepcopy(model)
    batch = padded_batch()
    labels = batch["labels"].clamp(max=2) if head == "TokenClassification" else torch.tensor([0, 2, 1, 2])
    inputs = dict(attention_mask=batch["attention_mask"], labels=labels)
    program = mc.compile(model, mc.Plan(mode="train"), example_inputs=(batch["input_ids"],), example_kwargs=inputs)
    ids_, inputs = batch["input_ids"].flip(0), {k: v.flip(0) for k, v in inputs.items()}   # rows padded elsewhere
    got, want = program(ids_, **inputs), eager(ids_, **inputs)
    assert type(got) is type(want)
    for name in ("loss", "logits"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=RTOL, atol=ATOL)
    got.loss.backward()
    want.loss.backward()
    assert_grads_equal(model, eager)


def same_loss_and_gradients(program, model, eager) -> None:
    """``program(x, labels=x).loss`` and its gradients equal the eager copy's."""
    x = ids(2)
    got, want = program(x, labels=x), eager(x, labels=x)
    torch.testing.assert_close(got.loss, want.loss, rtol=RTOL, atol=1e-5)
    got.loss.backward()
    want.loss.backward()
    assert_grads_equal(model, eager)


def test_gradient_checkpointing_warns_that_it_is_not_kept_and_trains_like_eager():
    model = build_hf("mixtral").train()
    model.gradient_checkpointing_enable()
    eager = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"gradient checkpointing on, which the compiled program does not keep"):
        program = mc.compile(model, mc.Plan(mode="train"), example_inputs=(ids(),), example_kwargs={"labels": ids()})
    same_loss_and_gradients(program, model, eager)


def test_torch_compile_wraps_the_program_not_the_model():
    model = build_hf("olmoe").train()
    eager = copy.deepcopy(model)
    with pytest.raises(TypeError, match=r"OptimizedModule around OlmoeForCausalLM.*model\._orig_mod"):
        mc.compile(torch.compile(model), mc.Plan(mode="train"), example_inputs=(ids(),))
    program = torch.compile(mc.compile(model, mc.Plan(mode="train"), example_inputs=(ids(),),
                                       example_kwargs={"labels": ids()}), backend="eager")
    same_loss_and_gradients(program, model, eager)


class _Rows:
    """A program's local expert parameter and the rows of the full parameter it holds."""

    def __init__(self, param, shard):
        self.grad, self.rows = param.grad, slice(shard.lo, shard.hi)


def padded_checkpointed_step(rank: int, world: int):
    """Qwen2-MoE (shared expert) at EP=2: right padding, labels -100 on pads, gradient
    checkpointing and the model's own aux loss. Each rank's out.loss is eager's loss on its rows;
    the synced gradients are those of the mean of the ranks' losses."""
    torch.manual_seed(0)
    model = build_hf("qwen2_moe", output_router_logits=True).train()
    model.gradient_checkpointing_enable()
    eager = copy.deepcopy(model)
    batch = padded_batch()
    shares = [{k: v[r * BATCH // world:(r + 1) * BATCH // world] for k, v in batch.items()} for r in range(world)]
    plan = mc.Plan(mode="train", world_size=world, expert_parallel=2, bucket_mb=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = mc.compile(model, plan, example_kwargs=shares[rank])
    out = program(**shares[rank])
    out.loss.backward()
    eager_losses = [eager(**share).loss for share in shares]
    (sum(eager_losses) / world).backward()
    local = {name: _Rows(p, program.expert_layout[name]) for name, p in program.graph_module.named_parameters()
             if program.is_expert(name)}
    assert_grads_equal(model, eager, local)
    return float(out.loss), float(eager_losses[rank])


def test_padded_checkpointed_training_at_ep2_equals_eager():
    for got, want in run_ranks(padded_checkpointed_step, 2):
        assert got == pytest.approx(want, rel=RTOL)


def exchange_losses(rank: int, world: int, family: str):
    """Three SGD steps with capacity_factor 1.0 under each EP exchange: (losses, dropped) each."""
    tokens = ids(1, BATCH)
    local = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    x, targets = tokens[local], tokens.roll(-1, dims=1)[local]
    results = {}
    for exchange in ("token", "slot"):
        torch.manual_seed(0)
        plan = mc.Plan(mode="train", world_size=world, expert_parallel=2, capacity_factor=1.0, ep_exchange=exchange,
                       bucket_mb=0.01)
        program = mc.compile(build_hf(family).train(), plan, example_inputs=(x,))
        opt = torch.optim.SGD(program.parameters(), lr=0.5)
        losses = []
        for _ in range(3):
            loss = F.cross_entropy(program(x).logits.reshape(-1, VOCAB), targets.reshape(-1)) + program.aux_loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
        results[exchange] = losses, program.dropped_fraction()
    return results


def test_shared_experts_with_capacity_train_alike_under_both_exchanges():
    """DeepSeek-V3 (shared expert, group-limited sigmoid router) drops slots at capacity 1.0; the
    token exchange (default) and the slot exchange give the same losses and drop the same slots."""
    for result in run_ranks(exchange_losses, 2, "deepseek_v3"):
        (token, token_dropped), (slot, slot_dropped) = result["token"], result["slot"]
        assert any(v for v in token_dropped.values()), "capacity 1.0 drops some slots"
        assert token == pytest.approx(slot, rel=1e-5)
        assert token_dropped == pytest.approx(slot_dropped)


def trainer_losses(model, dataset: list[dict], output_dir, batch: int) -> list[float]:
    """The logged losses of 2 steps of ``transformers.Trainer`` on CPU (lr 1e-2, seed 0)."""
    import transformers
    args = transformers.TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=batch, max_steps=2,
                                          learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                                          use_cpu=True, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_hf_trainer_trains_the_program_as_it_trains_the_model(tmp_path):
    """The Trainer keeps the dataset columns the forward signature names (the program's is the
    model's), and counts ``num_items_in_batch`` over shifted labels because the program answers
    ``loss_type`` and ``config`` from the model: the losses equal the eager model's."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    rows = [ids(seed, 1)[0] for seed in range(8)]
    dataset = [dict(input_ids=row, labels=row) for row in rows]
    model = build_hf("qwen3_moe").train()
    eager = copy.deepcopy(model)
    example = dict(input_ids=torch.stack(rows[:BATCH]), labels=torch.stack(rows[:BATCH]),
                   num_items_in_batch=torch.tensor(BATCH * (SEQ - 1)))
    program = mc.compile(model, mc.Plan(mode="train"), example_kwargs=example)
    assert program.loss_type == model.loss_type and program.config is model.config
    got, want = (trainer_losses(m, dataset, tmp_path / "out", BATCH) for m in (program, eager))
    assert len(got) == 2
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
