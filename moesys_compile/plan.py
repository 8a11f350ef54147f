"""The compile plan: what to build (mode), over how many ranks, under which memory budget.

    >>> import moesys_compile as mc
    >>> plan = mc.Plan(mode="train", world_size=4, expert_parallel=2)
    >>> plan.data_parallel
    2
    >>> mc.Plan(mode="infer", device_budget="512MiB").device_budget
    536870912
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import PlanError

MODES = ("train", "infer")
WEIGHT_TIERS = ("host", "disk")
KERNEL_CHOICES = ("auto", "triton", "torch")
EP_EXCHANGES = ("token", "slot")
DTYPES = ("float32", "bfloat16", "float16")

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


# a decimal number, also in scientific notation ("1e9", which YAML reads as a string)
_NUMBER = r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
_SCIENTIFIC = r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+"


def parse_bytes(value: Union[int, float, str, None], field_name: str = "device_budget") -> Optional[int]:
    """``512MiB`` -> 536870912, ``1e9`` -> 1000000000; whole numbers pass through. Raises
    PlanError naming the field for anything but a finite size of at least one byte, and for a
    fraction of a byte where the size is given in bytes (a size in units rounds down to a byte)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise PlanError(f"{field_name} ({value!r}) must be a byte count such as 536870912 or '512MiB'")
    if isinstance(value, (int, float)):
        return _whole_bytes(value, 1, value, field_name)
    match = re.fullmatch(rf"\s*({_NUMBER})\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise PlanError(f"{field_name} ({value!r}) is not a size; write e.g. 536870912, '512MiB' or '2GB'")
    return _whole_bytes(float(match.group(1)), _UNITS[match.group(2).lower()], value, field_name)


def _whole_bytes(number: Union[int, float], scale: int, given: Any, field_name: str) -> int:
    """``number`` x ``scale`` as a byte count, or PlanError naming ``field_name`` and ``given``."""
    size = number * scale
    if isinstance(size, float) and not math.isfinite(size):
        raise PlanError(f"{field_name} ({given!r}) must be a finite size such as 536870912 or '512MiB'")
    if size <= 0:
        raise PlanError(f"{field_name} ({given!r}) must be positive")
    if scale == 1 and size != int(size):
        raise PlanError(f"{field_name} ({given!r}) is not a whole number of bytes; give an integer such as "
                        f"536870912, or a size with a unit such as '512MiB'")
    if size < 1:
        raise PlanError(f"{field_name} ({given!r}) is less than one byte; give a size such as 536870912 or '512MiB'")
    return int(size)


def _scientific(value: Any) -> Any:
    """A string in scientific notation as the number it writes (YAML reads ``1e9`` and ``1e2`` as
    strings), an integral one as an int; any other value as it is."""
    if not isinstance(value, str) or not re.fullmatch(_SCIENTIFIC, value.strip()):
        return value
    number = float(value)
    return int(number) if number.is_integer() else number


def _options_hint(fields: list[str]) -> str:
    """Where ``options`` is among the ignored fields: the options there are, all of them the ring's."""
    if "options" not in fields:
        return ""
    from .programs.ring import RING_OPTIONS
    return f" (only ring inference reads options: {', '.join(RING_OPTIONS)})"


def format_bytes(num: Union[int, float]) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(num) >= scale:
            return f"{num / scale:.2f} {unit}"
    return f"{int(num)} B"


@dataclass
class Plan:
    """How to compile a model. Every field is checked on construction (PlanError names it).

    mode: "train" (per-rank expert+data parallel program) or "infer" (memory-ring program).
    world_size / expert_parallel: ranks in all, and ranks an expert group spans; the rest is
        data parallelism (``data_parallel = world_size // expert_parallel``).
    capacity_factor: GShard capacity per expert (> 0); 0 for dropless routing; None keeps each
        layer's own (dropless where it has none).
    ep_exchange: how tokens travel to the experts of other EP ranks. "token": a token crosses to
        a rank once however many of its experts live there, and comes back once, weighted and
        summed there; "slot": one row per routed slot each way (the GShard layout).
    device: "cpu", "cuda" or "cuda:N". device_budget: bytes (int or "512MiB") the program may
        hold on the device (ring inference). weights: "host" (pinned memory) or "disk"
        (safetensors under offload_dir). dtype: compute dtype (None: the model's own; the ring casts
        to it, a train plan refuses one other than the parameters'). disable_passes: pass names to skip.
    weights_checkpoint: directory the infer ring stages its weights from (a Hugging Face style
        safetensors directory or a training checkpoint) instead of the model's own tensors.
    ring_slots, weights, offload_dir, options: read by the ring alone; a plan that builds none (a
        train plan, an infer plan without device_budget) refuses them, a train plan also
        device_budget and weights_checkpoint.
    leaf_modules: module paths (``"layers.0.router"``) or nn.Module classes kept as one opaque call.
    """

    mode: str = "train"
    world_size: int = 1
    expert_parallel: int = 1
    capacity_factor: Optional[float] = None
    ep_exchange: str = "token"
    device: str = "cpu"
    device_budget: Optional[Union[int, str]] = None
    weights: str = "host"
    offload_dir: Optional[str] = None
    dtype: Optional[str] = None          # None: the model's own
    disable_passes: tuple[str, ...] = ()
    kernels: str = "auto"
    bucket_mb: float = 25.0
    ring_slots: Optional[int] = None
    weights_checkpoint: Optional[str] = None
    leaf_modules: tuple[Union[str, type], ...] = ()
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # one name written without a list (``disable_passes: fuse_comm`` in YAML) is one name, not its letters
        self.disable_passes = (self.disable_passes,) if isinstance(self.disable_passes, str) else tuple(
            self.disable_passes or ())
        self.leaf_modules = (self.leaf_modules,) if isinstance(self.leaf_modules, str) else tuple(
            self.leaf_modules or ())
        if self.options is not None and not isinstance(self.options, Mapping):
            raise PlanError(f"options ({self.options!r}) must be a mapping of option names to values, e.g. "
                            f"{{'progress': True}} (in YAML: 'options: {{progress: true}}')")
        self.options = dict(self.options or {})
        for name in ("world_size", "expert_parallel", "capacity_factor", "bucket_mb", "ring_slots"):
            setattr(self, name, _scientific(getattr(self, name)))
        if not isinstance(self.dtype, str) and str(self.dtype).startswith("torch."):   # torch.bfloat16
            self.dtype = str(self.dtype).removeprefix("torch.")
        # a torch.device and pathlib paths as the strings a plan file holds (to_file writes them)
        import torch
        if isinstance(self.device, torch.device):
            self.device = str(self.device)
        for name in ("offload_dir", "weights_checkpoint"):
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        self.device_budget = parse_bytes(self.device_budget)
        self._check_choice("mode", MODES)
        self._check_choice("weights", WEIGHT_TIERS)
        self._check_choice("kernels", KERNEL_CHOICES)
        self._check_choice("ep_exchange", EP_EXCHANGES)
        if self.dtype is not None:
            self._check_choice("dtype", DTYPES)
        for name in ("world_size", "expert_parallel"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlanError(f"{name} ({value!r}) must be a positive integer")
        for name in ("capacity_factor", "bucket_mb", "ring_slots"):
            value, kinds = getattr(self, name), (int,) if name == "ring_slots" else (int, float)
            if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
                raise PlanError(f"{name} ({value!r}) must be {'an integer' if kinds == (int,) else 'a number'}")
        if self.world_size % self.expert_parallel:
            raise PlanError(f"world_size ({self.world_size}) is not divisible by expert_parallel "
                            f"({self.expert_parallel}); set Plan.expert_parallel to a divisor of it")
        if self.capacity_factor is not None and not 0 <= self.capacity_factor < math.inf:
            raise PlanError(f"capacity_factor ({self.capacity_factor}) must be a finite number > 0 (GShard capacity), "
                            f"0 (dropless), or None (each layer's own)")
        if not isinstance(self.device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise PlanError(f"device ({self.device!r}) must be 'cpu', 'cuda' or 'cuda:N'")
        if not 0 < self.bucket_mb < math.inf:
            raise PlanError(f"bucket_mb ({self.bucket_mb}) must be a finite number > 0")
        if self.ring_slots is not None and self.ring_slots < 2:
            raise PlanError(f"ring_slots ({self.ring_slots}) must be >= 2 (one computes while the next loads)")
        self._check_leaf_modules()
        if self.weights == "disk" and self.mode == "infer" and not self.offload_dir:
            raise PlanError("weights is 'disk' but offload_dir is not set; give a directory for the safetensors files")
        self._check_ring_only_fields()
        if self.weights_checkpoint is not None and not Path(self.weights_checkpoint).is_dir():
            raise PlanError(f"weights_checkpoint ({self.weights_checkpoint!r}) is not a directory; give the "
                            f"checkpoint directory (model.safetensors, its index, a training checkpoint or a "
                            f"training run's checkpoint root)")

    def _check_leaf_modules(self) -> None:
        import torch
        for leaf in self.leaf_modules:
            if not isinstance(leaf, str) and not (isinstance(leaf, type) and issubclass(leaf, torch.nn.Module)):
                raise PlanError(f"leaf_modules entry {leaf!r} must be a module path as in model.named_modules() "
                                f"(e.g. 'layers.0.router') or an nn.Module class")

    def _ring_fields_set(self) -> list[str]:
        """The fields set here that only a ring reads. An infer plan's lowering also reads
        weights_checkpoint (a model on the meta device takes its weights from it); a train plan
        reads neither it nor device_budget, which is what makes an infer plan build a ring."""
        train = self.mode == "train"
        return [name for name, is_set in (
            ("device_budget", train and self.device_budget is not None), ("ring_slots", self.ring_slots is not None),
            ("weights", self.weights != "host"), ("offload_dir", self.offload_dir is not None),
            ("weights_checkpoint", train and self.weights_checkpoint is not None), ("options", bool(self.options)),
        ) if is_set]

    def _check_ring_only_fields(self) -> None:
        """A train plan, or an infer plan without a device_budget, builds no ring: the fields only a
        ring reads would be ignored without a word."""
        ignored = self._ring_fields_set()
        if not ignored or (self.mode == "infer" and self.device_budget is not None):
            return
        first = f"{ignored[0]} ({getattr(self, ignored[0])!r})"
        if self.mode == "train":
            raise PlanError(f"{first} applies to mode='infer' (ring inference), and a train plan ignores it: drop "
                            f"{', '.join(ignored)}{_options_hint(ignored)}")
        raise PlanError(f"{first} applies to a ring, and without a device_budget there is none (every weight stays "
                        f"on the device): set device_budget (e.g. '512MiB'), or drop {', '.join(ignored)}"
                        f"{_options_hint(ignored)}")

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise PlanError(f"{name} ({value!r}) must be one of {', '.join(map(repr, choices))}")

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.expert_parallel

    @property
    def torch_dtype(self):
        """``dtype`` as a torch dtype; None where the plan keeps the model's own."""
        import torch
        return None if self.dtype is None else getattr(torch, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values (a plan file's content). Class entries of ``leaf_modules``
        stay classes: ``to_file`` refuses them."""
        data = dataclasses.asdict(self)
        data["disable_passes"] = list(self.disable_passes)
        data["leaf_modules"] = list(self.leaf_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "plan") -> "Plan":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(f"{source}: unknown plan field(s) {unknown}; known fields: {sorted(known)}")
        try:
            return cls(**data)
        except PlanError as exc:
            raise PlanError(f"{source}: {exc}") from None

    def to_file(self, path: Union[str, Path]) -> None:
        """Write the plan as YAML (or JSON for a ``.json`` path), atomically. A plan whose
        ``leaf_modules`` holds classes is refused: a file holds module paths only."""
        path = Path(path)
        classes = [leaf for leaf in self.leaf_modules if not isinstance(leaf, str)]
        if classes:
            names = ", ".join(f"{leaf.__module__}.{leaf.__qualname__}" for leaf in classes)
            raise PlanError(f"leaf_modules holds the class(es) {names}, which a plan file ({str(path)!r}) cannot "
                            f"hold; name those modules by their paths in model.named_modules() instead (e.g. "
                            f"leaf_modules=['layers.0.router'])")
        text = (json.dumps(self.to_dict(), indent=2) if path.suffix == ".json"
                else yaml.safe_dump(self.to_dict(), sort_keys=False))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "Plan":
        return cls.from_dict(read_plan_file(path), source=str(path))


def read_plan_file(path: Union[str, Path]) -> dict[str, Any]:
    """The fields a YAML or JSON plan file holds (not yet checked as a Plan)."""
    path = Path(path)
    if not path.exists():
        raise PlanError(f"plan file {str(path)!r} does not exist")
    if path.is_dir():
        raise PlanError(f"plan file {str(path)!r} is a directory; give the YAML or JSON file of the plan in it")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise PlanError(f"plan file {str(path)!r} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                        f"{exc}") from exc
    if data is None:
        raise PlanError(f"plan file {str(path)!r} is empty; write the plan's fields in it (e.g. 'mode: train')")
    if not isinstance(data, dict):
        raise PlanError(f"plan file {str(path)!r} must hold a mapping of plan fields, got {type(data).__name__}")
    return data
