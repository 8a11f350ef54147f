"""grouped_mlp / fused_experts (kernels/experts.py, experts_torch.py, grouped_mlp*.py) against the naive
per-expert reference: outputs and the gradients of x, the top-k weights, w_up and w_down."""

import os
import threading

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels (and Triton) are imported

import pytest  # noqa: E402

import moesys_compile.kernels as kernels  # noqa: E402
from moesys_compile.kernels import reference  # noqa: E402
from moesys_compile.ops import clamped_swiglu, up_rows  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not kernels.INTERPRET else "cpu"
IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    kernels.triton_unavailable(DEVICE) is not None, reason=f"Triton cannot run: {kernels.triton_unavailable(DEVICE)}"))]
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}  # max error relative to the largest reference value


def close(actual, expected, dtype, what):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, f"{what}: {actual.dtype} {expected.dtype}"
    scale = expected.float().abs().max().clamp_min(1e-3)
    err = (actual.double() - expected.double()).abs().max() / scale
    assert err <= TOL[dtype], f"{what}: max error {err:.3g} (relative to {scale:.3g}) > {TOL[dtype]}"


def experts(num_experts, dim, ffn, activation, dtype, seed, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    w_up = torch.randn(num_experts, up_rows(ffn, activation), dim, generator=gen) / dim ** 0.5
    w_down = torch.randn(num_experts, dim, ffn, generator=gen) / ffn ** 0.5
    return [w.to(dtype).to(device).requires_grad_(True) for w in (w_up, w_down)]


def routed(num_tokens, top_k, num_experts, seed, skew=False, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.rand(num_tokens, num_experts, generator=gen)
    if skew:
        ranks = ranks - torch.linspace(0, 1, num_experts)
    return torch.argsort(ranks, dim=1)[:, :top_k].to(device)


# (T, K, E, D, F, activation, capacity): D and F are not multiples of the interpreter's 32 blocks
FUSED_CASES = [
    (1, 1, 4, 40, 36, "swiglu", -1),
    (37, 2, 8, 40, 36, "swiglu", -1),
    (19, 4, 8, 33, 20, "gelu", 5),       # capacity: dropped slots contribute and receive nothing
    (13, 8, 64, 24, 20, "swiglu", -1),   # many experts, most with one or two rows, some empty
    (21, 1, 4, 40, 40, "relu", -1),
    (17, 2, 8, 33, 36, "geglu", -1),
    (9, 4, 4, 24, 18, "silu", 3),
    (15, 2, 8, 33, 20, "gelu_tanh", -1),
    (11, 3, 4, 40, 36, "geglu_tanh", 4),
]


# every case in fp32; bf16 for the SwiGLU and GELU ones
FUSED_PARAMS = [pytest.param(case, dtype, id="T{}-K{}-E{}-D{}-F{}-{}-cap{}-".format(*case) + name)
                for case in FUSED_CASES for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))
                if dtype == torch.float32 or case[5] in ("swiglu", "gelu", "gelu_tanh", "geglu_tanh")]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case, dtype", FUSED_PARAMS)
def test_fused_experts_matches_reference(case, dtype, impl):
    check_fused_experts(case, dtype, impl)


@pytest.mark.skipif(DEVICE != "cuda", reason="the autotuner runs natively on a GPU only")
def test_autotuned_kernels_match_reference(monkeypatch):
    """Every autotune config that compiles for the shape gets benchmarked; the chosen one must agree."""
    monkeypatch.setenv("MOESYS_TRITON_AUTOTUNE", "1")
    check_fused_experts((300, 2, 8, 256, 192, "swiglu", -1), torch.bfloat16, "triton")


def test_autotuner_keys_rows_by_three_buckets():
    """A shape is tuned again for a much larger batch, at most three times (decoding-sized, up to
    32768 rows, more), not at every row count."""
    from moesys_compile.kernels.grouped_mlp import rows_bucket
    buckets = [rows_bucket(n) for n in (1, 7, 2048, 2049, 32768, 32769, 10 ** 7)]
    assert buckets[:3] == [buckets[0]] * 3 and buckets[3:5] == [buckets[3]] * 2 and buckets[5] == buckets[6]
    assert len(set(buckets)) == 3


