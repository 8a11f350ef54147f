"""Canonical ops: each against its naive reference (outputs and every gradient), and capture
keeps each op as one node under torch.fx and torch.export."""

import pytest
import torch
import torch.fx as fx

from moesys_compile import ops

DTYPE = torch.float64


def _inputs(T, D, F, E, K, activation, requires_grad=True):
    x = torch.randn(T, D, dtype=DTYPE, requires_grad=requires_grad)
    logits = torch.randn(T, E, dtype=DTYPE, requires_grad=requires_grad)
    w_up = torch.randn(E, ops.up_rows(F, activation), D, dtype=DTYPE, requires_grad=requires_grad)
    w_down = torch.randn(E, D, F, dtype=DTYPE, requires_grad=requires_grad)
    return x, logits, w_up, w_down


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True, retain_graph=True)


@pytest.mark.parametrize("T,E,K", [(1, 4, 1), (13, 4, 2), (7, 8, 4), (5, 8, 8)])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("capacity_factor", [0.0, 0.5])
def test_moe_experts_matches_reference(T, E, K, activation, capacity_factor):
    x, logits, w_up, w_down = _inputs(T, 6, 5, E, K, activation)
    weights, ids, _ = ops.route_reference(logits, K)
    y = torch.ops.moesys.moe_experts(x, ids, weights, w_up, w_down, activation, capacity_factor)
    y_ref = ops.moe_experts_reference(x, ids, weights, w_up, w_down, activation, capacity_factor)
    torch.testing.assert_close(y, y_ref)
    probe = torch.randn_like(y)
    for got, want in zip(_grads((y * probe).sum(), (x, logits, w_up, w_down)),
                         _grads((y_ref * probe).sum(), (x, logits, w_up, w_down))):
        torch.testing.assert_close(got, want)


CLAMPED = ops.clamped_swiglu(1.702, 0.5)   # gpt-oss's activation with a limit low enough to clamp often


