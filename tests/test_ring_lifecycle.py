"""Ring programs over their lifetime, as a notebook or a service runs them: many programs made and
dropped, programs sharing an offload directory, failures in the middle of a call (in a section,
in the copy thread, an interrupt), calls from other threads, and edge plans."""

import dataclasses
import gc
import os
import re
import threading
import time
import weakref

import pytest
import torch

import moesys_compile as mc
from moesys_compile.generate import eager_generate
from moesys_compile.infer import model_bytes
from moesys_compile.programs import ring as ring_program
from moesys_compile.programs.ring import RingProgram
from moesys_compile.runtime import ring as ring_runtime
from moesys_compile.runtime import storage
from moesys_compile.runtime.storage import StorageError

IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))


def build(name="tiny-moe"):
    torch.manual_seed(0)
    return mc.models.build(name, n_layers=4).eval()


@pytest.fixture(scope="module")
def lowered():
    """tiny-moe lowered once at a third of its size (sections rotate through two slots), its eager output."""
    model = build()
    gm, ctx = mc.lower(model, mc.Plan(mode="infer", device_budget=model_bytes(model) // 3), (IDS,))
    with torch.inference_mode():
        expected = model(IDS)
    return gm, ctx, expected


def program_on(lowered, tier="host", offload_dir=None):
    gm, ctx, _ = lowered
    ctx.plan = dataclasses.replace(ctx.plan, weights=tier, offload_dir=offload_dir and str(offload_dir))
    return RingProgram(gm, ctx)


def copy_threads():
    return [t for t in threading.enumerate() if t.name == "moesys-ring-copy"]


def ring_files_in_use(directory):
    """Offload files of ``directory`` this process has open or mapped."""
    fds = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}
    maps = {line.strip() for line in open("/proc/self/maps")}     # a deleted file still shows its path
    return {p for p in fds | maps if str(directory) in p}


def test_programs_closed_or_dropped_release_threads_files_and_mappings(lowered, tmp_path):
    _, _, expected = lowered
    threads = len(copy_threads())
    for i in range(4):
        program = program_on(lowered, "disk", tmp_path)
        torch.testing.assert_close(program(IDS), expected, atol=1e-6, rtol=0)
        assert len(copy_threads()) == threads + 1 and ring_files_in_use(tmp_path)
        if i % 2:
            program.close()                  # closed, then dropped
            assert not list(tmp_path.iterdir())                  # close deletes the offload files
            torch.testing.assert_close(program(IDS), expected, atol=1e-6, rtol=0)   # still mapped
        alive = weakref.ref(program)
        del program                          # odd: dropped without close
        gc.collect()
        assert alive() is None
        time.sleep(0.05)                     # a stopped copy thread may take a moment to exit
        assert len(copy_threads()) == threads
        assert not ring_files_in_use(tmp_path) and not list(tmp_path.iterdir())


def test_programs_share_an_offload_dir_with_files_another_program_left(lowered, tmp_path):
    _, _, expected = lowered
    leftover = tmp_path / "ring-deadbeef-00000.safetensors"      # as a crashed process leaves it
    leftover.write_bytes(b"not a safetensors file")
    gpt = build("tiny-gpt")
    with torch.inference_mode():
        expected_gpt = gpt(IDS)
    first, second = program_on(lowered, "disk", tmp_path), program_on(lowered, "disk", tmp_path)
    other = mc.compile(gpt, mc.Plan(mode="infer", device_budget=model_bytes(gpt) // 3, weights="disk",
                                    offload_dir=str(tmp_path)), example_inputs=(IDS,))
    for _ in range(2):                       # interleaved: each ring keeps its own slots and files
        torch.testing.assert_close(first(IDS), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(other(IDS), expected_gpt, atol=1e-6, rtol=0)
        torch.testing.assert_close(second(IDS), expected, atol=1e-6, rtol=0)
    files_of_first = set(first.store.files)
    del first
    gc.collect()
    assert not any(p.exists() for p in files_of_first)
    assert all(p.exists() for p in second.store.files + other.store.files) and leftover.exists()
    torch.testing.assert_close(second(IDS), expected, atol=1e-6, rtol=0)


def test_an_offload_dir_that_cannot_hold_the_files_names_plan_offload_dir(lowered, tmp_path, monkeypatch):
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"")
    for where in (a_file, a_file / "sub"):
        with pytest.raises(StorageError, match=r"Plan.offload_dir \(.*weights.bin.*\) cannot be used as a directory"):
            program_on(lowered, "disk", where)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(storage, "save_file", full_disk)
    with pytest.raises(StorageError, match=r"cannot write the offload file .*ring-.*No space left.*Plan.offload_dir"):
        program_on(lowered, "disk", tmp_path / "offload")
    assert not list((tmp_path / "offload").iterdir())


@pytest.mark.parametrize("failure", ["bad input", "section raises", "interrupt"])
def test_a_failure_while_the_next_section_loads_reaches_the_caller(lowered, failure, monkeypatch):
    _, _, expected = lowered
    program = program_on(lowered)
    torch.testing.assert_close(program(IDS), expected, atol=1e-6, rtol=0)
    load = ring_runtime.RingExecutor._load

    def slow_load(self, *args):              # the copy thread is still loading when the section fails
        time.sleep(0.02)
        return load(self, *args)
    monkeypatch.setattr(ring_runtime.RingExecutor, "_load", slow_load)
    if failure == "bad input":
        with pytest.raises(TypeError, match=r"torch.float32, but the program was compiled with torch.int64"):
            program(IDS.float())        # embedding refuses float ids inside the first section
    else:
        section = program._runtimes["forward"].sections[3]
        module, error = section.module, ValueError if failure == "section raises" else KeyboardInterrupt

        def failing(*args):
            raise error("stop")
        section.module = failing
        with pytest.raises(error):
            program(IDS)
        section.module = module
    for _ in range(2):
        torch.testing.assert_close(program(IDS), expected, atol=1e-6, rtol=0)
    program.close()


def test_a_truncated_offload_file_is_named_instead_of_crashing(lowered, tmp_path):
    _, _, expected = lowered
    program = program_on(lowered, "disk", tmp_path)
    torch.testing.assert_close(program(IDS), expected, atol=1e-6, rtol=0)
    first, last = program.store.files[0], program.store.files[-1]
    first.unlink()                           # deleted: the mapping still holds the data
    torch.testing.assert_close(program(IDS), expected, atol=1e-6, rtol=0)
    os.truncate(last, 100)                   # truncated: reading the mapping would be SIGBUS
    for _ in range(2):                       # and again: the ring stays failed, it does not hang
        with pytest.raises(RuntimeError, match=f"copy thread failed loading section .*{re.escape(str(last))}.*"
                                               f"truncated to 100 bytes.*Plan.offload_dir"):
            program(IDS)
    program.close()


def test_an_interrupt_while_switching_rings_leaves_the_program_usable(lowered, monkeypatch):
    model, (_, _, expected) = build(), lowered
    program = program_on(lowered)
    program(IDS)
    runtime = ring_program.RingRuntime
    interrupts = [KeyboardInterrupt()]

    def interrupted_runtime(*args):          # Ctrl-C after the forward ring closed, before the next is built
        if interrupts:
            raise interrupts.pop()
        return runtime(*args)
    monkeypatch.setattr(ring_program, "RingRuntime", interrupted_runtime)
    with pytest.raises(KeyboardInterrupt):
        program.generate(IDS, 2)             # the forward ring is closed for the decoding one
    assert torch.equal(program.generate(IDS, 2), eager_generate(model, IDS, 2))
    torch.testing.assert_close(program(IDS), expected, atol=1e-6, rtol=0)
    program.close()


def test_calls_from_several_threads_take_turns(lowered):
    _, _, expected = lowered
    program = program_on(lowered)
    outputs, errors = [], []

    def calls():
        try:
            outputs.extend(program(IDS) for _ in range(3))
        except Exception as exc:            # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=calls) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and len(outputs) == 9
    for output in outputs:
        torch.testing.assert_close(output, expected, atol=1e-6, rtol=0)
    program.close()


def test_the_minimum_budget_the_error_names_runs_equal_to_eager():
    model = build()
    with torch.inference_mode():
        expected = model(IDS)
    with pytest.raises(mc.PlanError, match=r"below the minimum (\d+) bytes") as info:
        mc.compile(model, mc.Plan(mode="infer", device_budget=model_bytes(model) // 64), example_inputs=(IDS,))
    minimum = int(re.search(r"minimum (\d+) bytes", str(info.value)).group(1))
    program = mc.compile(model, mc.Plan(mode="infer", device_budget=minimum), example_inputs=(IDS,))
    torch.testing.assert_close(program(IDS), expected, atol=1e-6, rtol=0)
    assert program.stats["peak_device_bytes"] <= program.stats["budget_bytes"] == minimum


def test_an_unknown_option_is_named_with_the_known_ones(lowered):
    gm, ctx, _ = lowered
    ctx.plan = dataclasses.replace(ctx.plan, options={"ring_worksapce": 1 << 20})
    with pytest.warns(UserWarning, match=r"Plan.options\['ring_worksapce'\] is not an option of ring inference.*"
                                         r"did you mean 'ring_workspace'.*known options: progress, ring_workspace"):
        RingProgram(gm, ctx).close()
    ctx.plan = dataclasses.replace(ctx.plan, options={})


def test_generate_edges(lowered):
    model = build()
    program = program_on(lowered)
    with pytest.raises(ValueError, match=r"max_new_tokens must be >= 1 \(got 0\)"):
        program.generate(IDS, 0)
    one_token = torch.randint(0, 256, (3, 1), generator=torch.Generator().manual_seed(1))   # batch 3, one token
    for ids, new in ((one_token, 3), (one_token, 1), (IDS, 2)):
        assert torch.equal(program.generate(ids, new), eager_generate(model, ids, new))
    program.close()


def test_a_ring_lowered_again_reads_finer_expert_groups_from_the_stored_ones(tmp_path):
    """A call too large for the compiled ring gets one with smaller slots, whose expert groups
    are finer: their rows are read from the groups already on disk, not written a second time."""
    torch.manual_seed(0)
    model = mc.models.build("tiny-moe", num_experts=8, dim=128, ffn_dim=512).eval()
    plan = mc.Plan(mode="infer", device_budget=int(model_bytes(model) * 0.4), weights="disk", offload_dir=str(tmp_path))
    program = mc.compile(model, plan, example_inputs=(IDS,))
    stored, files = program.store.nbytes, sorted(tmp_path.iterdir())
    groups = {key for key in program.store.locations if "[" in key}
    longer = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(program(longer), model(longer), rtol=0, atol=1e-6)
    assert program.stats["compiled_for"] == (2, 24)
    finer = {key for key in program.store.locations if "[" in key} - groups
    assert groups and finer, "the call's ring groups the experts otherwise than the compiled one"
    assert program.store.nbytes == stored == model_bytes(model) and sorted(tmp_path.iterdir()) == files
