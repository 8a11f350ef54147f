"""Ring programs against what users do around them: threads that capture while others call,
loading weights, copies, calls after close, plans whose ring fields would be ignored, CLI checks."""

import copy
import gc
import io
import pickle
import re
import threading
import time

import pytest
import torch
from torch import nn

import moesys_compile as mc
import moesys_compile.infer as infer_cli
from moesys_compile.programs.ring import RingProgram, RingWeightsError

IDS = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))


def build(name="tiny-moe"):
    torch.manual_seed(0)
    return mc.models.build(name).eval()


def ring(model, **plan):
    program = mc.compile(model, mc.Plan(mode="infer", device_budget="512KiB", **plan), example_inputs=(IDS,))
    assert isinstance(program, RingProgram)
    return program


def copy_threads():
    return [t for t in threading.enumerate() if t.name == "moesys-ring-copy"]


# -- threads: captures and ring calls take turns, process-wide --------------------------------------


class SlowToTrace(nn.Module):
    """Signals ``started`` from inside its forward, then keeps the tracer busy for a while."""

    def __init__(self, started: threading.Event):
        super().__init__()
        self.lin, self.started = nn.Linear(4, 4), started

    def forward(self, x):
        self.started.set()
        time.sleep(0.5)
        return self.lin(x)


def test_a_program_called_while_another_thread_traces_waits_for_the_capture():
    """torch.fx patches nn.Module.__call__ process-wide while it traces: a ring call in that window
    used to run as if traced ("module is not installed as a submodule")."""
    program = ring(build("tiny-gpt"))
    with torch.inference_mode():
        want = program(IDS)
    started, results = threading.Event(), []

    def call_during_capture():
        started.wait(timeout=30)
        try:
            results.append(program(IDS))
        except Exception as exc:        # noqa: BLE001 - reported below
            results.append(exc)
    thread = threading.Thread(target=call_during_capture)
    thread.start()
    mc.trace(SlowToTrace(started), (torch.randn(2, 4),))
    thread.join(timeout=60)
    assert len(results) == 1 and not isinstance(results[0], Exception), results
    torch.testing.assert_close(results[0], want, atol=0, rtol=0)
    program.close()


def test_generate_lowering_in_one_thread_leaves_another_program_in_another_thread_working():
    first, second = ring(build("tiny-moe")), ring(build("tiny-gpt"))
    stop, errors, calls = threading.Event(), [], []

    def serve_second():
        while not stop.is_set():
            try:
                calls.append(second(IDS))
            except Exception as exc:    # noqa: BLE001 - reported below
                errors.append(exc)
                return
    thread = threading.Thread(target=serve_second)
    thread.start()
    try:
        for new in (3, 9, 17):          # each a new size: generate lowers (fx-traces) its step graph again
            first.generate(IDS[:1, :4], new)
        deadline = time.monotonic() + 30    # the lock is not fair: let the other thread have its turn
        while not calls and not errors and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, errors
    assert calls
    first.close(), second.close()


# -- weights are staged at compile -----------------------------------------------------------------


def test_load_state_dict_into_a_ring_program_is_refused_and_changes_nothing():
    model = build()
    program = ring(model)
    with torch.inference_mode():
        want = program(IDS)
    other = build()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    for state in (other.state_dict(), {"graph_module." + k: v for k, v in other.state_dict().items()}):
        with pytest.raises(RingWeightsError, match=r"staged the model's weights when it was compiled.*compile it "
                                                   r"again.*weights_checkpoint=DIR"):
            program.load_state_dict(state, strict=False)
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)
    torch.testing.assert_close(program(IDS), want, atol=0, rtol=0)
    program.close()


# -- copies ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle", "torch.save"])
def test_a_ring_program_cannot_be_copied_or_pickled(how):
    program = ring(build())
    attempt = {"copy": copy.copy, "deepcopy": copy.deepcopy, "pickle": pickle.dumps,
               "torch.save": lambda p: torch.save(p, io.BytesIO())}[how]
    with pytest.raises(TypeError, match=r"a RingProgram cannot be copied or pickled: it holds device slots, copy "
                                        r"threads and offload files; compile the model again"):
        attempt(program)
    program.close()


