"""Training habits from a user sweep: parameters frozen before compile and unfrozen later (synced,
unchanged while frozen, no traffic for them), DDP's "save the state dict on rank 0, load it
everywhere" (refused at expert_parallel > 1, by a record of the expert shard), evaluation on rank 0
alone between training steps (no collective at expert_parallel 1), checkpoints of optimizers without
state, and a state dict without its prefix loaded into the eager model."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import moesys_compile as mc
from moesys_compile.runtime.checkpoint import CheckpointError

sys.path.insert(0, str(Path(__file__).parent))
from dist_utils import run_ranks  # noqa: E402
from test_training_parity import VOCAB, cross_entropy, make_model  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
BATCH, SEQ, STEPS = 4, 8, 3
FROZEN = ("embed.weight", "layers.0.ffn.w_up")     # a dense and an expert parameter


def batch(step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the global batch of ``step``."""
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(step))
    ids = ids[rank * BATCH // world:(rank + 1) * BATCH // world]
    return ids[:, :-1], ids[:, 1:]


def sgd(params):
    return torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=0.01)


def eager_aux(model) -> torch.Tensor:
    return sum(layer.ffn.aux_loss for layer in model.layers)


def eager_run(freeze: bool = False) -> dict[str, torch.Tensor]:
    """One process on the global batch; with ``freeze``, FROZEN is frozen for step 0 only."""
    model = make_model()
    params = dict(model.named_parameters())
    for name in FROZEN if freeze else ():
        params[name].requires_grad_(False)
    opt = sgd(model.parameters())
    for step in range(STEPS):
        if step == 1:
            for name in FROZEN:
                params[name].requires_grad_(True)
        ids, targets = batch(step)
        (cross_entropy(model(ids), targets) + eager_aux(model)).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@contextlib.contextmanager
def counting_collectives():
    """Counts the elements all-reduced and the all-to-alls started inside the block."""
    seen = {"all_reduce_numel": 0, "all_to_all": 0}
    all_reduce, all_to_all = dist.all_reduce, dist.all_to_all_single

    def counted_all_reduce(tensor, *args, **kwargs):
        seen["all_reduce_numel"] += tensor.numel()
        return all_reduce(tensor, *args, **kwargs)

    def counted_all_to_all(*args, **kwargs):
        seen["all_to_all"] += 1
        return all_to_all(*args, **kwargs)
    dist.all_reduce, dist.all_to_all_single = counted_all_reduce, counted_all_to_all
    try:
        yield seen
    finally:
        dist.all_reduce, dist.all_to_all_single = all_reduce, all_to_all


def _unfreeze_run(rank: int, world: int, ep: int) -> dict:
    model = make_model()
    for name in FROZEN:
        model.get_parameter(name).requires_grad_(False)
    plan = mc.Plan(mode="train", world_size=world, expert_parallel=ep)
    program = mc.compile(model, plan, (batch(0, rank, world)[0],))
    params = {name.removeprefix("graph_module."): p for name, p in program.named_parameters()}
    initial = {name: params[name].detach().clone() for name in FROZEN}
    bucketed = {name for bucket in program.bucketer.buckets for name in bucket.params}
    opt = sgd(program.parameters())
    for step in range(STEPS):
        if step == 1:
            frozen_unchanged = all(torch.equal(params[name], initial[name]) for name in FROZEN)
            for name in FROZEN:
                params[name].requires_grad_(True)
        ids, targets = batch(step, rank, world)
        loss = cross_entropy(program(ids), targets) + program.aux_loss
        with counting_collectives() as seen:
            loss.backward()
        if step == 0:
            frozen_reduced = seen["all_reduce_numel"]
        opt.step()
        opt.zero_grad()
    trainable = sum(p.numel() for name, p in params.items() if name not in FROZEN)
    return dict(state=program.full_state_dict(), bucketed=bucketed, frozen_unchanged=frozen_unchanged,
                frozen_reduced=frozen_reduced, trainable=trainable,
                embed=[t.clone() for t in _gathered(params["embed.weight"].detach())])