def test_autotune_choices_are_kept_on_disk_from_triton_3_2():
    """A resumed run reuses the tuning of the one before it: Triton >= 3.2 keeps each choice on disk."""
    triton = pytest.importorskip("triton")
    from moesys_compile.kernels.grouped_mlp import autotune_options
    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    assert autotune_options() == ({"cache_results": True} if (major, minor) >= (3, 2) else {})


def check_fused_experts(case, dtype, impl):
    num_tokens, top_k, num_experts, dim, ffn, activation, capacity = case
    seed = num_tokens * 100 + num_experts
    w_up, w_down = experts(num_experts, dim, ffn, activation, dtype, seed)
    x = torch.randn(num_tokens, dim, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)
    x.requires_grad_(True)
    weights = torch.rand(num_tokens, top_k, device=DEVICE, requires_grad=True)
    counts, order = reference.sort_slots_reference(routed(num_tokens, top_k, num_experts, seed, capacity >= 0),
                                                   num_experts, capacity)
    grad_out = torch.randn(num_tokens, dim, device=DEVICE).to(dtype)
    inputs = (x, weights, w_up, w_down)

    y, h = torch.ops.moesys_kernels.fused_experts(x, order, counts, weights, w_up, w_down, activation, impl=impl)
    y_ref = reference.fused_experts_reference(x, order, counts, weights, w_up, w_down, activation)
    assert h.shape == (num_tokens * top_k, up_rows(ffn, activation))
    close(y, y_ref, dtype, "y_TD")
    grads = torch.autograd.grad((y.float() * grad_out.float()).sum(), inputs)
    grads_ref = torch.autograd.grad((y_ref.float() * grad_out.float()).sum(), inputs)
    for name, a, b in zip(("grad x_TD", "grad weights_TK", "grad w_up_EHD", "grad w_down_EDF"), grads, grads_ref):
        assert b.abs().sum() > 0, f"{name}: the reference gradient is zero, the test would prove nothing"
        close(a, b, dtype, name)
    if capacity >= 0:
        dropped = order[int(counts.sum()):]
        assert dropped.numel() > 0
        assert torch.all(grads[1].reshape(-1)[dropped] == 0)


# (N rows, E, D, F, activation)
GROUPED_CASES = [(1, 4, 40, 36, "swiglu"), (75, 8, 40, 36, "swiglu"), (50, 64, 24, 20, "gelu"), (33, 4, 33, 40, "relu"),
                 (29, 4, 24, 36, "geglu_tanh")]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", GROUPED_CASES, ids=lambda c: "N{}-E{}-D{}-F{}-{}".format(*c))
