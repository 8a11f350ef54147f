"""Expert-parallel training launcher: what ``torchrun`` runs on every rank.

    torchrun --nproc-per-node 2 -m moesys_compile.train --model tiny-moe --ep 2 --steps 50 \\
        --ckpt-dir runs/ckpt --ckpt-every 25
    moesys-compile train --nproc-per-node 2 --model tiny-moe --ep 2 --steps 50   # launches torchrun
    moesys-compile train tiny-moe --steps 50                                      # MODEL as inspect takes it

Data: ``--data synthetic`` (default: sequences ``a, a+b, a+2b, ... mod V`` with a random start and
stride per sequence, so the loss visibly falls), a text file (bytes as tokens, vocab >= 256), or a
``.npy`` (integer ids of any shape, read as one stream in row order) or ``.bin`` (uint16) file of
token ids. The global batch (``--batch-size``) is split over all ranks.
Checkpoints go to ``CKPT_DIR/step_NNNNNN`` (sharded, atomic) with ``CKPT_DIR/latest`` naming the
newest; a run with the same ``--ckpt-dir`` resumes from it unless ``--no-resume``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from .generate import first_tensor
from .api import check_device, check_plan_against_model, lower
from .cli import check_seq_len, name_flags, writable_dir
from .errors import MoesysError, PlanError
from .frontend import canonicalize
from .models.spec import load_model, parse_overrides
from .plan import Plan, read_plan_file
from .programs.training import TrainingProgram
from .runtime import groups
from .runtime import checkpoint
from .runtime.checkpoint import CheckpointError


DEFAULT_MODEL = "tiny-moe"
NPROC_SPELLINGS = ("--nproc-per-node", "--nproc_per_node")   # both of torchrun's spellings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moesys-compile train", description=__doc__.split("\n\n")[0])
    p.add_argument("model_arg", nargs="?", metavar="MODEL", help="MODEL as inspect and infer take it (the same as "
                                                                  "--model)")
    p.add_argument("--model", default=None, help=f"built-in name ({DEFAULT_MODEL}, the default), hf:<family> (random "
                                                 f"init), a Hugging Face model directory (its weights are trained "
                                                 f"on), or package.module:factory")
    p.add_argument("--override", "--config", dest="override", action="extend", nargs="+", default=[],
                   metavar="FIELD=VALUE", help="model config overrides, e.g. --override num_experts=8 top_k=2 (one or "
                                               "more, repeatable; --config as in inspect and infer)")
    p.add_argument("--plan", help="plan file (YAML/JSON); --ep/--capacity-factor/--device fill the fields it "
                                   "leaves out (one that contradicts the file is refused)")
    p.add_argument("--ep", type=int, default=None, help="expert_parallel (default 1; must divide the launched world)")
    p.add_argument("--capacity-factor", type=float, default=None, help="GShard capacity (default dropless)")
    p.add_argument("--device", default=None, help="cpu (gloo, the default) or cuda (nccl)")
    p.add_argument("--data", default="synthetic", help="'synthetic', a text file, or a .npy/.bin token file")
    p.add_argument("--steps", type=int, default=100, help="total optimizer steps (a resumed run continues up to it)")
    p.add_argument("--batch-size", type=int, default=8, help="global batch (sequences over all ranks)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (constant, no weight decay)")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    p.add_argument("--seed", type=int, default=0, help="seeds the model's initial values and the batches")
    p.add_argument("--ckpt-dir", help="checkpoint root (step_NNNNNN dirs + 'latest')")
    p.add_argument("--ckpt-every", type=int, default=0, help="save every K steps (0: only at the end)")
    p.add_argument("--keep-last", type=int, default=0, metavar="N",
                   help="after each save, delete all but the newest N step checkpoints (0: keep all)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --ckpt-dir")
    p.add_argument("--log-every", type=int, default=10,
                   help="print a step line every N steps and at the last step (0: no step lines)")
    p.add_argument("--log-json", help="the per-step losses and throughput (rank 0), rewritten at every log line; "
                                      "a resumed run continues the log it finds there")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="when not already under torchrun, launch this many ranks with torch.distributed.run")
    return p


# -- data --------------------------------------------------------------------------------------


class TokenSource:
    """Deterministic global batches: step s gives the same [batch, seq+1] ids on every rank."""

    def __init__(self, spec: str, vocab: int, batch: int, seq: int, seed: int):
        self.vocab, self.batch, self.seq, self.seed = vocab, batch, seq, seed
        self.tokens = None if spec == "synthetic" else self._load(spec, vocab)

    @staticmethod
    def _load(path: str, vocab: int) -> torch.Tensor:
        file = Path(path)
        if file.is_dir():
            raise ValueError(f"--data {path!r} is a directory; give one file of token ids (a text file, or a "
                             f".npy/.bin of ids: concatenate a dataset's files into one), or 'synthetic'")
        if not file.is_file():
            raise ValueError(f"--data {path!r} is neither 'synthetic' nor an existing file")
        if file.suffix == ".npz":
            raise ValueError(f"--data {path!r} is an .npz archive; save the token ids as one .npy array "
                             f"(np.save) or a .bin file of uint16 ids")
        if file.suffix == ".npy":
            ids = np.load(file, mmap_mode="c")       # copy-on-write: a writable view, nothing read yet
        elif file.suffix == ".bin":
            ids = TokenSource._uint16_ids(file, path)
        else:
            ids = np.frombuffer(file.read_bytes(), dtype=np.uint8)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"--data {path!r} holds {ids.dtype} values; token ids must be integers")
        if not ids.size:
            raise ValueError(f"--data {path!r} holds no token ids; pass a file of token ids, or 'synthetic'")
        # bounds in the file's own dtype: a uint64 id past int64's range must not read as negative
        low, high = int(ids.min()), int(ids.max())
        if low < 0:
            raise ValueError(f"--data {path!r} has a negative token id ({low})")
        if high >= vocab:
            raise ValueError(f"--data {path!r} has token id {high} >= the model's vocab_size ({vocab}); "
                             f"use --override vocab_size={high + 1}")
        return torch.from_numpy(np.asarray(ids, dtype=np.int64).reshape(-1))   # [N, L] rows: one stream

    @staticmethod
    def _uint16_ids(file: Path, path: str) -> np.ndarray:
        """A ``.bin`` file as uint16 ids; one of an odd number of bytes is not such a file."""
        size = file.stat().st_size
        if size % 2:
            raise ValueError(f"--data {path!r} is {size} bytes, an odd number, so not uint16 token ids (2 bytes "
                             f"each) as a .bin file must hold; write the ids with np.asarray(ids, np.uint16)"
                             f".tofile(PATH), or save another dtype as .npy")
        return np.memmap(file, dtype=np.uint16, mode="c") if size else np.zeros(0, np.uint16)

    def global_batch(self, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        if self.tokens is None:
            start = torch.randint(0, self.vocab, (self.batch, 1), generator=gen)
            stride = torch.randint(1, 8, (self.batch, 1), generator=gen)
            return (start + stride * torch.arange(self.seq + 1)) % self.vocab
        if self.tokens.numel() < self.seq + 1:
            raise ValueError(f"--data has {self.tokens.numel()} tokens; need at least --seq-len + 1 ({self.seq + 1})")
        offsets = torch.randint(0, self.tokens.numel() - self.seq, (self.batch,), generator=gen)   # every window
        return torch.stack([self.tokens[o: o + self.seq + 1] for o in offsets.tolist()])

    def local_batch(self, step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.global_batch(step)
        share = self.batch // world
        local = ids[rank * share: (rank + 1) * share]
        return local[:, :-1], local[:, 1:]


# -- checkpoints ---------------------------------------------------------------------------------


def latest_checkpoint(root: Optional[str]) -> Optional[Path]:
    return checkpoint.latest_step(root) if root else None


def save_checkpoint(program: TrainingProgram, opt, root: str, step: int, keep_last: int = 0) -> Path:
    """Collective: ``ROOT/step_NNNNNN``, then ``latest`` names it; with ``keep_last`` the step
    checkpoints older than the newest ``keep_last`` go (after ``latest`` has moved past them)."""
    name = f"step_{step:06d}"
    program.save(str(Path(root) / name), optimizer=opt, step=step)
    if program.topology.rank == 0:
        _write_atomically(Path(root) / checkpoint.LATEST, name)
        if keep_last:
            _delete_old_steps(Path(root), name, keep_last)
    return Path(root) / name


def _delete_old_steps(root: Path, saved: str, keep_last: int) -> None:
    """Keep ``saved`` and the ``keep_last - 1`` highest other steps (a --no-resume run into an old
    root may have saved a lower step than those there)."""
    others = sorted((p for p in root.glob("step_*") if p.name[5:].isdigit() and p.is_dir() and p.name != saved),
                    key=lambda p: int(p.name[5:]), reverse=True)
    for old in others[keep_last - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def _remove_interrupted_saves(root: str) -> None:
    """Delete the temporary copies that saves killed midway left in ``root`` (a resumed run may
    never save their step again, and ``--keep-last`` counts only complete steps); only while this
    run holds the root's ``.lock``, so that no save into it is under way."""
    for stale in checkpoint.remove_interrupted_saves(root):
        print(f"removed {stale}, left by a save that was interrupted", flush=True)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


