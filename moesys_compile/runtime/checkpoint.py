"""Sharded, atomic checkpoints of a TrainingProgram, reloadable at any expert-parallel size.

Layout of a checkpoint directory ``DIR`` (names are the original model's state names):

    DIR/meta.json                    commit record: layout, expert shards, aliases, extra (step ...)
    DIR/plan.yaml                    the plan it was trained with
    DIR/dense.safetensors            every non-expert tensor (written by rank 0)
    DIR/experts-ep{i}.safetensors    the experts [i*L, (i+1)*L) of EP rank i of the first EP group:
                                     those rows of every stacked [E, ...] expert parameter (F rows
                                     per expert of a flat [E*F, D] one, DBRX's), and the whole
                                     per-expert parameters (ModuleList experts) of them
    DIR/optim-dense.safetensors      optimizer state of the dense parameters, "<name>:<key>" (rank 0)
    DIR/optim-experts-ep{i}.safetensors   optimizer state of the experts of EP rank i, cut like the
                                     experts-ep{i} weights (0-dim entries such as Adam's step whole)
    DIR/optim-groups.pt              the optimizer's param_groups, their parameters by name (rank 0)

The optimizer state is stored by parameter name and expert rows, like the weights, so it too
reloads at any expert-parallel size.

Each expert shard file records, per parameter, the experts [lo, hi) it holds (its metadata's
``moesys_expert_ranges``); reading checks them against meta.json where they are recorded.

Atomicity: all ranks write into ``.DIR.tmp-<token>`` beside DIR; after a barrier rank 0 writes
meta.json, then renames DIR -> ``.DIR.old-<token>``, the temporary -> DIR, and deletes the old one.
A crash at any point leaves either DIR or the old copy complete; ``load`` falls back to the old
copy when DIR itself is missing. DIR must be new, empty or a checkpoint: any other directory is
refused, since the swap replaces all of it.

A training run's root holds ``step_N`` checkpoints and ``latest``, which names the newest; where
``latest`` names no complete checkpoint (a deleted step), the newest complete ``step_N`` stands
for the root, with a warning.

A missing or damaged file of a checkpoint (a shard, meta.json, a file of the optimizer state that
meta.json promises) is a ``CheckpointError`` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import MoesysError
from .storage import FileSpan

META, PLAN, DENSE = "meta.json", "plan.yaml", "dense.safetensors"
LATEST = "latest"    # in a training run's checkpoint root: the name of its newest step directory
FORMAT = 1
RANGES = "moesys_expert_ranges"    # an expert shard file's metadata: {name: [lo, hi]} of the experts it holds
# the entries of meta.json that loading reads, and their JSON types
META_KEYS = {"experts": dict, "aliases": dict, "optimizer": bool, "extra": dict}

# Test hook: called with a stage name ("shards_written", "before_swap") during save.
FAULT_HOOK: Optional[Callable[[str], None]] = None


class CheckpointError(MoesysError):
    """A checkpoint directory is missing, incomplete, or does not fit the model."""


def _fault(stage: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(stage)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _agree(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _expert_file(index: int) -> str:
    return f"experts-ep{index}.safetensors"


def _dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses shared storage: keep tied tensors once, remember the aliases."""
    unique, aliases, seen = {}, {}, {}
    for name, tensor in tensors.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        unique[name] = tensor.detach().contiguous().cpu()
    return unique, aliases