def test_grouped_mlp_matches_reference(case, dtype, impl):
    num_rows, num_experts, dim, ffn, activation = case
    w_up, w_down = experts(num_experts, dim, ffn, activation, dtype, seed=num_rows)
    gen = torch.Generator().manual_seed(num_rows)
    counts = torch.bincount(torch.randint(0, num_experts, (num_rows,), generator=gen), minlength=num_experts)
    counts[0] = max(int(counts[0]) - 1, 0)  # one trailing row outside every group: must stay zero
    counts = counts.to(DEVICE)
    x = torch.randn(num_rows, dim, generator=gen).to(dtype).to(DEVICE).requires_grad_(True)
    grad_out = torch.randn(num_rows, dim, device=DEVICE).to(dtype)

    y, _ = torch.ops.moesys_kernels.grouped_mlp(x, counts, w_up, w_down, activation, impl=impl)
    y_ref = reference.grouped_mlp_reference(x, counts, w_up, w_down, activation)
    close(y, y_ref, dtype, "y_ND")
    kept = int(counts.sum())
    assert torch.all(y[kept:] == 0)
    grads = torch.autograd.grad((y.float() * grad_out.float()).sum(), (x, w_up, w_down))
    grads_ref = torch.autograd.grad((y_ref.float() * grad_out.float()).sum(), (x, w_up, w_down))
    for name, a, b in zip(("grad x_ND", "grad w_up_EHD", "grad w_down_EDF"), grads, grads_ref):
        close(a, b, dtype, name)
    assert torch.all(grads[0][kept:] == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_without_saved_activation_backward_recomputes(impl):
    """save_h=False (inference lowering) returns an empty h and still differentiates correctly."""
    w_up, w_down = experts(4, 24, 20, "swiglu", torch.float32, seed=5)
    x = torch.randn(11, 24, device=DEVICE, requires_grad=True)
    weights = torch.rand(11, 2, device=DEVICE, requires_grad=True)
    counts, order = reference.sort_slots_reference(routed(11, 2, 4, seed=5), 4)
    y, h = torch.ops.moesys_kernels.fused_experts(x, order, counts, weights, w_up, w_down, "swiglu", False, impl)
    assert h.shape == (0, 40)
    y_ref = reference.fused_experts_reference(x, order, counts, weights, w_up, w_down, "swiglu")
    close(y, y_ref, torch.float32, "y_TD")
    grads = torch.autograd.grad(y.square().sum(), (x, weights, w_up, w_down))
    grads_ref = torch.autograd.grad(y_ref.square().sum(), (x, weights, w_up, w_down))
    for a, b in zip(grads, grads_ref):
        close(a, b, torch.float32, "grad")


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_torch_path_splits_experts_into_chunks(monkeypatch, activation):
    """Experts with more rows than a chunk: outputs per chunk, weight gradients accumulated."""
    from moesys_compile.kernels import experts_torch
    monkeypatch.setattr(experts_torch, "_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(experts_torch, "_MIN_CHUNK_ROWS", 5)   # ~20 rows per expert -> 4 chunks
    w_up, w_down = experts(4, 24, 20, activation, torch.float32, seed=11)
    x = torch.randn(40, 24, device=DEVICE, requires_grad=True)
    weights = torch.rand(40, 2, device=DEVICE, requires_grad=True)
    counts, order = reference.sort_slots_reference(routed(40, 2, 4, seed=11), 4)
    assert int(counts.min()) > 10
    inputs = (x, weights, w_up, w_down)
    y, _ = torch.ops.moesys_kernels.fused_experts(x, order, counts, weights, w_up, w_down, activation, impl="torch")
    y_ref = reference.fused_experts_reference(x, order, counts, weights, w_up, w_down, activation)
    close(y, y_ref, torch.float32, "y_TD")
    for a, b in zip(torch.autograd.grad(y.square().sum(), inputs), torch.autograd.grad(y_ref.square().sum(), inputs)):
        close(a, b, torch.float32, "grad")


@pytest.mark.parametrize("skew, threads, partial_bytes", [(False, 2, None), (False, 3, None), (True, 2, None),
                                                           (True, 3, 0)],
                         ids=["even-2-threads", "even-3-threads", "skewed-2-threads", "skewed-3-threads-no-splits"])
def test_torch_path_shares_experts_between_threads(monkeypatch, skew, threads, partial_bytes):
    """With n intra-op threads, n threads take runs of expert rows; an expert too large for one
    thread's share is split between runs (in backward only as far as the partial weight-gradient
    budget allows, else one run on intra-op threads). Results equal the reference, and the caller's
    threads come back."""
    from moesys_compile.kernels import cpu_threads
    from moesys_compile.kernels import experts_torch
    monkeypatch.setattr(cpu_threads, "MIN_RUN_ROWS", 8)
    if partial_bytes is not None:
        monkeypatch.setattr(experts_torch, "PARTIAL_GRAD_BYTES", partial_bytes)
    runs_seen, threads_seen = [], set()
    over_runs, take_runs = cpu_threads.over_runs, cpu_threads.take_runs

    def take_runs_and_record(work, runs, lock):
        threads_seen.add(threading.get_ident())
        take_runs(work, runs, lock)
    monkeypatch.setattr(cpu_threads, "over_runs", lambda work, runs: (runs_seen.append(list(runs)),
                                                                     over_runs(work, runs)))
    monkeypatch.setattr(cpu_threads, "take_runs", take_runs_and_record)
    w_up, w_down = experts(8, 24, 20, "swiglu", torch.float32, seed=13, device="cpu")   # CPU threads
    x = torch.randn(48, 24, requires_grad=True)
    weights = torch.rand(48, 2, requires_grad=True)
    ids = routed(48, 2, 8, seed=13, device="cpu")
    if skew:                    # expert 0 takes half the rows: no split in 3 by whole experts
        ids = torch.cat([torch.zeros_like(ids[:, :1]), 1 + routed(48, 1, 7, seed=13, device="cpu")], dim=1)
    counts, order = reference.sort_slots_reference(ids, 8)
    counts[-1] -= 1             # one dropped slot
    inputs = (x, weights, w_up, w_down)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y, _ = torch.ops.moesys_kernels.fused_experts(x, order, counts, weights, w_up, w_down, impl="torch")
        grads = torch.autograd.grad(y.square().sum(), inputs)
        with torch.inference_mode():
            y_infer, _ = torch.ops.moesys_kernels.fused_experts(x, order, counts, weights, w_up, w_down,
                                                                save_h=False, impl="torch")
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    forward, backward, infer = runs_seen
    backward = [run for _, run in backward]
    split = {expert for expert in range(8) if sum(any(e == expert for e, _, _ in run) for run in forward) > 1}
    assert len(forward) > threads and forward == infer and (0 in split or not skew), (forward, split)
    if partial_bytes is None:
        assert backward == forward
    else:   # no budget for partial weight gradients: the skewed rows stay one run in backward
        assert len(backward) == 1
    assert len(threads_seen) == threads
    y_ref = reference.fused_experts_reference(x, order, counts, weights, w_up, w_down, "swiglu")
    close(y, y_ref, torch.float32, "y_TD")
    close(y_infer, y_ref.detach(), torch.float32, "y_TD under inference_mode")
    for name, a, b in zip(("x", "weights", "w_up", "w_down"), grads, torch.autograd.grad(y_ref.square().sum(), inputs)):
        close(a, b, torch.float32, f"grad {name}")


def test_grouped_mlp_splits_a_large_expert_between_threads(monkeypatch):
    """The unfused op on 2 threads, one expert holding most rows: its rows are cut between runs, the
    later pieces' weight gradients go to their own buffers and are added in; all equal the reference."""
    from moesys_compile.kernels import cpu_threads
    monkeypatch.setattr(cpu_threads, "MIN_RUN_ROWS", 8)
    runs_seen = []
    over_runs = cpu_threads.over_runs
    monkeypatch.setattr(cpu_threads, "over_runs", lambda work, runs: (runs_seen.append(list(runs)),
                                                                     over_runs(work, runs)))
    w_up, w_down = experts(4, 24, 20, "swiglu", torch.float32, seed=17, device="cpu")   # CPU threads
    counts = torch.tensor([70, 5, 10, 11])
    x = torch.randn(int(counts.sum()) + 3, 24, requires_grad=True)   # 3 dropped rows
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y, _ = torch.ops.moesys_kernels.grouped_mlp(x, counts, w_up, w_down, "swiglu", True, "torch")
        grads = torch.autograd.grad(y.square().sum(), (x, w_up, w_down))
    finally:
        torch.set_num_threads(before)
    backward = [run for _, run in runs_seen[1]]
    assert sum(any(e == 0 for e, _, _ in run) for run in backward) > 2      # expert 0 in several runs
    y_ref = reference.grouped_mlp_reference(x, counts, w_up, w_down, "swiglu")
    close(y, y_ref, torch.float32, "y_ND")
    for name, a, b in zip(("x", "w_up", "w_down"), grads, torch.autograd.grad(y_ref.square().sum(), (x, w_up, w_down))):
        close(a, b, torch.float32, f"grad {name}")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "grouped"])
