"""RingProgram end to end: parity with eager, storage tiers, the budget, greedy decoding, the CLI."""

import dataclasses
import json
import weakref

import pytest
import sympy
import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

import moesys_compile as mc
from moesys_compile.generate import eager_generate
from moesys_compile.infer import main, model_bytes
from moesys_compile.ir import is_op
from moesys_compile.programs.ring import RingBudgetError, RingProgram
from moesys_compile.runtime import ring as ring_runtime
from moesys_compile.runtime import workspace as ring_workspace

# deep enough that 1/8 of the model still holds two copies of the largest weight (the 64 KiB
# embedding) next to the activations; MoE layers split into expert groups below that
MODELS = {"tiny-gpt": dict(n_layers=10), "tiny-moe": dict(n_layers=6)}


def build(name):
    torch.manual_seed(0)
    return mc.models.build(name, **MODELS[name]).eval()


def ring(model, fraction, tier, tmp_path, ids, **plan):
    plan = mc.Plan(mode="infer", device_budget=model_bytes(model) // fraction, weights=tier,
                   offload_dir=str(tmp_path / "offload"), **plan)
    program = mc.compile(model, plan, example_inputs=(ids,))
    assert isinstance(program, RingProgram)
    return program


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("fraction", [2, 4, 8])
def test_forward_equals_eager_on_both_tiers(name, fraction, tmp_path):
    model = build(name)
    ids = torch.randint(0, 256, (2, 9))
    budget = model_bytes(model) // fraction
    gm, ctx = mc.lower(model, mc.Plan(mode="infer", device_budget=budget), (ids,))   # one lowering, two tiers
    with torch.inference_mode():
        expected = {shape: model(ids[:shape[0], :shape[1]]) for shape in [(2, 9), (1, 7), (2, 3)]}
    for tier in ("host", "disk"):
        ctx.plan = dataclasses.replace(ctx.plan, weights=tier, offload_dir=str(tmp_path / tier))
        program = RingProgram(gm, ctx)
        for shape, want in list(expected.items()) * 2:          # twice: the ring wraps across calls
            got = program(ids[:shape[0], :shape[1]])
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
            stats = program.stats
            assert stats["peak_device_bytes"] <= stats["budget_bytes"] == budget
        assert stats["sections"] > stats["slots"]               # the weights really rotate through the ring
        assert stats["bytes_moved"] >= model_bytes(model) - 2 * stats["slot_bytes"]
        assert program.store.tier == tier
        files = list((tmp_path / tier).glob("ring-*.safetensors")) if tier == "disk" else []
        assert bool(files) == (tier == "disk")
        program.close()
        assert not any(f.exists() for f in files)                # close deletes them
    assert not (tmp_path / "host").exists()


def test_program_never_reads_the_model_weights(tmp_path):
    model = build("tiny-moe")
    ids = torch.randint(0, 256, (2, 9))
    with torch.inference_mode():
        want = model(ids)
    program = ring(model, 4, "disk", tmp_path, ids)
    for p in model.parameters():
        p.data.zero_()       # only the disk tier still has the weights (through .data: not a change torch counts)
    torch.testing.assert_close(program(ids), want, atol=1e-6, rtol=0)


def test_resident_weights_never_exceed_the_slots(tmp_path, monkeypatch):
    """Independent count: every load of the copy thread replaces one slot's section; the
    weight bytes on the device (sum over slots of what they hold) stay within the slot region."""
    model = build("tiny-gpt")
    ids = torch.randint(0, 256, (2, 8))
    program = ring(model, 8, "host", tmp_path, ids)
    held, peaks = {}, []
    original = ring_runtime.RingExecutor._load

    def counting_load(self, load, slot):
        held[slot] = load.nbytes
        assert load.nbytes <= self.pool.slot_bytes
        peaks.append(sum(held.values()))
        return original(self, load, slot)
    monkeypatch.setattr(ring_runtime.RingExecutor, "_load", counting_load)
    program(ids)
    program(ids)
    layout = program.context.extras["ring"]
    assert len(peaks) >= 2 * len(layout.sections) - layout.slots
    assert max(peaks) <= layout.slots * layout.slot_bytes
    assert max(peaks) + layout.workspace <= layout.budget < model_bytes(model)


