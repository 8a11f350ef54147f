"""What the kernel tests share: the device they run on (CUDA when present, else the CPU under
TRITON_INTERPRET=1, which conftest.py sets before Triton is imported), the two implementations to
parametrize over (Triton skipped, with the reason, where it cannot run), and the error measure."""

import pytest
import torch

import moesys_compile.kernels as kernels

DEVICE = "cuda" if torch.cuda.is_available() and not kernels.INTERPRET else "cpu"
TRITON_REASON = kernels.triton_unavailable(DEVICE)
needs_triton = pytest.mark.skipif(TRITON_REASON is not None, reason=f"Triton cannot run: {TRITON_REASON}")
IMPLS = ["torch", pytest.param("triton", marks=needs_triton)]


def close(actual, expected, tol, what):
    """Max error relative to the largest reference value (at least 1) within ``tol``."""
    scale = expected.abs().max().clamp_min(1.0)
    err = (actual.double() - expected.double()).abs().max() / scale
    assert err <= tol, f"{what}: max error {err:.3g} x {scale:.3g} > {tol}"
