"""Training loops as DeepSpeed / torchtitan / accelerate users write them: batches whose shape
changes after compiling, gradient accumulation under ``no_sync``, evaluation between steps, AdamW
with parameter groups and an LR schedule, resumed at another EP size; and what a single process,
``torch.autocast`` (bfloat16), ``program.eval()`` on traced dropout and a resume into another model do."""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import moesys_compile as mc
from moesys_compile import train
from moesys_compile.runtime.checkpoint import CheckpointError

pytest.importorskip("transformers")

from moesys_compile.models.hf import build_hf  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from dist_utils import free_port, global_mean, run_ranks  # noqa: E402
from test_training_parity import VOCAB, cross_entropy, make_model  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
# (global batch, sequence, micro-steps, no_sync): another batch size and length than the example
# (4, 8), a smaller last-but-one batch, one token per rank; two micro-steps accumulate into one
# step, the first under no_sync, or every backward synced (DDP without no_sync)
SCHEDULE = [(4, 8, 1, False), (2, 3, 2, True), (6, 5, 1, False), (2, 1, 2, False)]


def batch(size: int, seq: int, seed: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of a global batch of ``size`` sequences."""
    ids = torch.randint(0, VOCAB, (size, seq + 1), generator=torch.Generator().manual_seed(seed))
    ids = ids[rank * size // world:(rank + 1) * size // world]
    return ids[:, :-1], ids[:, 1:]


def adamw_with_groups(named_parameters):
    """No weight decay on norms and 1-D parameters; a warm-up schedule."""
    decay, no_decay = [], []
    for name, param in named_parameters:
        (no_decay if param.dim() < 2 or "norm" in name else decay).append(param)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-2, foreach=False)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 3))


def run_schedule(loss_of, no_sync, clip, opt, sched, rank: int = 0, world: int = 1, evaluate=None) -> list[float]:
    """SCHEDULE: micro-steps (all but the last under ``no_sync()`` where it says so), ``clip(0.5)``,
    an optimizer and LR step, zero_grad alternating set_to_none, then ``evaluate(ids)``. The global
    mean losses."""
    losses = []
    for step, (size, seq, micro, unsynced) in enumerate(SCHEDULE):
        total = 0.0
        for m in range(micro):
            ids, targets = batch(size, seq, 10 * step + m, rank, world)
            with no_sync() if unsynced and m < micro - 1 else contextlib.nullcontext():
                loss = loss_of(ids, targets) / micro
                loss.backward()
            total += float(loss.detach())
        clip(0.5)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=step % 2 == 0)
        if evaluate is not None:
            evaluate(batch(4, 6, 99, rank, world)[0])
        losses.append(global_mean(total))
    return losses


def eager_run(steps_after: int) -> tuple[list[float], dict, list[float]]:
    """One process, global batches: the schedule, the state, then ``steps_after`` more steps."""
    model = make_model()
    opt, sched = adamw_with_groups(model.named_parameters())

    def loss_of(ids, targets):
        return cross_entropy(model(ids), targets) + sum(layer.ffn.aux_loss for layer in model.layers)
    losses = run_schedule(loss_of, contextlib.nullcontext,
                          lambda max_norm: torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm), opt, sched)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    after = [float(step_loss.detach()) for step_loss in
             (single_step(loss_of, model.parameters(), opt, sched) for _ in range(steps_after))]
    return losses, state, after


def single_step(loss_of, params, opt, sched):
    ids, targets = batch(4, 8, 7)
    loss = loss_of(ids, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    opt.step()
    sched.step()
    opt.zero_grad()
    return loss


def compiled(rank: int, world: int, ep: int, shift: float = 0.0):
    model = make_model()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(shift)
    plan = mc.Plan(mode="train", world_size=world, expert_parallel=ep, bucket_mb=0.01)
    program = mc.compile(model, plan, (batch(4, 8, 0, rank, world)[0],))
    return program, *adamw_with_groups(program.named_parameters())


def steps_after(program, opt, sched, rank: int, world: int, steps: int) -> list[float]:
    def loss_of(ids, targets):
        return cross_entropy(program(ids), targets) + program.aux_loss
    losses = []
    for _ in range(steps):
        ids, targets = batch(4, 8, 7, rank, world)
        loss = loss_of(ids, targets)
        loss.backward()
        program.clip_grad_norm_(0.5)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(global_mean(float(loss.detach())))
    return losses


def workflow(rank: int, world: int, root: str):
    """ep=2 over the schedule with an evaluation after every step and a save (a tensor in its extra
    record is refused on every rank); then both the ep=2 program and a dp=2 (ep=1) program that
    loads the save into other values take 2 more steps."""
    program, opt, sched = compiled(rank, world, 2)
    modes = []

    def evaluate(ids):
        program.eval()
        with torch.no_grad():
            program(ids)
        modes.append(program.training)
        program.train()
        modes.append(program.training)

    losses = run_schedule(lambda ids, targets: cross_entropy(program(ids), targets) + program.aux_loss,
                          program.no_sync, program.clip_grad_norm_, opt, sched, rank, world, evaluate)
    state = program.full_state_dict()
    with pytest.raises(CheckpointError, match=r"save\(\.\.\., step=\.\.\.\) goes into meta\.json, but Tensor"):
        program.save(f"{root}/ckpt", optimizer=opt, step=torch.tensor(4))   # refused on every rank: no hang
    program.save(f"{root}/ckpt", optimizer=opt, scheduler=sched.state_dict())
    continued = steps_after(program, opt, sched, rank, world, 2)
    other, other_opt, other_sched = compiled(rank, world, 1, shift=0.3)
    other_sched.load_state_dict(other.load(f"{root}/ckpt", optimizer=other_opt)["scheduler"])
    resumed = steps_after(other, other_opt, other_sched, rank, world, 2)
    return losses, (state if rank == 0 else None), modes, continued, resumed


def test_a_user_training_loop_on_two_expert_ranks_matches_one_eager_process(tmp_path):
    losses, state, modes, continued, resumed = run_ranks(workflow, 2, str(tmp_path), timeout=240)[0]
    ref_losses, ref_state, ref_after = eager_run(2)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL)
    for name, tensor in ref_state.items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert modes == [False, True] * len(SCHEDULE)
    torch.testing.assert_close(torch.tensor(continued), torch.tensor(ref_after), rtol=1e-4, atol=1e-5)
    assert resumed == pytest.approx(continued, rel=1e-5), "resumed at ep=1 with AdamW groups and the LR schedule"


def test_a_single_process_train_program_clips_saves_and_accumulates(tmp_path):
    """Without torchrun a train-mode program still offers clip_grad_norm_, no_sync and save."""
    model, reference = make_model(), make_model()
    ids, targets = batch(4, 8, 1)
    program = mc.compile(model, mc.Plan(mode="train"), (ids,))
    with program.no_sync():
        (cross_entropy(program(ids), targets) + program.aux_loss).backward()
    (cross_entropy(reference(ids), targets) + sum(layer.ffn.aux_loss for layer in reference.layers)).backward()
    norm = program.clip_grad_norm_(0.1)
    torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1))
    program.save(str(tmp_path / "ckpt"))
    restored = mc.load_into(make_model(n_layers=2), str(tmp_path / "ckpt"))
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[name], tensor, rtol=0, atol=0)


def initialised_again_run(rank: int, world: int, port: int):
    """Two steps, the process group destroyed and initialised again (on a store of its own, at
    ``port``), then two more steps on a program compiled again."""
    def two_steps() -> list[float]:
        program, opt, _ = compiled(rank, world, 2)
        return autocast_steps(lambda ids, targets: cross_entropy(program(ids), targets) + program.aux_loss,
                              program.parameters, opt, rank, world)
    first = two_steps()
    dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    return first, two_steps()


def test_a_process_group_initialised_again_gets_groups_of_its_own():
    """A notebook that destroys its process group and initialises a new one compiles again on the
    new groups, not on the destroyed ones."""
    first, second = run_ranks(initialised_again_run, 2, free_port(), timeout=240)[0]
    assert first == pytest.approx(second, rel=1e-6)


def autocast_steps(loss_of, params, opt, rank: int = 0, world: int = 1) -> list[float]:
    """Two AdamW steps with forward and loss under torch.autocast (bfloat16), as accelerate's
    ``mixed_precision="bf16"`` runs them; the parameters and their gradients stay float32."""
    losses = []
    for step in range(2):
        ids, targets = batch(4, 8, step, rank, world)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(ids, targets)
        loss.backward()
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in params())
        opt.step()
        opt.zero_grad()
        losses.append(global_mean(float(loss.detach())))
    return losses


def autocast_run(rank: int, world: int):
    program, opt, _ = compiled(rank, world, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert program(batch(2, 4, 5, rank, world)[0]).dtype == torch.bfloat16
    losses = autocast_steps(lambda ids, targets: cross_entropy(program(ids), targets) + program.aux_loss,
                            program.parameters, opt, rank, world)
    state = program.full_state_dict()       # collective
    return losses, state if rank == 0 else None


def test_autocast_trains_on_two_expert_ranks_as_eager_autocast_does():
    losses, state = run_ranks(autocast_run, 2, timeout=240)[0]
    model = make_model()
    opt, _ = adamw_with_groups(model.named_parameters())
    ref = autocast_steps(lambda ids, targets: cross_entropy(model(ids), targets)
                         + sum(layer.ffn.aux_loss for layer in model.layers), model.parameters, opt)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=1e-2, atol=1e-3)
    for name, tensor in model.state_dict().items():
        assert state[name].dtype == torch.float32
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=2e-2, msg=lambda m: f"{name}: {m}")


def test_autocast_trains_a_model_captured_by_export_as_eager_autocast_does():
    """torch.export asserts the capture's dtype before every ``.to()`` (Qwen3's RMSNorm upcast);
    under autocast the input there is bfloat16, as in eager, and the program runs."""
    model = build_hf("qwen3_moe", num_hidden_layers=2).train()
    reference = copy.deepcopy(model)
    ids = batch(2, 8, 0)[0]
    program = mc.compile(model, mc.Plan(mode="train"), example_kwargs={"input_ids": ids, "labels": ids})
    assert program.graph_module.meta["moesys_capture"] == "export"
    for module in (program, reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            module(input_ids=ids, labels=ids).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=2e-2 * float(p.grad.abs().max()) + 1e-6,
                                   msg=lambda m: f"{name}: {m}")


class DropoutNet(torch.nn.Module):
    """Functional dropout on ``self.training``: fx traces the flag as a constant."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(F.dropout(x, 0.5, self.training))


