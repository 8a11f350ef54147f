"""torch.compile of a train program (and of a model with the canonical ops): AOT autograd traces
the autograd formulas of the MoE custom ops, so every backward that syncs with the host
(``group_bounds``) or launches Triton is itself an op (kernels/experts.py ``experts_backward``,
permute.py ``permute_backward`` / ``unpermute_backward``, routing.py ``route_topk_backward``,
ops/experts.py ``grouped_mlp_backward``). Structure (one graph, the backward ops in the traced
backward graph), fake vs real of each backward op (opcheck), and equality with the uncompiled
program: loss and every gradient."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels (and Triton) are imported

import pytest  # noqa: E402
import torch._dynamo  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402
from torch._functorch.aot_autograd import make_boxed_func  # noqa: E402

import moesys_compile as mc  # noqa: E402
import moesys_compile.kernels as kernels  # noqa: E402
from moesys_compile.ops import up_rows  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not kernels.INTERPRET else "cpu"
TRITON = pytest.param("triton", marks=pytest.mark.skipif(
    kernels.triton_unavailable(DEVICE) is not None, reason=f"Triton cannot run: {kernels.triton_unavailable(DEVICE)}"))
IMPLS = ["torch", TRITON]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Fresh counters and no graph caches: a cached graph would skip the tracing under test."""
    torch._dynamo.reset()
    counters.clear()
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()


def tiny_model():
    torch.manual_seed(0)
    # two layers: the second layer's experts need grad_x, the first layer's do not (input ids)
    return mc.models.build("tiny-moe", dim=32, n_heads=2, n_layers=2, num_experts=4, vocab_size=64)


def ids():
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def loss_and_grads(module, run, aux=True):
    """(loss, {name: grad}) of one forward and backward of ``run`` (the module or its compiled form)."""
    module.zero_grad(set_to_none=True)
    loss = run(ids()).pow(2).mean()
    if aux:
        loss = loss + module.aux_loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_same(compiled, eager):
    (loss_c, grads_c), (loss_e, grads_e) = compiled, eager
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    assert grads_c.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def program(kernels_impl):
    return mc.compile(tiny_model(), mc.Plan(mode="train", kernels=kernels_impl), example_inputs=(ids(),))


def capturing_backend(graphs):
    """aot_eager that keeps the forward and backward graphs it compiles in ``graphs``."""
    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = gm
            return make_boxed_func(gm)
        return compiler
    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))


def targets(gm):
    return {str(node.target) for node in gm.graph.nodes if node.op == "call_function"}


@pytest.mark.parametrize("impl", IMPLS)
def test_train_program_is_one_graph_with_opaque_backward_ops(impl):
    p = program(impl)
    eager = loss_and_grads(p, p)
    graphs = {}
    compiled = loss_and_grads(p, torch.compile(p, backend=capturing_backend(graphs), fullgraph=True))
    forward, backward = targets(graphs["forward"]), targets(graphs["backward"])
    assert "moesys_kernels.fused_experts.default" in forward
    assert {"moesys_kernels.experts_backward.default", "moesys_kernels.route_topk_backward.default"} <= backward
    assert not any("_local_scalar_dense" in t for t in forward | backward)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert_same(compiled, eager)


def test_train_program_with_inductor_compiles_without_fallback():
    """The README's ``torch.compile(program)``: inductor compiles the whole program (a backend
    failure would show as ``aot_autograd.not_ok`` and a graph break, with results still right)."""
    p = program("torch")
    eager = loss_and_grads(p, p)
    compiled = loss_and_grads(p, torch.compile(p))
    assert counters["aot_autograd"]["ok"] == 1 and not counters["aot_autograd"]["not_ok"]
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert_same(compiled, eager)


def test_model_with_canonical_ops_compiles_fullgraph():
    """The canonical moesys.moe_experts backward chains grouped_mlp_backward (an op), not nested autograd."""
    m = tiny_model()
    eager = loss_and_grads(m, m, aux=False)
    graphs = {}
    compiled = loss_and_grads(m, torch.compile(m, backend=capturing_backend(graphs), fullgraph=True), aux=False)
    assert "moesys.grouped_mlp_backward.default" in targets(graphs["backward"])
    assert_same(compiled, eager)