def test_a_larger_call_runs_in_micro_batches_through_the_compiled_ring(tmp_path):
    """Past the workspace, each section runs over slices of the batch while its weights sit in
    the slot: the weights still move once per call, and the estimate stays within the budget."""
    model = build("tiny-moe")
    program = ring(model, 2, "host", tmp_path, torch.randint(0, 256, (8, 16)))
    whole = torch.randint(0, 256, (8, 16))
    program(whole)
    moved_whole = program.stats["bytes_moved"]
    assert program.stats["micro_batches"] == 1 and program.aux_loss is not None
    ids = torch.randint(0, 256, (5, 33))
    with torch.inference_mode():
        want = model(ids)
    torch.testing.assert_close(program(ids), want, atol=1e-6, rtol=0)
    stats = program.stats
    assert stats["micro_batches"] > 1 and stats["compiled_for"] == (8, 16)
    assert stats["activation_bytes"] <= program.context.extras["ring"].workspace
    assert stats["peak_device_bytes"] <= stats["budget_bytes"]
    assert stats["bytes_moved"] == moved_whole
    assert program.aux_loss is None          # a mean over the whole batch: not defined by the slices


def test_a_call_too_large_for_the_compiled_ring_gets_a_ring_lowered_for_it(tmp_path):
    model = build("tiny-gpt")
    program = ring(model, 2, "host", tmp_path, torch.randint(0, 256, (1, 4)))
    ids = torch.randint(0, 256, (8, 16))
    with torch.inference_mode():
        torch.testing.assert_close(program(ids), model(ids), atol=1e-6, rtol=0)
    stats = program.stats
    assert stats["compiled_for"] == (8, 16) and stats["micro_batches"] == 1
    assert stats["activation_bytes"] > program.context.extras["ring"].workspace   # the compiled ring could not
    assert stats["peak_device_bytes"] <= stats["budget_bytes"]
    small = torch.randint(0, 256, (1, 4))          # later calls keep the larger ring
    torch.testing.assert_close(program(small), model(small), atol=1e-6, rtol=0)
    assert program.stats["compiled_for"] == (8, 16)


def test_a_growing_call_lowers_again_at_powers_of_two_only(tmp_path, monkeypatch):
    """A caller's own decoding loop (one token longer each call) past the compiled workspace: the
    ring lowered for a call is sized for its length rounded up to a power of two, so 16 calls
    from seq 5 to 20 lower three times (for 8, 16 and 32), not sixteen."""
    from moesys_compile import api
    model = build("tiny-gpt")
    program = ring(model, 2, "host", tmp_path, torch.randint(0, 256, (1, 4)))
    lowerings = []
    lower_prepared = api.lower_prepared
    monkeypatch.setattr(api, "lower_prepared", lambda *args: lowerings.append(1) or lower_prepared(*args))
    ids = torch.randint(0, 256, (1, 20))
    for seq in range(5, 21):
        with torch.inference_mode():
            torch.testing.assert_close(program(ids[:, :seq]), model(ids[:, :seq]), atol=1e-6, rtol=0)
        assert program.stats["peak_device_bytes"] <= program.stats["budget_bytes"]
    assert len(lowerings) == 3


def test_a_call_no_ring_holds_whole_runs_in_micro_batches_on_a_ring_lowered_for_them(tmp_path):
    """Neither the compiled ring (in micro-batches) nor a ring sized for the whole call fits:
    the ring lowered with the workspace of one sequence at a time (what the compiled ring
    estimated, the carried values held whole) takes the call in micro-batches."""
    model = build("tiny-moe")
    program = ring(model, 2, "host", tmp_path, torch.randint(0, 256, (2, 8)))
    ids = torch.randint(0, 256, (8, 24))
    with torch.inference_mode():
        torch.testing.assert_close(program(ids), model(ids), atol=1e-6, rtol=0)
    stats, runtime = program.stats, program.forward_runtime()
    assert stats["compiled_for"] == (8, 24) and stats["micro_batches"] > 1
    assert stats["peak_device_bytes"] <= stats["budget_bytes"]
    assert runtime.sizer.activation_bytes([ids]) > runtime.layout.workspace >= stats["activation_bytes"]


