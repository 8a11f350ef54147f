"""Edge inputs of the kernels: tied and NaN router scores (route_topk), expert ids outside
[0, E) (sort_slots, permute), TRITON_INTERPRET set too late and an interpreter that cannot run
the kernels (triton_unavailable)."""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels (and Triton) are imported

import pytest  # noqa: E402

import moesys_compile.kernels as kernels  # noqa: E402
from moesys_compile.kernels import _triton, permute, reference  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from kernel_cases import DEVICE, IMPLS, close, needs_triton  # noqa: E402
# the tie rule of each path: Triton the lowest index, torch whatever torch.topk does (as eager models)
ROUTE_REFERENCE = {"triton": reference.route_topk_lowest_index_reference, "torch": reference.route_topk_reference}


def route_and_grad(fn, logits, grad_weights):
    logits = logits.detach().requires_grad_(True)
    out = fn(logits)
    (grad,) = torch.autograd.grad((out[0] * grad_weights).sum(), logits)
    return out, grad


def tied_logits(kind, num_tokens, num_experts, dtype):
    gen = torch.Generator().manual_seed(num_tokens * num_experts)
    if kind == "zeros":      # a zero-initialised router: every expert ties
        return torch.zeros(num_tokens, num_experts, dtype=dtype, device=DEVICE)
    # a handful of values exact in bf16: most rows hold ties inside and across the top-k
    return (torch.randint(-2, 3, (num_tokens, num_experts), generator=gen) / 4).to(dtype).to(DEVICE)