def _experts(num_tokens, top_k, num_experts, dim, ffn, activation, biases):
    gen = torch.Generator().manual_seed(0)
    rows_h = up_rows(ffn, activation)
    x = torch.randn(num_tokens, dim, generator=gen)
    ids_TK = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    counts_E, order_N = torch.ops.moesys_kernels.sort_slots(ids_TK, num_experts)
    weights_TK = torch.rand(num_tokens, top_k, generator=gen)
    w_up = torch.randn(num_experts, rows_h, dim, generator=gen)
    w_down = torch.randn(num_experts, dim, ffn, generator=gen)
    b_up, b_down = (torch.randn(num_experts, rows_h), torch.randn(num_experts, dim)) if biases else (None, None)
    return x, ids_TK, counts_E, order_N, weights_TK, w_up, w_down, b_up, b_down


FAKE_CHECKS = ("test_schema", "test_faketensor")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation,biases,need_grad_x,fused", [
    ("swiglu", False, True, True), ("swiglu", True, False, True), ("gelu", True, True, False),
    ("swiglu", False, False, False), ("relu2", False, True, True)])   # relu2: autograd inside the op
def test_experts_backward_op_fake_matches_real(impl, activation, biases, need_grad_x, fused):
    if impl == "triton" and (biases or activation == "relu2"):
        pytest.skip("the Triton expert kernels take neither biases nor relu2")
    x, _, counts_E, order_N, weights_TK, w_up, w_down, b_up, b_down = _experts(5, 2, 4, 8, 16, activation, biases)
    x_rows = x if fused else x.repeat(2, 1)    # grouped_mlp: one row per slot, N = T*K
    h_NH = torch.randn(order_N.numel(), w_up.shape[1])
    args = (torch.randn(x_rows.shape[0], 8), x_rows, counts_E, w_up, w_down, h_NH, activation, impl, need_grad_x,
            order_N if fused else None, weights_TK if fused else None, b_up, b_down)
    torch.library.opcheck(torch.ops.moesys_kernels.experts_backward, args, test_utils=FAKE_CHECKS)


@pytest.mark.parametrize("impl", IMPLS)
def test_dispatch_and_routing_backward_ops_fake_matches_real(impl):
    x, ids_TK, _, order_N, weights_TK, *_ = _experts(5, 2, 4, 8, 16, "swiglu", False)
    y_ND = torch.randn(order_N.numel(), 8)
    ops = torch.ops.moesys_kernels
    torch.library.opcheck(ops.permute_backward, (y_ND, order_N, 5, 2, impl), test_utils=FAKE_CHECKS)
    torch.library.opcheck(ops.unpermute_backward, (x, y_ND, order_N, weights_TK, impl), test_utils=FAKE_CHECKS)
    scores_TE = torch.softmax(torch.randn(5, 4), -1)
    for grads in [(torch.randn(5, 2), None, None), (torch.randn(5, 2), torch.randn(5, 4), torch.randn(4))]:
        torch.library.opcheck(ops.route_topk_backward, (scores_TE, ids_TK, *grads, "softmax", True, 1.0,
                                                        torch.float32, impl), test_utils=FAKE_CHECKS)


@pytest.mark.parametrize("activation", ["swiglu", "relu2"])
def test_grouped_mlp_backward_op_fake_matches_real(activation):
    x, _, counts_E, _, _, w_up, w_down, b_up, b_down = _experts(5, 2, 4, 8, 16, activation, True)
    x_ND = x.repeat(2, 1)
    for biases in [(None, None), (b_up, b_down)]:
        torch.library.opcheck(torch.ops.moesys.grouped_mlp_backward,
                              (torch.randn(10, 8), x_ND, counts_E, w_up, w_down, activation, *biases),
                              test_utils=FAKE_CHECKS)
