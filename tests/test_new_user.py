"""What a first-time user runs into: ring inference of Hugging Face MoE models at their example
shape, checkpoints saved by ``save_pretrained`` (hub layout), and the ``infer`` command line with
other models and bad arguments."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

import moesys_compile as mc
from moesys_compile.errors import PlanError
from moesys_compile.infer import main as infer_main
from moesys_compile.infer import model_bytes
from moesys_compile.passes.ring_partition import activation_workspace
from moesys_compile.passes.schedule_prefetch import refresh_workspace
from moesys_compile.plan import parse_bytes
from moesys_compile.runtime.storage import StorageError

pytest.importorskip("transformers")

from moesys_compile.models.hf import build_hf, hf_config  # noqa: E402


def example_ids(batch: int = 2, seq: int = 8) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_fused_experts_stay_inside_the_workspace_ring_partition_sized(family):
    """lower_kernels runs after ring_partition; its fused experts must not raise the activation
    estimate the ring checks every call against (the example call itself used to be refused)."""
    model = build_hf(family).eval()
    ids = example_ids()
    program = mc.compile(model, mc.Plan(mode="infer", device_budget=model_bytes(model)), example_inputs=(ids,))
    assert any("fused_experts" in str(n.target) for n in program.graph_module.graph.nodes)
    notes = program.context.notes.get("schedule_prefetch", [])
    assert not any("activation workspace" in note for note in notes), "the workspace ring_partition sized was short"
    with torch.inference_mode():
        want = model(ids).logits
    torch.testing.assert_close(program(ids).logits, want, rtol=1e-4, atol=1e-4)
    assert program.stats["peak_device_bytes"] <= program.stats["budget_bytes"]
    program.close()


def test_workspace_is_refreshed_after_lowering_or_the_plan_is_refused():
    model = mc.models.build("tiny-moe").eval()
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    gm, ctx = mc.lower(model, mc.Plan(mode="infer", device_budget=model_bytes(model)), (ids,))
    layout = ctx.extras["ring"]
    need = activation_workspace(gm, ctx, *layout.example_shape)   # what the lowered graph needs
    assert need <= layout.workspace
    layout.workspace = need // 2                       # as if a pass after the partition had grown it
    refresh_workspace(gm, ctx, layout)                 # the budget's rest holds it: taken
    assert layout.workspace == need
    layout.workspace = need // 2
    layout.slot_bytes = (layout.budget - need // 2) // layout.slots      # no rest left beside the slots,
    refresh_workspace(gm, ctx, layout)                 # but the sections leave room in theirs: taken
    largest = max(section.nbytes for section in layout.sections)
    assert layout.workspace == need and largest <= layout.slot_bytes
    assert layout.slots * layout.slot_bytes + need + sum(layout.resident.values()) <= layout.budget
    layout.workspace = need // 2                       # sections that fill their slots: refused
    layout.slot_bytes = largest
    layout.budget = layout.slots * largest + need // 2 + sum(layout.resident.values())
    with pytest.raises(PlanError, match=r"lowered graph needs a \d+-byte activation workspace.*"
                                        r"Plan.options\['ring_workspace'\] = \d+.*raise Plan.device_budget by \d+"):
        refresh_workspace(gm, ctx, layout)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_ring_reads_a_save_pretrained_checkpoint_in_the_hub_layout(family, tmp_path):
    """transformers v5 saves MoE experts one tensor per expert (and Mixtral under its old module
    names); the ring converts them one model tensor at a time, from a sharded directory."""
    source = build_hf(family, seed=1).eval()
    source.save_pretrained(tmp_path, max_shard_size="20KB")
    fresh = build_hf(family, seed=2).eval()
    ids = example_ids()
    with torch.inference_mode():
        want = source(ids).logits
    plan = mc.Plan(mode="infer", device_budget=model_bytes(source), weights="disk", offload_dir=str(tmp_path / "off"),
                   weights_checkpoint=str(tmp_path))
    program = mc.compile(fresh, plan, example_inputs=(ids,))
    torch.testing.assert_close(program(ids).logits, want, rtol=1e-4, atol=1e-4)
    program.close()


def test_a_checkpoint_of_another_model_names_its_nearest_tensors(tmp_path):
    build_hf("qwen3_moe", seed=1).save_pretrained(tmp_path)
    other = build_hf("llama")
    plan = mc.Plan(mode="infer", device_budget=model_bytes(other), weights_checkpoint=str(tmp_path))
    with pytest.raises(StorageError, match=r"has no tensor 'model.layers.0.mlp.gate_proj.weight'.*nearest names"):
        mc.compile(other, plan, example_inputs=(example_ids(),))


def test_infer_cli_runs_a_hugging_face_model(capsys):
    code = infer_main(["hf:qwen2_moe", "--budget", "1MiB", "--max-new-tokens", "2", "--prompt-ids", "1", "2", "3"])
    out = capsys.readouterr().out
    assert code == 0
    assert "max |ring - eager| = 0.00e+00" in out
    assert "equal to eager greedy decoding: True" in out


@pytest.mark.parametrize("argv,message", [
    (["tiny-moe", "--budget", "1MiB", "--prompt-ids", "999", "1"], "--prompt-ids [999]: token ids must lie in 0..255"),
    (["tiny-moe", "--budget", "-5"], "--budget ('-5') must be positive"),
    (["hf:nosuchfam", "--budget", "1MiB"], "hf:nosuchfam: unknown transformers model type; tiny presets:"),
])
def test_infer_cli_bad_arguments_give_one_line(argv, message, capsys):
    assert infer_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err) < 2000                      # not transformers' list of every model type


def test_budget_sizes_a_user_would_write():
    assert parse_bytes("300MiB") == 300 * 2**20
    assert parse_bytes("1.5GB") == 1_500_000_000
    with pytest.raises(PlanError, match="must be positive"):
        parse_bytes("-1KiB")
    with pytest.raises(ValueError, match="nosuchfam"):
        hf_config("nosuchfam", {})


@pytest.mark.parametrize("argv,message", [
    (["--config", "num_experts=3", "--ep", "2"],
     "layers.0.ffn.num_experts (3) is not divisible by --ep (2); set --ep to one of its divisors (1, 3)"),
    (["--ep", "4"], "--ep 4 spreads each layer's experts over 4 ranks, and this run has 2; pass --nproc-per-node 4"),
    (["--config", "n_layer=3"], "unknown override(s) ['n_layer']"),
])
def test_train_launcher_refuses_a_bad_plan_before_starting_ranks(argv, message, capsys, monkeypatch):
    """``--nproc-per-node 2`` checks the plan against the model once, in the launcher: one line,
    not torchrun's report of every failed rank. ``--config`` works as in inspect and infer."""
    from moesys_compile import train
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(train, "launch", lambda *a, **k: pytest.fail("ranks were launched"))
    assert train.main(["--model", "tiny-moe", "--steps", "1", "--nproc-per-node", "2", *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_output_into_a_closed_pipe_is_no_traceback():
    """``moesys-compile inspect ... | head``: the reader closing early ends the command quietly."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "moesys_compile", "inspect", "--list-passes"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr


@pytest.mark.parametrize("offload", ["disk_offload", "cpu_offload"])
def test_a_compiled_model_offloaded_by_accelerate_computes_what_it_did(offload, tmp_path):
    """Compiling recognises the MoE blocks in place. The canonical block reads the expert and
    router weights without calling their modules, so it runs accelerate's offload hooks on them
    itself; otherwise those weights were left offloaded and the model's output changed silently."""
    accelerate = pytest.importorskip("accelerate")
    model = build_hf("qwen3_moe").eval()
    ids = example_ids()
    with torch.inference_mode():
        want = model(ids).logits
    mc.compile(model, mc.Plan(mode="train"), example_inputs=(ids,))
    offloaded = copy.deepcopy(model)
    if offload == "disk_offload":
        accelerate.disk_offload(offloaded, str(tmp_path), execution_device="cpu")
    else:
        accelerate.cpu_offload(offloaded, execution_device="cpu")
    assert any(type(m).__name__ == "CanonicalMoEBlock" for m in offloaded.modules())
    with torch.inference_mode():
        torch.testing.assert_close(offloaded(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_train_takes_model_in_first_place_as_inspect_and_infer_do(tmp_path, capsys):
    """``moesys-compile train tiny-moe ...`` (it said "unrecognized arguments: tiny-moe"); a MODEL
    and a --model that differ are refused, and neither means tiny-moe."""
    from moesys_compile import train
    assert train.parse_args(["tiny-gpt", "--steps", "1"]).model == "tiny-gpt"
    assert train.parse_args(["--steps", "1"]).model == "tiny-moe"
    assert train.parse_args(["tiny-gpt", "--model", "tiny-gpt"]).model == "tiny-gpt"
    with pytest.raises(SystemExit):
        train.parse_args(["tiny-gpt", "--model", "tiny-moe"])
    assert "MODEL 'tiny-gpt' and --model 'tiny-moe' name different models; give one" in capsys.readouterr().err
    argv = ["tiny-gpt", "--override", "n_layers=1", "--steps", "2", "--batch-size", "2", "--seq-len", "8",
            "--ckpt-dir", str(tmp_path / "ckpt")]
    assert train.main(argv) == 0
    assert (tmp_path / "ckpt" / "step_000002").is_dir()