# -- run -------------------------------------------------------------------------------------------


# The flags that set a plan field: (flag, attribute of the parsed arguments, Plan field).
PLAN_FLAGS = (("--ep", "ep", "expert_parallel"), ("--capacity-factor", "capacity_factor", "capacity_factor"),
              ("--device", "device", "device"))
# Plan fields as the messages of a run without a plan file name them: the flags that set them.
FLAG_OF_FIELD = {field: flag for flag, _, field in PLAN_FLAGS}


def plan_fields(args) -> dict:
    """The plan's fields before the world is known: the plan file's (or a train plan's), with the
    flags given filling the fields it leaves out; a flag that contradicts the file is refused."""
    fields = read_plan_file(args.plan) if args.plan else {"mode": "train"}
    for flag, name, field in PLAN_FLAGS:
        value = getattr(args, name)
        if value is None:
            continue
        if field in fields and fields[field] != value:
            raise PlanError(f"{flag} {value} contradicts the plan file {args.plan}, which sets {field} to "
                            f"{fields[field]!r}; drop {flag} (the file decides) or change the file")
        fields[field] = value
    return fields


def make_plan(args, world: int) -> Plan:
    fields = plan_fields(args)
    _check_world(args, fields, world)
    fields.setdefault("world_size", world)        # a plan file need not repeat the launched world
    plan = Plan.from_dict(fields, source=args.plan) if args.plan else Plan(**fields)
    if plan.mode != "train":
        raise PlanError(f"{args.plan}: mode ({plan.mode!r}) must be 'train' for moesys-compile train")
    return plan


