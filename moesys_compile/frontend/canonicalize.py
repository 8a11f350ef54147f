"""Find the MoE blocks of a model and put them in canonical form (``moesys_compile.nn.MoE``-style
modules whose forward calls ``torch.ops.moesys.*``).

A recognizer is a function ``(module, path) -> Recognition | None``. It looks at structure (a
router producing top-k ids and weights, stacked expert weights, the activation), not only at
class names. A recognition either keeps the module (it is canonical already) or names a
replacement that reuses the original Parameter objects, so nothing is copied and state_dict
names map back to the original. Recognizers are data: ``RECOGNIZERS`` is a plain list, and
``canonicalize(model, recognizers=RECOGNIZERS + mine)`` adds more. A recognition that offers
``for_twin`` is reused for every later block of the same ``structure_key`` (the layers of a model are
probed once), so a recognizer decides by structure, not by a block's path or tensor values.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Callable, Hashable, Optional

import torch
from torch import nn

from ..nn import MoE
from .adapters import parameter_adapters_note
from .empty_weights import Source, materialized


@dataclass
class Recognition:
    kind: str                                   # e.g. "moesys.nn.MoE", "hf.MixtralSparseMoeBlock"
    replacement: Optional[nn.Module] = None     # None: the module is canonical already
    details: dict = field(default_factory=dict)  # num_experts, top_k, dim, ffn_dim, activation, ...
    note: str = "dispatch/experts/combine now canonical ops"   # the report's reason for a replacement
    # the same recognition built on another block of identical structure (``structure_key``), without
    # probing it (nor, for a model on meta, reading it from its checkpoint); None: probe every block
    for_twin: Optional[Callable[[nn.Module], "Recognition"]] = None


@dataclass
class BlockReport:
    """One line of ``inspect``'s 'MoE layers found' list."""
    path: str
    kind: str
    action: str      # "canonical" (kept), "replaced", "left" (looks like MoE, not recognised)
    reason: str
    details: dict = field(default_factory=dict)

    def describe(self) -> str:
        facts = " ".join(f"{k}={v}" for k, v in self.details.items())
        return f"{self.path:<32} {self.kind:<28} {self.action:<9} {facts}  ({self.reason})"


Recognizer = Callable[[nn.Module, str], Optional[Recognition]]


def moe_details(module: MoE) -> dict:
    """What ``inspect`` lists for an ``nn.MoE``, in the terms of a recognised block's details: the
    router as ``RouterSpec.describe`` names it, the capacity and the shared experts where it has them."""
    details = dict(num_experts=module.num_experts, top_k=module.top_k, dim=module.dim, ffn_dim=module.ffn_dim,
                   activation=module.activation,
                   router="-".join([module.score_func, f"top{module.top_k}"] + ["renorm"] * bool(module.renormalize)))
    if module.capacity_factor:
        details["capacity_factor"] = module.capacity_factor
    if module.shared is not None:
        details["shared"] = "shared"
    return details


def recognize_canonical(module: nn.Module, path: str) -> Optional[Recognition]:
    """``moesys_compile.nn.MoE`` (and subclasses) are canonical as they are."""
    if isinstance(module, MoE):
        return Recognition(kind="moesys.nn.MoE", details=moe_details(module))
    return None


RECOGNIZERS: list[Recognizer] = [recognize_canonical]

NO_MATCH = ("no recognizer matched its structure (they expect a router child with one [E, D] weight and a child "
            "named like 'experts' holding a ModuleList of Linear MLPs or two stacked 3-D [E, ., .] "
            "weights, or those two weights as the block's own parameters); it runs as traced code")
_MOE_LIKE_NAME = re.compile(r"moe|mixture|sparse.*(block|mlp)|expert", re.IGNORECASE)


def named_like_moe(module: nn.Module) -> bool:
    """Its class is named like an MoE block or experts (``MixtralSparseMoeBlock``, ``ZayaExperts``)."""
    return bool(_MOE_LIKE_NAME.search(type(module).__name__))


def _looks_like_moe(module: nn.Module) -> bool:
    has_experts = isinstance(getattr(module, "experts", None), (nn.Module, nn.ModuleList))
    return has_experts or named_like_moe(module) and any(
        name == "gate" or "router" in name for name, _ in module.named_children())   # Doge: ``router_gate``