def test_a_call_that_fits_no_ring_of_the_budget_raises_and_the_ring_stays_usable(tmp_path):
    model = build("tiny-gpt")
    program = ring(model, 8, "host", tmp_path, torch.randint(0, 256, (1, 4)))
    with pytest.raises(RingBudgetError, match=r"does not fit Plan.device_budget: the ring compiled at batch 1, seq 4 "
                                              r"cannot take it .*nor can a ring lowered for it .*below the minimum "
                                              r"\d+ bytes.*batch 8, seq 64.*fewer sequences per call"):
        program(torch.randint(0, 256, (8, 64)))
    small = torch.randint(0, 256, (1, 4))          # the ring is still in order after the refusal
    torch.testing.assert_close(program(small), model(small), atol=1e-6, rtol=0)


def test_micro_batch_estimate_covers_the_whole_batch_at_one_slice(tmp_path):
    """With one slice as large as the batch, the split estimate (values carried between sections
    held whole, the outputs gathered into one) is never below the unsplit liveness peak."""
    model = build("tiny-moe")
    ids = torch.randint(0, 256, (4, 12))
    runtime = ring(model, 2, "host", tmp_path, ids).forward_runtime()
    sizer, count = runtime.sizer, len(runtime.sections)
    roots, frees = sizer.liveness
    for batch, seq in [(1, 1), (4, 12), (7, 31)]:
        own, scratch = sizer.node_bytes(batch, seq)
        held = ring_workspace.carried_bytes(own, roots, frees, sizer.section_of, count)
        inside = ring_workspace.slice_peaks(own, roots, frees, sizer.section_of, count, scratch)
        assert len(held) == count + 1 and held[-1] > 0              # the logits stay to the end
        assert max(h + i for h, i in zip(held, inside)) >= ring_workspace.peak_live_bytes(own, roots, frees, scratch)


def test_a_sections_own_outputs_count_once_while_it_runs_in_slices():
    """Nodes: input (section -1), a value section 0 makes and section 1 reads, a graph output
    section 1 makes. While section 0 runs its last slice, the earlier slices of its output are
    held and the last one is among its temporaries; a gathered output is held whole from the
    start."""
    full, one_slice = [4096, 8192, 2048, 0], [1024, 2048, 512, 0]      # batch 4, slices of 1
    roots, section_of = [0, 1, 2, 3], [-1, 0, 1, 2]
    frees = [[], [0], [1], []]                 # the input read last in section 0, the value in 1
    assert ring_workspace.carried_bytes(full, roots, frees, section_of, 2) == [4096 + 8192, 8192 + 2048, 2048]
    assert ring_workspace.carried_bytes(full, roots, frees, section_of, 2, one_slice) == [
        4096 + 8192 - 2048, 8192 + 2048 - 512, 2048]
    assert ring_workspace.carried_bytes(full, roots, frees, section_of, 2, one_slice, frozenset({2})) == [
        4096 + 8192 - 2048, 8192 + 2048, 2048]