def _check_world(args, fields: dict, world: int) -> None:
    """An expert_parallel that does not divide the launched world (the plan takes its world_size
    from the launch): say how to launch enough ranks."""
    ep = fields.get("expert_parallel", 1)
    if "world_size" in fields or not isinstance(ep, int) or isinstance(ep, bool) or ep < 1 or not world % ep:
        return
    given = f"{args.plan}'s expert_parallel ({ep})" if args.plan and args.ep is None else f"--ep {ep}"
    launch = (f"launch a multiple of {ep} ranks (torchrun --nproc-per-node {ep})" if "RANK" in os.environ
              else f"pass --nproc-per-node {ep} (or a multiple of {ep}), or launch under torchrun "
                   f"--nproc-per-node {ep}")
    raise PlanError(f"{given} spreads each layer's experts over {ep} ranks, and this run has {world}; {launch}")


def build_model(args, plan: Plan):
    """``--model`` with its ``--override``s, in training mode and the plan's dtype (a plan file may
    ask for bfloat16). Its config must give ``vocab_size`` (the data's token range). ``--seed``
    picks the initial values: ``hf:<family>`` seeds its own init (with ``seed``, 0 unless given),
    so it is passed on there, where ``--override seed=N`` does not name another."""
    overrides = parse_overrides(args.override)
    if args.model.startswith("hf:"):
        overrides.setdefault("seed", args.seed)
    model = load_model(args.model, overrides).model
    if not isinstance(getattr(getattr(model, "config", None), "vocab_size", None), int):
        raise ValueError(f"--model {args.model}: {type(model).__name__} has no config.vocab_size, which the token "
                         f"batches need; train it from your own loop with mc.compile(model, Plan(mode='train'))")
    check_seq_len(model, args.seq_len, "--seq-len", "--override")
    return model.to(plan.torch_dtype or torch.float32).train()


