"""Models whose parameters are not in memory: built on the meta device, their weights read from a
checkpoint only where compiling needs values, and streamed by the ring at run time.

    >>> with moesys_compile.empty_weights():                      # doctest: +SKIP
    ...     model = AutoModelForCausalLM.from_config(config)       # parameters on meta, buffers real
    >>> plan = Plan(mode="infer", device_budget="8GiB", weights="disk", offload_dir="/scratch",
    ...             weights_checkpoint="/models/Qwen3-30B-A3B")    # doctest: +SKIP
    >>> program = moesys_compile.compile(model, plan, example_inputs=(ids,))   # doctest: +SKIP

Where compiling needs tensors, and what it uses instead of the whole model:

    recognizing an MoE block   the block's own tensors, read from the checkpoint for the probe and
                               put back on meta afterwards (``materialized``)
    torch.export               uninitialised host tensors, never written (``stand_ins``), swapped
                               back for the meta originals in the captured module (``put_back``)
    shape propagation          fake tensors on the example inputs' device (``fake_like``)
    the ring                   stages every tensor from ``Plan.weights_checkpoint``

Buffers stay real under ``empty_weights`` (rotary tables and other non-persistent buffers are
computed in ``__init__`` and are in no checkpoint).
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from ..runtime.storage import Source



@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no initialisation
    cost); buffers are created as usual."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        if param is not None and not param.is_meta:
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def accelerate_offloaded_modules(model: nn.Module) -> list[str]:
    """Paths of the modules of ``model`` whose weights accelerate's hooks hold and load at every
    call (an ``AlignDevicesHook`` with ``offload=True``, alone or in a ``SequentialHook``): what
    ``from_pretrained(device_map=...)`` with offloading, ``disk_offload`` and ``cpu_offload`` leave."""
    paths = []
    for path, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        if any(getattr(h, "offload", False) for h in getattr(hook, "hooks", (hook,))):
            paths.append(path)
    return paths


def meta_tensor_names(module: nn.Module) -> list[str]:
    """Names of ``module``'s parameters and buffers on the meta device."""
    return [name for name, t in itertools.chain(module.named_parameters(remove_duplicate=False),
                                                module.named_buffers(remove_duplicate=False)) if t.is_meta]


@contextlib.contextmanager
def meta_replaced(module: nn.Module, make: Callable[[str, torch.Tensor], torch.Tensor],
                  as_parameters: bool = True) -> Iterator[dict[int, torch.Tensor]]:
    """While inside, every meta parameter and buffer of ``module`` is ``make(name, tensor)`` (name
    relative to ``module``; a parameter stays an ``nn.Parameter`` when ``as_parameters``); yields
    id(replacement) -> the meta original. Afterwards the very same meta objects are back."""
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    for owner_path, owner in module.named_modules(remove_duplicate=False):
        for table in (owner._parameters, owner._buffers):
            for name, t in list(table.items()):
                if t is None or not t.is_meta:
                    continue
                value = make(f"{owner_path}.{name}" if owner_path else name, t)
                is_param = as_parameters and isinstance(t, nn.Parameter)
                table[name] = nn.Parameter(value, t.requires_grad) if is_param else value
                swapped.append((table, name, t))
    try:
        yield {id(table[name]): original for table, name, original in swapped}
    finally:
        for table, name, original in reversed(swapped):
            table[name] = original


@contextlib.contextmanager
def materialized(module: nn.Module, path: str, source: Optional[Source]) -> Iterator[None]:
    """While inside, every meta tensor of ``module`` (at ``path`` in the model) holds its values
    from ``source`` (model name -> tensor), so that a replacement built meanwhile refers to the
    model's own (meta) parameters afterwards. Without ``source`` nothing changes."""
    if source is None:
        yield
        return
    prefix = f"{path}." if path else ""
    with meta_replaced(module, lambda name, t: source(prefix + name).to(t.dtype)):
        yield


def blank_like(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor shaped, strided and typed like ``t``, on ``device``."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)


def fake_like(t: torch.Tensor, mode, device: torch.device) -> torch.Tensor:
    """A fake tensor of ``mode`` shaped, strided and typed like the meta tensor ``t``, on ``device``."""
    with mode:
        return blank_like(t, device)


def stand_ins(model: nn.Module, device: torch.device):
    """Context: every meta tensor of ``model`` replaced by an uninitialised tensor on ``device``
    (memory the OS commits only when written; torch.export reads shapes, never values); yields
    id(stand-in) -> the meta original, for ``put_back`` on what was captured meanwhile."""
    return meta_replaced(model, lambda name, t: blank_like(t, device))


def put_back(module: nn.Module, originals: dict[int, torch.Tensor]) -> None:
    """Replace, in ``module``, every tensor of ``originals``' stand-ins by its meta original."""
    for owner in module.modules():
        for table in (owner._parameters, owner._buffers):
            for name, t in list(table.items()):
                if t is not None and id(t) in originals:
                    table[name] = originals[id(t)]
        for name, value in list(vars(owner).items()):    # tensor constants kept as plain attributes
            if isinstance(value, torch.Tensor) and id(value) in originals:
                setattr(owner, name, originals[id(value)])
