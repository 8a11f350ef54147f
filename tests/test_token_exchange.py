"""The token-level EP exchange (``ep_token_plan``/``ep_token_dispatch``/``ep_token_combine``):
outputs and every gradient equal the one-process reference on the global batch (dropless) and the
slot-level exchange (with capacity drops, which are per rank); each token crosses to a rank once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import moesys_compile as mc
import moesys_compile.runtime.token_exchange  # noqa: F401  registers the ops
from moesys_compile.runtime import groups
from moesys_compile.ops import expert_capacity, moe_experts_reference

sys.path.insert(0, str(Path(__file__).parent))
from dist_utils import run_ranks  # noqa: E402

DIM, HIDDEN, TOKENS = 8, 6, 12
ops = torch.ops.moesys


def problem(experts: int, top_k: int, skew: str = ""):
    """Global batch of 4 ranks' tokens, routing and weights. ``skew``: "one" sends every slot to
    experts 0..k-1 (the other ranks receive nothing); "first-rank-empty" routes rank 0's tokens
    only to experts of the last rank."""
    gen = torch.Generator().manual_seed(experts * 10 + top_k)
    x = torch.randn(4 * TOKENS, DIM, generator=gen, dtype=torch.float64)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(4 * TOKENS)])
    if skew == "one":
        ids = torch.arange(top_k).expand(4 * TOKENS, top_k).clone()
    weights = torch.rand(4 * TOKENS, top_k, generator=gen, dtype=torch.float64)
    w_up = torch.randn(experts, 2 * HIDDEN, DIM, generator=gen, dtype=torch.float64) / DIM ** 0.5
    w_down = torch.randn(experts, DIM, HIDDEN, generator=gen, dtype=torch.float64) / HIDDEN ** 0.5
    grad_out = torch.randn(4 * TOKENS, DIM, generator=gen, dtype=torch.float64)
    return x, ids, weights, w_up, w_down, grad_out


def local_moe(exchange: str, x_TD, ids_TK, weights_TK, w_up_LHD, w_down_LDF, num_experts, capacity, ranks):
    """This rank's MoE layer output with its experts (rows [lo, hi)) over the "ep" group."""
    if exchange == "token":
        counts_E, order_N, send_S, row_M, recv_RL, rows_2R, weights_M = ops.ep_token_plan(
            ids_TK, weights_TK, num_experts, capacity, "ep", ranks)
        x_MD = ops.ep_token_dispatch(x_TD, send_S, row_M, rows_2R, "ep")
        y_MD = ops.grouped_mlp(x_MD, recv_RL.sum(0), w_up_LHD, w_down_LDF, "swiglu")
        return ops.ep_token_combine(y_MD, weights_M, send_S, row_M, rows_2R, ids_TK, "ep"), rows_2R
    x_ND, counts_E, order_N = ops.permute(x_TD, ids_TK, num_experts, capacity)
    recv_RL = ops.ep_counts(counts_E, "ep", ranks)
    x_MD = ops.ep_dispatch(x_ND, counts_E, recv_RL, "ep")
    y_MD = ops.grouped_mlp(x_MD, recv_RL.sum(0), w_up_LHD, w_down_LDF, "swiglu")
    return ops.unpermute(ops.ep_combine(y_MD, counts_E, recv_RL, order_N, "ep"), order_N, weights_TK), None