def run(args) -> dict:
    under_torchrun = "RANK" in os.environ
    if under_torchrun:
        groups.init_from_env(plan_fields(args).get("device", "cpu"))
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    plan = make_plan(args, world)
    check_device(plan)
    groups.check_world(plan)                         # before any work
    _check_args(args, world)
    torch.manual_seed(args.seed)                     # same initial model on every rank
    model = build_model(args, plan)
    data = TokenSource(args.data, model.config.vocab_size, args.batch_size, args.seq_len, args.seed)
    device = torch.device(plan.device)
    ids, _ = data.local_batch(0, rank, world)
    gm, ctx = lower(model, plan, (ids,), rank=rank)
    program = TrainingProgram(gm, ctx)
    from moesys_compile.kernels._triton import autotune_enabled    # Triton is imported with the kernels
    if rank == 0 and device.type == "cuda" and plan.kernels != "torch" and autotune_enabled():
        print("the first step compiles and tunes the Triton kernels for these shapes (minutes on a GPU); "
              "MOESYS_TRITON_AUTOTUNE=0 runs one fixed config per kernel instead", flush=True)
    opt = torch.optim.AdamW(program.parameters(), lr=args.lr, weight_decay=0.0)
    with _only_run_in(args.ckpt_dir if rank == 0 else None):
        if args.ckpt_dir and rank == 0:       # holding the lock, before this run's first save
            _remove_interrupted_saves(args.ckpt_dir)
        start = _resume(program, opt, args, rank)
        log = _train_loop(program, opt, data, args, start, rank, world, device)
        # the last step's checkpoint, unless --ckpt-every saved it or the checkpoint resumed from is
        # already at (or past) --steps: nothing was trained, and a save would label it step --steps
        if args.ckpt_dir and start < args.steps and (not args.ckpt_every or args.steps % args.ckpt_every):
            path = save_checkpoint(program, opt, args.ckpt_dir, args.steps, args.keep_last)
            if rank == 0:
                print(f"saved {path}", flush=True)
    _write_log(log, args, rank)
    return log


def _write_log(log: dict, args, rank: int) -> None:
    if rank == 0 and args.log_json:   # its folder: made by _check_args
        _write_atomically(Path(args.log_json), json.dumps(log, indent=1))


def _earlier_log(args, start: int) -> dict:
    """The ``--log-json`` that a resumed run continues: its per-step entries up to the step resumed
    from, and its ``runs`` (each run's first step, world and EP size); a log of another run, or
    none, starts afresh."""
    path = Path(args.log_json) if args.log_json and start else None
    try:
        earlier = json.loads(path.read_text()) if path and path.is_file() else {}
        kept = [i for i, step in enumerate(earlier.get("steps", [])) if step <= start]
        per_step = {key: [values[i] for i in kept] for key, values in earlier.items()
                    if key != "runs" and isinstance(values, list) and len(values) == len(earlier["steps"])}
        runs = [run for run in earlier.get("runs", []) if run["first_step"] <= start]
        return {**per_step, "runs": runs} if per_step else {}
    except (ValueError, TypeError, AttributeError, LookupError):
        return {}


