"""route_topk / balance_loss (kernels/routing.py) against the naive reference: outputs and the
gradient of every differentiable output, Triton (interpreted on CPU, native on a GPU) and torch."""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels (and Triton) are imported

import pytest  # noqa: E402

import moesys_compile.kernels as kernels  # noqa: E402
from moesys_compile.kernels import reference  # noqa: E402
from moesys_compile.ops import load_balancing_loss_reference  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from kernel_cases import DEVICE, IMPLS, close  # noqa: E402

TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-6}  # scores are computed in fp32 from either dtype


def run(fn, logits, grads):
    """Outputs and d(sum of outputs * grads)/d logits."""
    logits = logits.detach().requires_grad_(True)
    weights, ids, scores, counts, sums = fn(logits)
    loss = (weights * grads[0]).sum() + (scores * grads[1]).sum() + (sums * grads[2]).sum()
    (grad_logits,) = torch.autograd.grad(loss, logits)
    return (weights, ids, scores, counts, sums), grad_logits


CASES = [  # (T, E, K, score_func, bias, n_groups, topk_groups, scaling)
    (1, 4, 1, "softmax", False, 1, 1, 1.0),
    (1, 8, 8, "sigmoid", True, 1, 1, 1.0),
    (37, 4, 2, "softmax", False, 1, 1, 1.0),
    (37, 8, 4, "sigmoid", True, 1, 1, 2.5),
    (19, 64, 8, "softmax", False, 1, 1, 1.0),
    (19, 64, 8, "sigmoid", True, 8, 3, 2.5),    # DeepSeek-V3 style: bias + group-limited
    (33, 8, 2, "softmax", True, 4, 2, 1.0),
    (70, 64, 1, "sigmoid", False, 16, 4, 1.0),  # more tokens than one program's block
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-E{}-K{}-{}{}-g{}".format(c[0], c[1], c[2], c[3],
                                                                                    "-bias" if c[4] else "", c[5]))
def test_route_topk_matches_reference(case, dtype, impl):
    num_tokens, num_experts, top_k, score_func, has_bias, n_groups, topk_groups, scaling = case
    gen = torch.Generator().manual_seed(num_tokens * num_experts + top_k)
    # distinct logits per row, exact in bf16 (multiples of 1/8): top-k has no ties to break
    ranks = torch.argsort(torch.rand(num_tokens, num_experts, generator=gen), dim=1)
    logits = ((ranks - num_experts / 2) / 8).to(dtype).to(DEVICE)
    bias = (0.3 * torch.randn(num_experts, generator=gen)).to(DEVICE) if has_bias else None
    grads = [torch.randn(num_tokens, top_k, generator=gen).to(DEVICE),
             torch.randn(num_tokens, num_experts, generator=gen).to(DEVICE),
             torch.randn(num_experts, generator=gen).to(DEVICE)]
    args = (top_k, score_func, True, bias, n_groups, topk_groups, scaling)

    got, grad = run(lambda lg: torch.ops.moesys_kernels.route_topk(lg, *args, impl=impl), logits, grads)
    want, grad_ref = run(lambda lg: reference.route_topk_reference(lg, *args), logits, grads)

    assert torch.equal(got[1], want[1]), "expert ids differ"
    assert torch.equal(got[3], want[3]), f"counts differ: {got[3].tolist()} vs {want[3].tolist()}"
    assert got[3].dtype == torch.int64 and int(got[3].sum()) == num_tokens * top_k
    for name, a, b in (("weights_TK", got[0], want[0]), ("scores_TE", got[2], want[2]), ("score_sum_E", got[4], want[4])):
        assert a.dtype == b.dtype, f"{name}: {a.dtype} vs {b.dtype}"
        close(a, b, TOL[dtype] * (num_tokens if name == "score_sum_E" else 1), name)
    assert grad.dtype == dtype and grad.abs().sum() > 0
    close(grad, grad_ref, 1e-5 if dtype == torch.float32 else 1e-2, "grad logits_TE")


@pytest.mark.parametrize("impl", IMPLS)
def test_route_topk_without_renormalize_and_partial_grads(impl):
    """Only some outputs used (the others' gradients arrive as None)."""
    logits = torch.randn(21, 8, device=DEVICE, requires_grad=True)
    weights, *_ = torch.ops.moesys_kernels.route_topk(logits, 2, "softmax", False, impl=impl)
    want, *_ = reference.route_topk_reference(logits, 2, "softmax", False)
    close(weights, want, 2e-6, "weights_TK")
    (grad,) = torch.autograd.grad(weights.square().sum(), logits)
    (grad_ref,) = torch.autograd.grad(want.square().sum(), logits)
    close(grad, grad_ref, 1e-5, "grad logits_TE")


@pytest.mark.parametrize("impl", IMPLS)
def test_balance_loss_equals_canonical_loss(impl):
    logits = torch.randn(29, 8, device=DEVICE, requires_grad=True)
    _, ids, scores, counts, sums = torch.ops.moesys_kernels.route_topk(logits, 2, impl=impl)
    loss = torch.ops.moesys_kernels.balance_loss(counts, sums, ids, 0.01)
    (grad,) = torch.autograd.grad(loss, logits)

    _, ids_ref, scores_ref = reference.route_reference(logits, 2)
    loss_ref = load_balancing_loss_reference(scores_ref, ids_ref, 0.01)
    (grad_ref,) = torch.autograd.grad(loss_ref, logits)
    close(loss, loss_ref, 1e-6, "loss")
    assert grad_ref.abs().sum() > 0
    close(grad, grad_ref, 1e-5, "grad logits_TE")


def test_zero_tokens():
    for impl in ("torch", "triton") if kernels.triton_unavailable(DEVICE) is None else ("torch",):
        weights, ids, scores, counts, sums = torch.ops.moesys_kernels.route_topk(
            torch.zeros(0, 8, device=DEVICE), 2, impl=impl)
        assert weights.shape == (0, 2) and ids.shape == (0, 2) and scores.shape == (0, 8)
        assert counts.tolist() == [0] * 8 and sums.tolist() == [0.0] * 8


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=9), r"top_k \(9\) must be in \[1, num_experts \(8\)\]"),
    (dict(top_k=2, n_groups=3), r"num_experts \(8\) is not divisible by n_groups \(3\)"),
    (dict(top_k=4, n_groups=4, topk_groups=1), r"top_k \(4\) exceeds the 1 x 2 experts"),
    (dict(top_k=2, score_func="tanh"), r"score_func 'tanh' is not supported"),
    (dict(top_k=2, bias_E=torch.zeros(7)), r"bias_E has shape \(7,\), expected \(8,\)"),
])
def test_invalid_arguments_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        torch.ops.moesys_kernels.route_topk(torch.randn(3, 8), impl="torch", **kwargs)


def test_fake_impl_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        outs = torch.ops.moesys_kernels.route_topk(torch.empty(5, 16, dtype=torch.bfloat16), 4)
    assert [tuple(o.shape) for o in outs] == [(5, 4), (5, 4), (5, 16), (16,), (16,)]
    assert [o.dtype for o in outs] == [torch.float32, torch.int64, torch.float32, torch.int64, torch.float32]