def rank_grads(rank: int, world: int, exchange: str, experts: int, top_k: int, capacity_factor, skew: str):
    """(y, grad x, grad weights, grad w_up rows, grad w_down rows, rows sent per rank) of this rank."""
    groups.setup(mc.Plan(mode="train", world_size=world, expert_parallel=world))
    x, ids, weights, w_up, w_down, grad_out = problem(experts, top_k, skew)
    part = slice(rank * TOKENS, (rank + 1) * TOKENS)
    if skew == "first-rank-empty" and rank == 0:
        ids[part] = torch.arange(experts - top_k, experts).expand(TOKENS, top_k)
    lo, hi = rank * experts // world, (rank + 1) * experts // world
    leaves = [t.clone().requires_grad_(True) for t in (x[part], weights[part], w_up[lo:hi], w_down[lo:hi])]
    capacity = -1 if capacity_factor is None else expert_capacity(TOKENS, top_k, experts, capacity_factor)
    y, rows_2R = local_moe(exchange, leaves[0], ids[part], leaves[1], leaves[2], leaves[3], experts, capacity, world)
    y.backward(grad_out[part])
    slots_out = int((ids[part] // (experts // world)).ne(rank).sum()) if capacity_factor is None else None
    return [y.detach(), *[t.grad for t in leaves]], (rows_2R.tolist() if rows_2R is not None else None), slots_out


def cases_on_ranks(rank: int, world: int):
    results = {}
    cases = [(4, 2, None, ""), (8, 4, None, ""), (8, 1, None, ""), (8, 2, 0.5, ""), (4, 2, None, "one"),
             (8, 2, None, "first-rank-empty")]
    for experts, top_k, capacity_factor, skew in cases:
        for exchange in ("token", "slot"):
            results[(experts, top_k, capacity_factor, skew, exchange)] = rank_grads(
                rank, world, exchange, experts, top_k, capacity_factor, skew)
    return results


@pytest.fixture(scope="module")
def four_ranks():
    return run_ranks(cases_on_ranks, 4)


def reference_grads(experts: int, top_k: int, skew: str):
    x, ids, weights, w_up, w_down, grad_out = problem(experts, top_k, skew)
    if skew == "first-rank-empty":
        ids[:TOKENS] = torch.arange(experts - top_k, experts).expand(TOKENS, top_k)
    leaves = [t.clone().requires_grad_(True) for t in (x, weights, w_up, w_down)]
    y = moe_experts_reference(leaves[0], ids, leaves[1], leaves[2], leaves[3], "swiglu")
    y.backward(grad_out)
    return [y.detach(), *[t.grad for t in leaves]]


@pytest.mark.parametrize("experts, top_k, skew", [(4, 2, ""), (8, 4, ""), (8, 1, ""), (4, 2, "one"),
                                                  (8, 2, "first-rank-empty")])
def test_dropless_token_exchange_equals_one_process(four_ranks, experts, top_k, skew):
    expected = reference_grads(experts, top_k, skew)
    for rank, results in enumerate(four_ranks):
        (y, g_x, g_w, g_up, g_down), _, _ = results[(experts, top_k, None, skew, "token")]
        part, lo, hi = slice(rank * TOKENS, (rank + 1) * TOKENS), rank * experts // 4, (rank + 1) * experts // 4
        for got, want in [(y, expected[0][part]), (g_x, expected[1][part]), (g_w, expected[2][part]),
                          (g_up, expected[3][lo:hi]), (g_down, expected[4][lo:hi])]:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("experts, top_k, capacity_factor, skew", [(4, 2, None, ""), (8, 2, 0.5, ""),
                                                                   (8, 2, None, "first-rank-empty")])
def test_token_exchange_equals_slot_exchange(four_ranks, experts, top_k, capacity_factor, skew):
    for results in four_ranks:
        token, _, _ = results[(experts, top_k, capacity_factor, skew, "token")]
        slot, _, _ = results[(experts, top_k, capacity_factor, skew, "slot")]
        for got, want in zip(token, slot):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_each_token_crosses_to_a_rank_once(four_ranks):
    for rank, results in enumerate(four_ranks):
        _, (send_R, recv_R), slots_out = results[(8, 4, None, "", "token")]
        x, ids, *_ = problem(8, 4)
        owners = ids[rank * TOKENS:(rank + 1) * TOKENS] // 2
        expected = [int((owners == r).any(1).sum()) for r in range(4)]
        assert send_R == expected, "one row per (rank, token) with at least one of its experts there"
        remote = sum(send_R) - send_R[rank]
        assert remote < slots_out, f"token rows sent to other ranks ({remote}) are fewer than their slots"
    sent = torch.tensor([r[(8, 4, None, "", "token")][1][0] for r in four_ranks])
    received = torch.tensor([r[(8, 4, None, "", "token")][1][1] for r in four_ranks])
    assert sent.sum() == received.sum()
    _, (send_R, recv_R), _ = four_ranks[2][(4, 2, None, "one", "token")]
    assert recv_R == [0, 0, 0, 0] and send_R == [TOKENS, TOKENS, 0, 0], "experts 0, 1 live on ranks 0, 1"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_single_process_token_exchange_equals_reference(device):
    groups.setup(mc.Plan(mode="train"))
    x, ids, weights, w_up, w_down, grad_out = (t.to(device) for t in problem(4, 2))
    leaves = [t.clone().requires_grad_(True) for t in (x, weights, w_up, w_down)]
    y, _ = local_moe("token", leaves[0], ids, leaves[1], leaves[2], leaves[3], 4, -1, 1)
    y.backward(grad_out)
    expected = reference_grads(4, 2, "")
    for got, want in zip([y.detach(), *[t.grad for t in leaves]], expected):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-12)