@contextlib.contextmanager
def _only_run_in(ckpt_dir: Optional[str]):
    """Within, this process holds ``CKPT_DIR/.lock``: a second run into the same directory (whose
    checkpoints would interleave with this one's) is refused by name. Nothing without a directory."""
    if ckpt_dir is None:
        yield
        return
    with open(Path(ckpt_dir) / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"--ckpt-dir {ckpt_dir!r} is in use by another training run (it holds "
                             f"{ckpt_dir}/.lock); wait for it to end, or pass another --ckpt-dir") from None
        yield


def _resume(program, opt, args, rank: int) -> int:
    latest = None if args.no_resume else latest_checkpoint(args.ckpt_dir)
    if latest is None:
        return 0
    try:
        step = int(program.load(str(latest), optimizer=opt).get("step", 0))
    except CheckpointError as exc:
        raise CheckpointError(f"resuming from {latest}: {exc}; or pass --no-resume (or another --ckpt-dir) "
                              f"to start afresh") from None
    saved_lr = {group["lr"] for group in opt.param_groups}
    for group in opt.param_groups:                # this run's --lr, not the checkpoint's
        group["lr"] = args.lr
    if rank == 0:
        done = f"; --steps {args.steps} is reached, nothing to train" if step >= args.steps else ""
        lr = f"; --lr {args.lr} replaces the checkpoint's {sorted(saved_lr)[0]}" if saved_lr != {args.lr} else ""
        print(f"resumed from {latest} at step {step}{lr}{done}", flush=True)
    return step


