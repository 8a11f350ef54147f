"""sort_slots / permute / unpermute (kernels/permute.py) against the canonical references: exact
order and counts, outputs and every gradient, with and without a capacity."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels (and Triton) are imported

import pytest  # noqa: E402

import moesys_compile.kernels as kernels  # noqa: E402
from moesys_compile.kernels import reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not kernels.INTERPRET else "cpu"
IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    kernels.triton_unavailable(DEVICE) is not None, reason=f"Triton cannot run: {kernels.triton_unavailable(DEVICE)}"))]


def close(actual, expected, dtype, what):
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    scale = expected.abs().max().clamp_min(1.0)
    err = (actual.double() - expected.double()).abs().max() / scale
    assert err <= tol, f"{what}: max error {err:.3g} x {scale:.3g} > {tol}"


def routed(num_tokens, top_k, num_experts, seed, skew=False):
    """Distinct experts per token; ``skew`` sends most tokens to the low experts (drops)."""
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.rand(num_tokens, num_experts, generator=gen)
    if skew:
        ranks = ranks - torch.linspace(0, 1, num_experts)
    return torch.argsort(ranks, dim=1)[:, :top_k].to(DEVICE)


CASES = [  # (T, K, E, capacity)
    (1, 1, 4, -1), (1, 8, 8, -1), (37, 2, 8, -1), (37, 4, 4, -1), (23, 8, 64, -1),
    (130, 2, 8, -1),            # several sort blocks per expert
    (50, 4, 8, 9), (23, 8, 64, 2), (130, 1, 4, 20), (40, 2, 8, 0),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-K{}-E{}-cap{}".format(*c))
def test_sort_and_permute_match_reference(case, impl):
    num_tokens, top_k, num_experts, capacity = case
    ids = routed(num_tokens, top_k, num_experts, seed=num_tokens + num_experts, skew=capacity >= 0)
    x = torch.randn(num_tokens, 33, device=DEVICE, requires_grad=True)
    want = reference.permute_reference(x, ids, num_experts, capacity)

    counts, order = torch.ops.moesys_kernels.sort_slots(ids, num_experts, capacity, impl=impl)
    assert torch.equal(counts, want[1]) and torch.equal(order, want[2])

    got = torch.ops.moesys_kernels.permute(x, ids, num_experts, capacity, impl=impl)
    for name, a, b in zip(("x_ND", "counts_E", "order_N"), got, want):
        assert torch.equal(a, b), f"{name} differs"
    grad_rows = torch.randn_like(want[0])
    (grad,) = torch.autograd.grad((got[0] * grad_rows).sum(), x)
    (grad_ref,) = torch.autograd.grad((want[0] * grad_rows).sum(), x)
    close(grad, grad_ref, torch.float32, "grad x_TD")


def test_capacity_factor_sets_capacity_from_tokens():
    ids = routed(40, 2, 8, seed=3, skew=True)
    by_factor = torch.ops.moesys_kernels.sort_slots(ids, 8, -1, 1.0, impl="torch")
    by_capacity = reference.sort_slots_reference(ids, 8, 10)  # ceil(1.0 * 40 * 2 / 8)
    assert all(torch.equal(a, b) for a, b in zip(by_factor, by_capacity))
    assert int(by_factor[0].sum()) < 80  # the skew makes some slots drop
    with pytest.raises(ValueError, match=r"give capacity \(4\) or capacity_factor \(1.0\), not both"):
        torch.ops.moesys_kernels.sort_slots(ids, 8, 4, 1.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [(1, 1, 4), (37, 2, 8), (19, 4, 8), (23, 8, 64)], ids=lambda c: "T{}-K{}-E{}".format(*c))
def test_unpermute_matches_reference(case, dtype, impl):
    num_tokens, top_k, num_experts = case
    ids = routed(num_tokens, top_k, num_experts, seed=7 * num_tokens)
    _, order = reference.sort_slots_reference(ids, num_experts)
    y = torch.randn(num_tokens * top_k, 45, device=DEVICE).to(dtype).requires_grad_(True)
    weights = torch.rand(num_tokens, top_k, device=DEVICE, requires_grad=True)
    grad_out = torch.randn(num_tokens, 45, device=DEVICE).to(dtype)

    got = torch.ops.moesys_kernels.unpermute(y, order, weights, impl=impl)
    want = reference.unpermute_reference(y, order, weights)
    assert got.dtype == want.dtype == dtype
    close(got, want, dtype, "y_TD")
    grads = torch.autograd.grad((got.float() * grad_out.float()).sum(), (y, weights))
    grads_ref = torch.autograd.grad((want.float() * grad_out.float()).sum(), (y, weights))
    for name, a, b in zip(("grad y_ND", "grad weights_TK"), grads, grads_ref):
        assert a.dtype == b.dtype
        close(a, b, dtype, name)


def test_unpermute_checks_shapes():
    with pytest.raises(ValueError, match=r"must agree on N = T\*K rows"):
        torch.ops.moesys_kernels.unpermute(torch.randn(6, 4), torch.arange(6), torch.rand(2, 2))


def test_permute_checks_shapes():
    with pytest.raises(ValueError, match=r"x_TD has shape \(5, 3\) but ids_TK has 4 tokens"):
        torch.ops.moesys_kernels.permute(torch.randn(5, 3), torch.zeros(4, 2, dtype=torch.long), 4)
