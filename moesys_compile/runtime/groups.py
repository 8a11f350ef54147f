"""Process groups of a training plan: world = data_parallel x expert_parallel.

EP groups are blocks of consecutive ranks (``[0..ep)``, ``[ep..2ep)``, ...); the expert-data-parallel
(EDP) group of a rank is the ranks at the same position of every EP group (they hold the same
experts). Dense parameters are synchronised over all ranks ("dense" group), expert parameters
over the EDP group, tokens travel over the EP group.

    >>> Topology.of(rank=3, world_size=4, expert_parallel=2).edp_ranks
    [1, 3]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..errors import PlanError

GROUP_NAMES = ("dense", "ep", "edp")


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    expert_parallel: int

    @classmethod
    def of(cls, rank: int, world_size: int, expert_parallel: int) -> "Topology":
        return cls(rank, world_size, expert_parallel)

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.expert_parallel

    @property
    def ep_index(self) -> int:
        """Position of this rank inside its EP group (which slice of experts it holds)."""
        return self.rank % self.expert_parallel

    @property
    def dp_index(self) -> int:
        """Which EP group (data-parallel replica of the experts) this rank belongs to."""
        return self.rank // self.expert_parallel

    @property
    def ep_ranks(self) -> list[int]:
        start = self.dp_index * self.expert_parallel
        return list(range(start, start + self.expert_parallel))

    @property
    def edp_ranks(self) -> list[int]:
        return list(range(self.ep_index, self.world_size, self.expert_parallel))

    def ranks(self, name: str) -> list[int]:
        return {"dense": list(range(self.world_size)), "ep": self.ep_ranks, "edp": self.edp_ranks}[name]


_GROUPS: dict[str, Optional[dist.ProcessGroup]] = {}
_TOPOLOGY: Optional[Topology] = None
_MADE_IN: Optional[object] = None       # the default group that _GROUPS were created under


def _default_group() -> Optional[object]:
    return dist.group.WORLD if dist.is_initialized() else None


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def init_from_env(device: str = "cpu") -> int:
    """Initialise the default process group from torchrun's environment (no-op when initialised).
    Returns the global rank. On CUDA, binds this process to ``LOCAL_RANK``'s device."""
    on_cuda = device.startswith("cuda")
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise RuntimeError("no process group and no torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR); "
                               "launch with `torchrun --nproc-per-node N -m moesys_compile.train ...`")
        # NCCL bound to this rank's GPU from the start (its barriers need not guess the device)
        bound = {"device_id": _local_cuda_device()} if on_cuda else {}
        dist.init_process_group(backend=backend_for(device), **bound)
    if on_cuda:
        torch.cuda.set_device(_local_cuda_device())
    return dist.get_rank()


def _local_cuda_device() -> torch.device:
    """This process's GPU: ``LOCAL_RANK`` (torchrun), else the global rank modulo the GPUs."""
    if "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])
    return torch.device("cuda", rank % torch.cuda.device_count())


def check_world(plan) -> None:
    """A plan must describe the launched world exactly; raised before any collective runs."""
    launched = dist.get_world_size() if dist.is_initialized() else 1
    if plan.world_size != launched:
        raise PlanError(f"plan.world_size ({plan.world_size}) differs from the launched world ({launched} "
                        f"process(es)); launch with `torchrun --nproc-per-node {plan.world_size}` or set "
                        f"world_size={launched} (expert_parallel must divide it)")


def setup(plan) -> Topology:
    """Create every EP, EDP and dense group of ``plan`` (all ranks must call this, in the same order)
    and keep the ones this rank belongs to. Idempotent for the same layout."""
    global _TOPOLOGY, _MADE_IN
    check_world(plan)
    topo = Topology.of(dist.get_rank() if dist.is_initialized() else 0, plan.world_size, plan.expert_parallel)
    if _TOPOLOGY == topo and _GROUPS and _MADE_IN is _default_group():
        return topo       # a process group destroyed and initialised again needs groups of its own
    _GROUPS.clear()
    _MADE_IN = _default_group()
    if not dist.is_initialized():
        _GROUPS.update({name: None for name in GROUP_NAMES})
        _TOPOLOGY = topo
        return topo
    _GROUPS["dense"] = dist.new_group(list(range(topo.world_size)))
    for dp_index in range(topo.data_parallel):
        ranks = list(range(dp_index * topo.expert_parallel, (dp_index + 1) * topo.expert_parallel))
        group = dist.new_group(ranks)
        if topo.rank in ranks:
            _GROUPS["ep"] = group
    for ep_index in range(topo.expert_parallel):
        ranks = list(range(ep_index, topo.world_size, topo.expert_parallel))
        group = dist.new_group(ranks)
        if topo.rank in ranks:
            _GROUPS["edp"] = group
    _TOPOLOGY = topo
    return topo


def topology() -> Topology:
    if _TOPOLOGY is None:
        raise RuntimeError("process groups are not set up; build the program with a train plan first "
                           "(moesys_compile.runtime.groups.setup(plan))")
    return _TOPOLOGY


def get(name: str) -> Optional[dist.ProcessGroup]:
    """The group ``name`` ("dense" | "ep" | "edp") of this rank; None when running single-process."""
    if name not in GROUP_NAMES:
        raise KeyError(f"unknown group {name!r}; groups: {GROUP_NAMES}")
    topology()
    return _GROUPS.get(name)


def size(name: str) -> int:
    return len(topology().ranks(name))


def reset() -> None:
    """Forget the groups; called before ``dist.destroy_process_group()`` so that none is left to be
    destroyed while the interpreter shuts down."""
    global _TOPOLOGY, _MADE_IN
    _GROUPS.clear()
    _TOPOLOGY = _MADE_IN = None