def _gathered(tensor: torch.Tensor) -> list[torch.Tensor]:
    pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, tensor)
    return pieces


def _eval_on_rank0_run(rank: int, world: int) -> dict:
    """ep=1: rank 0 alone evaluates (no_grad, inference_mode, torch.compile) after step 0."""
    model = make_model()
    program = mc.compile(model, mc.Plan(mode="train", world_size=world), (batch(0, rank, world)[0],))
    opt = sgd(program.parameters())
    result = {}
    for step in range(STEPS):
        ids, targets = batch(step, rank, world)
        (cross_entropy(program(ids), targets) + program.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        if step == 0 and rank == 0:
            program.eval()
            eval_ids = batch(10)[0][:1]
            with counting_collectives() as seen:
                with torch.no_grad():
                    result["no_grad"] = (program(eval_ids).clone(), program.aux_loss.clone())
                with torch.inference_mode():
                    result["inference_mode"] = (program(eval_ids).clone(), program.aux_loss.clone())
                compiled = torch.compile(program, backend="eager", fullgraph=True)
                with torch.no_grad():
                    result["compiled"] = (compiled(eval_ids).clone(), program.aux_loss.clone())
            result["collectives"] = seen
            program.train()
    result["state"] = program.full_state_dict()
    return result


def _state_dict_run(rank: int, world: int) -> dict:
    """ep=2: each rank's own state dict loads; rank 0's is refused on rank 1, nothing copied."""
    program = mc.compile(make_model(), mc.Plan(mode="train", world_size=world, expert_parallel=2),
                         (batch(0, rank, world)[0],))
    before = program.full_state_dict()
    own = program.state_dict()
    own_load = str(program.load_state_dict(own))
    shared = [own if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)     # the DDP habit, without a file
    try:
        program.load_state_dict(shared[0])
        refusal = None
    except CheckpointError as exc:
        refusal = str(exc)
    after = program.full_state_dict()
    compiled = torch.compile(program)            # its state dict carries the record under _orig_mod.
    compiled_state = compiled.state_dict()
    compiled.load_state_dict(compiled_state)
    without_record = {k: v for k, v in own.items() if not k.endswith("_extra_state")}
    missing = program.load_state_dict(without_record, strict=False).missing_keys
    return dict(record=own.get("graph_module._extra_state"), own_load=own_load, refusal=refusal,
                unchanged=all(torch.equal(before[k], after[k]) for k in before),
                compiled_keys=[k for k in compiled_state if k.endswith("_extra_state")], missing=missing)


def sweep_ranks(rank: int, world: int) -> dict:
    return dict(unfreeze={ep: _unfreeze_run(rank, world, ep) for ep in (1, 2)}, eval=_eval_on_rank0_run(rank, world),
                state_dict=_state_dict_run(rank, world))


def _assert_state_close(state: dict, reference: dict) -> None:
    assert set(state) == set(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(state[name], tensor, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def test_two_ranks_unfreeze_eval_on_rank0_and_state_dict_of_a_shard():
    ranks = run_ranks(sweep_ranks, 2, timeout=400)

    # parameters frozen before compile, unfrozen after step 0: synced, as one process
    frozen_reference = eager_run(freeze=True)
    for ep in (1, 2):
        runs = [result["unfreeze"][ep] for result in ranks]
        assert set(FROZEN) <= runs[0]["bucketed"], f"ep={ep}: frozen parameters are not bucketed"
        assert all(run["frozen_unchanged"] for run in runs), f"ep={ep}: a frozen parameter changed"
        # while frozen they add nothing to the gradient all-reduces (the aux statistics aside)
        assert runs[0]["frozen_reduced"] <= runs[0]["trainable"] + 64, (ep, runs[0]["frozen_reduced"])
        torch.testing.assert_close(runs[0]["embed"][0], runs[0]["embed"][1], rtol=0, atol=0)
        _assert_state_close(runs[0]["state"], frozen_reference)

    # rank 0 evaluates alone after step 0: no collective, eager's values on its batch; training goes on
    evaluated = ranks[0]["eval"]
    assert evaluated["collectives"] == {"all_reduce_numel": 0, "all_to_all": 0}
    model = make_model()
    opt = sgd(model.parameters())
    ids, targets = batch(0)
    (cross_entropy(model(ids), targets) + eager_aux(model)).backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        expected = model(batch(10)[0][:1]), eager_aux(model)
    for kind in ("no_grad", "inference_mode", "compiled"):
        for got, want in zip(evaluated[kind], expected):
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{kind}: {m}")
    reference = eager_run()
    for result in ranks:
        _assert_state_close(result["eval"]["state"], reference)

    # ep=2: a state dict records its shard; the own loads, another rank's is refused untouched
    first, second = (result["state_dict"] for result in ranks)
    assert first["record"] is not None and not torch.equal(first["record"], second["record"])
    assert first["own_load"] == second["own_load"] == "<All keys matched successfully>"
    assert first["refusal"] is None
    assert "expert shard 0 of expert_parallel=2" in second["refusal"]
    assert "program.save" in second["refusal"] and "full_state_dict" in second["refusal"]
    assert first["unchanged"] and second["unchanged"]
    assert first["compiled_keys"] == ["_orig_mod.graph_module._extra_state"]
    assert first["missing"] == ["graph_module._extra_state"]


def test_optimizer_checkpoints_without_state_resume(tmp_path):
    """Plain SGD (no state at all) and an AdamW saved before its first step load and resume as
    the run that went on."""
    def program_and(make_opt):
        program = mc.compile(make_model(), mc.Plan(mode="train"), (batch(0)[0],))
        return program, make_opt(program.parameters())

    def steps(program, opt, first):
        for step in range(first, first + 2):
            ids, targets = batch(step)
            (cross_entropy(program(ids), targets) + program.aux_loss).backward()
            opt.step()
            opt.zero_grad()
        return {k: v.detach().clone() for k, v in program.state_dict().items()}

    for name, make_opt, trained in [("sgd", lambda p: torch.optim.SGD(p, lr=0.1), 1),
                                    ("adamw", lambda p: torch.optim.AdamW(p, lr=1e-2), 0)]:
        program, opt = program_and(make_opt)
        if trained:
            steps(program, opt, 0)
        assert not opt.state_dict()["state"], name
        program.save(str(tmp_path / name), optimizer=opt, step=trained)
        resumed, resumed_opt = program_and(make_opt)
        assert resumed.load(str(tmp_path / name), optimizer=resumed_opt) == {"step": trained}
        went_on, came_back = steps(program, opt, 2), steps(resumed, resumed_opt, 2)
        for key, tensor in went_on.items():
            torch.testing.assert_close(came_back[key], tensor, rtol=0, atol=0, msg=lambda m: f"{name} {key}: {m}")


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_state_dict_without_prefix_loads_into_the_model(mode):
    """The model's non-persistent buffers (rotary tables) stay out of program.state_dict(), and at
    expert_parallel 1 there is no shard record: stripped of its prefix it loads strictly."""
    model = make_model()
    program = mc.compile(model, mc.Plan(mode=mode), (batch(0)[0],))
    state = {k.removeprefix("graph_module."): v for k, v in program.state_dict().items()}
    assert set(state) == set(model.state_dict())
    assert {"rope_cos", "rope_sin"} <= {name for name, _ in program.graph_module.named_buffers()}
    plain = mc.models.build("tiny-moe", vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, ffn_dim=64, num_experts=4,
                            top_k=2, moe_ffn_dim=32, aux_loss_coef=0.05)
    plain.load_state_dict(state)
    ids = batch(1)[0]
    torch.testing.assert_close(program(ids), plain(ids), rtol=RTOL, atol=ATOL)
