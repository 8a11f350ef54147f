"""What the tenth new-user sweep (the inference side, as a user of transformers and accelerate
big-model inference) found, each refused or fixed now:

- A model loaded with accelerate's offloading (``from_pretrained(DIR, device_map="auto",
  offload_folder=...)`` that spills to disk, ``disk_offload``, ``cpu_offload``) has its parameters
  on meta and hooks that load them at every call. ``mc.compile`` of it for ring inference said to
  use ``Plan(mode='infer', weights_checkpoint=DIR)`` (the plan was an infer plan already), and with
  ``weights_checkpoint`` it failed with an UntraceableModelError blaming ``model.embed_tokens``
  inside accelerate's loader, with a fix about tensor ops. It is refused now, naming the hooks and
  the way to run such a model (``mc.empty_weights()`` and ``Plan.weights_checkpoint``).
- A model with meta tensors compiled under an infer plan with a budget but no
  ``weights_checkpoint`` was told that "only ring inference streams weights from a checkpoint";
  it now names the missing field.
- ``moesys-compile infer DIR --prompt TEXT`` with a tokenizer whose ids reach past the model's
  vocabulary blamed ``--prompt-ids``, an option the user had not given; it now names the prompt,
  the tokenizer's directory and ``--tokenizer``.
- ``model.share_memory()`` or ``program.share_memory()`` (for torch.multiprocessing workers) moves
  every tensor's storage into shared memory, values kept, and the next call of a ring program was
  refused with a RingWeightsError saying that a rotary buffer "was replaced by another tensor".
  The move is taken now; a tensor replaced or cast is still refused, and one changed in place is
  judged as before. A tensor is told by its object and its storage, not its address: a
  replacement made after the move could sit at the address the moved memory had, and was then
  taken for an in-place change; a new Parameter on the same memory failed with a KeyError.
- An in-place change of a weight that a CPU ring reads in place (host tier) is taken, as the
  README says, but the ring went on computing with the old values wherever the section was still
  in its slot: always where the budget gives every section a slot of its own (nothing is
  reloaded), and for the first sections of a call, which the copy thread loads ahead. The logits
  were silently stale. Taking such a change now releases the slots, so every section loads again.
- ``program.bfloat16()`` of a Hugging Face model's ring program said to compile again under a Plan
  with that dtype, which torch.export-captured models refuse; it now says to cast the model itself.
- ``moesys-compile inspect DIR --mode infer`` showed "no ring" (no budget), and only a plan file
  could give one; ``--budget`` now does, and implies ``--mode infer``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import moesys_compile as mc

sys.path.insert(0, str(Path(__file__).parent))
from test_cli_options import save_word_tokenizer  # noqa: E402

from moesys_compile.programs.staged_weights import RingWeightsError  # noqa: E402

VOCAB = 128


def _ids(batch: int = 2, seq: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _ring_plan(**fields) -> mc.Plan:
    return mc.Plan(mode="infer", device="cpu", device_budget="1MiB", **fields)


@pytest.mark.parametrize("offload", ["disk_offload", "cpu_offload"])
def test_a_model_offloaded_by_accelerate_is_refused_with_the_way_to_run_it(tmp_path, offload):
    accelerate = pytest.importorskip("accelerate")
    pytest.importorskip("transformers")
    from moesys_compile.models.hf import build_hf

    model = build_hf("qwen3_moe").eval()
    model.save_pretrained(tmp_path / "hf")
    if offload == "disk_offload":
        accelerate.disk_offload(model, str(tmp_path / "offload"), execution_device="cpu")
    else:
        accelerate.cpu_offload(model, execution_device="cpu")
    refusal = (r"Qwen3MoeForCausalLM has its weights offloaded by accelerate's hooks \(\d+ module\(s\), e\.g\. "
               r"'.*'.*empty_weights\(\).*Plan\(weights_checkpoint=DIR\)")
    for plan in (_ring_plan(), _ring_plan(weights_checkpoint=str(tmp_path / "hf"))):
        with pytest.raises(mc.PlanError, match=refusal):
            mc.compile(model, plan, example_inputs=(_ids(),))


def test_the_way_out_of_accelerate_offloading_runs_as_eager(tmp_path):
    """What the refusal above advises gives the eager model's logits."""
    pytest.importorskip("transformers")
    from transformers import AutoConfig, AutoModelForCausalLM
    from moesys_compile.models.hf import build_hf

    eager = build_hf("qwen3_moe").eval()
    eager.save_pretrained(tmp_path / "hf")
    with mc.empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path / "hf"))
    program = mc.compile(model, _ring_plan(weights_checkpoint=str(tmp_path / "hf")), example_inputs=(_ids(),))
    ids = _ids(3, 7, seed=1)
    torch.testing.assert_close(program(ids).logits, eager(ids).logits, rtol=1e-5, atol=1e-5)
    program.close()


def test_meta_tensors_under_a_ring_plan_without_a_checkpoint_name_the_missing_field():
    with mc.empty_weights():
        model = mc.models.build("tiny-moe")
    with pytest.raises(mc.PlanError, match=r"on the meta device .* and Plan\.weights_checkpoint is not set.*"
                                           r"weights_checkpoint=DIR.*mc\.load_into"):
        mc.compile(model, _ring_plan(), example_inputs=(_ids(),))


