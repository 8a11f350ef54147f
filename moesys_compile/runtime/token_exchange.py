"""Token-level expert-parallel exchange: a token crosses to an EP rank once, however many of its
top-k experts live there, and its outputs come back once, already weighted and summed there.

The slot-level exchange (``ep_dispatch``/``ep_combine`` in ``collectives``) sends one row per routed
slot: with top-8 over 2 ranks a token crosses about four times each way. Here the source sends the
unique (rank, token) rows plus, per slot, a small record (which row, its top-k weight); the
receiver fans the rows out to its experts, and folds their weighted outputs back into one row per
token before the return trip.

Shape legend: T tokens · K top-k · N = T*K slots · D dim · E experts · R EP ranks · L = E/R local
experts · S (rank, token) rows this rank sends · U rows it receives · M slots it receives (the work
of its experts, expert-major).

    moesys::ep_token_plan(ids_TK, weights_TK, E, capacity, group, ep_size)
        -> counts_E, order_N          (this rank's slots sorted by expert, as ``permute`` sorts them)
           send_token_S               (token of every row sent, grouped by destination rank)
           slot_row_M                 (row of the received tokens feeding each received slot)
           recv_RL                    (received slots per (source rank, local expert))
           rows_2R                    (rows sent to / received from each rank)
           weights_M                  (top-k weight of each received slot; differentiable)
    moesys::ep_token_dispatch(x_TD, send_token_S, slot_row_M, rows_2R, group) -> x_MD
    moesys::ep_token_combine(y_MD, weights_M, send_token_S, slot_row_M, rows_2R, ids_TK, group) -> y_TD
    moesys::ep_token_gather(rows_MD, send_token_S, slot_row_M, rows_2R, T, group) -> y_TD
                                  (ep_token_dispatch's backward: summed per token, sent back)
    moesys::ep_token_weights_back(grad_weights_M, counts_E, order_N, recv_RL, group, ep_size) -> grad_N
                                  (ep_token_plan's backward: the weights' gradients, sent back)

Each op's backward is the reverse exchange; the gradient of a token's row is summed on the rank
that used it before it travels back, so backward is deduplicated the same way. The backward
formulas call only ops (see ``collectives``): ``torch.compile`` traces them into its backward graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moesys_compile.frontend.annotation import register_unbacked_bound
from moesys_compile.ops import sort_slots_reference
from moesys_compile.ops.autocast import follow_autocast
from moesys_compile.ops.first_order import register_autograd
from moesys_compile.runtime.collectives import all_to_all_rows, dynamic_rows, group_of, transpose_blocks


def _exchange_sizes(sizes_RX: Tensor, group: str) -> Tensor:
    """Row r of ``sizes_RX`` goes to rank r; row r of the result came from rank r."""
    received = torch.empty_like(sizes_RX)
    pg = group_of(group)
    if pg is None:
        return received.copy_(sizes_RX)
    torch.distributed.all_to_all_single(received, sizes_RX.contiguous(), group=pg)
    return received


def _send_rows(slot_N: Tensor, counts_E: Tensor, num_tokens: int, top_k: int, ranks: int):
    """For the kept slots ``slot_N`` (expert-sorted): the unique (rank, token) rows to send, sorted
    by rank then token (token_S, rows per rank), and each slot's row within its rank's block."""
    local = counts_E.numel() // ranks
    expert_N = torch.repeat_interleave(torch.arange(counts_E.numel(), device=slot_N.device), counts_E)
    rank_N = expert_N // local
    keys_S, row_of_slot_N = torch.unique(rank_N * num_tokens + slot_N // top_k, sorted=True, return_inverse=True)
    rows_R = torch.bincount(keys_S // num_tokens, minlength=ranks)
    starts_R = rows_R.cumsum(0) - rows_R
    return keys_S % num_tokens, rows_R, row_of_slot_N - starts_R[rank_N]


@torch.library.custom_op("moesys::ep_token_plan", mutates_args=())
def ep_token_plan(ids_TK: Tensor, weights_TK: Tensor, num_experts: int, capacity: int, group: str,
                  ep_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    num_tokens, top_k = ids_TK.shape
    local = num_experts // ep_size
    counts_E, order_N = sort_slots_reference(ids_TK, num_experts, capacity)
    slot_N = order_N[: int(counts_E.sum())]
    send_token_S, send_rows_R, row_in_block_N = _send_rows(slot_N, counts_E, num_tokens, top_k, ep_size)
    # one exchange of sizes: slots per local expert of the receiver, and unique rows
    sizes = _exchange_sizes(torch.cat([counts_E.view(ep_size, local), send_rows_R[:, None]], 1), group)
    recv_RL, recv_rows_R = sizes[:, :local].contiguous(), sizes[:, local]
    # one exchange of per-slot records: (row within the sender's block, top-k weight)
    records_N2 = torch.stack([row_in_block_N.double(), weights_TK.reshape(-1)[slot_N].double()], 1)
    recv_slots_R = recv_RL.sum(1)
    host = torch.cat([counts_E.view(ep_size, local).sum(1), recv_slots_R, recv_RL.reshape(-1)]).tolist()
    records_M2 = all_to_all_rows(records_N2, host[:ep_size], host[ep_size:2 * ep_size], group,
                                 records_N2.new_empty((sum(host[ep_size:2 * ep_size]), 2)))
    source_M = torch.repeat_interleave(torch.arange(ep_size, device=ids_TK.device), recv_slots_R)
    row_M = records_M2[:, 0].long() + (recv_rows_R.cumsum(0) - recv_rows_R)[source_M]
    recv = [host[2 * ep_size + r * local: 2 * ep_size + (r + 1) * local] for r in range(ep_size)]
    expert_major_M2 = transpose_blocks(torch.stack([row_M.double(), records_M2[:, 1]], 1), recv)
    slot_row_M = expert_major_M2[:, 0].long()
    weights_M = expert_major_M2[:, 1].to(weights_TK.dtype)
    return counts_E, order_N, send_token_S, slot_row_M, recv_RL, torch.stack([send_rows_R, recv_rows_R]), weights_M


@ep_token_plan.register_fake
def _ep_token_plan_fake(ids_TK, weights_TK, num_experts, capacity, group, ep_size):
    num_slots = ids_TK.numel()
    slots, sends = (num_slots if size is None else size for size in (dynamic_rows(), dynamic_rows()))
    index = ids_TK.new_empty
    return (index((num_experts,), dtype=torch.int64), index((num_slots,), dtype=torch.int64),
            index((sends,), dtype=torch.int64), index((slots,), dtype=torch.int64),
            index((ep_size, num_experts // ep_size), dtype=torch.int64), index((2, ep_size), dtype=torch.int64),
            weights_TK.new_empty((slots,)))


def _plan_sizes_bound(node, expr) -> dict:
    """An ``ep_token_plan``'s data-dependent sizes: the rows it sends (one per token and rank it
    routes to: T x min(ranks, K)) and the slots it receives (every rank's tokens, each routed to at
    most min(K, local experts) of this rank's experts)."""
    ids_TK = node.args[0].meta["val"]
    num_experts, ep_size = node.args[2], node.args[5]
    tokens, top_k = expr(ids_TK.shape[0]), int(ids_TK.shape[1])
    sends, slots = (node.meta["val"][i].shape[0].node.expr for i in (2, 3))
    return {sends: tokens * min(ep_size, top_k), slots: ep_size * tokens * min(top_k, num_experts // ep_size)}


register_unbacked_bound("moesys::ep_token_plan", _plan_sizes_bound)


def _plan_setup(ctx, inputs, output):
    ids_TK, _, _, _, group, ep_size = inputs
    counts_E, order_N, _, _, recv_RL, _, _ = output
    ctx.save_for_backward(counts_E, order_N, recv_RL)
    ctx.shape, ctx.group, ctx.ep_size = ids_TK.shape, group, ep_size


def _plan_backward(ctx, *grads):
    counts_E, order_N, recv_RL = ctx.saved_tensors
    grad_weights_M = grads[6]
    if grad_weights_M is None:
        return None, None, None, None, None, None
    grad_N = ep_token_weights_back(grad_weights_M, counts_E, order_N, recv_RL, ctx.group, ctx.ep_size)
    return None, grad_N.view(ctx.shape), None, None, None, None


register_autograd(ep_token_plan, _plan_backward, setup_context=_plan_setup)


@torch.library.custom_op("moesys::ep_token_weights_back", mutates_args=())
def ep_token_weights_back(grad_weights_M: Tensor, counts_E: Tensor, order_N: Tensor, recv_RL: Tensor, group: str,
                          ep_size: int) -> Tensor:
    """The weights' gradients travel back to the slots they came from (dropped slots: 0)."""
    host = torch.cat([counts_E.view(ep_size, -1).sum(1), recv_RL.sum(1)]).tolist()
    source_major_M = transpose_blocks(grad_weights_M.reshape(-1, 1), [list(col) for col in zip(*recv_RL.tolist())])
    kept = sum(host[:ep_size])
    grad_N1 = all_to_all_rows(source_major_M, host[ep_size:], host[:ep_size], group,
                              grad_weights_M.new_empty((kept, 1)))
    return grad_weights_M.new_zeros(order_N.numel()).index_copy_(0, order_N[:kept], grad_N1.view(-1))


@ep_token_weights_back.register_fake
def _ep_token_weights_back_fake(grad_weights_M, counts_E, order_N, recv_RL, group, ep_size):
    return grad_weights_M.new_empty((order_N.shape[0],))


# ---------------------------------------------------------------------------------------------
# rows out and back
# ---------------------------------------------------------------------------------------------


def _scatter_back(rows_MD: Tensor, slot_row_M: Tensor, send_token_S: Tensor, rows_2R: Tensor, num_tokens: int,
                  group: str) -> Tensor:
    """Sum the slots' rows per received token, return them to their senders, and sum there per
    token: [M, D] at the experts' rank -> [T, D] at the tokens' rank."""
    send_R, recv_R = rows_2R.tolist()
    summed_UD = rows_MD.new_zeros((sum(recv_R), rows_MD.shape[1])).index_add_(0, slot_row_M, rows_MD)
    back_SD = all_to_all_rows(summed_UD, recv_R, send_R, group, rows_MD.new_empty((sum(send_R), rows_MD.shape[1])))
    return rows_MD.new_zeros((num_tokens, rows_MD.shape[1])).index_add_(0, send_token_S, back_SD)


def _gather_out(x_TD: Tensor, send_token_S: Tensor, slot_row_M: Tensor, rows_2R: Tensor, group: str) -> Tensor:
    """The rows of the tokens each rank needs, once per rank, fanned out to the received slots:
    [T, D] at the tokens' rank -> [M, D] at the experts' rank."""
    send_R, recv_R = rows_2R.tolist()
    received_UD = all_to_all_rows(x_TD.index_select(0, send_token_S), send_R, recv_R, group,
                                  x_TD.new_empty((sum(recv_R), x_TD.shape[1])))
    return received_UD.index_select(0, slot_row_M)


@torch.library.custom_op("moesys::ep_token_dispatch", mutates_args=())
def ep_token_dispatch(x_TD: Tensor, send_token_S: Tensor, slot_row_M: Tensor, rows_2R: Tensor, group: str) -> Tensor:
    return _gather_out(x_TD, send_token_S, slot_row_M, rows_2R, group)


@ep_token_dispatch.register_fake
def _ep_token_dispatch_fake(x_TD, send_token_S, slot_row_M, rows_2R, group):
    return x_TD.new_empty((slot_row_M.shape[0], x_TD.shape[1]))


def _dispatch_setup(ctx, inputs, output):
    x_TD, send_token_S, slot_row_M, rows_2R, group = inputs
    ctx.save_for_backward(send_token_S, slot_row_M, rows_2R)
    ctx.num_tokens, ctx.group = x_TD.shape[0], group


def _dispatch_backward(ctx, grad_x_MD):
    send_token_S, slot_row_M, rows_2R = ctx.saved_tensors
    grad_x_TD = ep_token_gather(grad_x_MD, send_token_S, slot_row_M, rows_2R, ctx.num_tokens, ctx.group)
    return grad_x_TD, None, None, None, None


register_autograd(ep_token_dispatch, _dispatch_backward, setup_context=_dispatch_setup)


@torch.library.custom_op("moesys::ep_token_gather", mutates_args=())
def ep_token_gather(rows_MD: Tensor, send_token_S: Tensor, slot_row_M: Tensor, rows_2R: Tensor, num_tokens: int,
                    group: str) -> Tensor:
    """The received slots' rows summed per token and returned to the tokens' rank: [M, D] -> [T, D]."""
    return _scatter_back(rows_MD.contiguous(), slot_row_M, send_token_S, rows_2R, num_tokens, group)


@ep_token_gather.register_fake
def _ep_token_gather_fake(rows_MD, send_token_S, slot_row_M, rows_2R, num_tokens, group):
    return rows_MD.new_empty((num_tokens, rows_MD.shape[1]))


@torch.library.custom_op("moesys::ep_token_combine", mutates_args=())
def ep_token_combine(y_MD: Tensor, weights_M: Tensor, send_token_S: Tensor, slot_row_M: Tensor, rows_2R: Tensor,
                     ids_TK: Tensor, group: str) -> Tensor:
    weighted_MD = y_MD * weights_M.to(y_MD.dtype).unsqueeze(-1)
    return _scatter_back(weighted_MD, slot_row_M, send_token_S, rows_2R, ids_TK.shape[0], group)


@ep_token_combine.register_fake
def _ep_token_combine_fake(y_MD, weights_M, send_token_S, slot_row_M, rows_2R, ids_TK, group):
    return y_MD.new_empty((ids_TK.shape[0], y_MD.shape[1]))


def _combine_setup(ctx, inputs, output):
    y_MD, weights_M, send_token_S, slot_row_M, rows_2R, _, group = inputs
    ctx.save_for_backward(y_MD, weights_M, send_token_S, slot_row_M, rows_2R)
    ctx.group = group


def _combine_backward(ctx, grad_y_TD):
    y_MD, weights_M, send_token_S, slot_row_M, rows_2R = ctx.saved_tensors
    grad_rows_MD = ep_token_dispatch(grad_y_TD.contiguous(), send_token_S, slot_row_M, rows_2R, ctx.group)
    grad_y_MD = grad_rows_MD * weights_M.to(grad_rows_MD.dtype).unsqueeze(-1)
    grad_weights_M = (grad_rows_MD * y_MD).sum(-1).to(weights_M.dtype)
    return grad_y_MD, grad_weights_M, None, None, None, None, None


register_autograd(ep_token_combine, _combine_backward, setup_context=_combine_setup)


# torch.autocast: expert matmuls in the autocast dtype, the rest on their inputs as they come
follow_autocast("moesys::ep_token_plan", cast=False)
follow_autocast("moesys::ep_token_dispatch", cast=False)
follow_autocast("moesys::ep_token_combine", cast=False)
follow_autocast("moesys::ep_token_gather", cast=False)
follow_autocast("moesys::ep_token_weights_back", cast=False)