def _expert_entry(shard) -> dict:
    """Where an expert parameter is stored: the files holding its rows, or (per-expert
    parameters, ``expert`` set) the one file of the EP rank that owns its expert."""
    local = shard.hi - shard.lo
    if shard.expert is not None:
        index = shard.expert // local
        return {"num_experts": shard.num_experts, "expert": shard.expert,
                "shards": [{"file": _expert_file(index), "lo": index * local, "hi": (index + 1) * local}]}
    shards = [{"file": _expert_file(i), "lo": i * local, "hi": (i + 1) * local}
              for i in range(shard.num_experts // local)]
    return {"num_experts": shard.num_experts, "shards": shards}


def _meta(program, aliases: dict[str, str], optimizer, extra: dict) -> dict:
    topo = program.topology
    experts = {name: _expert_entry(shard) for name, shard in program.expert_layout.items()}
    return {"format": FORMAT, "world_size": topo.world_size, "expert_parallel": topo.expert_parallel,
            "experts": experts, "aliases": {**aliases, **program.expert_aliases}, "optimizer": optimizer is not None,
            "optimizer_class": type(optimizer).__name__ if optimizer is not None else None, "extra": extra,
            "time": time.time()}


def save(program, directory: str, optimizer: Optional[torch.optim.Optimizer] = None,
         extra: Optional[dict] = None) -> Path:
    """Collective. Write ``program``'s state (and the optimizer's) atomically to ``directory``: a
    new or empty directory, or a checkpoint, which it replaces; any other is refused (on every
    rank, before anything is written), since the swap would delete what it holds."""
    _check_extra(dict(extra or {}))       # on every rank, before any collective: none is left waiting
    topo = program.topology
    target = Path(directory).resolve()
    refusal = _agree(_target_refusal(target) if topo.rank == 0 else None)   # rank 0 swaps: its view counts
    if refusal:
        raise CheckpointError(refusal)
    token = _agree(f"{os.getpid()}-{time.time_ns()}")
    tmp = target.parent / f".{target.name}.tmp-{token}"
    if topo.rank == 0:
        _remove_temporaries(target.parent, target.name)
        tmp.mkdir(parents=True)
    _barrier()
    dense, experts = program.local_state()
    dense, aliases = _dedupe(dense)
    if topo.rank == 0:
        save_file(dense, str(tmp / DENSE))
    if topo.dp_index == 0 and experts:
        save_file({n: t.contiguous().cpu() for n, t in experts.items()}, str(tmp / _expert_file(topo.ep_index)),
                  metadata=_expert_ranges(program))
    if optimizer is not None:
        _save_optimizer(program, optimizer, tmp)
    _fault("shards_written")
    _barrier()
    if topo.rank == 0:
        _plan_by_paths(program).to_file(tmp / PLAN)
        (tmp / META).write_text(json.dumps(_meta(program, aliases, optimizer, dict(extra or {})), indent=1))
        _fault("before_swap")
        _swap(tmp, target, token)
    _barrier()
    return target


def _plan_by_paths(program):
    """The program's plan with each class in ``leaf_modules`` replaced by the paths of the model's
    modules of that class (the modules it made leaves when the program was compiled), as a plan
    file holds them."""
    plan = program.plan
    classes = tuple(leaf for leaf in plan.leaf_modules if isinstance(leaf, type))
    if not classes:
        return plan
    paths = [name for name, module in program.context.model.named_modules() if name and isinstance(module, classes)]
    named = [leaf for leaf in plan.leaf_modules if isinstance(leaf, str)]
    return dataclasses.replace(plan, leaf_modules=tuple(dict.fromkeys(named + paths)))


def _expert_ranges(program) -> dict[str, str]:
    """The metadata of this rank's expert shard files: the experts [lo, hi) of each parameter it holds."""
    held = {name: [shard.lo, shard.hi] for name, shard in program.expert_layout.items() if shard.held}
    return {RANGES: json.dumps(held)}


def _remove_temporaries(parent: Path, pattern: str) -> list[Path]:
    """Delete the temporary copies ``.{pattern}.tmp-*`` in ``parent`` (``pattern`` a glob of
    checkpoint names) that killed saves left; only while no save into them is under way."""
    stale = sorted(p for p in parent.glob(f".{pattern}.tmp-*") if p.is_dir())
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def remove_interrupted_saves(root: str) -> list[Path]:
    """Delete what killed saves left in a training run's checkpoint root (``.step_N.tmp-*``, as
    large as a checkpoint, never loaded); returns them. Call it only where no save into ``root``
    can be under way, as the launcher does while it holds the root's ``.lock``.

        >>> checkpoint.remove_interrupted_saves("runs/ckpt")   # doctest: +SKIP
        [PosixPath('runs/ckpt/.step_000004.tmp-4242-1700000000')]
    """
    return _remove_temporaries(Path(root), "step_*")


def _check_extra(extra: dict) -> None:
    """``extra`` goes into meta.json: refuse what JSON cannot hold, naming the entry."""
    for key, value in extra.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"save(..., {key}=...) goes into {META}, but {type(value).__name__} values cannot "
                                  f"({exc}); pass numbers, strings, lists or dicts of them, e.g. "
                                  f"{key}=int({key})") from None


def _target_refusal(target: Path) -> Optional[str]:
    """Why ``save`` must not write to ``target`` (None: it may). The swap replaces the whole
    directory, so only a new or empty one, or a checkpoint (its ``meta.json``), may be replaced."""
    if not target.exists() or (target / META).is_file():
        return None
    if target.is_dir():
        held = sorted(p.name for p in target.iterdir())
        if not held:
            return None
        shown = ", ".join(held[:5]) + (f", ... ({len(held) - 5} more)" if len(held) > 5 else "")
        what = f"an existing directory that is not a checkpoint (no {META}; it holds {shown})"
    else:
        what = "an existing file"
    return (f"save({str(target)!r}): the target is {what}; saving replaces the whole directory, which would "
            f"delete that; pass a new or empty directory (e.g. {str(target / 'ckpt')!r}), or an existing "
            f"checkpoint to overwrite it")


def _swap(tmp: Path, target: Path, token: str) -> None:
    old = target.parent / f".{target.name}.old-{token}"
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    if old.exists():
        shutil.rmtree(old)


def latest_step(directory: str) -> Optional[Path]:
    """The step directory that a training run's checkpoint root (``--ckpt-dir``) names in its
    ``latest`` file, or without one (a copy that left it out), or where the one it names holds no
    complete checkpoint (a deleted step; with a warning naming both), its newest complete
    ``step_N`` directory; None for any other directory."""
    root, marker = Path(directory), Path(directory) / LATEST
    if (root / META).is_file():
        return None
    if not marker.is_file():
        return _newest_complete_step(root)
    named = root / marker.read_text().strip()
    newest = None if _complete_copy(named) is not None else _newest_complete_step(root)
    if newest is None:           # complete, or nothing to fall back to (``resolve`` names it as incomplete)
        return named
    warnings.warn(f"{str(marker)!r} names {named.name!r}, which holds no complete checkpoint ({META} missing); "
                  f"using the newest complete one, {newest.name!r}; write {newest.name!r} into {str(marker)!r} "
                  f"to make that the run's latest")
    return newest


def _newest_complete_step(root: Path) -> Optional[Path]:
    steps = [p for p in root.glob("step_*") if p.name[5:].isdigit() and (p / META).is_file()] if root.is_dir() else []
    return max(steps, key=lambda p: int(p.name[5:]), default=None)


def _complete_copy(target: Path) -> Optional[Path]:
    """``target`` if it is a complete checkpoint, else the newest complete previous copy that a
    crashed swap left beside it (``.NAME.old-*``), else None."""
    if (target / META).is_file():
        return target
    olds = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    return next((old for old in reversed(olds) if (old / META).is_file()), None)


def resolve(directory: str) -> Path:
    """The complete checkpoint at ``directory`` (at the newest step, for a training run's root), or
    the previous copy a crashed swap left beside it."""
    target = (latest_step(directory) or Path(directory)).resolve()
    found = _complete_copy(target)
    if found is None:
        raise _no_checkpoint(target)
    return found


def _no_checkpoint(target: Path) -> CheckpointError:
    """Why ``target`` holds no complete checkpoint: it is a file, it does not exist (and no save
    into it was interrupted), or its meta.json is missing."""
    if target.is_file():
        return CheckpointError(f"{str(target)!r} is a file, and a checkpoint is a directory (what program.save or "
                               f"save_pretrained wrote, or a training run's --ckpt-dir): pass the directory that "
                               f"holds it; a state dict saved as one file loads with "
                               f"model.load_state_dict(torch.load(PATH)) (safetensors.torch.load_file for "
                               f".safetensors)")
    if not target.exists() and not any(target.parent.glob(f".{target.name}.tmp-*")):
        return CheckpointError(f"no complete checkpoint at {str(target)!r}: no such directory")
    return CheckpointError(f"no complete checkpoint at {str(target)!r} ({META} missing); an interrupted save "
                           f"leaves only '.{target.name}.tmp-*' beside it, which is never loaded")


def _damaged(file: Path, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint file {str(file)!r} {why}: the checkpoint is incomplete or damaged; save it "
                           f"again, or load another copy (e.g. an earlier step)")


def read_meta(directory: str, optimizer: bool = False) -> tuple[Path, dict]:
    """The complete checkpoint at ``directory`` (see ``resolve``) and its meta.json, checked: it
    parses, has this format and the entries loading reads, and every weight file it names is
    there; with ``optimizer`` also every file of the optimizer state it promises."""
    path = resolve(directory)
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(path / META, f"cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict):
        raise _damaged(path / META, f"holds a JSON {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r} is not supported "
                              f"(expected {FORMAT!r})")
    problem = _meta_problem(meta)
    if problem:
        raise _damaged(path / META, problem)
    optimizer_files = _optimizer_files(meta) if optimizer and meta["optimizer"] else set()
    missing = sorted(name for name in {DENSE, *_shard_files(meta), *optimizer_files} if not (path / name).is_file())
    if missing:
        fresh = (" (to keep its weights and start the optimizer afresh, load it without optimizer=)"
                 if set(missing) <= optimizer_files else "")
        raise _damaged(path / missing[0], f"is missing ({META} promises {missing}, not all in the directory){fresh}")
    return path, meta


def _meta_problem(meta: dict) -> Optional[str]:
    """What meta.json lacks of the entries loading reads (None: nothing)."""
    wrong = [f"'{key}' (a JSON {'boolean' if kind is bool else 'object'})" for key, kind in META_KEYS.items()
             if not isinstance(meta.get(key), kind)]
    if wrong:
        return f"lacks {', '.join(wrong)}"
    bad = [name for name, entry in meta["experts"].items() if not _valid_entry(entry)]
    if bad:
        return f"has no 'num_experts' and 'shards' (each a 'file', 'lo' and 'hi') for experts {bad[:3]}"
    return None


def _valid_entry(entry: Any) -> bool:
    """An ``experts`` entry of meta.json: ``num_experts`` and a non-empty list of shards."""
    if not isinstance(entry, dict) or not isinstance(entry.get("num_experts"), int) or not entry.get("shards"):
        return False
    return isinstance(entry["shards"], list) and all(
        isinstance(shard, dict) and isinstance(shard.get("file"), str) and isinstance(shard.get("lo"), int)
        and isinstance(shard.get("hi"), int) for shard in entry["shards"])


def _shard_files(meta: dict) -> set[str]:
    """The expert weight files that meta.json names."""
    return {shard["file"] for entry in meta["experts"].values() for shard in entry["shards"]}


def _optimizer_files(meta: dict) -> set[str]:
    """The files of the optimizer state of a checkpoint saved with one (``meta["optimizer"]``)."""
    return {OPTIM_DENSE, OPTIM_GROUPS} | {OPTIM_PREFIX + file for file in _shard_files(meta)}


def open_file(file: Path):
    """``safe_open`` of one file of a checkpoint; a missing or damaged one is a CheckpointError naming it."""
    try:
        return safe_open(str(file), framework="pt")
    except (OSError, SafetensorError) as exc:
        raise _damaged(file, f"cannot be read ({type(exc).__name__}: {exc})") from None


def _open_shard(file: Path, name: str, shard: dict):
    """``open_file`` of an expert shard file, whose recorded experts of ``name`` (see RANGES; files
    saved before they were recorded have none) must be those meta.json places there."""
    opened = open_file(file)
    try:
        recorded = json.loads((opened.metadata() or {}).get(RANGES, "{}")).get(name)
    except (json.JSONDecodeError, AttributeError):
        raise _damaged(file, f"has an unreadable '{RANGES}' record") from None
    if recorded is not None and list(recorded) != [shard["lo"], shard["hi"]]:
        raise _damaged(file, f"holds experts {recorded[0]}..{recorded[1] - 1} of '{name}', but {META} places "
                             f"experts {shard['lo']}..{shard['hi'] - 1} there")
    return opened


def _stored(opened, file: Path, stored: str):
    """The lazy slice of tensor ``stored`` in the open ``file``."""
    try:
        return opened.get_slice(stored)
    except SafetensorError:
        raise _damaged(file, f"has no tensor '{stored}', which {META} places there") from None


def _dense_state(path: Path, meta: dict) -> dict[str, torch.Tensor]:
    """Every tensor of dense.safetensors, and each tied name of meta.json's ``aliases`` as the
    tensor it shares (names of expert parameters: ``full_state`` adds them)."""
    with open_file(path / DENSE) as f:
        state = {name: f.get_tensor(name) for name in f.keys()}
    for alias, name in meta["aliases"].items():
        if name in meta["experts"]:
            continue
        if name not in state:
            raise _damaged(path / DENSE, f"has no tensor {name!r}, which {META}'s aliases name as the one that "
                                         f"'{alias}' is tied to")
        state[alias] = state[name]
    return state


def _entry(path: Path, meta: dict, name: str) -> dict:
    entry = meta["experts"].get(name)
    if entry is None:
        raise CheckpointError(f"{path}: no expert parameter '{name}' in this checkpoint")
    return entry


def read_rows(path: Path, meta: dict, name: str, lo: int, hi: int, key: str = "", prefix: str = "") -> torch.Tensor:
    """The part of expert parameter ``name`` that belongs to experts [lo, hi): those experts' rows
    of a stacked [E, ...] parameter (F rows each of a flat [E*F, D] one), read from whichever shard
    files hold them; a per-expert parameter whole (its expert must be in [lo, hi)).
    ``key``/``prefix``: its optimizer state entry ``key``, from the ``prefix``-named shard files."""
    entry = _entry(path, meta, name)
    stored = f"{name}:{key}" if key else name
    if entry.get("expert") is not None:
        if not lo <= entry["expert"] < hi:
            raise CheckpointError(f"{path}: '{name}' belongs to expert {entry['expert']}, not to experts {lo}..{hi - 1}")
        file = path / (prefix + entry["shards"][0]["file"])
        with _open_shard(file, name, entry["shards"][0]) as f:
            return _stored(f, file, stored)[:]
    if not 0 <= lo < hi <= entry["num_experts"]:
        raise CheckpointError(f"{path}: the checkpoint holds {entry['num_experts']} experts of '{name}', not experts "
                              f"{lo}..{hi - 1}; load it into a model with {entry['num_experts']} experts per layer "
                              f"(the config it was saved with)")
    spans = [(shard, max(lo, shard["lo"]), min(hi, shard["hi"])) for shard in entry["shards"]]
    spans = [(shard, start, end) for shard, start, end in spans if start < end]
    if sum(end - start for _, start, end in spans) != hi - lo:
        raise _damaged(path / META, f"does not place experts {lo}..{hi - 1} of '{name}' in its shards")
    return torch.cat([_shard_rows(path / (prefix + shard["file"]), name, stored, shard, start, end)
                      for shard, start, end in spans])


def _shard_rows(file: Path, name: str, stored: str, shard: dict, start: int, end: int) -> torch.Tensor:
    """The rows of experts [start, end) in a shard file holding experts [shard lo, shard hi):
    its rows split evenly among them (one each of a stacked parameter, F of a flat one)."""
    with _open_shard(file, name, shard) as f:
        part = _stored(f, file, stored)
        rows, experts = part.get_shape()[0], shard["hi"] - shard["lo"]
        if rows % experts:
            raise _damaged(file, f"holds {rows} rows of '{stored}' for {experts} experts")
        per = rows // experts
        return part[(start - shard["lo"]) * per: (end - shard["lo"]) * per]


def shard_span(path: Path, meta: dict, name: str, rows: Optional[tuple[int, int]] = None) -> Optional[FileSpan]:
    """Where ``read_dim0(path, meta, name, rows)`` lies unconverted: rows of tensor ``name`` in
    the one shard file that holds them all (its recorded experts checked, as reading checks them);
    None where they lie in two."""
    entry = _entry(path, meta, name)
    if entry.get("expert") is not None:           # a per-expert parameter: whole in its file
        shard = entry["shards"][0]
    else:
        per = rows_per_expert(path, meta, name)
        lo, hi = rows or (0, entry["num_experts"] * per)
        shard = next((s for s in entry["shards"] if s["lo"] * per <= lo and hi <= s["hi"] * per), None)
        if shard is None:
            return None
        rows = (lo - shard["lo"] * per, hi - shard["lo"] * per)      # rows of the shard's part
    file = path / shard["file"]
    with _open_shard(file, name, shard) as f:
        _stored(f, file, name)
    return FileSpan(file, name, rows)


def rows_per_expert(path: Path, meta: dict, name: str) -> int:
    """Rows of dim 0 per expert of stacked or flat expert parameter ``name`` (1, or F of [E*F, D])."""
    shard = _entry(path, meta, name)["shards"][0]
    file = path / shard["file"]
    with _open_shard(file, name, shard) as f:
        return _stored(f, file, name).get_shape()[0] // (shard["hi"] - shard["lo"])


def read_dim0(path: Path, meta: dict, name: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Rows [lo, hi) of dim 0 of expert parameter ``name`` at full size (all of it when ``rows``
    is None), reading only the experts that hold them."""
    entry = _entry(path, meta, name)
    if entry.get("expert") is not None:             # a per-expert parameter: one file holds it whole
        whole = read_rows(path, meta, name, entry["expert"], entry["expert"] + 1)
        return whole if rows is None else whole[rows[0]:rows[1]]
    if rows is None:
        return read_rows(path, meta, name, 0, entry["num_experts"])
    per = rows_per_expert(path, meta, name)
    first, last = rows[0] // per, -(-rows[1] // per)
    return read_rows(path, meta, name, first, last)[rows[0] - first * per: rows[1] - first * per]


def load(program, directory: str, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """Fill ``program`` (and ``optimizer``'s state) from a checkpoint saved at any EP size.
    Returns the ``extra`` record given to ``save``."""
    path, meta = read_meta(directory, optimizer=optimizer is not None)
    _check_num_experts(program, path, meta)
    dense = _dense_state(path, meta)
    program.load_local_state(dense, lambda name, lo, hi: read_rows(path, meta, name, lo, hi))
    if optimizer is not None:
        _load_optimizer(program, path, meta, optimizer)
    return meta["extra"]


def _check_num_experts(program, path: Path, meta: dict) -> None:
    """Every expert parameter has as many experts in the checkpoint as in the program's model."""
    for name, shard in program.expert_layout.items():
        saved = meta["experts"].get(name, {}).get("num_experts", shard.num_experts)
        if saved != shard.num_experts:
            raise CheckpointError(f"{path}: the checkpoint holds {saved} experts of '{name}' but "
                                  f"{type(program.context.model).__name__} has {shard.num_experts}; load it into "
                                  f"the model it was saved from (same config overrides, {saved} experts per layer)")


# ---------------------------------------------------------------------------------------------
# optimizer state by parameter name (resharded like the weights)
# ---------------------------------------------------------------------------------------------

OPTIM_DENSE, OPTIM_GROUPS, OPTIM_PREFIX = "optim-dense.safetensors", "optim-groups.pt", "optim-"
GROUP_NAMES = "moesys_param_names"   # a saved group's parameter names: groups are matched by them on load


def _parameter_names(program) -> dict[int, str]:
    """id(parameter) -> original name, for the dense parameters and this rank's expert tensors."""
    names = {id(p): n for n, p in program.context.model.named_parameters() if not program.is_expert(n)}
    local = dict(program.graph_module.named_parameters())
    names.update({id(local[n]): n for n, shard in program.expert_layout.items() if shard.held and n in local})
    return names


def _save_optimizer(program, optimizer: torch.optim.Optimizer, tmp: Path) -> None:
    """Per parameter name, each state entry as a tensor (numbers as 0-dim tensors, their type in
    the file's metadata): dense ones by rank 0, expert ones by the first rank of each EP index."""
    names, topo = _parameter_names(program), program.topology
    dense, experts, kinds = {}, {}, {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names.get(id(param))
            if name is None:
                raise CheckpointError(f"the optimizer holds a {tuple(param.shape)} parameter that is not one of the "
                                      f"program's; build it over program.parameters()")
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, (bool, int, float)):
                    kinds[f"{name}:{key}"], value = type(value).__name__, torch.tensor(value)
                if isinstance(value, torch.Tensor):
                    (experts if program.is_expert(name) else dense)[f"{name}:{key}"] = value.detach().contiguous().cpu()
                elif value is not None:
                    warnings.warn(f"optimizer state {name}:{key} ({type(value).__name__}) is not saved")
    group_names = _group_names(names, optimizer)       # collective
    if topo.rank == 0:
        # no metadata rather than an empty dict: safetensors 0.8 writes an unreadable header for
        # an empty file with empty metadata (a stateless SGD, or an optimizer before its first step)
        save_file(dense, str(tmp / OPTIM_DENSE), metadata=kinds or None)
        torch.save([{**{k: v for k, v in g.items() if k != "params"}, GROUP_NAMES: held}
                    for g, held in zip(optimizer.param_groups, group_names)], tmp / OPTIM_GROUPS)
    if topo.dp_index == 0 and program.expert_layout:    # also empty: load opens it for every expert parameter
        save_file(experts, str(tmp / (OPTIM_PREFIX + _expert_file(topo.ep_index))),
                  metadata={**kinds, **_expert_ranges(program)})


def _group_names(names: dict[int, str], optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Per optimizer group, the names of its parameters on every rank: a rank holds only its own
    experts, and experts kept as separate modules have names of their own."""
    local = [sorted(names[id(p)] for p in group["params"]) for group in optimizer.param_groups]
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    return [sorted(set().union(*(ranks[i] for ranks in everyone if i < len(ranks)))) for i in range(len(local))]


def _param_state(program, path: Path, meta: dict, name: str) -> dict:
    """The optimizer state of parameter ``name`` (this rank's share of it) for this rank's layout:
    dense entries as saved, expert entries cut to this rank's experts (0-dim entries whole)."""
    expert, file = program.is_expert(name), _optimizer_file(path, meta, program, name)
    state = {}
    with open_file(file) as f:
        kinds = f.metadata() or {}
        for stored in (k for k in f.keys() if k.startswith(f"{name}:")):
            key, value = stored[len(name) + 1:], f.get_tensor(stored)
            if expert and value.dim() > 0:
                shard = program.expert_layout[name]
                value = read_rows(path, meta, name, shard.lo, shard.hi, key=key, prefix=OPTIM_PREFIX)
            kind = kinds.get(stored)
            state[key] = {"int": int, "float": float, "bool": bool}[kind](value.item()) if kind else value
    return state


def _optimizer_file(path: Path, meta: dict, program, name: str) -> Path:
    """The file holding parameter ``name``'s optimizer state (for an expert parameter, the first of
    its shards: its 0-dim entries whole, its rows from there on)."""
    if program.is_expert(name):
        return path / (OPTIM_PREFIX + meta["experts"][name]["shards"][0]["file"])
    return path / OPTIM_DENSE


def _check_state_shapes(file: Path, name: str, param: torch.Tensor, state: dict) -> None:
    """Each state tensor of a torch.optim optimizer with the parameter's number of dims has its
    size in each dim, or 1 (as Adafactor's factored rows and columns): a damaged file fails here,
    by name, rather than in ``optimizer.step()``. Other optimizers' state (block-wise scales of
    8-bit ones) may have other shapes and is not checked."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() == param.dim() and any(
                size not in (1, own) for size, own in zip(value.shape, param.shape)):
            raise _damaged(file, f"holds optimizer state '{name}:{key}' of shape {tuple(value.shape)} for parameter "
                                 f"'{name}' of shape {tuple(param.shape)}")


def _saved_groups(file: Path) -> list[dict]:
    """The optimizer's saved param_groups: plain hyperparameters, so no pickled code is run."""
    try:
        groups = torch.load(file, weights_only=True)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
        # not torch's text: for a file it refuses, that advises weights_only=False
        raise _damaged(file, f"cannot be read as the optimizer's groups ({type(exc).__name__})") from None
    if not isinstance(groups, list) or not all(isinstance(group, dict) for group in groups):
        raise _damaged(file, f"holds a {type(groups).__name__}, not the optimizer's list of groups")
    return groups


def _load_optimizer(program, path: Path, meta: dict, optimizer) -> None:
    """Rebuild the optimizer's state for this rank's layout and load it through
    ``optimizer.load_state_dict`` (which places each entry on its parameter's device)."""
    if not meta["optimizer"]:
        warnings.warn(f"{path}: no optimizer state in this checkpoint; the optimizer starts afresh")
        return
    saved_class = meta.get("optimizer_class")      # absent from checkpoints written before it was kept
    if saved_class is not None and saved_class != type(optimizer).__name__:
        raise CheckpointError(f"{path}: its optimizer state is {saved_class}'s, not {type(optimizer).__name__}'s "
                              f"(their state entries differ); build a {saved_class} over program.parameters() to "
                              f"resume it, or load without optimizer= to start {type(optimizer).__name__} afresh")
    names = _parameter_names(program)
    saved_groups = _saved_groups(path / OPTIM_GROUPS)
    state, param_groups, index = {}, [], 0
    for number, group in enumerate(optimizer.param_groups):
        ids = []
        for param in group["params"]:
            if id(param) not in names:
                raise CheckpointError(f"the optimizer holds a {tuple(param.shape)} parameter that is not one of the "
                                      f"program's; build it over program.parameters()")
            name = names[id(param)]
            entry = _param_state(program, path, meta, name)
            if type(optimizer).__module__.startswith("torch.optim"):   # state shapes known
                _check_state_shapes(_optimizer_file(path, meta, program, name), name, param, entry)
            if entry:
                state[index] = entry
            ids.append(index)
            index += 1
        hyper = _saved_group(saved_groups, optimizer.param_groups, number, [names[id(p)] for p in group["params"]])
        param_groups.append({**hyper, "params": ids})
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def _saved_group(saved_groups: list[dict], groups: list[dict], number: int, param_names: list[str]) -> dict:
    """The saved hyperparameters of optimizer group ``number``: those of the saved group that
    holds its parameters (saved from every rank, so a rank's share of the experts, at any
    expert-parallel size, finds its group; groups built in another order still get their own), by
    position for a checkpoint without names or an empty group, else the group's current ones (with a
    warning)."""
    for saved in saved_groups:
        if param_names and set(param_names) <= set(saved.get(GROUP_NAMES, ())):
            return {k: v for k, v in saved.items() if k != GROUP_NAMES}
    if len(saved_groups) == len(groups) and not any(GROUP_NAMES in saved for saved in saved_groups):
        return saved_groups[number]
    if not param_names:      # an empty group (e.g. no-decay biases of a model without biases): by position
        saved = saved_groups[number] if number < len(saved_groups) else {}
        if not saved.get(GROUP_NAMES, ()) and saved:
            return {k: v for k, v in saved.items() if k != GROUP_NAMES}
        return {k: v for k, v in groups[number].items() if k != "params"}
    warnings.warn(f"optimizer group {number} ({len(param_names)} parameters, e.g. {param_names[:2]}) has no saved "
                  f"group with the same parameters; it keeps its current hyperparameters")
    return {k: v for k, v in groups[number].items() if k != "params"}


def full_state(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint at full size, by the original model's names."""
    path, meta = read_meta(directory)
    state = _dense_state(path, meta)
    for name in meta["experts"]:
        state[name] = read_dim0(path, meta, name)
    state.update({alias: state[name] for alias, name in meta["aliases"].items() if name in meta["experts"]})
    return state


def load_into(model: torch.nn.Module, directory: str) -> torch.nn.Module:
    """Fill a plain eager ``model`` (the original architecture) from a checkpoint of any layout (a
    training run's checkpoint root: its newest step), or from a Hugging Face-style directory as ring
    inference reads one (``save_pretrained``'s, or a HF Trainer checkpoint of a compiled program,
    whose ``model.safetensors`` is ``program.state_dict()``).

        >>> model = mc.models.build("tiny-moe"); mc.load_into(model, "ckpt/step_100")  # doctest: +SKIP
    """
    if _weights_directory(Path(directory)):
        from .sources import checkpoint_source
        read = checkpoint_source(directory, model)
        state = {name: read(name) for name in model.state_dict()}
    else:
        state = full_state(directory)
        _check_fits(model, state, directory)
    _give_meta_tensors_memory(model, directory)
    model.load_state_dict(state)
    return model


def _give_meta_tensors_memory(model: torch.nn.Module, directory: str) -> None:
    """A model built under ``mc.empty_weights()`` (or accelerate's ``init_empty_weights()``) holds its
    parameters on the meta device, where ``load_state_dict`` copies nothing: each gets host memory
    (tied ones one tensor) for the checkpoint to fill. A non-persistent buffer on meta holds values
    that no checkpoint has, so such a model is refused."""
    from ..frontend.empty_weights import blank_like, meta_tensor_names
    on_meta = meta_tensor_names(model)
    computed = [name for name in on_meta if name not in model.state_dict(keep_vars=True)]
    if computed:
        raise CheckpointError(f"cannot load {directory!r} into {type(model).__name__}: its non-persistent buffer "
                              f"'{computed[0]}' is on the meta device, and no checkpoint holds it; build the model "
                              f"under moesys_compile.empty_weights() or accelerate's init_empty_weights() (parameters "
                              f"on meta, buffers real), not on torch.device('meta')")
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}     # id(meta tensor) -> (it, its replacement)
    for owner in model.modules():
        for table in (owner._parameters, owner._buffers):
            for name, t in list(table.items()):
                if t is None or not t.is_meta:
                    continue
                if id(t) not in made:
                    blank = blank_like(t, torch.device("cpu"))
                    made[id(t)] = (t, torch.nn.Parameter(blank, t.requires_grad) if isinstance(t, torch.nn.Parameter)
                                   else blank)
                table[name] = made[id(t)][1]


def _weights_directory(directory: Path) -> bool:
    """A directory of model weights as transformers saves them, not a training checkpoint or run root."""
    from .sources import HF_WEIGHTS
    return (directory.is_dir() and not (directory / META).is_file() and latest_step(str(directory)) is None
            and any((directory / name).is_file() for name in HF_WEIGHTS))


def _check_fits(model: torch.nn.Module, state: dict[str, torch.Tensor], directory: str) -> None:
    """``state`` has exactly ``model``'s names and shapes; else a CheckpointError naming them."""
    own = model.state_dict(keep_vars=True)
    missing, unexpected = [n for n in own if n not in state], [n for n in state if n not in own]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {directory!r} does not fit {type(model).__name__}: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}")
    misfits = [f"'{n}' is {tuple(t.shape)} in the checkpoint but {tuple(own[n].shape)} in the model"
               for n, t in state.items() if t.shape != own[n].shape]
    if misfits:
        raise CheckpointError(f"checkpoint {directory!r} does not fit {type(model).__name__}: {len(misfits)} "
                              f"tensor(s) have another shape: {'; '.join(misfits[:3])}; build the model with the "
                              f"config the checkpoint was saved with (same overrides) before load_into")