@pytest.mark.parametrize("make,example", [
    (lambda: build_hf("qwen3_moe", num_hidden_layers=1, attention_dropout=0.5),
     lambda: torch.randint(0, 128, (2, 8))),               # torch.export: sdpa's dropout_p
    (DropoutNet, lambda: torch.randn(4, 16)),             # fx: F.dropout(x, p, training=True)
])
def test_program_eval_turns_off_the_dropout_the_trace_froze(make, example):
    model, x = make().train(), example()
    program = mc.compile(model, mc.Plan(mode="train"), (x,))

    def output():
        out = program(x)
        return out if isinstance(out, torch.Tensor) else out.logits
    assert not torch.equal(output(), output()), "dropout is on in training mode"
    program.eval()
    torch.testing.assert_close(output(), model.eval()(x) if isinstance(model, DropoutNet) else model.eval()(x).logits)
    program.train()
    assert not torch.equal(output(), output()), "and on again after program.train()"


def test_train_resume_past_steps_keeps_labels_and_a_misfit_names_the_tensor(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    common = ["--model", "tiny-moe", "--override", "n_layers=1", "--batch-size", "2", "--seq-len", "4",
              "--ckpt-dir", str(tmp_path / "ckpt"), "--log-every", "0"]
    assert train.main(common + ["--steps", "2"]) == 0
    assert train.main(common + ["--steps", "1"]) == 0       # resumed at 2: nothing to train, nothing saved
    assert "at step 2; --steps 1 is reached, nothing to train" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [".lock", "latest", "step_000002"]
    assert train.main(common[:-4] + ["--steps", "1", "--ckpt-every", "1"]) == 2
    assert "--ckpt-every 1 saves nowhere without --ckpt-dir" in capsys.readouterr().err
    assert train.main(common + ["--steps", "3", "--override", "dim=32"]) == 2
    err = capsys.readouterr().err
    assert "'embed.weight' is (256, 64) in the checkpoint but (256, 32) in Transformer" in err
    assert "--no-resume" in err and "Traceback" not in err
    program = mc.compile(mc.models.build("tiny-moe", n_layers=1, dim=32), mc.Plan(mode="train"),
                         (batch(2, 4, 0)[0] % 256,))
    before = program.context.model.embed.weight.detach().clone()
    with pytest.raises(CheckpointError, match=r"'embed\.weight' is \(256, 64\) in the checkpoint"):
        program.load(str(train.latest_checkpoint(str(tmp_path / "ckpt"))))
    assert torch.equal(program.context.model.embed.weight, before), "a misfit load changes nothing"


def test_a_hugging_face_model_exported_in_eval_mode_warns_that_dropout_stays_off():
    """from_pretrained returns models in eval mode; export fixes that mode into the graph."""
    model, ids = build_hf("qwen3_moe", num_hidden_layers=1, attention_dropout=0.5), torch.randint(0, 128, (2, 8))
    with pytest.warns(UserWarning, match=r"Qwen3MoeForCausalLM is in eval mode \(config\.attention_dropout=0\.5\): "
                                         r"a train-mode program .* call model\.train\(\) before compiling"):
        mc.compile(model.eval(), mc.Plan(mode="train"), (ids,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        mc.compile(model.train(), mc.Plan(mode="train"), (ids,))