def _probed_like_moe(module: nn.Module) -> bool:
    """Whether recognizers probe ``module`` (reading its tensors from the checkpoint for a model on
    meta; its twins then take its recognition): an MoE-like block, or a module named like experts
    holding stacked 3-D weights (experts its caller routes, ``routed_experts``)."""
    stacked = named_like_moe(module) and any(p.dim() == 3 for p in module.parameters(recurse=False))
    return _looks_like_moe(module) or stacked


# a module's hook tables (the handles of hooks registered on it hold these very dicts)
_HOOK_TABLES = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
                "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")


def _swap_in(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` in place of the block there, with the block's hooks: the model
    keeps calling them (``handle.remove()`` still removes one), and the capture sees them."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    block = getattr(parent, name)
    for table in _HOOK_TABLES:
        hooks = getattr(block, table, None)
        if hooks:
            hooks.update(getattr(module, table))
            object.__setattr__(module, table, hooks)
    if block._backward_hooks:
        module._is_full_backward_hook = block._is_full_backward_hook
    setattr(parent, name, module)


SMALL_TENSOR_ATTRIBUTE = 64   # elements: a plain tensor attribute up to this size is keyed by its values


def _plain(value) -> Hashable:
    """An attribute's value as part of a key: itself when hashable, a function by its code and what
    it closes over (a hook or activation a factory made for each layer), a tensor by
    ``_tensor_attribute``, anything else by its repr (a config: every value in it)."""
    if isinstance(value, torch.Tensor):
        return _tensor_attribute(value)
    if inspect.isfunction(value):
        return value.__code__, tuple(_captured(cell) for cell in value.__closure__ or ())
    try:
        hash(value)
        return value
    except TypeError:
        return repr(value)


def _captured(cell) -> Hashable:
    """A closure cell's value as part of a key; a function in it by its code alone (it may close
    over itself)."""
    try:
        value = cell.cell_contents
    except ValueError:   # a cell not yet filled
        return None
    return value.__code__ if inspect.isfunction(value) else _plain(value)


def _tensor_attribute(t: torch.Tensor) -> Hashable:
    """A tensor held as a plain attribute (neither parameter nor buffer, so the forward may read it
    as a constant, a per-layer scale say): shape, dtype, device and its values when small; a
    larger one as that very tensor."""
    small = t.numel() <= SMALL_TENSOR_ATTRIBUTE and not t.is_meta
    return tuple(t.shape), t.dtype, t.device, tuple(t.detach().flatten().tolist()) if small else id(t)


def _tensors(tensors: dict[str, Optional[torch.Tensor]]) -> tuple:
    return tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in tensors.items() if t is not None)


def structure_key(module: nn.Module) -> tuple:
    """What recognizing a block may depend on besides its tensors' values: for the block and each
    module in it, its name and class, its plain attributes (top_k, capacity_factor, router flags, the
    config it holds, a function-valued activation), the names, shapes, dtypes and devices of its
    parameters and of its buffers (a missing bias is absent), and its forward hooks, which run when
    it is probed. Two blocks with one key are twins (the layers of one model): recognizers decide by
    this alone, so one probe serves them all."""
    return tuple((name, type(sub), _attributes(sub), _tensors(sub._parameters), _tensors(sub._buffers), _hooks(sub))
                 for name, sub in module.named_modules(remove_duplicate=False))


def _attributes(module: nn.Module) -> tuple:
    return tuple(sorted((name, _plain(value)) for name, value in vars(module).items()
                        if not name.startswith("_") and not isinstance(value, nn.Module)))


def _hooks(module: nn.Module) -> tuple:
    return tuple(tuple(_plain(hook) for hook in hooks.values())
                 for hooks in (module._forward_pre_hooks, module._forward_hooks))


def _recognize(module: nn.Module, path: str, recognizers: list[Recognizer], weights: Optional[Source],
               twins: dict[tuple, Recognition]) -> Optional[Recognition]:
    """The first recognizer's recognition of the block. An MoE-like block whose twin
    (``structure_key``) was recognised already takes the twin's recognition built on it: nothing is
    probed, nor read from ``weights``. Otherwise it is probed, with its tensors read from ``weights``
    for a model on meta."""
    twin_able = bool(path) and _probed_like_moe(module)
    key = structure_key(module) if twin_able else None
    if key in twins:
        return twins[key].for_twin(module)
    with materialized(module, path, weights if twin_able else None):
        recognition = next((r for r in (rec(module, path) for rec in recognizers) if r is not None), None)
    if key is not None and recognition is not None and recognition.for_twin is not None:
        twins[key] = recognition
    return recognition


def canonicalize(model: nn.Module, recognizers: Optional[list[Recognizer]] = None,
                 weights: Optional[Source] = None) -> list[BlockReport]:
    """Swap recognised MoE blocks for canonical modules, in place. Returns one report per block
    found (kept, replaced, or left as it is with the reason). An MoE-like block is probed once per
    structure: its twins (``structure_key``, the layers of one model) take the same recognition,
    each built on its own block and reported under its own path. ``weights`` (model name -> tensor)
    serves the tensors of a model built under ``empty_weights``: a probed block's own tensors are
    read from it, then put back on meta; its twins are not read."""
    recognizers = RECOGNIZERS if recognizers is None else recognizers
    reports: list[BlockReport] = []
    claimed: list[str] = []
    twins: dict[tuple, Recognition] = {}
    for path, module in list(model.named_modules()):
        if any(path.startswith(prefix + ".") or prefix == "" for prefix in claimed):
            continue
        recognition = _recognize(module, path, recognizers, weights, twins)
        if recognition is not None:
            claimed.append(path)
            if recognition.replacement is not None and not path:
                reports.append(BlockReport("(model)", recognition.kind, "left",
                                           "the model itself is the MoE block; wrap it in a parent module to "
                                           "canonicalize it", recognition.details))
            elif recognition.replacement is None:
                reports.append(BlockReport(path or "(model)", recognition.kind, "canonical", "already canonical",
                                           recognition.details))
            else:
                _swap_in(model, path, recognition.replacement)
                note = recognition.note + parameter_adapters_note(model, path)
                reports.append(BlockReport(path, recognition.kind, "replaced", note, recognition.details))
        elif path and _looks_like_moe(module):   # not claimed: a part of it may still be recognised
            reports.append(BlockReport(path, type(module).__name__, "left", NO_MATCH))
    return outermost(reports)


def outermost(reports: list[BlockReport]) -> list[BlockReport]:
    """Drop a "left" report for a module that contains a recognised one (JetMoE's attention holds
    its attention experts) or that sits inside another left module (reports in module order)."""
    done = [r.path for r in reports if r.action != "left"]
    kept: list[BlockReport] = []
    for report in reports:
        inside = report.path + "."
        if report.action == "left" and (any(p.startswith(inside) for p in done) or any(
                k.action == "left" and report.path.startswith(k.path + ".") for k in kept)):
            continue
        kept.append(report)
    return kept


def is_canonical_moe(module: nn.Module) -> bool:
    """``nn.MoE`` or a recognizer's canonical module (marked ``_moesys_canonical = True``; it
    exposes ``num_experts``, ``top_k``, ``dim`` and ``ffn_dim`` like ``nn.MoE``)."""
    return isinstance(module, MoE) or getattr(module, "_moesys_canonical", False)


def moe_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Canonical MoE modules by path (after canonicalize)."""
    return {path: m for path, m in model.named_modules() if is_canonical_moe(m)}


def moe_parameter_classes(model: nn.Module) -> dict[str, str]:
    """Full parameter name -> "expert" or "router" for every canonical MoE block (from each
    block's ``expert_param_names`` and ``router_path``); parameters not listed are dense."""
    classes: dict[str, str] = {}
    for path, module in moe_modules(model).items():
        prefix = f"{path}." if path else ""
        router = module.get_submodule(module.router_path) if getattr(module, "router_path", None) else None
        for name, _ in (router.named_parameters(prefix=f"{prefix}{module.router_path}") if router else ()):
            classes[name] = "router"
        for name in module.expert_param_names:
            classes[prefix + name] = "expert"
    return classes
