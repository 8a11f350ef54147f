"""The kernels and lower_kernels at shapes and dtypes the other kernel tests do not name: sizes that
are not block multiples (D=96, F=40; D=200, F=1), one expert, top_k = E, one token and an empty
batch, every slot on one expert, non-contiguous x, expert weights stored transposed (the HF
[E, D, H] / [E, F, D] layouts, read as views), fp16, fp64 (torch path; Triton names itself and the
fix), int32 sort order, bf16 experts under an fp32 router, and a compiled HF model on Triton."""

import copy
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels (and Triton) are imported

import pytest  # noqa: E402

import moesys_compile as mc  # noqa: E402
import moesys_compile.kernels as kernels  # noqa: E402
from moesys_compile.kernels import reference  # noqa: E402
from moesys_compile.nn import MoE  # noqa: E402
from moesys_compile.ops import up_rows  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from kernel_cases import DEVICE, IMPLS, needs_triton  # noqa: E402
# max error relative to the largest reference value; the interpreter truncates fp32 -> bf16 (no
# round to nearest), which doubles the bf16 error of the Triton path there
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3,
       torch.bfloat16: 5e-2 if kernels.INTERPRET else 2e-2}
ops = torch.ops.moesys_kernels


def close(actual, expected, tol, what):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    if expected.numel() == 0:
        return
    scale = expected.detach().double().abs().max().clamp_min(1e-3)
    err = float((actual.detach().double() - expected.detach().double()).abs().max() / scale)
    assert err <= tol, f"{what}: max error {err:.3g} (relative to {float(scale):.3g}) > {tol}"


def routed_inputs(num_tokens, top_k, num_experts, dim, ffn, activation, dtype, seed, transposed=False, ids=None):
    """x_TD, weights_TK, w_up_EHD, w_down_EDF (leaves to differentiate) and ids_TK. ``transposed``:
    the weights are stored [E, D, H] / [E, F, D] and passed as transposed views, as HF stacks are."""
    gen = torch.Generator().manual_seed(seed)
    rows_h = up_rows(ffn, activation)
    if transposed:
        w_up = (torch.randn(num_experts, dim, rows_h, generator=gen) / dim ** 0.5).to(dtype)
        w_down = (torch.randn(num_experts, ffn, dim, generator=gen) / ffn ** 0.5).to(dtype)
    else:
        w_up = (torch.randn(num_experts, rows_h, dim, generator=gen) / dim ** 0.5).to(dtype)
        w_down = (torch.randn(num_experts, dim, ffn, generator=gen) / ffn ** 0.5).to(dtype)
    x = torch.randn(num_tokens, dim, generator=gen).to(dtype)
    weights = torch.rand(num_tokens, top_k, generator=gen, dtype=torch.float64 if dtype == torch.float64 else None)
    if ids is None:
        ids = torch.argsort(torch.rand(num_tokens, num_experts, generator=gen), dim=1)[:, :top_k]
    leaves = [t.to(DEVICE).requires_grad_(True) for t in (x, weights, w_up, w_down)]
    return leaves, ids.to(DEVICE)


def views(w_up, w_down, transposed):
    return (w_up.transpose(1, 2), w_down.transpose(1, 2)) if transposed else (w_up, w_down)


