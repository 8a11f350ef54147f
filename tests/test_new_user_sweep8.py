"""What the eighth new-user sweep found, each refused or fixed now:

- A Hugging Face model compiled with the ``num_items_in_batch`` keyword the HF Trainer passes (it
  reaches ``forward``'s ``**kwargs``) was captured with the example's batch and sequence fixed:
  torch.export cannot keep sizes symbolic for keywords given through ``**kwargs``. The Trainer's
  evaluation at another batch size, or a last partial batch, then failed with a CapturedSizeError.
- The HF Trainer saves a compiled program as it saves any module that is not a ``PreTrainedModel``:
  ``model.safetensors`` of ``program.state_dict()`` (names under ``graph_module.``), no config.
  Nothing turned such a checkpoint back into the model: ``mc.load_into`` said ``meta.json`` was
  missing (it read only this project's checkpoints) and ring inference found no tensor of the
  model in it. Both read it now, and ``load_into`` takes any Hugging Face-style directory.
- ``mc.load_into`` of a model built under ``mc.empty_weights()`` or accelerate's
  ``init_empty_weights()`` returned it still on the meta device (torch's copy into a meta tensor
  is a no-op, one warning per tensor); its parameters now get memory and the checkpoint's values,
  ties kept, and a model whose computed buffers are on meta is refused by name.
- ``moesys-compile inspect --after ring_partition`` of a train run (or ``expert_parallel`` of an
  infer run) listed the run's stages without saying that the pass belongs to the other mode.
- ``DistributedDataParallel(program)`` at expert_parallel > 1, which the HF Trainer and
  ``accelerate.prepare`` do on several processes, overwrote each rank's experts with rank 0's
  and averaged the gradients of different experts, silently. It is refused now, with the fix.
- ``TrainingArguments(gradient_checkpointing=True)`` stopped the HF Trainer with an AttributeError
  (the program had no ``gradient_checkpointing_enable``); it now warns, as compiling a model with
  checkpointing on does, that the captured graph stores every activation, and trains.
- An HF Trainer checkpoint of a program given to ``moesys-compile infer`` as MODEL was called "not
  a Hugging Face model directory (no config.json)"; it is now named as weights without a config,
  with the way to run it (the model as MODEL, the directory as ``--checkpoint``).
- ``moesys-compile train --data DIR`` (a dataset directory) was said to be no existing file.
- ``mc.compile`` of a model already wrapped in DDP (or DataParallel) failed with an
  UntraceableModelError about iteration over a traced value at an unknown line, with a fix about
  tensor ops; it now says to pass ``model.module``.
- A ring program's outputs (and ``generate``'s tokens) were inference tensors, which cannot be
  changed in place outside ``torch.inference_mode``: ``logits[..., banned] = -inf`` in a user's own
  decoding loop, or the HF Trainer's ``loss *= ...`` in ``evaluate``, failed. The ring now runs
  under ``no_grad``, as ``model.generate`` does, and its outputs are ordinary tensors.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

import moesys_compile as mc

sys.path.insert(0, str(Path(__file__).parent))
from dist_utils import run_ranks  # noqa: E402

VOCAB = 128


def _ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_a_keyword_through_kwargs_keeps_batch_and_sequence_symbolic():
    pytest.importorskip("transformers")
    from moesys_compile.models.hf import build_hf

    model = build_hf("qwen3_moe").train()
    eager = copy.deepcopy(model)
    ids = _ids(4, 8)
    example = dict(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(4 * 7))
    program = mc.compile(model, mc.Plan(mode="train"), example_kwargs=example)
    for batch, seq in ((2, 8), (3, 5)):
        call = dict(input_ids=_ids(batch, seq, 1), labels=_ids(batch, seq, 1),
                    num_items_in_batch=torch.tensor(batch * (seq - 1)))
        torch.testing.assert_close(program(**call).loss, eager(**call).loss, rtol=1e-5, atol=1e-6)


def test_a_trainer_checkpoint_of_a_program_loads_into_the_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from moesys_compile.models.hf import build_hf

    model = build_hf("qwen3_moe").train()
    ids = _ids(4, 8)
    example = dict(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(4 * 7))
    program = mc.compile(model, mc.Plan(mode="train"), example_kwargs=example)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                                          max_steps=1, save_steps=1, learning_rate=1e-2, report_to=[],
                                          use_cpu=True, disable_tqdm=True)
    transformers.Trainer(model=program, args=args,
                         train_dataset=[dict(input_ids=row, labels=row) for row in ids]).train()
    saved = tmp_path / "out" / "checkpoint-1"
    fresh = build_hf("qwen3_moe", seed=1)
    assert not torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    mc.load_into(fresh, str(saved))
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name

    fresh.save_pretrained(tmp_path / "hf")             # and a save_pretrained directory
    other = build_hf("qwen3_moe", seed=2)
    mc.load_into(other, str(tmp_path / "hf"))
    assert torch.equal(other.lm_head.weight, model.lm_head.weight)

    ring = mc.compile(build_hf("qwen3_moe", seed=3), mc.Plan(mode="infer", device_budget="4MiB",
                                                              weights_checkpoint=str(saved)), example_inputs=(ids,))
    torch.testing.assert_close(ring(ids).logits, model.eval()(ids).logits, rtol=1e-4, atol=1e-5)


def test_one_ranks_program_state_dict_is_refused_as_a_shard(tmp_path):
    from safetensors.torch import save_file

    model = mc.models.build("tiny-moe", n_layers=1, num_experts=4)
    state = {"graph_module." + name: t.clone() for name, t in model.state_dict().items()}
    save_file({**state, "graph_module._extra_state": torch.tensor([0, 2, 0, 2, 4])}, tmp_path / "model.safetensors")
    with pytest.raises(mc.MoesysError, match="one rank at expert_parallel > 1"):
        mc.load_into(model, str(tmp_path))


def test_load_into_a_model_built_without_weights_fills_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    accelerate = pytest.importorskip("accelerate")
    from moesys_compile.frontend.empty_weights import meta_tensor_names
    from moesys_compile.models.hf import build_hf

    model = build_hf("qwen3_moe", tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    ids = _ids(2, 8)
    with mc.empty_weights():
        ours = transformers.AutoModelForCausalLM.from_config(model.config)
    with accelerate.init_empty_weights():
        theirs = transformers.AutoModelForCausalLM.from_config(model.config)
    for empty in (ours, theirs):
        mc.load_into(empty, str(tmp_path))
        assert not meta_tensor_names(empty)
        assert empty.lm_head.weight is empty.model.embed_tokens.weight
        torch.testing.assert_close(empty(ids).logits, model(ids).logits)
    with torch.device("meta"):
        computed_on_meta = transformers.AutoModelForCausalLM.from_config(model.config)
    with pytest.raises(mc.MoesysError, match="non-persistent buffer 'model.rotary_emb.inv_freq' is on the meta"):
        mc.load_into(computed_on_meta, str(tmp_path))


@pytest.mark.parametrize("mode, after, other", [("train", "ring_partition", "infer"),
                                                ("infer", "expert_parallel", "train")])
def test_inspect_after_a_pass_of_the_other_mode_names_that_mode(mode, after, other, capsys):
    from moesys_compile.cli import main

    assert main(["inspect", "tiny-moe", "--config", "n_layers=1", "--mode", mode, "--after", after]) != 0
    err = capsys.readouterr().err
    assert f"{after} is a pass of mode '{other}', not '{mode}': pass --mode {other}" in err


def _wrap_in_ddp(rank: int, world: int, ep: int):
    torch.manual_seed(0)
    model = mc.models.build("tiny-moe", n_layers=1, num_experts=4)
    program = mc.compile(model, mc.Plan(mode="train", world_size=world, expert_parallel=ep),
                         example_inputs=(_ids(2, 8, rank),))
    experts = dict(program.named_parameters())["graph_module.layers.0.ffn.w_up"]
    before = experts.detach().clone()
    try:
        torch.nn.parallel.DistributedDataParallel(program)
    except mc.PlanError as exc:
        return str(exc), torch.equal(experts, before)
    return None, torch.equal(experts, before)


@pytest.mark.parametrize("ep", [2, 1])
def test_wrapping_an_expert_parallel_program_in_ddp_is_refused(ep):
    for refusal, experts_kept in run_ranks(_wrap_in_ddp, 2, ep):
        assert experts_kept
        if ep == 1:
            assert refusal is None           # DDP only syncs again what the program has synced
        else:
            assert "expert_parallel=2 cannot be wrapped in DistributedDataParallel" in refusal


def test_the_trainers_gradient_checkpointing_warns_and_trains(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from moesys_compile.models.hf import build_hf

    ids = _ids(4, 8)
    program = mc.compile(build_hf("qwen3_moe").train(), mc.Plan(mode="train"),
                         example_kwargs=dict(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(4 * 7)))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1,
                                          logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                                          disable_tqdm=True, gradient_checkpointing=True)
    trainer = transformers.Trainer(model=program, args=args,
                                   train_dataset=[dict(input_ids=row, labels=row) for row in ids])
    with pytest.warns(UserWarning, match="checkpointing cannot be turned on in a compiled program"):
        trainer.train()
    assert [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_weights_without_a_config_given_as_model_say_to_pass_them_as_checkpoint(tmp_path, capsys):
    from safetensors.torch import save_file

    from moesys_compile import infer

    save_file({"graph_module.embed.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    assert infer.main([str(tmp_path), "--budget", "1MiB"]) != 0
    err = capsys.readouterr().err
    assert "is a directory of weights (model.safetensors) without a config.json" in err
    assert f"moesys-compile infer MODEL --checkpoint {tmp_path} to run it, or mc.load_into" in err


def test_train_data_given_as_a_directory_is_named_as_one(tmp_path, capsys):
    from moesys_compile import train

    assert train.main(["--data", str(tmp_path), "--steps", "1"]) != 0
    assert f"--data {str(tmp_path)!r} is a directory; give one file of token ids" in capsys.readouterr().err


def _compile_ddp(rank: int, world: int):
    model = torch.nn.parallel.DistributedDataParallel(mc.models.build("tiny-moe", n_layers=1, num_experts=4))
    with pytest.raises(TypeError, match=r"wrapped in DistributedDataParallel \(around Transformer\).*model.module"):
        mc.compile(model, mc.Plan(mode="train", world_size=world), example_inputs=(_ids(2, 8),))
    return True


def test_a_model_wrapped_for_data_parallelism_is_refused_with_the_fix():
    model = torch.nn.DataParallel(mc.models.build("tiny-moe", n_layers=1, num_experts=4))
    with pytest.raises(TypeError, match=r"wrapped in DataParallel \(around Transformer\).*model.module"):
        mc.compile(model, mc.Plan(mode="train"), example_inputs=(_ids(2, 8),))
    assert run_ranks(_compile_ddp, 1) == [True]


def test_a_ring_programs_outputs_can_be_changed_in_place():
    model = mc.models.build("tiny-moe", n_layers=1, num_experts=4)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    ring = mc.compile(model, mc.Plan(mode="infer", device="cpu", device_budget="300KB"), example_inputs=(ids,))
    logits = ring(ids)
    want = model.eval()(ids).detach()
    logits[..., 0] = float("-inf")
    want[..., 0] = float("-inf")
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-5)
    tokens = ring.generate(ids, 2)
    tokens[tokens == 0] = 1
    assert not tokens.is_inference()
