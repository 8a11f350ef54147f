"""Optional Triton, shared by the kernel modules.

Importing the kernels never requires Triton: without it ``triton.jit`` below is a no-op decorator,
the kernel bodies are plain (never called) Python functions, and ``triton_unavailable(device)``
says why the Triton path cannot run, so callers fall back to the torch path.

Triton decides between compiling and interpreting when a kernel is *decorated*, i.e. when a kernel
module is imported: ``TRITON_INTERPRET=1`` must be in the environment before the first
``import moesys_compile.kernels`` for the kernels to run on CPU tensors.
"""

import functools
import os
import types
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
    IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # ImportError, or an install that fails at import (no driver libs, ...)
    HAVE_TRITON = False
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

    def _identity_decorator(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)

    triton = types.SimpleNamespace(jit=_identity_decorator, autotune=None, Config=None, cdiv=None,
                                   next_power_of_2=None)
    tl = types.SimpleNamespace(constexpr=object)  # only used in annotations of never-called bodies


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


INTERPRET = _interpret_env()  # Triton's own choice, made when the kernel modules were imported

# Dtypes the kernels compute in (fp32 accumulation). fp64 stays on the torch path.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_unavailable(device) -> Optional[str]:
    """None when Triton kernels can run on tensors of ``device``; otherwise the reason."""
    if not HAVE_TRITON:
        return f"triton is not importable ({IMPORT_ERROR})"
    device = torch.device(device)
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "torch has no CUDA device"
    if device.type == "cpu":
        if INTERPRET:
            return _interpreter_defect()
        if _interpret_env():
            return ("TRITON_INTERPRET=1 was set only after moesys_compile.kernels was first imported (Triton reads "
                    "it then; set it before that import, in the shell or at the top of the script)")
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    return f"there is no Triton backend for device type {device.type!r}"


@triton.jit
def _loop_bound_probe_kernel(out_ptr, n):
    total = 0
    for _ in range(0, n, 1):     # a loop bound that is a kernel argument, as every kernel here has
        total += 1
    tl.store(out_ptr, total)


@functools.lru_cache(maxsize=None)
def _interpreter_defect() -> Optional[str]:
    """None where Triton's interpreter runs a loop over a kernel argument, else why not: Triton
    3.6's interpreter reads such a bound as ``int()`` of a one-element array, which numpy 2.4
    refuses. Probed once, with a three-step loop."""
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _loop_bound_probe_kernel[(1,)](out, 3)
    except Exception as exc:  # noqa: BLE001 - whatever it raises, the kernels would raise it too
        import numpy
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return (f"triton {triton.__version__}'s interpreter cannot run a loop over a kernel argument with numpy "
                f"{numpy.__version__} ({cause}); install numpy<2.4, or a newer triton")
    return None if int(out) == 3 else f"triton {triton.__version__}'s interpreter ran a 3-step loop {int(out)} times"


def check_triton(*tensors: torch.Tensor) -> None:
    """Raise a clear error before launching on tensors Triton cannot run on."""
    reason = triton_unavailable(tensors[0].device)
    if reason is not None:
        raise RuntimeError(f"the Triton kernels cannot run on device {tensors[0].device}: {reason}; "
                           f"use impl='torch' (Plan(kernels='torch'))")
    for t in tensors:
        if t.device != tensors[0].device:
            raise ValueError(f"tensors are on different devices ({tensors[0].device} and {t.device})")


def autotune_enabled() -> bool:
    """False under ``MOESYS_TRITON_AUTOTUNE=0`` (tests: one compile per kernel instead of one per
    config; users: a fast first step)."""
    return os.environ.get("MOESYS_TRITON_AUTOTUNE", "1") not in ("", "0")


def use_autotune(t: torch.Tensor) -> bool:
    """Autotune only natively on CUDA, and only when ``autotune_enabled()``; otherwise the
    kernel's untuned config runs."""
    return HAVE_TRITON and not INTERPRET and t.is_cuda and autotune_enabled()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use TF32 only when torch allows it for matmuls (tests turn it off)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def pow2(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum) (Triton block shapes are powers of two)."""
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


def resolve_impl(impl: str, t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> str:
    """"auto" -> "triton" on CUDA when Triton can run the dtype, else "torch"; "triton" and "torch"
    are kept as asked (a "triton" that cannot run raises when launched, naming the reason)."""
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl ({impl!r}) must be 'auto', 'triton' or 'torch'")
    if impl != "auto":
        return impl
    dtype = t.dtype if dtype is None else dtype
    if t.is_cuda and triton_unavailable(t.device) is None and dtype in TRITON_DTYPES:
        return "triton"
    return "torch"


def check_dtype(kernel: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in TRITON_DTYPES:
        raise ValueError(f"{kernel}: {name} has dtype {t.dtype}; the Triton kernels take "
                         f"{', '.join(str(d) for d in TRITON_DTYPES)} (use impl='torch', or Plan(kernels='torch'), "
                         f"which runs {t.dtype})")