# (T, K, E, D, F, activation, x layout, weights stored transposed, dtype)
CASES = {
    "D96-F40-E3-topk=E": (7, 3, 3, 96, 40, "swiglu", "contiguous", False, torch.float32),
    "D200-F1-E1-K1": (5, 1, 1, 200, 1, "gelu", "contiguous", False, torch.float32),
    "one-token": (1, 2, 4, 40, 36, "swiglu", "contiguous", False, torch.float32),
    "all-slots-on-one-expert": (9, 1, 4, 24, 20, "relu", "one expert", False, torch.float32),
    "x-transposed-view": (7, 2, 4, 24, 20, "swiglu", "transposed", False, torch.float32),
    "hf-weight-layout": (11, 2, 3, 40, 20, "swiglu", "contiguous", True, torch.float32),
    "hf-weight-layout-bf16": (11, 2, 3, 40, 20, "swiglu", "contiguous", True, torch.bfloat16),
    "fp16": (7, 2, 4, 24, 20, "geglu", "contiguous", False, torch.float16),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_fused_and_grouped_experts_at_odd_shapes(case, impl):
    """fused_experts and grouped_mlp against the naive reference run in fp32 (or fp64) on the same
    inputs: outputs and the gradients of x, the top-k weights and both weight stacks."""
    num_tokens, top_k, num_experts, dim, ffn, activation, x_layout, transposed, dtype = case
    ids = torch.full((num_tokens, top_k), num_experts - 1) if x_layout == "one expert" else None
    (x, weights, w_up, w_down), ids = routed_inputs(num_tokens, top_k, num_experts, dim, ffn, activation, dtype,
                                                    seed=dim + ffn, transposed=transposed, ids=ids)
    x_in = x.t().contiguous().t() if x_layout == "transposed" else x   # same values, column-major
    counts, order = ops.sort_slots(ids, num_experts, -1, 0.0, impl)
    grad_y = torch.randn(num_tokens, dim, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    leaves = (x, weights, w_up, w_down)

    def truth(y_fn):
        exact = [t.detach().to(torch.float32).requires_grad_(True) for t in leaves]
        y = y_fn(exact[0], exact[1], *views(exact[2], exact[3], transposed))
        grads = torch.autograd.grad((y * grad_y).sum(), exact, allow_unused=True)
        return [y.to(dtype)] + [g.to(t.dtype) if g is not None else None for g, t in zip(grads, leaves)]

    y, h = ops.fused_experts(x_in, order, counts, weights, *views(w_up, w_down, transposed), activation, True, impl)
    assert h.shape == (num_tokens * top_k, up_rows(ffn, activation))
    got = [y] + list(torch.autograd.grad((y.float() * grad_y).sum(), leaves))
    want = truth(lambda a, b, c, d: reference.fused_experts_reference(a, order, counts, b, c, d, activation))
    for name, a, b in zip(("y_TD", "grad x_TD", "grad weights_TK", "grad w_up", "grad w_down"), got, want):
        close(a, b, TOL[dtype], name)

    x_ND = x_in[order // top_k].detach().requires_grad_(True)                  # the unfused op on sorted rows
    y_ND, _ = ops.grouped_mlp(x_ND, counts, *views(w_up, w_down, transposed), activation, True, impl)
    grad_ND = torch.randn(y_ND.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    got = [y_ND] + list(torch.autograd.grad((y_ND.float() * grad_ND).sum(), (x_ND, w_up, w_down)))
    exact = [t.detach().float().requires_grad_(True) for t in (x_ND, w_up, w_down)]
    y_ref = reference.grouped_mlp_reference(exact[0], counts, *views(exact[1], exact[2], transposed), activation)
    want = [y_ref.to(dtype)] + [g.to(dtype) for g in torch.autograd.grad((y_ref * grad_ND).sum(), exact)]
    for name, a, b in zip(("y_ND", "grad x_ND", "grad w_up", "grad w_down"), got, want):
        close(a, b, TOL[dtype], name)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch_through_every_kernel(impl):
    """T = 0: routing, sort, permute, the expert kernels and the combine return empty outputs and
    zero weight gradients; the canonical combine (the eager model's op) takes it too."""
    (x, weights, w_up, w_down), ids = routed_inputs(0, 2, 4, 24, 20, "swiglu", torch.float32, seed=0)
    weights_TK, ids_TK, *_ = ops.route_topk(torch.randn(0, 4, device=DEVICE, requires_grad=True), 2, impl=impl)
    assert weights_TK.shape == ids_TK.shape == (0, 2)
    counts, order = ops.sort_slots(ids, 4, -1, 0.0, impl)
    assert counts.tolist() == [0, 0, 0, 0] and order.shape == (0,)
    y, _ = ops.fused_experts(x, order, counts, weights, w_up, w_down, "swiglu", True, impl)
    x_ND, _, _ = ops.permute(x, ids, 4, -1, impl)
    y_ND, _ = ops.grouped_mlp(x_ND, counts, w_up, w_down, "swiglu", True, impl)
    y2 = ops.unpermute(y_ND, order, weights, impl)
    assert y.shape == y2.shape == (0, 24)
    grads = torch.autograd.grad(y.sum() + y2.sum(), (x, weights, w_up, w_down))
    assert [tuple(g.shape) for g in grads] == [(0, 24), (0, 2), (4, 40, 24), (4, 24, 20)]
    assert all(float(g.abs().sum()) == 0 for g in grads[2:])
    assert torch.ops.moesys.unpermute(y_ND.detach(), order, weights.detach()).shape == (0, 24)


@pytest.mark.parametrize("save_h", [True, False])
def test_fp64_torch_path_gradients_are_fp64_exact(save_h):
    """fp64 rows keep fp64 through the backward, the top-k weights' gradient included (it was
    summed in fp32: errors of ~1e-8 where fp64 gives 1e-16); gradcheck passes."""
    (x, weights, w_up, w_down), ids = routed_inputs(9, 2, 3, 6, 4, "swiglu", torch.float64, seed=3)
    counts, order = ops.sort_slots(ids, 3, -1, 0.0, "torch")
    leaves = (x, weights, w_up, w_down)
    y, _ = ops.fused_experts(x, order, counts, weights, w_up, w_down, "swiglu", save_h, "torch")
    y_ref = reference.fused_experts_reference(x, order, counts, weights, w_up, w_down, "swiglu")
    for name, a, b in zip(("x", "weights", "w_up", "w_down"), torch.autograd.grad(y.square().sum(), leaves),
                          torch.autograd.grad(y_ref.square().sum(), leaves)):
        close(a, b, TOL[torch.float64], f"grad {name}")
    assert torch.autograd.gradcheck(
        lambda *t: ops.fused_experts(t[0], order, counts, t[1], t[2], t[3], "swiglu", save_h, "torch")[0], leaves)


@pytest.mark.parametrize("op", ["grouped_mlp", "route_topk-softmax", "route_topk-sigmoid-grouped", "permute",
                                "unpermute"])
def test_torch_path_ops_pass_fp64_gradcheck(op):
    (x, weights, w_up, w_down), ids = routed_inputs(5, 2, 4, 6, 4, "swiglu", torch.float64, seed=7)
    counts, order = ops.sort_slots(ids, 4, -1, 0.0, "torch")
    rows = torch.randn(10, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    logits = torch.randn(5, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    floats = lambda outs: tuple(t for t in outs if t.is_floating_point())  # noqa: E731
    checks = {
        "grouped_mlp": (lambda r, a, b: ops.grouped_mlp(r, counts, a, b, "swiglu", True, "torch")[0],
                        (rows, w_up, w_down)),
        "route_topk-softmax": (lambda lg: floats(ops.route_topk(lg, 2, impl="torch")), (logits,)),
        "route_topk-sigmoid-grouped": (lambda lg: floats(ops.route_topk(lg, 2, "sigmoid", True, None, 2, 1, 2.5,
                                                                        "torch")), (logits,)),
        "permute": (lambda t: ops.permute(t, ids, 4, -1, "torch")[0], (x,)),
        "unpermute": (lambda r, w: ops.unpermute(r, order, w, "torch"), (rows, weights)),
    }
    fn, inputs = checks[op]
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("impl", IMPLS)
def test_int32_sort_order_and_counts(impl):
    """An order_N / counts_E of int32 (a user's own sort) gives the int64 result."""
    (x, weights, w_up, w_down), ids = routed_inputs(9, 2, 4, 24, 20, "swiglu", torch.float32, seed=4)
    counts, order = ops.sort_slots(ids, 4, -1, 0.0, impl)
    leaves = (x, weights, w_up, w_down)
    results = []
    for dtype in (torch.int64, torch.int32):
        y, _ = ops.fused_experts(x, order.to(dtype), counts.to(dtype), weights, w_up, w_down, "swiglu", True, impl)
        results.append([y] + list(torch.autograd.grad(y.square().sum(), leaves)))
    for a, b in zip(*results):
        close(a, b, TOL[torch.float32], "int32 vs int64 order")


@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_expert_dtypes_name_the_cast(impl):
    """bf16 tokens with fp32 expert weights: an error that says which cast makes it run."""
    (x, weights, w_up, w_down), ids = routed_inputs(5, 2, 4, 24, 20, "swiglu", torch.float32, seed=6)
    counts, order = ops.sort_slots(ids, 4, -1, 0.0, impl)
    with pytest.raises(ValueError, match=r"x_TD \(torch.bfloat16\), w_up_EHD \(torch.float32\) and w_down_EDF "
                                         r"\(torch.float32\) must share a dtype; cast the expert weights to "
                                         r"torch.bfloat16 \(or x_TD to theirs\)"):
        ops.fused_experts(x.bfloat16(), order, counts, weights, w_up, w_down, impl=impl)


@needs_triton
@pytest.mark.parametrize("op, message", [
    ("fused_experts", r"fused_experts: x_TD has dtype torch.float64; the Triton kernels take .* impl='torch'"),
    ("route_topk", r"route_topk: logits_TE has dtype torch.float64; .* Plan\(kernels='torch'\)"),
    ("permute", r"permute: x_TD has dtype torch.float64; .* impl='torch'"),
])
def test_fp64_on_triton_names_the_kernel_and_the_fix(op, message):
    (x, weights, w_up, w_down), ids = routed_inputs(5, 2, 4, 24, 20, "swiglu", torch.float64, seed=5)
    counts, order = ops.sort_slots(ids, 4, -1, 0.0, "torch")
    calls = {"fused_experts": lambda: ops.fused_experts(x, order, counts, weights, w_up, w_down, impl="triton"),
             "route_topk": lambda: ops.route_topk(torch.randn(5, 4, dtype=torch.float64, device=DEVICE), 2,
                                                  impl="triton"),
             "permute": lambda: ops.permute(x, ids, 4, -1, "triton")}
    with pytest.raises(ValueError, match=message):
        calls[op]()


class _Bf16ExpertsFp32Router(torch.nn.Module):
    """bf16 tokens and experts, fp32 router logits (and so fp32 top-k weights)."""

    def __init__(self):
        super().__init__()
        self.moe = MoE(24, 20, 4, 2)
        self.moe.w_up.data, self.moe.w_down.data = self.moe.w_up.data.bfloat16(), self.moe.w_down.data.bfloat16()

    def forward(self, x):
        x_TD = x.reshape(-1, 24)
        weights_TK, ids_TK, scores_TE = torch.ops.moesys.route(self.moe.router(x_TD.float()), 2, "softmax", True)
        y_TD = torch.ops.moesys.moe_experts(x_TD, ids_TK, weights_TK, self.moe.w_up, self.moe.w_down, "swiglu", 0.0)
        return y_TD.float().reshape(x.shape) + torch.ops.moesys.load_balancing_loss(scores_TE, ids_TK, 0.01)


MODELS = {   # name: (model factory, dtype of its input, tolerance)
    "D96-F40-E3-topk=E": (lambda: MoE(96, 40, 3, 3), torch.float32, 1e-5),
    # not renormalized: one renormalized weight is 1 whatever the logits, and the router's gradient
    # would be rounding noise around 0
    "D200-F1-E1-gelu-sigmoid": (lambda: MoE(200, 1, 1, 1, activation="gelu", score_func="sigmoid",
                                            renormalize=False), torch.float32, 1e-5),
    "fp64-falls-back-to-torch": (lambda: MoE(24, 20, 4, 2).double(), torch.float64, 1e-12),
    "bf16-experts-fp32-router": (_Bf16ExpertsFp32Router, torch.bfloat16, 3e-2),
}


@pytest.mark.parametrize("choice", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_program_equals_eager_at_odd_shapes(name, choice):
    """mc.compile with lower_kernels, compiled at [2, 5] tokens and run at that shape, one token
    and an empty batch: outputs and every parameter gradient equal eager."""
    factory, dtype, tol = MODELS[name]
    model = factory().to(DEVICE).train()
    eager = copy.deepcopy(model)
    dim = next(p for n, p in model.named_parameters() if n.endswith("router.weight")).shape[1]
    examples = [torch.randn(2, 5, dim, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)
                for seed in range(2)]
    program = mc.compile(model, mc.Plan(mode="train", kernels=choice, device=DEVICE), example_inputs=(examples[0],))
    impls = {n.args[-1] for n in program.graph_module.graph.nodes
             if n.op == "call_function" and getattr(n.target, "namespace", None) == "moesys_kernels"
             and "balance_loss" not in str(n.target)}
    assert impls == {"torch" if dtype == torch.float64 else choice}
    if dtype == torch.float64 and choice == "triton":
        assert any("float64" in note for note in program.context.notes["lower_kernels"])
    for x in (examples[1], examples[1][:1, :1], examples[1][:0]):
        got, want = program(x), eager(x)
        close(got, want, tol, f"output at {tuple(x.shape)}")
        got.float().square().sum().backward()
        want.float().square().sum().backward()
    for (param_name, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        close(p.grad, q.grad, max(tol, 1e-4), f"grad {param_name}")


@needs_triton
def test_hf_deepseek_v3_on_triton_trains_like_eager():
    """An HF preset (group-limited sigmoid routing with a bias, shared experts) lowered to Triton:
    logits and every gradient equal eager, at the example shape and at one token."""
    pytest.importorskip("transformers")
    from moesys_compile.models.hf import build_hf
    model = build_hf("deepseek_v3").to(DEVICE).train()
    eager = copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    program = mc.compile(model, mc.Plan(mode="train", kernels="triton", device=DEVICE), example_inputs=(ids,))
    labels = {n.meta["moesys"].get("lowered_to") for n in program.graph_module.graph.nodes if "moesys" in n.meta}
    assert {"triton:moe_fused_swiglu", "triton:route_sigmoid_grouped"} <= labels
    for x in (ids, ids[:1, :1]):
        got, want = program(x).logits, eager(x).logits
        close(got, want, 1e-4, f"logits at {tuple(x.shape)}")
        got.square().mean().backward()
        want.square().mean().backward()
    for (param_name, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        assert (p.grad is None) == (q.grad is None), param_name
        if q.grad is not None:
            close(p.grad, q.grad, 1e-4, f"grad {param_name}")
