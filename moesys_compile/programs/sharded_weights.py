"""The model's expert weights while a training program trains them as rank shards.

At ``expert_parallel > 1`` a rank trains its rows [lo, hi) of a stacked expert weight as a
parameter of its own (a view of the model's tensor), and of per-expert weights only its own
experts'. The model's tensors then hold this rank's experts as trained and every other rank's as
they were at compile. What a user does through the model is kept in step with that:

    an optimizer over the model's full weight   its ``step`` is refused (that weight gets no gradient)
    ``requires_grad_`` on the model's weight     mirrored on the shard at the next forward
    ``model.zero_grad()``                        clears the shards' gradients too (at the next
                                                 forward, with a warning once: zero them through
                                                 the optimizer or ``program.zero_grad()``)
    ``model.to(dtype or device)``                the shard views the model's cast rows at the
                                                 next forward, as the dense parameters (shared)
                                                 follow the cast at once
    the model after a step on its shards         "stale": ``model.state_dict()`` and a forward of
                                                 the model warn, and compiling it on other rows
                                                 (another EP size, an infer program) is refused,
                                                 until the trained state is loaded into it
                                                 (``model.load_state_dict(program.full_state_dict())``
                                                 or ``mc.load_into(model, DIR)``)

Compiling the model again at the same EP size takes the same rows, the trained ones, and keeps the
other rows stale.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from ..errors import PlanError, warn_user


@dataclass(eq=False)
class ShardedWeight:
    """A model weight some rank's program trains in part: ``shard`` is what the program holds of
    it (None: none of it, another rank's expert)."""
    full: weakref.ref
    name: str
    expert_parallel: int
    shard: Optional[weakref.ref]
    model_requires_grad: bool
    rows: tuple[int, int] = (0, 0)               # the rows [lo, hi) of the model's weight the shard views
    storage: int = 0                             # the model weight's storage the shard views
    stale: bool = False
    group: list = field(default_factory=list)    # the records of the program holding it
    warned: set = field(default_factory=set)     # the uses already warned about while stale

    def alive(self, param: Any) -> bool:
        return self.full() is param


# id(model weight) -> its record; id(shard) -> the records of the program holding it (a step on
# any of a program's shards makes all of its weights stale: the other ranks stepped theirs)
WEIGHTS: dict[int, ShardedWeight] = {}
_BY_SHARD: dict[int, tuple[weakref.ref, list[ShardedWeight]]] = {}
_HOOKED: weakref.WeakSet = weakref.WeakSet()      # modules holding such weights, hooks registered
_OPTIMIZER_HOOKS: list = []
_QUIET = [0]          # > 0 while the program itself reads the model (its forward, a compile)
_WARNED_ZERO_GRAD = [False]


@contextlib.contextmanager
def quiet():
    """The model read by this project (a program's forward, a compile): no staleness warnings."""
    _QUIET[0] += 1
    try:
        yield
    finally:
        _QUIET[0] -= 1


def track(model: nn.Module, partial: dict[str, Optional[tuple[nn.Parameter, tuple[int, int]]]],
          trained: list[nn.Parameter], expert_parallel: int) -> list[ShardedWeight]:
    """Record the model weights a program holds in part (``partial``: model name -> the program's
    shard of it and the rows [lo, hi) of the model's weight it views, None where this rank holds
    none of it, another rank's expert); a step on any of ``trained`` (the expert parameters the
    program trains) makes them stale. A weight already stale (the model compiled again) stays
    stale."""
    records = []
    for name, held in partial.items():
        param = model.get_parameter(name)
        before = WEIGHTS.get(id(param))
        shard, rows = held if held is not None else (None, (0, 0))
        record = ShardedWeight(weakref.ref(param), name, expert_parallel,
                               weakref.ref(shard) if shard is not None else None, param.requires_grad,
                               rows=rows, storage=param.untyped_storage().data_ptr(),
                               stale=bool(before and before.alive(param) and before.stale))
        WEIGHTS[id(param)] = record
        records.append(record)
        _hook_owner(model, name)
    for record in records:
        record.group = records
    for param in trained:
        _BY_SHARD[id(param)] = (weakref.ref(param), records)
    if not _OPTIMIZER_HOOKS:
        _OPTIMIZER_HOOKS.append(register_optimizer_step_pre_hook(_refuse_full_weights))
        _OPTIMIZER_HOOKS.append(register_optimizer_step_post_hook(_mark_stepped))
    return records


def untrack(model: nn.Module, names) -> None:
    """These weights are trained as they are (a program compiled again at expert_parallel=1)."""
    for name in names:
        WEIGHTS.pop(id(model.get_parameter(name)), None)


def _live(param_id: int, param: Any) -> Optional[ShardedWeight]:
    record = WEIGHTS.get(param_id)
    return record if record is not None and record.alive(param) else None


def _refuse_full_weights(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            record = _live(id(param), param)
            if record is not None and record.shard is not None:
                raise PlanError(f"{type(optimizer).__name__}.step: the optimizer holds the model's full expert weight "
                                f"'{record.name}', which the program trains as this rank's shard (expert_parallel="
                                f"{record.expert_parallel}): it gets no gradient and would never change; build the "
                                f"optimizer over program.parameters() after compile")


def _mark_stepped(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    stepped = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            trained = _BY_SHARD.get(id(param))
            if trained is not None and trained[0]() is param:
                stepped[id(trained[1])] = trained[1]
    for records in stepped.values():
        mark_stale(records)


def mark_stale(records: list[ShardedWeight]) -> None:
    for record in records:
        record.stale = True


def _hook_owner(model: nn.Module, name: str) -> None:
    owner = model.get_submodule(name.rpartition(".")[0])
    if owner in _HOOKED:
        return
    _HOOKED.add(owner)
    owner.register_state_dict_post_hook(_warn_on_state_dict)
    owner.register_load_state_dict_pre_hook(_synced_by_load)
    owner.register_forward_pre_hook(_warn_on_forward)


def _stale_here(module: nn.Module) -> list[ShardedWeight]:
    return [r for p in module.parameters(recurse=False) if (r := _live(id(p), p)) is not None and r.stale]


def _warn_stale(records: list[ShardedWeight], use: str) -> None:
    """One warning per use while stale, naming the first of the program's stale weights."""
    fresh = [r for r in records if use not in r.warned]
    if _QUIET[0] or not fresh:
        return
    stale = [r for r in fresh[0].group if r.stale] or fresh
    for record in stale + fresh:
        record.warned.add(use)
    first = stale[0]
    more = f" (and {len(stale) - 1} more)" if len(stale) > 1 else ""
    warn_user(f"{use} reads the model's expert weight '{first.name}'{more}, which a training program trains as "
              f"rank shards (expert_parallel={first.expert_parallel}): the model holds this rank's experts as "
              f"trained and the other ranks' as they were at compile; load the trained state into it first: "
              f"model.load_state_dict(program.full_state_dict()) on every rank (a collective), or "
              f"mc.load_into(model, DIR) of a checkpoint")


def _warn_on_state_dict(module: nn.Module, state: dict, prefix: str, local_metadata: Any) -> None:
    # the project's own reads ask for the parameters themselves (keep_vars=True)
    records = [r for r in _stale_here(module) if not isinstance(state.get(prefix + r.name.rpartition(".")[2]),
                                                                    nn.Parameter)]
    _warn_stale(records, "model.state_dict()")


def _warn_on_forward(module: nn.Module, args: Any) -> None:
    _warn_stale(_stale_here(module), "a forward of the model")


def _synced_by_load(module: nn.Module, state: dict, prefix: str, *rest: Any) -> None:
    for param_name, param in module.named_parameters(recurse=False):
        record = _live(id(param), param)
        if record is not None and prefix + param_name in state:
            record.stale = False
            record.warned.clear()


def refuse_stale_model(model: nn.Module, mode: str, expert_parallel: int) -> None:
    """Before compiling ``model``: a stale weight (see the module doc) may only be compiled again
    onto the same rows, a training program at the same EP size."""
    for name, param in model.named_parameters():
        record = _live(id(param), param)
        if record is None or not record.stale or (mode == "train" and expert_parallel == record.expert_parallel):
            continue
        raise PlanError(f"'{name}' was trained as rank shards at expert_parallel={record.expert_parallel}, so this "
                        f"rank's model holds only its own experts as trained (the others as at compile); compiling it "
                        f"for {'mode=infer' if mode == 'infer' else f'expert_parallel={expert_parallel}'} would use "
                        f"the untrained ones. Load the trained state into the model first: "
                        f"model.load_state_dict(program.full_state_dict()) on every rank (a collective), or "
                        f"mc.load_into(model, DIR) of a checkpoint")


def follow_model(records: list[ShardedWeight], dense: list[nn.Parameter]) -> None:
    """Before a forward: follow a cast of the model (``follow_cast``), mirror ``requires_grad_``
    set on the model's weights since the last one, and drop the shards' gradients where the
    model's were zeroed (every trainable dense parameter's gradient None, a shard's not:
    ``model.zero_grad()``)."""
    shards = [(r, r.shard()) for r in records if r.shard is not None]
    for record, shard in shards:
        full = record.full()
        if full is not None and not torch.compiler.is_compiling():    # storage pointers: no graph of them
            follow_cast(record, full, shard)
        if full is not None and full.requires_grad != record.model_requires_grad:
            record.model_requires_grad = full.requires_grad
            shard.requires_grad_(full.requires_grad)
    trainable = [p for p in dense if p.requires_grad]
    leftover = [shard for _, shard in shards if shard.grad is not None]
    if leftover and trainable and all(p.grad is None for p in trainable):
        for shard in leftover:
            shard.grad = None
        if not _WARNED_ZERO_GRAD[0]:
            _WARNED_ZERO_GRAD[0] = True
            warn_user("the model's gradients were zeroed (model.zero_grad()) but not those of the expert shards the "
                      "program trains at expert_parallel > 1, which the model does not hold: they are dropped now; "
                      "zero gradients with optimizer.zero_grad() or program.zero_grad(), which reach the shards")


def follow_cast(record: ShardedWeight, full: nn.Parameter, shard: nn.Parameter) -> None:
    """``model.to(torch.bfloat16)`` (or to another device) after compile gives the model's weight
    new storage, cast, holding this rank's trained rows too; the shard, which viewed the old
    storage, views the new one's rows from then on (and its gradient is cast alike), so the model
    cast reaches the experts as it reaches the dense parameters. A shard given storage of its
    own (``program.to(...)`` casts the shards) is left as it is. Under ``torch.compile`` the
    program's forward does not follow a cast (dynamo cannot trace storage pointers): cast the
    model before compiling it with torch.compile."""
    storage = full.untyped_storage().data_ptr()
    if storage == record.storage:
        return
    if shard.untyped_storage().data_ptr() == record.storage:     # the model was cast, the shard was not
        lo, hi = record.rows
        with torch.no_grad():
            shard.data = full.detach()[lo:hi]
            if shard.grad is not None:
                shard.grad = shard.grad.to(device=full.device, dtype=full.dtype)
    record.storage = storage