# -- close -----------------------------------------------------------------------------------------


def test_a_call_after_close_runs_again_and_another_close_releases_it(tmp_path):
    """As documented (README, ``RingProgram.close``): the program starts again; a second close,
    or dropping it, releases the copy thread and the offload files once more."""
    threads = len(copy_threads())
    program = ring(build(), weights="disk", offload_dir=str(tmp_path))
    with torch.inference_mode():
        want = program(IDS)
    program.close()
    assert len(copy_threads()) == threads and not list(tmp_path.iterdir())
    torch.testing.assert_close(program(IDS), want, atol=0, rtol=0)
    assert len(copy_threads()) == threads + 1
    program.close()
    time.sleep(0.05)                    # a stopped copy thread may take a moment to exit
    assert len(copy_threads()) == threads and not list(tmp_path.iterdir())
    del program
    gc.collect()


# -- plans -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields,named", [
    (dict(ring_slots=3), "ring_slots (3)"),
    (dict(weights="disk", offload_dir="/tmp/ring"), "weights ('disk')"),
    (dict(offload_dir="/tmp/ring"), "offload_dir ('/tmp/ring')"),
])
def test_an_infer_plan_without_a_budget_refuses_the_fields_only_a_ring_reads(fields, named):
    with pytest.raises(mc.PlanError, match=re.escape(named) + r" applies to a ring.*set device_budget"):
        mc.Plan(mode="infer", **fields)
    assert mc.Plan(mode="infer", device_budget="1MiB", **fields).device_budget == 1 << 20
    with pytest.raises(mc.PlanError, match="applies to mode='infer'"):   # train plans never build a ring
        mc.Plan(mode="train", **fields)


def test_an_infer_plan_over_several_ranks_is_refused_at_compile():
    """world_size and expert_parallel were accepted and ignored by infer programs."""
    model = mc.models.build("tiny-moe")
    with pytest.raises(mc.PlanError, match=r"world_size=2, expert_parallel=2: an infer program runs on one device"):
        mc.compile(model, mc.Plan(mode="infer", world_size=2, expert_parallel=2),
                   example_inputs=(torch.randint(0, 256, (2, 4)),))


# -- CLI -------------------------------------------------------------------------------------------


def test_infer_cli_refuses_a_negative_max_new_tokens_before_loading_the_model(monkeypatch, capsys):
    def no_run(*args, **kwargs):
        raise AssertionError("the ring ran before --max-new-tokens was checked")
    monkeypatch.setattr(infer_cli, "run_ring", no_run)
    with pytest.raises(SystemExit) as info:
        infer_cli.main(["tiny-moe", "--budget", "512KiB", "--max-new-tokens", "-1"])
    assert info.value.code == 2
    assert "--max-new-tokens (-1) must be >= 0" in capsys.readouterr().err


# -- hybrid linear-attention models ------------------------------------------------------------------


def test_size_estimates_evaluate_torchs_integer_functions():
    """A mamba layer's chunk count is a FloorDiv of the sequence length in its symbolic sizes."""
    from torch.utils._sympy.functions import CeilDiv, FloorDiv, ModularIndexing

    from moesys_compile.frontend.annotation import B, S, size_function

    exprs = [FloorDiv(S, 8) * B, CeilDiv(S, 8), ModularIndexing(S, 2, 4), 3 * B * S]
    assert size_function(exprs)(3, 21) == [6, 3, 2, 189]


@pytest.mark.parametrize("family", ["granitemoehybrid"])     # (qwen3_next holds the same FloorDiv)
def test_a_hybrid_linear_attention_model_runs_through_the_ring(family):
    pytest.importorskip("transformers")
    from moesys_compile.models.hf import build_hf

    model = build_hf(family).eval()
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    program = mc.compile(model, mc.Plan(mode="infer", device_budget="32MiB"), example_inputs=(ids,))
    with torch.inference_mode():
        torch.testing.assert_close(program(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
