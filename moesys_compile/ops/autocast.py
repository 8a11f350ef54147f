"""Autocast rules for the custom ops (``torch.autocast`` around a model or a program).

Without a rule, a custom op runs its implementation with autocast still on: the matmuls inside
come out in the autocast dtype and meet buffers of the inputs' dtype. Each op here gets one of two
rules for the autocast keys of CPU and CUDA:

* ``cast=True`` (expert matmuls): floating inputs are cast to the active autocast dtype, as
  autocast casts ``F.linear``'s, and the op runs in it with autocast off;
* ``cast=False`` (routing, permutes, losses, collectives): the op runs with autocast off on its
  inputs as they come (routing keeps its float32 scores, a combine follows its rows' dtype).

The dtype is read when the op runs (``torch.get_autocast_dtype``), so one rule serves bfloat16
and float16 regions alike. Autograd sits below the autocast keys: gradients flow back through the
casts to the float32 weights.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

DEVICE_TYPES = ("cpu", "cuda")
_LIBRARIES: dict[str, torch.library.Library] = {}


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _autocast_kernel(op: Callable, device_type: str, key: torch._C.DispatchKey, cast: bool) -> Callable:
    def kernel(_keyset, *args: Any, **kwargs: Any) -> Any:
        if cast:
            dtype = torch.get_autocast_dtype(device_type)
            args, kwargs = _cast(args, dtype), {k: _cast(v, dtype) for k, v in kwargs.items()}
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*args, **kwargs)
    return kernel


def follow_autocast(qualname: str, cast: bool) -> None:
    """Register ``qualname``'s (``"namespace::name"``) rule for every device type in ``DEVICE_TYPES``."""
    namespace, name = qualname.split("::")
    library = _LIBRARIES.setdefault(namespace, torch.library.Library(namespace, "FRAGMENT"))
    op = getattr(getattr(torch.ops, namespace), name).default
    for device_type in DEVICE_TYPES:
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)
        library.impl(name, _autocast_kernel(op, device_type, key, cast), key_name, with_keyset=True)