@pytest.mark.parametrize("biases", ["up+down", "down"])
@pytest.mark.parametrize("activation", [clamped_swiglu(1.702, 0.5), "relu2"])
def test_torch_path_takes_expert_biases_and_any_activation(monkeypatch, fused, biases, activation):
    """gpt-oss experts (biases, clamped interleaved SwiGLU) and relu² ones on the torch path, 2
    threads with an expert split between runs: outputs and every gradient (biases included) equal
    the reference."""
    from moesys_compile.kernels import cpu_threads
    monkeypatch.setattr(cpu_threads, "MIN_RUN_ROWS", 8)
    w_up, w_down = experts(4, 24, 20, activation, torch.float32, seed=19)
    gen = torch.Generator().manual_seed(19)
    b_up = torch.randn(4, w_up.shape[1], generator=gen).to(DEVICE).requires_grad_(True) if "up" in biases else None
    b_down = torch.randn(4, 24, generator=gen).to(DEVICE).requires_grad_(True)
    ids = torch.cat([torch.zeros(60, 1, dtype=torch.long, device=DEVICE), 1 + routed(60, 1, 3, seed=19)], dim=1)
    x = torch.randn(60, 24, generator=gen).to(DEVICE).requires_grad_(True)
    weights = torch.rand(60, 2, generator=gen).to(DEVICE).requires_grad_(True)
    counts, order = reference.sort_slots_reference(ids, 4)
    inputs = [t for t in (x, weights, w_up, w_down, b_up, b_down) if t is not None]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        if fused:
            y, _ = torch.ops.moesys_kernels.fused_experts(x, order, counts, weights, w_up, w_down, activation, True,
                                                          "auto", b_up, b_down)
        else:
            x_ND = x[order // 2]
            y_ND, _ = torch.ops.moesys_kernels.grouped_mlp(x_ND, counts, w_up, w_down, activation, True, "auto",
                                                           b_up, b_down)
            y = reference.unpermute_reference(y_ND, order, weights)
        grads = torch.autograd.grad(y.square().sum(), inputs)
    finally:
        torch.set_num_threads(before)
    y_ref = reference.fused_experts_reference(x, order, counts, weights, w_up, w_down, activation, b_up, b_down)
    close(y, y_ref, torch.float32, "y_TD")
    for a, b in zip(grads, torch.autograd.grad(y_ref.square().sum(), inputs)):
        close(a, b, torch.float32, "grad")
    with pytest.raises(ValueError, match="Triton expert kernels take neither expert biases"):
        torch.ops.moesys_kernels.grouped_mlp(x.detach(), counts, w_up, w_down, activation, True, "triton")


@pytest.mark.parametrize("change, message", [
    (dict(w_up=torch.randn(4, 30, 8)), r"w_up_EHD has 30 rows per expert but activation 'swiglu' with w_down_EDF's "
                                       r"F = 16 needs H = 32"),
    (dict(x=torch.randn(5, 7)), r"x_ND has shape \(5, 7\), expected \[\*, 8\]"),
    (dict(counts=torch.tensor([5, 0, 0])), r"counts_E has shape \(3,\), expected \(4,\)"),
    (dict(w_down=torch.randn(3, 8, 16)), r"w_down_EDF \(3, 8, 16\) does not match w_up_EHD \(4, 32, 8\)"),
])
def test_shape_errors_name_tensor_and_sizes(change, message):
    args = dict(x=torch.randn(5, 8), counts=torch.tensor([2, 3, 0, 0]), w_up=torch.randn(4, 32, 8),
                w_down=torch.randn(4, 8, 16))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        torch.ops.moesys_kernels.grouped_mlp(args["x"], args["counts"], args["w_up"], args["w_down"], "swiglu")


def test_fake_impls_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x, w_up, w_down = torch.empty(6, 8), torch.empty(4, 32, 8), torch.empty(4, 8, 16)
        y, h = torch.ops.moesys_kernels.fused_experts(x, torch.empty(12, dtype=torch.long), torch.empty(4, dtype=torch.long),
                                                      torch.empty(6, 2), w_up, w_down, "swiglu", False)
        y2, h2 = torch.ops.moesys_kernels.grouped_mlp(torch.empty(12, 8), torch.empty(4, dtype=torch.long), w_up, w_down)
    assert (tuple(y.shape), tuple(h.shape), tuple(y2.shape), tuple(h2.shape)) == ((6, 8), (0, 32), (12, 8), (12, 32))