def test_capacity_dropping_is_never_split_into_micro_batches(tmp_path):
    from moesys_compile.programs.ring_calls import micro_batch_plan
    model = build("tiny-moe")
    ids = torch.randint(0, 256, (2, 9))
    gm, ctx = mc.lower(model, mc.Plan(mode="infer", device_budget=model_bytes(model) // 2, capacity_factor=1.0),
                       (ids,))
    join, reason = micro_batch_plan(gm, ctx)
    assert "capacity_factor" in reason and "Plan.capacity_factor=0" in reason
    gm, ctx = mc.lower(model, mc.Plan(mode="infer", device_budget=model_bytes(model) // 2), (ids,))
    join, reason = micro_batch_plan(gm, ctx)
    assert reason is None and sorted(join.values()) == ["cat", "drop"]
    capped = mc.models.build("tiny-moe", **MODELS["tiny-moe"], capacity_factor=1.0).eval()   # the layer's own
    for factor, splits in ((None, False), (0, True)):         # the advice above: 0 is dropless whatever the layer's
        gm, ctx = mc.lower(capped, mc.Plan(mode="infer", device_budget=model_bytes(capped) // 2,
                                           capacity_factor=factor), (ids,))
        assert (micro_batch_plan(gm, ctx)[1] is None) == splits


def test_activation_estimate_covers_the_expert_kernels_scratch(tmp_path, monkeypatch):
    """The torch experts kernel allocates temporaries besides its outputs; the fused node's
    ``scratch_bytes`` covers what it holds at once, and the ring's estimate includes it. On one
    thread the kernel holds its slot rows through the call, and its block buffers and the gather
    buffer one after another."""
    from moesys_compile.frontend.annotation import B, S
    from moesys_compile.kernels import cpu_threads, experts
    model = build("tiny-moe")
    ids = torch.randint(0, 256, (2, 9))
    program = ring(model, 2, "host", tmp_path, ids, kernels="torch")
    fused = [n for n in program.graph_module.graph.nodes if is_op(n, "fused_experts", namespace="moesys_kernels")]
    estimate = max(int(sympy.sympify(n.meta["moesys"]["scratch_bytes"]).xreplace({B: 2, S: 9})) for n in fused)
    asked, held = [], []
    workspace, forward = cpu_threads.workspace, experts._FORWARD["torch"]

    def counting_workspace(sizes, like, purpose="block", keep=True):
        asked.append((purpose, sum(r * c for r, c in sizes) * like.element_size()))
        return workspace(sizes, like, purpose, keep)

    def counting_forward(*args, **kwargs):
        asked.clear()
        result = forward(*args, **kwargs)
        rows = sum(n for purpose, n in asked if purpose == "rows")
        held.append(rows + max(n for purpose, n in asked if purpose != "rows"))
        return result
    monkeypatch.setattr(cpu_threads, "workspace", counting_workspace)
    monkeypatch.setitem(experts._FORWARD, "torch", counting_forward)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.testing.assert_close(program(ids), model(ids), atol=1e-6, rtol=0)
    finally:
        torch.set_num_threads(threads)
    assert len(held) == len(fused) and 0 < max(held) <= estimate
    exprs = [int(sympy.sympify(e).xreplace({B: 2, S: 9}))
             for e in ring_workspace.activation_exprs(program.graph_module, program.context)]
    without_scratch = ring_workspace.peak_live_bytes(exprs, *ring_workspace.liveness_plan(program.graph_module))
    assert without_scratch < program.stats["activation_bytes"]


def test_expert_groups_scratch_covers_what_their_kernel_holds(tmp_path, monkeypatch):
    """Experts split between sections (expert groups) run the experts kernel on their rows; each
    group's ``scratch_bytes`` covers the kernel's temporaries and its output rows, and the rows
    all go to one group in the worst case."""
    from moesys_compile.frontend.annotation import B, S
    from moesys_compile.kernels import cpu_threads, experts
    model = build("tiny-moe")
    ids = torch.randint(0, 256, (2, 9))
    program = ring(model, 8, "host", tmp_path, ids, kernels="torch")
    groups = [n for n in program.graph_module.graph.nodes if is_op(n, "expert_group_mlp", namespace="moesys_ring")]
    assert groups and all(n.meta["moesys"]["lowered_to"] == "torch:expert_group_mlp" for n in groups)
    estimate = min(int(sympy.sympify(n.meta["moesys"]["scratch_bytes"]).xreplace({B: 2, S: 9})) for n in groups)
    asked, held = [], []
    workspace, forward = cpu_threads.workspace, experts._FORWARD["torch"]

    def counting_workspace(sizes, like, purpose="block", keep=True):
        asked.append(sum(r * c for r, c in sizes) * like.element_size())
        return workspace(sizes, like, purpose, keep)

    def counting_forward(*args, **kwargs):
        asked.clear()
        y, h = forward(*args, **kwargs)
        held.append(max(asked, default=0) + y.nbytes)
        return y, h
    monkeypatch.setattr(cpu_threads, "workspace", counting_workspace)
    monkeypatch.setitem(experts._FORWARD, "torch", counting_forward)
    torch.testing.assert_close(program(ids), model(ids), atol=1e-6, rtol=0)
    assert held and max(held) <= estimate, (held, estimate)
    held.clear()    # the worst case: every row to one expert of the group
    group = groups[0]
    w_up, w_down = (getattr(program.graph_module, a.target) for a in group.args[2:4])
    rows = 2 * 9 * model.config.top_k
    counts = torch.zeros(model.config.num_experts, dtype=torch.long)
    counts[group.args[4]] = rows
    y = torch.ops.moesys_ring.expert_group_mlp(torch.randn(rows, w_down.shape[1]), counts, w_up, w_down,
                                               group.args[4], group.args[5], "torch")
    assert y.abs().sum() > 0 and held[0] <= estimate, (held, estimate)


def test_with_static_shapes_a_call_larger_than_the_example_gets_its_own_ring(tmp_path, monkeypatch):
    """When symbolic shape propagation fails (shapes are then static), the activation estimate
    holds at the example only: a larger call is lowered again at its own size."""
    from moesys_compile.frontend import annotation

    def fail(*args, **kwargs):
        raise RuntimeError("symbolic propagation unavailable")
    monkeypatch.setattr(annotation, "_symbolic_inputs", fail)
    model = build("tiny-gpt")
    ids = torch.randint(0, 256, (2, 6))
    program = ring(model, 4, "host", tmp_path, ids)
    assert not program.context.annotation.symbolic
    runtime = program.forward_runtime()
    with pytest.raises(RingBudgetError, match=r"batch 2, seq 7\) is larger .*symbolic propagation unavailable"):
        runtime.plan_call([torch.randint(0, 256, (2, 7))])
    torch.testing.assert_close(program(ids[:1, :4]), model(ids[:1, :4]), atol=1e-6, rtol=0)
    longer = torch.randint(0, 256, (2, 7))
    torch.testing.assert_close(program(longer), model(longer), atol=1e-6, rtol=0)
    assert program.stats["compiled_for"] == (2, 7)


@pytest.mark.parametrize("name,tier", [("tiny-gpt", "host"), ("tiny-moe", "disk")])
def test_generate_equals_eager_greedy(name, tier, tmp_path):
    model = build(name)
    ids = torch.randint(0, 256, (2, 5))
    program = ring(model, 4, tier, tmp_path, ids)
    out = program.generate(ids, max_new_tokens=6)
    assert torch.equal(out, eager_generate(model, ids, 6))
    assert program.stats["steps"] == 6
    assert program.stats["peak_device_bytes"] <= program.stats["budget_bytes"]
    torch.testing.assert_close(program(ids), model(ids), atol=1e-6, rtol=0)   # back to the forward ring


def test_later_generate_calls_reuse_the_step_graph_they_fit(tmp_path):
    """The DecodeStep graph is lowered at the first call's prompt and longest step rounded up to
    powers of two (8 tokens over 16 positions); later calls within those sizes, of any batch the
    budget holds, reuse it, and a longer prompt lowers it again. Every call equals eager."""
    model = build("tiny-moe")
    program = ring(model, 4, "host", tmp_path, torch.randint(0, 256, (2, 5)))
    lowered_at = []
    for batch, prompt, new in [(2, 5, 6), (2, 3, 4), (1, 8, 9), (2, 9, 4)]:
        ids = torch.randint(0, 256, (batch, prompt))
        assert torch.equal(program.generate(ids, max_new_tokens=new), eager_generate(model, ids, new))
        assert program.stats["peak_device_bytes"] <= program.stats["budget_bytes"]
        key, _, sizes = program._decode_lowered["builtin"]
        lowered_at.append((key, sizes))
    assert [sizes for _, sizes in lowered_at] == [(8, 16), (8, 16), (8, 16), (16, 16)]
    assert len({key for key, _ in lowered_at}) == 2
    program.close()


def test_generate_of_more_prompts_than_the_ring_holds_decodes_them_in_groups(tmp_path):
    """Eight prompts whose KV caches the budget cannot hold at once are decoded a group at a time
    (as many as a ring lowered for them holds), each group equal to eager."""
    model = build("tiny-moe")
    program = ring(model, 2, "host", tmp_path, torch.randint(0, 256, (1, 16)))
    ids = torch.randint(0, 256, (8, 16))
    assert torch.equal(program.generate(ids, max_new_tokens=16), eager_generate(model, ids, 16))
    assert 1 < program.stats["prompt_groups"] < 8
    assert program.stats["peak_device_bytes"] <= program.stats["budget_bytes"]
    program.close()


def _hf_dir(model, path, sharded):
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path.mkdir()
    if not sharded:
        save_file(state, str(path / "model.safetensors"))
        return
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for index, part in enumerate([names[:half], names[half:]]):
        file = f"model-{index + 1:05d}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, str(path / file))
        weight_map.update({n: file for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("sharded", [False, True])
def test_weights_stream_from_a_safetensors_checkpoint(tmp_path, sharded):
    trained = build("tiny-moe")
    _hf_dir(trained, tmp_path / "ckpt", sharded)
    ids = torch.randint(0, 256, (2, 6))
    with torch.inference_mode():
        want = trained(ids)
    torch.manual_seed(123)
    fresh = mc.models.build("tiny-moe", **MODELS["tiny-moe"]).eval()      # other weights
    program = ring(fresh, 4, "disk", tmp_path, ids, weights_checkpoint=str(tmp_path / "ckpt"))
    torch.testing.assert_close(program(ids), want, atol=1e-6, rtol=0)


def test_cli_infer_from_checkpoint(tmp_path, capsys):
    _hf_dir(build("tiny-gpt"), tmp_path / "ckpt", sharded=False)
    report = tmp_path / "report.json"
    budget = model_bytes(build("tiny-gpt")) // 4
    code = main(["tiny-gpt", "--config", "n_layers=10", "--checkpoint", str(tmp_path / "ckpt"), "--budget", str(budget),
                 "--weights", "disk", "--offload-dir", str(tmp_path / "off"), "--prompt-ids", "1", "2", "3",
                 "--max-new-tokens", "3", "--json", str(report)])
    assert code == 0
    record = json.loads(report.read_text())
    assert record["max_abs_error_vs_eager"] <= 1e-6 and record["generate_equals_eager"]
    assert record["forward"]["peak_device_bytes"] <= budget
    assert "efficiency" in capsys.readouterr().out


def test_cli_reports_a_too_small_budget(capsys):
    assert main(["tiny-gpt", "--budget", "4KiB", "--max-new-tokens", "0"]) == 2
    assert "minimum" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("tier", ["host", "disk"])
def test_cuda_ring_stays_within_budget(tier, tmp_path):
    model = build("tiny-moe")
    ids = torch.randint(0, 256, (2, 16))
    with torch.inference_mode():
        want = model(ids)
    program = ring(model, 4, tier, tmp_path, ids, device="cuda")
    torch.cuda.synchronize()
    torch.testing.assert_close(program(ids).cpu(), want, atol=1e-5, rtol=1e-5)
    stats = program.stats
    assert stats["cuda_max_allocated_bytes"] <= stats["budget_bytes"]
    assert stats["peak_device_bytes"] <= stats["budget_bytes"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_ring_takes_ids_on_the_gpu(tmp_path):
    """The model stays in host memory while the calls come on the GPU: a call at a new size
    (captured again) and greedy decoding (its step graph captured) take CUDA ids."""
    model = build("tiny-moe")
    ids = torch.randint(0, 256, (2, 16))
    program = ring(model, 4, "host", tmp_path, ids, device="cuda")
    longer = torch.randint(0, 256, (3, 24))
    with torch.inference_mode():
        want = model(longer)
    torch.testing.assert_close(program(longer.cuda()).cpu(), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(program.generate(ids.cuda(), 5).cpu(), eager_generate(model, ids, 5))


def test_weights_stream_from_a_training_checkpoint(tmp_path):
    """The training program's layout (meta.json, dense.safetensors, expert rows split over
    experts-ep{i}.safetensors) read through moesys_compile.runtime.checkpoint."""
    from moesys_compile.runtime import checkpoint
    trained = build("tiny-moe")
    state = {k: v.contiguous() for k, v in trained.state_dict().items()}
    experts = {k: v for k, v in state.items() if k.endswith(("w_up", "w_down"))}
    directory = tmp_path / "ckpt"
    directory.mkdir()
    save_file({k: v for k, v in state.items() if k not in experts}, str(directory / checkpoint.DENSE))
    for rank, (lo, hi) in enumerate([(0, 2), (2, 4)]):
        save_file({k: v[lo:hi].contiguous() for k, v in experts.items()}, str(directory / f"experts-ep{rank}.safetensors"))
    meta = {"format": checkpoint.FORMAT, "world_size": 2, "expert_parallel": 2, "aliases": {}, "optimizer": False,
            "extra": {}, "time": 0.0,
            "experts": {k: {"num_experts": 4, "shards": [{"file": f"experts-ep{r}.safetensors", "lo": lo, "hi": hi}
                                                        for r, (lo, hi) in enumerate([(0, 2), (2, 4)])]}
                        for k in experts}}
    (directory / checkpoint.META).write_text(json.dumps(meta))
    ids = torch.randint(0, 256, (1, 6))
    with torch.inference_mode():
        want = trained(ids)
    torch.manual_seed(7)
    fresh = mc.models.build("tiny-moe", **MODELS["tiny-moe"]).eval()
    program = ring(fresh, 8, "host", tmp_path, ids, weights_checkpoint=str(directory))
    torch.testing.assert_close(program(ids), want, atol=1e-6, rtol=0)


def test_loads_ahead_of_a_call_do_not_count_as_its_transfer(tmp_path, monkeypatch):
    """Slow loads (>= 0.1 s each) and a pause between calls: the copy thread fills the first
    slots for the next call during the pause. That time is in no call's wall, so it must not be
    in the call's transfer either; efficiency = max(transfer, compute) / wall stays <= 1."""
    import time
    model = build("tiny-gpt")
    ids = torch.randint(0, 256, (1, 4))
    program = ring(model, 8, "host", tmp_path, ids)
    original = ring_runtime.RingExecutor._load
    spans = []

    def slow_load(self, load, slot):
        start = time.perf_counter()
        time.sleep(0.1)
        result = original(self, load, slot)
        spans.append((start, time.perf_counter()))
        return result
    monkeypatch.setattr(ring_runtime.RingExecutor, "_load", slow_load)
    program(ids)
    after_call = time.perf_counter()
    time.sleep(1.0)            # the next call's first sections load now (2 slots: 0.2 s of sleeps)
    before_call = time.perf_counter()
    program(ids)
    stats = program.stats
    assert stats["sections"] > stats["slots"] >= 2
    assert len([b for a, b in spans if after_call < b <= before_call]) == stats["slots"]   # loaded in the pause
    during = sum(b - a for a, b in spans if b > before_call)
    # the executor times a load from just outside _load (thread switches add a little); counting
    # either load of the pause would add >= 0.1 s
    assert 0.1 * (stats["sections"] - stats["slots"]) <= stats["transfer_seconds"] <= during + 0.05
    assert stats["transfer_seconds"] <= stats["wall_seconds"]
    assert stats["compute_seconds"] <= stats["wall_seconds"]
    assert stats["efficiency"] <= 1.0


def test_generate_efficiency_sums_the_bounds_of_its_calls():
    from moesys_compile.generate import combine_stats
    keys = dict(bytes_moved=1, stall_seconds=0.0, peak_device_bytes=1)
    prompt = dict(keys, transfer_seconds=1.0, compute_seconds=3.0, wall_seconds=3.2)   # compute-bound
    step = dict(keys, transfer_seconds=1.0, compute_seconds=0.1, wall_seconds=1.1)     # transfer-bound
    total = combine_stats([prompt, step, step])
    assert total["steps"] == 3 and total["wall_seconds"] == pytest.approx(5.4)
    assert total["efficiency"] == pytest.approx((3.0 + 1.0 + 1.0) / 5.4)
    assert total["pooled_efficiency"] == pytest.approx(3.2 / 5.4)


class _LiveOutputs(TorchDispatchMode):
    """The largest sum of bytes of op outputs still referenced, over a call (by weak references,
    each storage once): the activations a ring call really keeps alive. An output that covers only
    part of its storage is a view (of a weight, a slot or an earlier output) and adds nothing, nor
    does one of the caller's tensors (``held``: storages the caller keeps)."""

    def __init__(self, held: tuple = ()):
        super().__init__()
        self.live, self.peak, self.held = {}, 0, {t.untyped_storage().data_ptr() for t in held}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # the freed first: a new output can sit at the address of one freed since
        self.live = {ptr: (ref, n) for ptr, (ref, n) in self.live.items() if ref() is not None}
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if (isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() == t.numel() * t.element_size()
                    and t.untyped_storage().data_ptr() not in self.held):
                self.live.setdefault(t.untyped_storage().data_ptr(), (weakref.ref(t), t.untyped_storage().nbytes()))
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_call_keeps_no_more_activations_alive_than_the_ring_accounts(name, tmp_path):
    """A section's inputs and the previous section's outputs are freed after their last use. Held
    through the next section, they took the H200 ring benchmark 49 MiB past its budget at 4 x 512
    (``torch.cuda.max_memory_allocated``); tiny-gpt with a large vocabulary shows the same here."""
    torch.manual_seed(0)      # a large vocabulary: the logits are the peak, as in a real LM
    model = mc.models.build(name, **MODELS[name], vocab_size=4096).eval()
    ids = torch.randint(0, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
    budget = model_bytes(model) // 4 + 12 * 2**20     # a quarter of the weights, beside these activations
    program = mc.compile(model, mc.Plan(mode="infer", device_budget=budget, weights="host"), example_inputs=(ids,))
    with torch.inference_mode():
        program(ids)
        watch = _LiveOutputs(held=(ids,))
        with watch:
            program(ids)
    assert 0 < watch.peak <= program.stats["activation_bytes"], (watch.peak, program.stats["activation_bytes"])