@pytest.mark.parametrize("T,E,K", [(1, 4, 1), (13, 4, 2), (7, 8, 4)])
@pytest.mark.parametrize("biases", ["both", "up", "none"])
@pytest.mark.parametrize("capacity_factor", [0.0, 0.5])
def test_biased_experts_with_a_clamped_swiglu_match_reference(T, E, K, biases, capacity_factor):
    x, logits, w_up, w_down = _inputs(T, 6, 5, E, K, CLAMPED)
    b_up = torch.randn(E, w_up.shape[1], dtype=DTYPE, requires_grad=True) if biases != "none" else None
    b_down = torch.randn(E, 6, dtype=DTYPE, requires_grad=True) if biases == "both" else None
    weights, ids, _ = ops.route_reference(logits, K)
    args = (x, ids, weights, w_up, w_down, CLAMPED, capacity_factor, b_up, b_down)
    y, y_ref = torch.ops.moesys.moe_experts(*args), ops.moe_experts_reference(*args)
    torch.testing.assert_close(y, y_ref)
    leaves = [t for t in (x, logits, w_up, w_down, b_up, b_down) if t is not None]
    probe = torch.randn_like(y)
    for got, want in zip(_grads((y * probe).sum(), leaves), _grads((y_ref * probe).sum(), leaves)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("activation", ["relu2", ops.clamped_swiglu(None, 0.5), ops.softcapped_swiglu(0.5, 0.3)])
def test_more_expert_activations_match_their_formula_and_reference_gradients(activation):
    h = torch.randn(7, 10, dtype=DTYPE)
    gate, up = h.chunk(2, dim=-1)
    want = {"relu2": torch.relu(h) ** 2,
            ops.clamped_swiglu(None, 0.5): torch.nn.functional.silu(gate.clamp(max=0.5)) * up.clamp(-0.5, 0.5),
            ops.softcapped_swiglu(0.5, 0.3): 0.5 * torch.tanh(gate / 0.5) * torch.sigmoid(gate)
            * 0.3 * torch.tanh(up / 0.3)}[activation]
    torch.testing.assert_close(ops.apply_activation(h, activation), want)
    x, logits, w_up, w_down = _inputs(9, 6, 5, 4, 2, activation)
    weights, ids, _ = ops.route_reference(logits, 2)
    y = torch.ops.moesys.moe_experts(x, ids, weights, w_up, w_down, activation)
    y_ref = ops.moe_experts_reference(x, ids, weights, w_up, w_down, activation)
    torch.testing.assert_close(y, y_ref)
    for got, ref in zip(_grads(y.sum(), (x, w_up, w_down)), _grads(y_ref.sum(), (x, w_up, w_down))):
        torch.testing.assert_close(got, ref)


def test_clamped_swiglu_is_interleaved_and_clamped():
    h = torch.tensor([[10.0, -10.0, 0.3, 0.2]], dtype=DTYPE)      # (gate, up) pairs, interleaved
    a = ops.apply_activation(h, CLAMPED)
    gate, up = torch.tensor([0.5, 0.3], dtype=DTYPE), torch.tensor([-0.5, 0.2], dtype=DTYPE)
    torch.testing.assert_close(a, ((up + 1) * gate * torch.sigmoid(1.702 * gate))[None])
    assert ops.is_gated(CLAMPED) and ops.up_rows(5, CLAMPED) == 10 and not ops.has_triton_kernel(CLAMPED)
    for bad in ("clamped_swiglu:alpha=1", "clamped_swiglu:alpha=x:limit=7", "softcapped_swiglu:gate=1", "swish"):
        with pytest.raises(ValueError, match="activation"):
            ops.check_activation(bad)


def test_capacity_drops_slots_past_capacity():
    x, _, w_up, w_down = _inputs(8, 4, 3, 2, 1, "swiglu", requires_grad=False)
    ids = torch.zeros(8, 1, dtype=torch.long)          # every token wants expert 0
    weights = torch.ones(8, 1, dtype=DTYPE)
    _, counts, order = torch.ops.moesys.permute(x, ids, 2, 3)
    assert counts.tolist() == [3, 0]
    y = torch.ops.moesys.moe_experts(x, ids, weights, w_up, w_down, "swiglu", 0.75)  # capacity ceil(.75*8/2)=3
    assert (y[3:] == 0).all() and (y[:3] != 0).any()


@pytest.mark.parametrize("score_func,bias,groups", [("softmax", False, (1, 1)), ("sigmoid", True, (4, 2)),
                                                    ("sigmoid", False, (1, 1))])
@pytest.mark.parametrize("renormalize,scaling", [(True, 1.0), (False, 2.5)])
def test_route_matches_reference(score_func, bias, groups, renormalize, scaling):
    logits = torch.randn(9, 8, dtype=DTYPE, requires_grad=True)
    bias_E = torch.randn(8, dtype=DTYPE) if bias else None
    args = (3, score_func, renormalize, bias_E, *groups, scaling)
    weights, ids, scores = torch.ops.moesys.route(logits, *args)
    weights_ref, ids_ref, scores_ref = ops.route_reference(logits, *args)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(weights, weights_ref)
    probe_w, probe_s = torch.randn_like(weights), torch.randn_like(scores)
    (g,) = _grads((weights * probe_w).sum() + (scores * probe_s).sum(), (logits,))
    (g_ref,) = _grads((weights_ref * probe_w).sum() + (scores_ref * probe_s).sum(), (logits,))
    torch.testing.assert_close(g, g_ref)


def test_group_limited_routing_picks_only_from_kept_groups():
    logits = torch.full((1, 8), -5.0)
    logits[0, 6] = logits[0, 7] = 5.0      # group 3 (experts 6, 7) is the best group
    logits[0, 0] = 4.0                      # a strong expert in a weak group (its partner is weak)
    _, ids, _ = torch.ops.moesys.route(logits, 2, "sigmoid", True, None, 4, 1, 1.0)
    assert sorted(ids[0].tolist()) == [6, 7]


def test_load_balancing_loss_gradient_matches_reference():
    scores = torch.rand(10, 4, dtype=DTYPE, requires_grad=True)
    ids = torch.randint(0, 4, (10, 2))
    loss = torch.ops.moesys.load_balancing_loss(scores, ids, 0.1)
    ref = ops.load_balancing_loss_reference(scores, ids, 0.1)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(_grads(loss, (scores,))[0], _grads(ref, (scores,))[0])


@pytest.mark.parametrize("op,args", [
    (torch.ops.moesys.permute.default, (torch.randn(5, 4), torch.randint(0, 3, (5, 2)), 3, -1)),
    (torch.ops.moesys.unpermute.default, (torch.randn(10, 4), torch.randperm(10), torch.rand(5, 2))),
    (torch.ops.moesys.grouped_mlp.default, (torch.randn(6, 4), torch.tensor([2, 0, 4]), torch.randn(3, 6, 4),
                                            torch.randn(3, 4, 3), "swiglu")),
    (torch.ops.moesys.grouped_mlp.default, (torch.randn(6, 4), torch.tensor([2, 0, 4]), torch.randn(3, 6, 4),
                                            torch.randn(3, 4, 3), CLAMPED, torch.randn(3, 6), torch.randn(3, 4))),
    (torch.ops.moesys.route.default, (torch.randn(5, 4), 2)),
])
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


def test_grouped_mlp_with_empty_experts_and_zero_tokens():
    w_up, w_down = torch.randn(3, 8, 4, requires_grad=True), torch.randn(3, 4, 4, requires_grad=True)
    empty = torch.ops.moesys.grouped_mlp(torch.randn(0, 4), torch.zeros(3, dtype=torch.long), w_up, w_down, "swiglu")
    assert empty.shape == (0, 4)
    empty.sum().backward()
    assert w_up.grad is not None and (w_up.grad == 0).all()


class _Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w_up = torch.nn.Parameter(torch.randn(4, 16, 8))
        self.w_down = torch.nn.Parameter(torch.randn(4, 8, 8))

    def forward(self, x, logits):
        weights, ids, _ = torch.ops.moesys.route(logits, 2)
        return torch.ops.moesys.moe_experts(x, ids, weights, self.w_up, self.w_down)


def _moesys_targets(gm):
    return [str(n.target) for n in gm.graph.nodes if "moesys" in str(n.target)]


def test_fx_and_export_keep_each_op_as_one_node():
    layer, x, logits = _Layer(), torch.randn(6, 8), torch.randn(6, 4)
    assert _moesys_targets(fx.symbolic_trace(layer)) == ["moesys.route", "moesys.moe_experts"]
    exported = torch.export.export(layer, (x, logits), strict=False).module()
    assert _moesys_targets(exported) == ["moesys.route.default", "moesys.moe_experts.default"]