TIE_CASES = [  # (kind, T, E, K, score_func, bias, n_groups, topk_groups)
    ("zeros", 5, 8, 2, "softmax", None, 1, 1),
    ("zeros", 5, 8, 3, "sigmoid", "zeros", 4, 2),      # groups tie too: the lowest groups are kept
    ("few", 37, 64, 8, "softmax", None, 1, 1),
    ("few", 19, 64, 8, "sigmoid", "few", 8, 3),        # DeepSeek-V3 style, ties in the group scores
    ("few", 9, 8, 6, "sigmoid", "-inf", 1, 1),         # more picks than finite choices: ties at -inf
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", TIE_CASES, ids=lambda c: "{}-T{}-E{}-K{}-{}-bias_{}-g{}".format(*c[:7]))
def test_route_topk_tie_rule(case, dtype, impl):
    kind, num_tokens, num_experts, top_k, score_func, bias_kind, n_groups, topk_groups = case
    logits = tied_logits(kind, num_tokens, num_experts, dtype)
    bias = {None: None, "zeros": torch.zeros(num_experts), "few": torch.arange(num_experts) % 3 / 8,
            "-inf": torch.where(torch.arange(num_experts) % 2 == 0, 0.0, float("-inf"))}[bias_kind]
    bias = bias.to(DEVICE) if bias is not None else None
    args = (top_k, score_func, True, bias, n_groups, topk_groups, 1.5)
    grad_weights = torch.randn(num_tokens, top_k, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    got, grad = route_and_grad(lambda lg: torch.ops.moesys_kernels.route_topk(lg, *args, impl=impl), logits,
                               grad_weights)
    want, grad_ref = route_and_grad(lambda lg: ROUTE_REFERENCE[impl](lg, *args), logits, grad_weights)

    assert torch.equal(got[1], want[1]), f"expert ids differ:\n{got[1].tolist()}\n{want[1].tolist()}"
    assert torch.equal(got[3], want[3]), f"counts differ: {got[3].tolist()} vs {want[3].tolist()}"
    assert int(got[3].sum()) == num_tokens * top_k
    close(got[0], want[0], 2e-6, "weights_TK")
    close(grad, grad_ref, 1e-5 if dtype == torch.float32 else 1e-2, "grad logits_TE")
    if impl == "triton" and kind == "zeros" and n_groups == 1:
        assert got[1].tolist() == [list(range(top_k))] * num_tokens


@needs_triton
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_route_topk_nan_logits_pick_distinct_experts(score_func):
    nan = float("nan")
    logits = torch.tensor([[nan, 0.0, 0.3, 0.1, 1.0],
                           [0.2, nan, 0.5, nan, -1.0],
                           [0.0, 0.1, 0.2, 0.3, 0.4]], device=DEVICE)
    args = (3, score_func, True, None, 1, 1, 1.0)
    _, ids, _, counts, _ = torch.ops.moesys_kernels.route_topk(logits, *args, impl="triton")
    want = reference.route_topk_lowest_index_reference(logits, *args)

    assert all(len(set(row)) == 3 for row in ids.tolist()), f"an expert picked twice: {ids.tolist()}"
    assert torch.equal(ids, want[1]) and torch.equal(counts, want[3])
    assert int(counts.sum()) == 3 * 3
    if score_func == "sigmoid":  # only the NaN columns are NaN: picked first, as by torch.topk
        assert ids[0, 0] == 0 and ids[1, :2].tolist() == [1, 3]


BAD_IDS = [([[0, 4], [1, 2], [3, 0]], r"ids_TK\[0, 1\] is 4"), ([[0, 1], [2, 3], [-1, 0]], r"ids_TK\[2, 0\] is -1")]


@pytest.mark.skipif(DEVICE != "cpu", reason="on CUDA the check is an asynchronous device assert")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ids, where", BAD_IDS, ids=["id-E", "id-minus-1"])
def test_out_of_range_expert_ids_raise(ids, where, impl):
    ids = torch.tensor(ids, device=DEVICE)
    message = where + r", outside \[0, num_experts \(4\)\)"
    with pytest.raises(ValueError, match=message):
        torch.ops.moesys_kernels.sort_slots(ids, 4, impl=impl)
    with pytest.raises(ValueError, match=message):
        torch.ops.moesys_kernels.permute(torch.randn(3, 8, device=DEVICE), ids, 4, impl=impl)


def padded(t, fill, pad=32):
    """``t`` (1-D) inside a larger buffer of ``fill``: a read past either end returns ``fill``."""
    buf = torch.full((t.numel() + 2 * pad,), fill, dtype=t.dtype, device=t.device)
    buf[pad:pad + t.numel()] = t
    return buf[pad:pad + t.numel()], buf


@needs_triton
def test_place_slots_kernel_skips_out_of_range_ids():
    """The kernel itself never reads or writes through an id outside [0, E): a read past the start
    tables would land on ``num_slots`` and a store there on the sentinel after ``order_N``."""
    num_experts = 4
    ids_N = torch.tensor([0, 4, 1, -1, 2, 3, 1, 7], device=DEVICE)
    num_slots = ids_N.numel()
    valid_N = (ids_N >= 0) & (ids_N < num_experts)
    counts_E = torch.bincount(ids_N[valid_N], minlength=num_experts)
    block_start, _ = padded(torch.zeros(num_experts, dtype=torch.int64, device=DEVICE), num_slots)
    kept_start, _ = padded(counts_E.cumsum(0) - counts_E, num_slots)
    drop_start, _ = padded(torch.full((num_experts,), int(counts_E.sum()), device=DEVICE), num_slots)
    order_N, order_buf = padded(torch.full((num_slots,), -7, device=DEVICE), -7)
    meta = permute._configs()[0].all_kwargs()
    permute._place_slots_kernel[(1,)](ids_N, block_start, kept_start, drop_start, order_N, ids_N, ids_N,
                                      num_slots, num_experts, 0, -1, 1, 0, 0, GATHER=False, **meta)
    n_valid = int(valid_N.sum())
    want_N = torch.argsort(ids_N.masked_fill(~valid_N, num_experts), stable=True)[:n_valid]
    assert torch.equal(order_N[:n_valid], want_N)
    assert (order_buf[:32] == -7).all() and (order_buf[32 + n_valid:] == -7).all(), "written out of bounds"


@pytest.mark.skipif(not _triton.HAVE_TRITON, reason="triton is not importable")
def test_triton_unavailable_says_interpret_was_set_too_late(monkeypatch):
    monkeypatch.setattr(_triton, "INTERPRET", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reason = kernels.triton_unavailable("cpu")
    assert "was set only after moesys_compile.kernels was first imported" in reason
    assert "set it before that import" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert kernels.triton_unavailable("cpu") == "Triton runs on CPU tensors only under TRITON_INTERPRET=1"


@pytest.mark.skipif(not kernels.INTERPRET or not _triton.HAVE_TRITON, reason="Triton's CPU interpreter is not in use")
def test_an_interpreter_that_cannot_loop_over_a_kernel_argument_is_named_with_the_fix(monkeypatch):
    """The probe runs the interpreter once: where it fails (Triton 3.6 with numpy 2.4), the reason
    names numpy and the fix; with the versions ``make`` installs (Triton 3.9) it runs."""
    import numpy
    import triton

    def major_minor(version: str) -> tuple[int, int]:
        major, minor = version.split(".")[:2]
        return int(major), int(minor)

    if major_minor(triton.__version__) >= (3, 9) or major_minor(numpy.__version__) < (2, 4):
        assert _triton._interpreter_defect() is None
    _triton._interpreter_defect.cache_clear()

    class Refusing:
        def __getitem__(self, grid):
            def launch(*args):
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
            return launch
    monkeypatch.setattr(_triton, "_loop_bound_probe_kernel", Refusing())
    try:
        reason = kernels.triton_unavailable("cpu")
    finally:
        _triton._interpreter_defect.cache_clear()
    assert reason is not None and "cannot run a loop over a kernel argument with numpy" in reason
    assert "only 0-dimensional arrays" in reason and "install numpy<2.4" in reason
