"""TrainingProgram: the per-rank expert-parallel + data-parallel program, used like DDP.

    program = mc.compile(model, mc.Plan(mode="train", world_size=4, expert_parallel=2), (ids,))
    logits = program(local_ids)                        # under torchrun, this rank's batch
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten()) + program.aux_loss
    loss.backward()                                    # gradients synced in fused buckets
    program.clip_grad_norm_(1.0); opt.step()           # opt over program.parameters()
    program.save("ckpt/step_100", optimizer=opt)       # sharded, atomic
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, NamedTuple, Optional

import torch
import torch.distributed as dist

from ..errors import PlanError
from ..frontend import moe_modules
from ..frontend.canonicalize import moe_parameter_classes
from ..runtime import checkpoint, groups
from ..runtime.collectives import GradBucketer
from ..runtime.sources import tensor_aliases
from . import sharded_weights
from .base import Program
from .train_mode import follow_train_mode


class ExpertShard(NamedTuple):
    """How this rank holds one expert parameter of the original model.

    Stacked parameter (``expert`` None): rows [lo, hi) of its ``num_experts`` rows. Per-expert
    parameter (a ModuleList of expert MLPs): it belongs to expert ``expert``; this rank owns
    experts [lo, hi) of ``num_experts`` and holds the whole tensor when ``expert`` is among them.
    """
    lo: int
    hi: int
    num_experts: int
    expert: Optional[int] = None

    @property
    def held(self) -> bool:
        return self.expert is None or self.lo <= self.expert < self.hi

    @property
    def complete(self) -> bool:
        """This rank holds every expert's part (no gathering needed)."""
        return self.hi - self.lo == self.num_experts


# the graph module's state_dict entry for its expert shard record: [ep_index, expert_parallel,
# (lo, hi, num_experts) per expert parameter] (``TrainingProgram._record_shard_in_state_dict``)
_EXTRA = "_extra_state"      # torch's key for a module's extra state


def _add_shard_record(record: torch.Tensor, module, state: dict, prefix: str, local_metadata) -> None:
    state[prefix + _EXTRA] = record.clone()


def _shard_words(record: torch.Tensor) -> str:
    index, ep, *first = record.tolist()[:5]
    experts = f" (experts {first[0]}..{first[1] - 1} of {first[2]})" if len(first) == 3 else ""
    return f"expert shard {index} of expert_parallel={ep}{experts}"


