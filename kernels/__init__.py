"""Kernels for the MoE hot path, registered as ``torch.ops.moesys_kernels.*`` custom ops.

Each op has a Triton implementation (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``), a fast
torch implementation (the CPU path), a fake implementation and autograd; its last argument
``impl`` ("auto" | "triton" | "torch") picks one, and the ``lower_kernels`` pass writes it. Each
backward is an op too (``*_backward``, ``impl`` resolved): AOT autograd (``torch.compile`` of a
program) traces autograd formulas, and must meet neither a host sync nor a Triton launch there.

    module                  ops                             kernels
    routing.py              route_topk, balance_loss        fused scores/top-k/renormalize/statistics
    permute.py              sort_slots, permute, unpermute  counting sort + gather, weighted combine
    grouped_mlp.py          (Triton path, forward)          grouped GEMMs with fused activation, launcher
    grouped_mlp_backward.py (Triton path, backward)         activation backward, per-expert weight GEMMs
    experts.py              grouped_mlp, fused_experts      the two ops: Triton or torch path, autograd
    experts_torch.py        (torch path)                    torch.mm per expert, reused workspaces
    cpu_threads.py          (torch path helpers)            per-thread workspace, runs of experts per thread
    reference.py            naive differentiable references for the tests

Importing works without Triton (``HAVE_TRITON`` is then False and only the torch paths run).
"""

from moesys_compile.kernels import experts, permute, routing  # noqa: F401  (registers the ops)
from moesys_compile.kernels._triton import HAVE_TRITON, INTERPRET, TRITON_DTYPES, triton_unavailable  # noqa: F401

__all__ = ["HAVE_TRITON", "INTERPRET", "TRITON_DTYPES", "triton_unavailable", "experts", "permute", "routing"]