def _train_loop(program, opt, data, args, start: int, rank: int, world: int, device) -> dict:
    log = {"steps": [], "loss": [], "tokens_per_s": [], "runs": [], **_earlier_log(args, start), "world_size": world,
           "expert_parallel": program.plan.expert_parallel}
    log["runs"].append({"first_step": start + 1, "world_size": world, "expert_parallel": program.plan.expert_parallel})
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train",
               disable=rank != 0 or not sys.stderr.isatty(),
               dynamic_ncols=True)
    for step in bar:
        began = time.perf_counter()
        ids, targets = (t.to(device) for t in data.local_batch(step, rank, world))
        logits = first_tensor(program(ids))       # a tensor, or a Hugging Face output's .logits
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        aux = program.aux_loss if program.aux_loss is not None else torch.zeros((), device=device)
        (ce + aux).backward()
        if args.clip:
            program.clip_grad_norm_(args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = _global_mean(ce.detach()) + float(aux.detach())
        tokens_per_s = args.batch_size * args.seq_len / (time.perf_counter() - began)
        log["steps"].append(step + 1)
        log["loss"].append(loss)
        log["tokens_per_s"].append(tokens_per_s)
        postfix = {"loss": f"{loss:.4f}", "tok_s": f"{tokens_per_s:,.0f}"}
        if program.plan.capacity_factor:
            dropped = [v for v in program.dropped_fraction(reset=True, across_ranks=True).values() if v is not None]
            log.setdefault("dropped_fraction", []).append(sum(dropped) / max(len(dropped), 1))
            postfix["dropped"] = f"{log['dropped_fraction'][-1]:.3f}"
        bar.set_postfix(postfix)
        if rank == 0 and args.log_every and ((step + 1) % args.log_every == 0 or step + 1 == args.steps):
            dropped = f"  dropped {postfix['dropped']}" if "dropped" in postfix else ""
            bar.write(f"step {step + 1:>5}  loss {loss:.4f}  tokens/s {tokens_per_s:,.0f}{dropped}")
            _write_log(log, args, rank)
        if args.ckpt_dir and args.ckpt_every and (step + 1) % args.ckpt_every == 0:
            path = save_checkpoint(program, opt, args.ckpt_dir, step + 1, args.keep_last)
            if rank == 0:
                bar.write(f"saved {path}")
    return log


def _global_mean(value: torch.Tensor) -> float:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The launcher's arguments; MODEL given as ``--model`` or in first place (as inspect and
    infer take it), ``tiny-moe`` where neither is."""
    parser = build_parser()
    args = parser.parse_args([_one_spelling(arg) for arg in argv])
    if args.model and args.model_arg and args.model != args.model_arg:
        parser.error(f"MODEL {args.model_arg!r} and --model {args.model!r} name different models; give one of them")
    args.model = args.model or args.model_arg or DEFAULT_MODEL
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        if args.nproc_per_node > 1 and "RANK" not in os.environ:
            precheck(args, args.nproc_per_node)   # one line here, not one traceback per rank from torchrun
            return launch(argv, args.nproc_per_node)
        run(args)
    except (MoesysError, ValueError) as exc:  # plan/model mismatches, bad overrides: one clear line, exit 2
        message = str(exc) if args.plan else name_flags(str(exc), FLAG_OF_FIELD)
        print(f"moesys-compile train: error: {message}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            groups.reset()
            dist.destroy_process_group()
    return 0


def precheck(args, world: int) -> None:
    """What ``run`` checks first on every rank, done once before the ranks are launched; with
    expert_parallel > 1 also rank 0's lowering, whose ``expert_parallel`` pass refuses expert
    weight layouts it cannot shard."""
    plan = make_plan(args, world)
    check_device(plan)
    if plan.world_size != world:
        raise PlanError(f"plan.world_size ({plan.world_size}) differs from --nproc-per-node ({world}); launch "
                        f"{plan.world_size} ranks or set world_size={world} in the plan")
    _check_args(args, world)
    model = build_model(args, plan)
    check_plan_against_model(model, plan, canonicalize(model))    # Hugging Face blocks become canonical first
    data = TokenSource(args.data, model.config.vocab_size, args.batch_size, args.seq_len, args.seed)
    if plan.expert_parallel > 1:   # e.g. DBRX's flat expert view: a PlanError here, not one per rank
        lower(model, plan, (data.local_batch(0, 0, world)[0],), rank=0)
    else:
        data.global_batch(0)


def _check_args(args, world: int) -> None:
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
        if value < 1:
            raise ValueError(f"{flag} ({value}) must be >= 1")
    for flag, value, zero in (("--clip", args.clip, "off"), ("--ckpt-every", args.ckpt_every, "only at the end"),
                              ("--log-every", args.log_every, "no step lines"),
                              ("--keep-last", args.keep_last, "keeps every checkpoint")):
        if not 0 <= value < math.inf:
            raise ValueError(f"{flag} ({value}) must be >= 0 (0: {zero})")
    if args.keep_last and not args.ckpt_dir:
        raise ValueError(f"--keep-last {args.keep_last} applies to checkpoints, which need --ckpt-dir; pass --ckpt-dir DIR")
    if not 0 <= args.lr < math.inf:      # an infinite rate makes every weight NaN at the first step
        raise ValueError(f"--lr ({args.lr}) must be a finite number >= 0, e.g. --lr 3e-4")
    if args.batch_size % world:
        raise ValueError(f"--batch-size ({args.batch_size}) must be divisible by the world size ({world})")
    if args.ckpt_every and not args.ckpt_dir:
        raise ValueError(f"--ckpt-every {args.ckpt_every} saves nowhere without --ckpt-dir; pass --ckpt-dir DIR")
    if args.ckpt_dir:
        _prepare_ckpt_dir(Path(args.ckpt_dir))
    if args.log_json:
        _prepare_log_json(Path(args.log_json))


def _prepare_ckpt_dir(root: Path) -> None:
    """Create ``--ckpt-dir`` and refuse one that is a file, cannot be written, or is one step's
    checkpoint (a run writes ``step_N`` directories and ``latest`` into its root), before any step."""
    if (root / checkpoint.META).is_file():
        raise ValueError(f"--ckpt-dir {str(root)!r} is one checkpoint (it holds {checkpoint.META}); pass the run's "
                         f"root, which holds its step_N directories and 'latest' (here {str(root.parent)!r}), to "
                         f"resume from its newest step")
    writable_dir(root, "--ckpt-dir", "the run writes its step_N checkpoints and 'latest' there")


def _prepare_log_json(path: Path) -> None:
    """Create ``--log-json``'s folder (as ``--ckpt-dir`` is) and refuse a path that cannot be
    written, before any step runs rather than after the last one."""
    if path.is_dir():
        raise ValueError(f"--log-json {str(path)!r} is a directory; pass a file path (e.g. {path / 'log.json'})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--log-json {str(path)!r}: cannot create its folder {str(path.parent)!r} "
                         f"({exc.strerror or exc}); pass a path in a writable folder") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"--log-json {str(path)!r} is not writable; pass a path in a writable folder")


def _one_spelling(arg: str) -> str:
    """torchrun's ``--nproc_per_node`` (also ``=N``) as this parser spells it."""
    name, sep, value = arg.partition("=")
    return NPROC_SPELLINGS[0] + sep + value if name in NPROC_SPELLINGS else arg