def test_a_text_prompt_past_the_vocabulary_names_the_prompt_and_its_tokenizer(tmp_path, capsys):
    pytest.importorskip("transformers")
    from moesys_compile.infer import main as infer_main
    from moesys_compile.models.hf import build_hf

    build_hf("llama", num_hidden_layers=1).save_pretrained(tmp_path)
    save_word_tokenizer(tmp_path, vocab_size=2 * VOCAB)          # ids up to 255 for a 128-token model
    code = infer_main([str(tmp_path), "--budget", "1MiB", "--prompt", "w5 w150 w3", "--max-new-tokens", "2",
                       "--no-compare"])
    err = capsys.readouterr().err
    assert code == 2
    assert (f"--prompt 'w5 w150 w3' (tokenizer of {str(tmp_path)!r}) encodes to token ids [151] outside the "
            f"model's vocabulary: token ids must lie in 0..127") in err
    assert "--tokenizer DIR" in err and "--prompt-ids" not in err


@pytest.mark.parametrize("weights", ["host", "disk"])
@pytest.mark.parametrize("shared", ["model", "program"])
def test_share_memory_keeps_the_ring_running_and_still_sees_changes(tmp_path, weights, shared):
    pytest.importorskip("transformers")
    from moesys_compile.models.hf import build_hf
    from moesys_compile.programs.staged_weights import RingWeightsError

    model = build_hf("qwen3_moe").eval()
    ids = _ids()
    program = mc.compile(model, _ring_plan(weights=weights, offload_dir=str(tmp_path)), example_inputs=(ids,))
    (model if shared == "model" else program).share_memory()
    assert model.lm_head.weight.is_shared()
    torch.testing.assert_close(program(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    if weights == "host":          # read in place on the CPU: the change is what the ring computes with
        torch.testing.assert_close(program(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)
    else:
        with pytest.raises(RingWeightsError, match=r"lm_head\.weight of Qwen3MoeForCausalLM was modified in place"):
            program(ids)
    model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.lm_head.weight))
    with pytest.raises(RingWeightsError, match=r"lm_head\.weight of Qwen3MoeForCausalLM was replaced by another"):
        program(ids)
    program.close()


@pytest.mark.parametrize("weights", ["host", "disk"])
@pytest.mark.parametrize("change", ["new Parameter", "new .data"])
def test_a_tensor_is_told_by_its_object_and_memory_not_by_its_address(tmp_path, weights, change):
    """``share_memory_`` frees a tensor's old memory, and a tensor made later can sit at the address
    it had: the replacement above was then taken for an in-place change. New memory at the very
    address the ring read (``from_numpy`` of the weight, which torch does not tie to it) stands for
    that here. A new Parameter is refused even on the same memory: the ring's graph holds the
    model's own parameter objects, and lowered with a new one it failed with a KeyError."""
    torch.manual_seed(0)
    model = mc.models.build("tiny-gpt").eval()
    ids = _ids()
    program = mc.compile(model, _ring_plan(weights=weights, offload_dir=str(tmp_path)), example_inputs=(ids,))
    read = model.lm_head.weight
    if change == "new Parameter":
        model.lm_head.weight = torch.nn.Parameter(read.detach())
    else:
        read.data = torch.from_numpy(read.detach().numpy())
    assert model.lm_head.weight.data_ptr() == read.data_ptr()
    with pytest.raises(RingWeightsError, match=r"lm_head\.weight of Transformer was replaced by another"):
        program(ids)
    program.close()


@pytest.mark.parametrize("budget", ["1MiB", "150KB"])      # every section in a slot of its own; streamed
def test_an_in_place_change_the_ring_takes_reaches_every_section(budget):
    pytest.importorskip("transformers")
    from moesys_compile.models.hf import build_hf

    model = build_hf("qwen3_moe").eval()
    ids = _ids()
    program = mc.compile(model, mc.Plan(mode="infer", device="cpu", device_budget=budget), example_inputs=(ids,))
    program(ids)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
        model.model.embed_tokens.weight.add_(0.5)
    torch.testing.assert_close(program(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)
    program.close()


@pytest.mark.parametrize("kind", ["hf", "built-in"])
def test_a_refused_cast_of_a_ring_program_advises_what_compiles(kind):
    """An exported graph keeps its captured dtype (Plan.dtype is refused for it): cast the model."""
    if kind == "hf":
        pytest.importorskip("transformers")
        from moesys_compile.models.hf import build_hf
        model, ids = build_hf("llama", num_hidden_layers=1, seed=0).eval(), torch.randint(0, 100, (1, 5))
    else:
        torch.manual_seed(0)
        model, ids = mc.models.build("tiny-gpt").eval(), torch.randint(0, 100, (1, 5))
    program = mc.compile(model, mc.Plan(mode="infer", device_budget="64MiB"), example_inputs=(ids,))
    advice = "model.to\\(torch.bfloat16\\); mc.compile" if kind == "hf" else "under a Plan with that device or dtype"
    with pytest.raises(RingWeightsError, match=advice):
        program.bfloat16()
    program.close()


def test_inspect_takes_a_budget_and_shows_the_ring(capsys):
    from moesys_compile.cli import main as cli_main
    assert cli_main(["inspect", "tiny-moe", "--budget", "300KiB", "--after", "ring_partition"]) == 0
    shown = capsys.readouterr().out
    assert "mode=infer" in shown and "budget 307200 B" in shown and "section   0  slot 0" in shown
    assert cli_main(["inspect", "tiny-moe", "--mode", "train", "--budget", "1MiB"]) == 2
    assert "--budget 1MiB is the device budget of ring inference, but the plan's mode is train" in capsys.readouterr().err