def _check_shard_record(record: torch.Tensor, module, state: dict, prefix: str, local_metadata, strict,
                        missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    saved = state.pop(prefix + _EXTRA, None)     # consumed here: torch would call it unexpected
    if saved is None:
        missing_keys.append(prefix + _EXTRA)
    elif not (isinstance(saved, torch.Tensor) and saved.shape == record.shape and torch.equal(saved.cpu(), record)):
        words = _shard_words(saved) if isinstance(saved, torch.Tensor) and saved.numel() >= 2 else "another record"
        raise checkpoint.CheckpointError(
            f"load_state_dict: the state dict holds {words}, but this rank holds {_shard_words(record)}: "
            f"program.state_dict() is the rank's own experts under the model's names, so one rank's state dict "
            f"cannot be loaded on the others; save with program.save(DIR) and restore with program.load(DIR) on "
            f"every rank (any EP size), or take the whole model with program.full_state_dict() (a collective) "
            f"or mc.load_into(model, DIR)")


class TrainingProgram(Program):
    """Holds the dense parameters (shared with the model) and only this rank's experts.

    ``expert_layout``: original parameter name -> ``ExpertShard`` (rows of a stacked [E, ...]
    parameter, or a per-expert parameter and whether it is here), by the name the model and the
    graph give the parameter first. ``expert_aliases``: the model's other names of expert
    parameters (two MoE layers sharing one set of experts) -> that first name; they are stored
    once and restored as ties. ``topology``: ranks of this rank's EP / EDP groups.
    """

    def __init__(self, gm, ctx):
        super().__init__(gm, ctx)
        plan = ctx.plan
        if plan.world_size > 1 and not dist.is_initialized():
            raise PlanError(f"plan.world_size ({plan.world_size}) needs torch.distributed; launch with "
                            f"`torchrun --nproc-per-node {plan.world_size} ...` (or init_process_group first)")
        self.topology = groups.setup(plan)
        if ctx.rank != self.topology.rank:
            raise PlanError(f"the graph was lowered for rank {ctx.rank} but this process is rank {self.topology.rank}")
        self.expert_layout, self.expert_aliases = self._expert_layout(ctx)
        self._track_sharded_weights(ctx.model)
        self._record_shard_in_state_dict(gm)
        follow_train_mode(gm)
        if plan.device != "cpu":
            gm.to(torch.device(plan.device))
        self._broadcast_parameters()
        self.bucketer = GradBucketer(self._buckets(gm, ctx), dict(gm.named_parameters()), plan.world_size) \
            if plan.world_size > 1 else None

    def _expert_layout(self, ctx) -> tuple[dict[str, ExpertShard], dict[str, str]]:
        """(``expert_layout``, ``expert_aliases``). A tied parameter is held, and sharded, under its
        first name (``named_parameters()``'s, the graph's); its other names are aliases of that one.
        One tied to a dense parameter named first is dense, saved and loaded as such."""
        shards, owners = ctx.extras.get("expert_shards", {}), ctx.extras.get("expert_owners", {})
        ep, index = self.topology.expert_parallel, self.topology.ep_index
        names = tensor_aliases(ctx.model)
        layout, aliases = {}, {}
        for path, module in moe_modules(ctx.model).items():
            total = module.num_experts
            for attr in module.expert_param_names:
                name = f"{path}.{attr}" if path else attr
                first = names.get(name, [name])[0]
                if first != name:
                    aliases[name] = first
                elif name in shards:
                    layout[name] = ExpertShard(*shards[name])
                elif name in owners:
                    layout[name] = ExpertShard(index * total // ep, (index + 1) * total // ep, total, owners[name])
                else:
                    layout[name] = ExpertShard(0, total, total)
        return layout, {alias: first for alias, first in aliases.items() if first in layout}

    def _track_sharded_weights(self, model: torch.nn.Module) -> None:
        """Under expert parallelism a stacked expert weight is trained as this rank's shard, a
        parameter of its own, and other ranks' per-expert weights not at all: the model's
        tensors are kept in step with that (``sharded_weights``: an optimizer over the model's
        full weight is refused, freezing through the model reaches the shard, a stale model is
        warned about)."""
        local = dict(self._named_local())
        partial = {name: ((local[name], (shard.lo, shard.hi)) if shard.expert is None else None)
                   for name, shard in self.expert_layout.items()
                   if not shard.complete and not (shard.expert is not None and shard.held)}
        sharded_weights.untrack(model, [name for name in self.expert_layout if name not in partial])
        trained = [local[name] for name, shard in self.expert_layout.items() if shard.held and name in local]
        self._sharded = sharded_weights.track(model, partial, trained, self.topology.expert_parallel) \
            if partial else []
        self._dense = [param for name, param in local.items() if not self.is_expert(name)]

    @property
    def _ddp_params_and_buffers_to_ignore(self):
        """Read by ``DistributedDataParallel`` as it wraps a module (the HF Trainer and accelerate
        wrap a model so on several processes). At expert_parallel > 1 that is refused here: DDP
        would broadcast rank 0's parameters, this rank's experts among them, and average expert
        gradients of different experts. At expert_parallel 1 DDP only syncs again what the
        program's buckets have synced, and nothing is ignored."""
        if self.plan.expert_parallel > 1:
            raise PlanError(f"a {type(self).__name__} at expert_parallel={self.plan.expert_parallel} cannot be "
                            f"wrapped in DistributedDataParallel (as the HF Trainer and accelerate.prepare do on "
                            f"several processes): each rank holds its own experts, which DDP would overwrite with "
                            f"rank 0's, and the program syncs its gradients itself; train the program as it is (out = "
                            f"program(x); loss.backward(); opt.step(), or moesys-compile train), with accelerate "
                            f"prepare only the optimizer and data loader")
        raise AttributeError("_ddp_params_and_buffers_to_ignore")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._sharded:
            sharded_weights.follow_model(self._sharded, self._dense)
        with sharded_weights.quiet():
            return super().forward(*args, **kwargs)

    @staticmethod
    def _buckets(gm, ctx):
        buckets = ctx.extras.get("grad_buckets")
        if buckets is None:      # fuse_comm disabled: one unfused bucket per parameter
            from moesys_compile.passes.fuse_comm import backward_order, parameter_kind, plan_buckets
            order, _ = backward_order(gm)
            classes = moe_parameter_classes(ctx.model)
            kinds = {n: parameter_kind(n, classes, set(ctx.extras.get("expert_shards", {}))) for n in order}
            buckets = plan_buckets(gm, order, kinds, cap_bytes=1)
        return buckets

    # -- parameters by class -------------------------------------------------------------------

    def is_expert(self, name: str) -> bool:
        """``name`` (of the model) is an expert parameter, or another name of one."""
        return name in self.expert_layout or name in self.expert_aliases

    def held_by_another_rank(self, name: str) -> bool:
        """An expert tensor that the graph does not hold is another rank's expert."""
        return self.is_expert(name)

    def _named_local(self):
        return self.graph_module.named_parameters()

    @torch.no_grad()
    def _broadcast_parameters(self) -> None:
        """Start every replica from the same values: dense from rank 0, experts from the first
        rank of each expert-data-parallel group (like DDP's initial broadcast)."""
        if self.plan.world_size == 1:
            return
        for name, param in self._named_local():
            group = "edp" if self.is_expert(name) else "dense"
            if groups.size(group) > 1:
                dist.broadcast(param.data, src=self.topology.ranks(group)[0], group=groups.get(group))

    # -- gradients -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally (no communication) in backward passes inside this block;
        the first backward after it syncs the accumulated sum."""
        if self.bucketer is None:
            yield
            return
        self.bucketer.enabled = False
        try:
            yield
        finally:
            self.bucketer.enabled = True

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float | str = 2.0, error_if_nonfinite: bool = False,
                        foreach: Optional[bool] = None) -> torch.Tensor:
        """Clip all gradients by the global norm over every shard (dense counted once, expert
        shards summed over the EP group), as ``torch.nn.utils.clip_grad_norm_`` does for one
        process (``norm_type`` also ``"inf"``; a non-finite norm raises with
        ``error_if_nonfinite``, else scales the gradients as torch does; ``foreach`` is accepted
        for its signature). Returns the total norm (same on every rank). ``max_norm`` must be
        finite and >= 0: a negative one would flip every gradient's sign."""
        if not 0 <= max_norm < math.inf:
            raise ValueError(f"clip_grad_norm_: max_norm ({max_norm}) must be a finite number >= 0 (a negative "
                             f"one would flip the sign of every gradient); skip the call to leave them unclipped")
        norm_type = float(norm_type)
        dense, expert = [], []
        for name, param in self._named_local():
            if param.grad is not None:
                (expert if self.is_expert(name) else dense).append(param.grad)
        device = next(self.parameters()).device
        if math.isinf(norm_type):
            parts = torch.stack([g.abs().max() for g in dense + expert] or [torch.zeros((), device=device)])
            total = parts.max().reshape(1)
            self._reduce_experts(total, dist.ReduceOp.MAX)
            total = total[0]
        else:
            dense_p = sum((g.double().abs().pow(norm_type).sum() for g in dense), torch.zeros((), device=device,
                                                                                           dtype=torch.float64))
            expert_p = sum((g.double().abs().pow(norm_type).sum() for g in expert),
                           torch.zeros((), device=device, dtype=torch.float64)).reshape(1)
            self._reduce_experts(expert_p, dist.ReduceOp.SUM)
            total = (dense_p + expert_p[0]).pow(1.0 / norm_type)
        if error_if_nonfinite and not math.isfinite(float(total)):
            raise RuntimeError(f"clip_grad_norm_: the total norm of order {norm_type} of the gradients is "
                               f"{float(total)} (non-finite); check the loss and learning rate, or pass "
                               f"error_if_nonfinite=False to scale the gradients anyway")
        coef = max_norm / (float(total) + 1e-6)
        if not coef >= 1.0:            # a NaN norm scales by NaN, as torch does
            for grad in dense + expert:
                grad.mul_(coef)
        return total.float()

    def grad_scaler(self, **settings: Any) -> torch.amp.GradScaler:
        """A ``GradScaler`` for float16 steps of this program (``settings``: its ``init_scale``,
        ``growth_interval``, ...). At expert_parallel > 1 the ranks hold different experts'
        gradients, so a plain scaler on each rank decides alone whether a step overflowed: a rank
        whose experts overflowed skips the step while the others take it, and the dense weights
        drift apart. There it is torch's ``ShardedGradScaler``, which reduces that decision over
        every rank, so all skip or all step; elsewhere every gradient is synced (the same on every
        rank) and it is ``torch.amp.GradScaler``."""
        device = next(self.parameters()).device.type
        if self.plan.expert_parallel > 1 and dist.is_initialized():
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
            return ShardedGradScaler(device=device, process_group=dist.group.WORLD, **settings)
        return torch.amp.GradScaler(device, **settings)

    def _reduce_experts(self, value: torch.Tensor, op) -> None:
        if groups.size("ep") > 1:
            dist.all_reduce(value, op=op, group=groups.get("ep"))

    # -- state -----------------------------------------------------------------------------------

    def _record_shard_in_state_dict(self, gm) -> None:
        """With expert_parallel > 1, ``state_dict()`` holds this rank's experts under the model's
        names, in shapes alike on every EP rank: it also carries ``graph_module._extra_state``, a
        record of the shard, and a state dict of another shard is refused before anything is
        copied (DDP's habit of loading rank 0's state dict on every rank would give all of them
        rank 0's experts). At expert_parallel 1 the state dict is the whole model and loads anywhere."""
        if self.topology.expert_parallel == 1:
            return
        record = torch.tensor([self.topology.ep_index, self.topology.expert_parallel]
                              + [v for s in self.expert_layout.values() for v in (s.lo, s.hi, s.num_experts)])
        gm.register_state_dict_post_hook(functools.partial(_add_shard_record, record))
        gm.register_load_state_dict_pre_hook(functools.partial(_check_shard_record, record))

    def local_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(dense state by original name, this rank's expert tensors by original name: the rows
        of stacked parameters, the per-expert parameters of its own experts)."""
        full = self.context.model.state_dict(keep_vars=True)
        local = dict(self._named_local())
        dense = {n: t.detach() for n, t in full.items() if not self.is_expert(n)}
        experts = {n: local[n].detach() for n, shard in self.expert_layout.items() if shard.held}
        return dense, experts

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the original model's state names with full tensors (experts gathered over
        the EP group), shaped as in the model."""
        dense, experts = self.local_state()
        result = {n: t.clone() for n, t in dense.items()}
        model_state = self.context.model.state_dict(keep_vars=True)
        for name, shard in self.expert_layout.items():
            result[name] = self._gather_expert(shard, experts.get(name), model_state[name])
        for alias, name in self.expert_aliases.items():      # one tensor under both names: tied, like the model's
            result[alias] = result[name]
        return {name: result[name] for name in model_state}

    def _gather_expert(self, shard: ExpertShard, local: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        if shard.complete:
            return local.clone()
        if shard.expert is None:      # rows [lo, hi) here: all-gather the rows of every EP rank
            pieces = [torch.empty_like(local) for _ in range(groups.size("ep"))]
            dist.all_gather(pieces, local.contiguous(), group=groups.get("ep"))
            return torch.cat(pieces)
        # a per-expert parameter: the EP rank owning its expert sends it to the others
        owner = self.topology.ep_ranks[shard.expert // (shard.hi - shard.lo)]
        device = next(self.parameters()).device
        tensor = local.clone() if shard.held else torch.empty(like.shape, dtype=like.dtype, device=device)
        dist.broadcast(tensor, src=owner, group=groups.get("ep"))
        return tensor

    @torch.no_grad()
    def load_local_state(self, dense: dict[str, torch.Tensor], read_rows) -> None:
        """Fill the dense state from ``dense`` and this rank's expert tensors via
        ``read_rows(name, lo, hi)`` (the part of ``name`` that belongs to experts [lo, hi))."""
        full = self.context.model.state_dict(keep_vars=True)
        model = type(self.context.model).__name__
        missing = [n for n in full if not self.is_expert(n) and n not in dense]
        if missing:
            raise checkpoint.CheckpointError(f"the checkpoint lacks {len(missing)} entr(ies) of {model}, e.g. "
                                             f"{missing[:3]}; load it into the model it was saved from")
        pairs = [(name, tensor, dense[name]) for name, tensor in full.items() if not self.is_expert(name)]
        local = dict(self._named_local())
        pairs += [(name, local[name], read_rows(name, shard.lo, shard.hi))
                  for name, shard in self.expert_layout.items() if shard.held]
        for name, tensor, saved in pairs:      # check all before copying any: a misfit leaves the model as it was
            if saved.shape != tensor.shape:
                raise checkpoint.CheckpointError(
                    f"'{name}' is {tuple(saved.shape)} in the checkpoint but {tuple(tensor.shape)} in {model} on this "
                    f"rank; load it into the model it was saved from (same config overrides)")
        for _, tensor, saved in pairs:
            tensor.data.copy_(saved)

    def save(self, directory: str, optimizer: Optional[torch.optim.Optimizer] = None, **extra: Any) -> None:
        """Collective: sharded atomic checkpoint (see ``moesys_compile.runtime.checkpoint``)."""
        checkpoint.save(self, directory, optimizer=optimizer, extra=extra)

    def load(self, directory: str, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
        """Load a checkpoint saved at any EP size; returns its ``extra`` record (e.g. the step)."""
        extra = checkpoint.load(self, directory, optimizer=optimizer)
        sharded_weights.mark_stale(self._sharded)     # this rank's experts loaded, the model's others not
        return extra

    def dropped_fraction(self, reset: bool = False, across_ranks: bool = False) -> dict:
        """Per-layer fraction of routed slots dropped by capacity on this rank (None: dropless);
        ``across_ranks=True`` (collective: every rank calls it) gives it over the global batch."""
        from moesys_compile.passes.decompose_moe import dropped_fraction
        return dropped_fraction(self, reset=reset, across_ranks=across_ranks)
