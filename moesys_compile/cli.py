"""``moesys-compile`` command line: inspect | train | infer.

    moesys-compile inspect tiny-moe --format text
    moesys-compile inspect tiny-moe --plan plan.yaml --after capture --format json --out out/
    moesys-compile inspect --list-passes
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import __version__
from .errors import MoesysError
from .plan import MODES, Plan, parse_bytes

FORMATS = ("text", "json", "dot", "svg")
DEFAULT_BATCH, DEFAULT_SEQ = 2, 16


def _inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="show the graph after each pass, with shapes and cost formulas",
                       description="Trace MODEL, run the plan's pipeline and show every stage.")
    p.add_argument("model", nargs="?", help="built-in name (tiny-moe), package.module:factory, hf:<family> or a HF dir")
    p.add_argument("--plan", help="plan file (YAML or JSON); default: Plan(mode=--mode)")
    p.add_argument("--mode", choices=MODES, default=None, help="mode when no plan file is given (default train)")
    p.add_argument("--config", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="model config overrides (one or more, repeatable)")
    p.add_argument("--after", metavar="PASS", help="show only the graph after this pass ('capture' for the trace)")
    p.add_argument("--format", choices=FORMATS, default="text",
                   help="text or json: one report of every stage shown; dot or svg: the last stage's graph on "
                        "stdout, or one file per stage with --out (svg needs Graphviz's dot program)")
    p.add_argument("--out", metavar="DIR", help="write files here (inspect.txt, inspect.json or NN-STAGE.dot/svg) "
                                                "instead of printing")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size B of the example inputs the plan is lowered at (an infer plan sizes its "
                        "ring's sections, slots and workspace for it) and at which formulas are evaluated "
                        f"(default {DEFAULT_BATCH}; a factory's own example inputs keep theirs)")
    p.add_argument("--seq", type=int, default=None,
                   help="sequence length S of the example inputs the plan is lowered at and at which formulas "
                        f"are evaluated (default {DEFAULT_SEQ}; at most the model's max_seq_len)")
    p.add_argument("--budget", help="device budget of an infer plan, e.g. 512MiB (Plan.device_budget; implies "
                                    "--mode infer): shows the ring's sections, their bytes and their slots")
    p.add_argument("--list-passes", action="store_true", help="list each mode's passes and exit")


def list_passes(plan: Optional[Plan]) -> str:
    from moesys_compile.passes import PIPELINES
    lines = []
    for mode, passes in PIPELINES.items():
        names = [p.__name__ for p in passes]
        disabled = set(plan.disable_passes) if plan and plan.mode == mode else set()
        shown = [f"{n} (disabled)" if n in disabled else n for n in names]
        lines.append(f"{mode}: " + (" → ".join(shown) if shown else "(no passes: identity)"))
        for fn in passes:
            summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
            lines.append(f"    {fn.__name__:<20} {summary}")
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace) -> int:
    from .api import lower
    from .models.hf import overrides_blamed
    from .models.spec import load_model, model_and_overrides
    from .report import InspectError, Renderer, check_stage, dot_program

    plan = Plan.from_file(args.plan) if args.plan else Plan(mode=args.mode or ("infer" if args.budget else "train"))
    if args.mode and args.plan and args.mode != plan.mode:
        raise MoesysError(f"--mode {args.mode} contradicts the plan file's mode ({plan.mode}); drop one")
    if args.budget is not None:
        plan = _with_budget(plan, args.budget)
    if args.list_passes:
        print(list_passes(plan))
        return 0
    model, overrides = model_and_overrides(args.model, args.config)
    if not model:
        raise MoesysError("inspect needs MODEL (e.g. tiny-moe), or --list-passes")
    for flag, value in (("--batch", args.batch), ("--seq", args.seq)):
        if value is not None and value < 1:
            raise MoesysError(f"{flag} ({value}) must be >= 1")
    check_stage(args.after, plan)
    if args.format == "svg":
        dot_program()
    out_dir = _out_dir(args.out)
    if plan.mode == "infer" and not plan.weights_checkpoint and os.path.isdir(model):
        plan = dataclasses.replace(plan, weights_checkpoint=model)     # as `infer DIR`: read, never loaded whole
    loaded = load_model(model, overrides, weights=not (plan.mode == "infer" and plan.weights_checkpoint))
    if plan.dtype is not None:             # as `train` does: the model in Plan.dtype (export fixes it in the graph)
        loaded.model.to(plan.torch_dtype)
    batch, seq = example_size(loaded, args.batch, args.seq)
    check_seq_len(loaded.model, seq, "--seq", "--config")
    with overrides_blamed(plan.weights_checkpoint, overrides):
        _, ctx = lower(loaded.model, plan, loaded.example_inputs(batch, seq))   # as compile at (B, S)
    renderer = Renderer(ctx, batch, seq)
    snapshots = renderer.snapshots(args.after)
    if args.format in ("text", "json"):
        text = renderer.text(args.after, loaded.description) if args.format == "text" else renderer.json(args.after)
        _emit(text, out_dir / f"inspect.{'txt' if args.format == 'text' else 'json'}" if out_dir else None)
        return 0
    render = renderer.dot if args.format == "dot" else renderer.svg
    try:
        if out_dir is None:
            print(render(snapshots[-1]))
        for index, snapshot in enumerate(snapshots if out_dir else []):
            _emit(render(snapshot), out_dir / f"{index:02d}-{snapshot.stage}.{args.format}")
    except InspectError:
        raise
    return 0


def _with_budget(plan: Plan, budget: str) -> Plan:
    """``plan`` with ``--budget`` as its device budget; only an infer plan has one."""
    if plan.mode != "infer":
        raise MoesysError(f"--budget {budget} is the device budget of ring inference, but the plan's mode is "
                          f"{plan.mode}; pass --mode infer (or an infer plan file), or drop --budget")
    return dataclasses.replace(plan, device_budget=parse_bytes(budget, "--budget"))


def example_size(loaded, batch: Optional[int], seq: Optional[int]) -> tuple[int, int]:
    """The (B, S) inspect lowers at: ``--batch``/``--seq`` (or their defaults), except for a factory
    that returns its own example inputs, whose sizes are kept; a --batch or --seq it cannot honour
    is then said on stderr rather than shown in the header as if it were used."""
    wanted = (batch or DEFAULT_BATCH, seq or DEFAULT_SEQ)
    if loaded.example_size is None:
        return wanted
    own = (loaded.example_size + wanted[len(loaded.example_size):])[:2]
    ignored = [f"{flag} {given}" for flag, given, kept in zip(("--batch", "--seq"), (batch, seq), own)
               if given is not None and given != kept]
    if ignored:
        print(f"moesys-compile inspect: note: {loaded.description} returns its own example inputs (B={own[0]}, "
              f"S={own[1]}), which are used; {' and '.join(ignored)} ignored; to choose B and S give the model an "
              f"example_inputs(batch, seq) method", file=sys.stderr)
    return own


def check_seq_len(model, seq: int, flag: str, override_flag: str) -> None:
    """Refuse a sequence length above the model config's ``max_seq_len`` (or Hugging Face's
    ``max_position_embeddings``) in one line, before a trace fails deep in the position tables.

    ``check_seq_len(mc.models.build("tiny-moe"), 700, "--seq-len", "--override")`` raises
    ``ValueError: --seq-len 700 exceeds the model's max_seq_len 512; pass --override
    max_seq_len=700 or a --seq-len of at most 512``.
    """
    from .models.spec import seq_limit
    field, limit = seq_limit(model) or (None, None)
    if limit is not None and seq > limit:
        raise ValueError(f"{flag} {seq} exceeds the model's {field} {limit}; pass {override_flag} "
                         f"{field}={seq} or a {flag} of at most {limit}")


def name_flags(message: str, flags: dict[str, str]) -> str:
    """A Plan error as a command line's user reads it: the Plan fields that ``flags`` maps to the
    flags which set them are named by those flags (``Plan.device_budget`` and a leading
    ``device_budget (`` become ``--budget``).

    ``name_flags("x.num_experts (6) is not divisible by expert_parallel (4)", {"expert_parallel": "--ep"})``
    is ``"x.num_experts (6) is not divisible by --ep (4)"``.
    """
    for field, flag in flags.items():
        # "field (value)": anywhere for a name with an underscore, which is no English word; for one
        # such as "device" only where it starts a message (also one wrapped as "...: PlanError: device (...)")
        before = r"(?<![\w.'\[])" if "_" in field else r"(?:^|(?<=: ))"
        message = re.sub(rf"\bPlan\.{field}\b|{before}{field}(?= \()", flag, message)
    return message


def _out_dir(out: Optional[str]) -> Optional[Path]:
    """``--out``'s directory, made where missing and checked writable before any work (as train's
    ``--ckpt-dir``). The files inspect writes there replace those of an earlier run."""
    if out is None:
        return None
    return writable_dir(Path(out), "--out", "inspect writes inspect.txt, inspect.json or one NN-STAGE.dot/svg "
                                            "per stage there")


def writable_dir(path: Path, flag: str, holds: str) -> Path:
    """``path`` made where missing; MoesysError naming ``flag`` where it is a file, cannot be
    created or cannot be written (checked before any work, not when the first file is written).
    ``holds``: what goes into it, for the message."""
    if path.exists() and not path.is_dir():
        raise MoesysError(f"{flag} {str(path)!r} is a file, not a directory; pass a directory (it is created if "
                          f"missing; {holds})")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MoesysError(f"{flag} {str(path)!r}: cannot create the directory ({exc.strerror or exc}); pass a "
                          f"directory in a writable folder") from None
    if not os.access(path, os.W_OK):
        raise MoesysError(f"{flag} {str(path)!r} is not writable; pass a directory in a writable folder")
    return path


def _emit(text: str, path: Optional[Path]) -> None:
    if path is None:
        print(text)
        return
    path.write_text(text)
    print(f"wrote {path}")


def _delegate(module: str, argv: Sequence[str]) -> int:
    """``train`` and ``infer`` live in their own modules (they are also ``python -m`` entry points)."""
    try:
        target = importlib.import_module(f"moesys_compile.{module}")
    except ModuleNotFoundError as exc:
        if exc.name == f"moesys_compile.{module}":
            print(f"moesys-compile {module}: not available in this installation", file=sys.stderr)
            return 2
        raise
    return int(target.main(list(argv)) or 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return _run(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:
        # `moesys-compile ... | head`: the reader left early. Like other tools, stop with a nonzero
        # code and no traceback (stdout goes to devnull so the flush at exit stays quiet too).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _run(argv: list[str]) -> int:
    if argv and argv[0] in ("train", "infer"):
        return _delegate(argv[0], argv[1:])
    parser = argparse.ArgumentParser(prog="moesys-compile", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"moesys-compile {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _inspect_parser(sub)
    sub.add_parser("train", help="distributed training under torchrun (see: moesys-compile train --help)")
    sub.add_parser("infer", help="memory-ring inference (see: moesys-compile infer --help)")
    args = parser.parse_args(argv)
    from .report import InspectError
    try:
        return run_inspect(args)
    except (MoesysError, InspectError, ValueError) as exc:
        print(f"moesys-compile inspect: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