def without_launch_option(argv: Sequence[str]) -> list[str]:
    """``argv`` less ``--nproc-per-node`` in each spelling torchrun takes (``--nproc_per_node``),
    with its value, given as ``--opt N`` or ``--opt=N``: the ranks are already launched."""
    forwarded, skip_value = [], False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg in NPROC_SPELLINGS:
            skip_value = True
        elif not arg.startswith(tuple(f"{spelling}=" for spelling in NPROC_SPELLINGS)):
            forwarded.append(arg)
    return forwarded


def launch(argv: Sequence[str], nproc: int, env: Optional[dict] = None) -> int:
    """Start ``nproc`` ranks of this launcher with torchrun on a free local port; returns its exit code."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    forwarded = without_launch_option(argv)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(port), "-m", "moesys_compile.train", *forwarded]
    full_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
    child = subprocess.Popen(cmd, env=full_env)
    if threading.current_thread() is not threading.main_thread():   # only the main thread takes signals
        return child.wait()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))   # stop the ranks too
    try:
        return child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def demo(out_dir: str, steps: int = 40) -> dict:
    """``make demo``: 2-rank expert-parallel training of tiny-moe on CPU (gloo) that saves a
    checkpoint; prints the falling loss and returns the log (first/last loss, checkpoint path)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_file, ckpt = out / "train_log.json", out / "ckpt"
    argv = ["--model", "tiny-moe", "--ep", "2", "--steps", str(steps), "--batch-size", "8", "--seq-len", "32",
            "--lr", "3e-3", "--ckpt-dir", str(ckpt), "--ckpt-every", str(steps), "--no-resume",
            "--log-every", "5", "--log-json", str(log_file)]
    print("$ torchrun --nproc-per-node 2 -m moesys_compile.train " + " ".join(argv), flush=True)
    code = launch(argv, 2)
    if code != 0:
        raise RuntimeError(f"the 2-rank training run exited with {code}")
    log = json.loads(log_file.read_text())
    first, last = log["loss"][0], log["loss"][-1]
    print(f"2 ranks (expert_parallel=2): loss {first:.4f} -> {last:.4f} over {steps} steps; "
          f"checkpoint {latest_checkpoint(str(ckpt))}", flush=True)
    return {"first_loss": first, "last_loss": last, "checkpoint": str(latest_checkpoint(str(ckpt))), "log": log}


if __name__ == "__main__":
    sys.exit(main())
