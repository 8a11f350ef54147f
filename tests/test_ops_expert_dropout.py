"""Dropout between the experts' projections: ``moesys.expert_dropout_keep`` draws the mask
(``keep_NF``: 0 or 1/(1-p) per activation) and ``moe_experts`` / ``grouped_mlp`` apply it, against
their references with the same mask (outputs and every gradient)."""

import pytest
import torch

from moesys_compile import ops
from moesys_compile.errors import OpInputError

DTYPE = torch.float64


def _experts(T, D, F, E, K, activation="swiglu"):
    x = torch.randn(T, D, dtype=DTYPE, requires_grad=True)
    weights, ids, _ = ops.route_reference(torch.randn(T, E, dtype=DTYPE), K)
    w_up = torch.randn(E, ops.up_rows(F, activation), D, dtype=DTYPE, requires_grad=True)
    w_down = torch.randn(E, D, F, dtype=DTYPE, requires_grad=True)
    return x, ids, weights.detach().requires_grad_(True), w_up, w_down


def test_the_mask_is_what_a_dropout_of_the_activations_draws():
    x = torch.randn(50, 8)
    torch.manual_seed(3)
    keep = torch.ops.moesys.expert_dropout_keep(x, 4, 16, 0.25)
    torch.manual_seed(3)
    want = torch.nn.functional.dropout(torch.ones(200, 16), 0.25)
    assert keep.shape == (200, 16) and keep.dtype == x.dtype
    assert torch.equal(keep, want)
    assert torch.equal(keep.unique(), torch.tensor([0.0, 1 / 0.75]))
    assert 0.2 < (keep == 0).float().mean().item() < 0.3
    assert torch.equal(torch.ops.moesys.expert_dropout_keep(x, 4, 16, 0.0), torch.ones(200, 16))
    with pytest.raises(OpInputError, match=r"p = 1.0 must be in \[0, 1\)"):
        torch.ops.moesys.expert_dropout_keep(x, 4, 16, 1.0)


@pytest.mark.parametrize("T,E,K", [(1, 4, 1), (13, 4, 2), (7, 8, 4)])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("capacity_factor", [0.0, 0.5])
def test_moe_experts_with_a_mask_matches_reference(T, E, K, activation, capacity_factor):
    x, ids, weights, w_up, w_down = _experts(T, 6, 5, E, K, activation)
    keep = torch.ops.moesys.expert_dropout_keep(x.detach(), K, 5, 0.4)
    args = (x, ids, weights, w_up, w_down, activation, capacity_factor, None, None, keep)
    y, y_ref = torch.ops.moesys.moe_experts(*args), ops.moe_experts_reference(*args)
    torch.testing.assert_close(y, y_ref)
    without = torch.ops.moesys.moe_experts(*args[:-1])
    assert (y - without).abs().max() > 1e-3                 # the mask drops and scales activations
    probe = torch.randn_like(y)
    leaves = (x, weights, w_up, w_down)
    got = torch.autograd.grad((y * probe).sum(), leaves)
    want = torch.autograd.grad((y_ref * probe).sum(), leaves)
    for name, g, w in zip(("x", "weights", "w_up", "w_down"), got, want):
        torch.testing.assert_close(g, w, msg=name)


def test_grouped_mlp_with_a_mask_and_biases_passes_gradcheck_and_opcheck():
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 2, 2])
    x = torch.randn(7, 4, dtype=DTYPE, requires_grad=True)
    w_up = torch.randn(4, 6, 4, dtype=DTYPE, requires_grad=True)
    w_down = torch.randn(4, 4, 3, dtype=DTYPE, requires_grad=True)
    b_up = torch.randn(4, 6, dtype=DTYPE, requires_grad=True)
    b_down = torch.randn(4, 4, dtype=DTYPE, requires_grad=True)
    keep = torch.ops.moesys.expert_dropout_keep(x.detach(), 1, 3, 0.5)
    assert torch.autograd.gradcheck(
        lambda *t: torch.ops.moesys.grouped_mlp(t[0], counts, t[1], t[2], "swiglu", t[3], t[4], keep),
        (x, w_up, w_down, b_up, b_down))
    torch.library.opcheck(torch.ops.moesys.grouped_mlp.default,
                          (x.detach(), counts, w_up.detach(), w_down.detach(), "swiglu", None, None, keep))
    torch.library.opcheck(torch.ops.moesys.expert_dropout_keep.default, (x.detach(), 2, 3, 0.0))


def test_a_mask_of_other_rows_is_refused_naming_the_op_that_draws_it():
    x, ids, weights, w_up, w_down = _experts(5, 6, 5, 4, 2)
    with pytest.raises(OpInputError, match=r"keep_NF has shape \(5, 5\), expected \[10, 5\].*expert_dropout_keep"):
        torch.ops.moesys.moe_experts(x, ids, weights, w_up, w_down, "swiglu", 0.0, None, None,
                                     torch.ones(5, 5, dtype=DTYPE))
