"""Collective custom ops of the expert-parallel graph, and fused gradient buckets.

Shape legend: N routed slots of this rank (T*K, expert-sorted, dropped slots last) · M rows this
rank receives for its local experts · D model dim · E experts · R ranks of the EP group ·
L = E / R local experts · T tokens · K top-k.

    moesys::ep_counts(counts_E, group, ep)             -> recv_counts_RL   (all-to-all of counts)
    moesys::ep_dispatch(x_ND, counts_E, recv_RL, group) -> x_MD            (uneven all-to-all,
                                                           rows regrouped expert-major)
    moesys::ep_combine(y_MD, counts_E, recv_RL, order_N, group) -> y_ND    (the reverse)
    moesys::global_load_balancing_loss(scores_TE, ids_TK, coef, group) -> aux, stats (global batch)
    moesys::global_load_balancing_losses([scores_TE], [ids_TK], [coef], group) -> aux_n, stats
                                                           (n layers, one all-reduce each way)
    moesys::ep_undispatch(grad_MD, counts_E, recv_RL, num_rows, group) -> grad_ND  (ep_dispatch's backward)
    moesys::all_reduce_sum(x, group) -> sum over the group  (the aux losses' backward)

Each op's backward is the reverse collective, so gradients travel back over the same group.
The group name ``LOCAL`` reduces nothing (this rank alone); ``training_group`` picks it for a
forward that autograd does not record (see there). The
backward formulas call only ops (never ``dist`` or ``.tolist()`` themselves): AOT autograd traces
them into the backward graph of ``torch.compile``, where a collective call would capture the
ProcessGroup object and a host read would break the graph. Groups travel as their names
("dense" | "ep" | "edp") and are looked up inside the ops.
A rank or an expert that receives no rows exchanges empty blocks and computes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..frontend.annotation import register_unbacked_bound
from ..ops.autocast import follow_autocast
from ..ops.first_order import register_autograd
from . import groups


LOCAL = "local"      # a group name that reduces nothing: this rank alone


def group_of(name: str):
    return None if name == LOCAL else groups.get(name)


def training_group(group: str) -> str:
    """``group`` while autograd records (a training forward), else ``LOCAL``. The graph of an
    ``expert_parallel=1`` plan picks its load-balancing losses' group with it (the ops cannot
    tell: they run with grad mode off), so a forward under ``torch.no_grad()`` or
    ``inference_mode`` runs no collective -- one rank may evaluate alone, as with DDP's
    ``model.module`` -- and its aux loss is that of the rank's own batch. torch.compile traces it
    to a constant, guarded on grad mode.

        >>> with torch.no_grad(): training_group("dense")
        'local'
    """
    return group if torch.is_grad_enabled() else LOCAL


def all_to_all_rows(x_SD: Tensor, send_R: list[int], recv_R: list[int], group_name: str, out_MD: Tensor) -> Tensor:
    """Uneven all_to_all_single of rows into ``out_MD``: ``send_R[r]`` rows to rank r, ``recv_R[r]``
    from it."""
    group = group_of(group_name)
    if group is None:                      # single process: the "exchange" is a copy
        return out_MD.copy_(x_SD)
    dist.all_to_all_single(out_MD, x_SD.contiguous(), recv_R, send_R, group=group)
    return out_MD


def transpose_blocks(x_MD: Tensor, counts_AB: list[list[int]]) -> Tensor:
    """Rows stored as blocks in (a, b) order, block (a, b) of ``counts_AB[a][b]`` rows, rewritten
    in (b, a) order: source-major (r, l) received rows -> expert-major (l, r), and back with the
    transposed counts. One copy per block, no index tensor."""
    blocks = x_MD.split([count for row in counts_AB for count in row])
    height, width = len(counts_AB), len(counts_AB[0])
    return torch.cat([blocks[a * width + b] for b in range(width) for a in range(height)])


def _layout(counts_E: Tensor, recv_RL: Tensor) -> tuple[list[int], list[int], list[list[int]]]:
    """(rows sent to each rank, rows received from each rank, received rows per (rank, local
    expert)), from one host read (a device sync on GPU) of both count tensors."""
    ranks, local = recv_RL.shape
    host = torch.cat([counts_E.view(ranks, -1).sum(1), recv_RL.reshape(-1)]).tolist()
    recv = [host[ranks + r * local: ranks + (r + 1) * local] for r in range(ranks)]
    return host[:ranks], [sum(row) for row in recv], recv


def dispatch_rows(x_ND: Tensor, counts_E: Tensor, recv_RL: Tensor, group: str) -> Tensor:
    send_R, recv_R, recv = _layout(counts_E, recv_RL)
    recv_MD = all_to_all_rows(x_ND[: sum(send_R)], send_R, recv_R, group, x_ND.new_empty((sum(recv_R), x_ND.shape[1])))
    return transpose_blocks(recv_MD, recv)


def combine_rows(y_MD: Tensor, counts_E: Tensor, recv_RL: Tensor, num_rows: int, group: str) -> Tensor:
    send_R, recv_R, recv = _layout(counts_E, recv_RL)
    source_major_MD = transpose_blocks(y_MD, [list(col) for col in zip(*recv)])
    y_ND = y_MD.new_empty((num_rows, y_MD.shape[1]))
    kept = sum(send_R)
    all_to_all_rows(source_major_MD, recv_R, send_R, group, y_ND[:kept])     # a prefix: contiguous
    y_ND[kept:] = 0                                                       # dropped slots stay zero
    return y_ND


# ---------------------------------------------------------------------------------------------
# ep_counts
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("moesys::ep_counts", mutates_args=())
def ep_counts(counts_E: Tensor, group: str, ep_size: int) -> Tensor:
    """Row counts per (source rank, local expert) this rank will receive."""
    recv = torch.empty_like(counts_E)
    pg = group_of(group)
    if pg is None:
        recv.copy_(counts_E)
    else:
        dist.all_to_all_single(recv, counts_E.contiguous(), group=pg)
    return recv.view(ep_size, -1)


@ep_counts.register_fake
def _ep_counts_fake(counts_E, group, ep_size):
    return counts_E.new_empty((ep_size, counts_E.shape[0] // ep_size))


# ---------------------------------------------------------------------------------------------
# ep_dispatch / ep_combine
# ---------------------------------------------------------------------------------------------


def dynamic_rows():
    try:
        return torch.library.get_ctx().new_dynamic_size()
    except Exception:   # static-shape fake mode (no shape env): fall back to a placeholder size
        return None


@torch.library.custom_op("moesys::ep_dispatch", mutates_args=())
def ep_dispatch(x_ND: Tensor, counts_E: Tensor, recv_RL: Tensor, group: str) -> Tensor:
    return dispatch_rows(x_ND, counts_E, recv_RL, group)


@ep_dispatch.register_fake
def _ep_dispatch_fake(x_ND, counts_E, recv_RL, group):
    rows = dynamic_rows()
    return x_ND.new_empty((x_ND.shape[0] if rows is None else rows, x_ND.shape[1]))


def _received_rows_bound(node, expr) -> dict:
    """Rows an ``ep_dispatch`` receives: at most the slots every rank of the group (``recv_RL``'s
    rows) routes, as many as this rank's ``x_ND`` rows."""
    x_ND, _, recv_RL = (arg.meta["val"] for arg in node.args[:3])
    return {node.meta["val"].shape[0].node.expr: recv_RL.shape[0] * expr(x_ND.shape[0])}


register_unbacked_bound("moesys::ep_dispatch", _received_rows_bound)


def _dispatch_setup(ctx, inputs, output):
    x_ND, counts_E, recv_RL, group = inputs
    ctx.save_for_backward(counts_E, recv_RL)
    ctx.num_rows, ctx.group = x_ND.shape[0], group


def _dispatch_backward(ctx, grad_MD):
    counts_E, recv_RL = ctx.saved_tensors
    return ep_undispatch(grad_MD, counts_E, recv_RL, ctx.num_rows, ctx.group), None, None, None


register_autograd(ep_dispatch, _dispatch_backward, setup_context=_dispatch_setup)


@torch.library.custom_op("moesys::ep_undispatch", mutates_args=())
def ep_undispatch(grad_MD: Tensor, counts_E: Tensor, recv_RL: Tensor, num_rows: int, group: str) -> Tensor:
    """The backward of ``ep_dispatch``: received rows back to their ``num_rows`` slots (dropped: 0)."""
    return combine_rows(grad_MD.contiguous(), counts_E, recv_RL, num_rows, group)


@ep_undispatch.register_fake
def _ep_undispatch_fake(grad_MD, counts_E, recv_RL, num_rows, group):
    return grad_MD.new_empty((num_rows, grad_MD.shape[1]))


@torch.library.custom_op("moesys::ep_combine", mutates_args=())
def ep_combine(y_MD: Tensor, counts_E: Tensor, recv_RL: Tensor, order_N: Tensor, group: str) -> Tensor:
    return combine_rows(y_MD, counts_E, recv_RL, order_N.shape[0], group)


@ep_combine.register_fake
def _ep_combine_fake(y_MD, counts_E, recv_RL, order_N, group):
    return y_MD.new_empty((order_N.shape[0], y_MD.shape[1]))


def _combine_setup(ctx, inputs, output):
    _, counts_E, recv_RL, _, group = inputs
    ctx.save_for_backward(counts_E, recv_RL)
    ctx.group = group


def _combine_backward(ctx, grad_ND):
    counts_E, recv_RL = ctx.saved_tensors
    return ep_dispatch(grad_ND.contiguous(), counts_E, recv_RL, ctx.group), None, None, None, None


register_autograd(ep_combine, _combine_backward, setup_context=_combine_setup)


# ---------------------------------------------------------------------------------------------
# global_load_balancing_loss: the aux loss of the global batch, on every rank
# ---------------------------------------------------------------------------------------------


def _all_reduce_sum(t: Tensor, group: str) -> Tensor:
    pg = group_of(group)
    if pg is not None:
        dist.all_reduce(t, group=pg)
    return t


@torch.library.custom_op("moesys::all_reduce_sum", mutates_args=())
def all_reduce_sum(x: Tensor, group: str) -> Tensor:
    """The sum of ``x`` over the ranks of ``group`` (a new tensor; ``x`` is left as it is)."""
    return _all_reduce_sum(x.clone(), group)


@all_reduce_sum.register_fake
def _all_reduce_sum_fake(x, group):
    return torch.empty_like(x)


def _layer_stats(scores_TE: Tensor, ids_TK: Tensor) -> Tensor:
    """[slot counts per expert (E) | summed scores per expert (E) | tokens | slots] of this rank."""
    num_tokens, num_experts = scores_TE.shape
    packed = scores_TE.new_zeros(2 * num_experts + 2)
    packed[:num_experts].scatter_add_(0, ids_TK.reshape(-1), torch.ones(ids_TK.numel(), dtype=packed.dtype,
                                                                         device=packed.device))
    packed[num_experts:2 * num_experts] = scores_TE.sum(0)
    packed[-2], packed[-1] = num_tokens, ids_TK.numel()
    return packed


def _loss_of(stats: Tensor, coef: float) -> Tensor:
    """The Switch/GShard loss from global statistics (no tokens anywhere: 0)."""
    num_experts = (stats.numel() - 2) // 2
    counts_E, score_sum_E = stats[:num_experts], stats[num_experts:2 * num_experts]
    tokens, slots = stats[-2].clamp(min=1), stats[-1].clamp(min=1)
    return coef * num_experts * ((counts_E / slots) * (score_sum_E / tokens)).sum()


def _scores_grad(stats: Tensor, total_grad: Tensor, coef: float, shape, dtype) -> Tensor:
    """Gradient of the global loss with respect to this rank's scores. Every rank adds the same
    global loss: its total gradient is the sum of the ranks' incoming gradients (``total_grad``,
    the backward of an all-reduce), spread over each rank's own scores."""
    num_tokens, num_experts = shape
    scale = coef * num_experts / (stats[-1] * stats[-2]).clamp(min=1)
    return (total_grad * scale * stats[:num_experts]).expand(num_tokens, -1).contiguous().to(dtype)


@torch.library.custom_op("moesys::global_load_balancing_loss", mutates_args=())
def global_load_balancing_loss(scores_TE: Tensor, ids_TK: Tensor, coef: float, group: str) -> tuple[Tensor, Tensor]:
    """``load_balancing_loss`` of the concatenation of every rank's tokens (same value on each
    rank), and the global statistics it used (kept for backward: no second reduction there)."""
    with torch.no_grad():
        stats = _all_reduce_sum(_layer_stats(scores_TE, ids_TK), group)
        return _loss_of(stats, coef), stats


@global_load_balancing_loss.register_fake
def _glbl_fake(scores_TE, ids_TK, coef, group):
    return scores_TE.new_empty(()), scores_TE.new_empty((2 * scores_TE.shape[1] + 2,))


def _glbl_setup(ctx, inputs, output):
    scores_TE, _, coef, group = inputs
    ctx.save_for_backward(output[1])
    ctx.coef, ctx.group, ctx.shape, ctx.dtype = coef, group, scores_TE.shape, scores_TE.dtype


def _glbl_backward(ctx, grad_loss, grad_stats):
    (stats,) = ctx.saved_tensors
    total_grad = all_reduce_sum(grad_loss.reshape(1).to(stats.dtype), ctx.group)
    return _scores_grad(stats, total_grad, ctx.coef, ctx.shape, ctx.dtype), None, None, None


register_autograd(global_load_balancing_loss, _glbl_backward, setup_context=_glbl_setup)


@torch.library.custom_op("moesys::global_load_balancing_losses", mutates_args=())
def global_load_balancing_losses(scores: Sequence[Tensor], ids: Sequence[Tensor], coefs: Sequence[float],
                                 group: str) -> tuple[Tensor, Tensor]:   # typing.Sequence: torch 2.5 reads no list[T]
    """``global_load_balancing_loss`` of n layers with one all-reduce in forward and one in
    backward (instead of n each): the layers' losses [n], and their global statistics
    concatenated (layer i: 2 * E_i + 2 values)."""
    with torch.no_grad():
        stats = _all_reduce_sum(torch.cat([_layer_stats(s, i) for s, i in zip(scores, ids)]), group)
        pieces = stats.split([2 * s.shape[1] + 2 for s in scores])
        return torch.stack([_loss_of(piece, coef) for piece, coef in zip(pieces, coefs)]), stats


@global_load_balancing_losses.register_fake
def _glbls_fake(scores, ids, coefs, group):
    return scores[0].new_empty((len(scores),)), scores[0].new_empty((sum(2 * s.shape[1] + 2 for s in scores),))


def _glbls_setup(ctx, inputs, output):
    scores, _, coefs, group = inputs
    ctx.save_for_backward(output[1])
    ctx.coefs, ctx.group = coefs, group
    ctx.shapes, ctx.dtypes = [s.shape for s in scores], [s.dtype for s in scores]


def _glbls_backward(ctx, grad_losses, grad_stats):
    (stats,) = ctx.saved_tensors
    total_grads = all_reduce_sum(grad_losses.to(stats.dtype), ctx.group)
    pieces = stats.split([2 * shape[1] + 2 for shape in ctx.shapes])
    grads = [_scores_grad(piece, total_grads[i], coef, shape, dtype)
             for i, (piece, coef, shape, dtype) in enumerate(zip(pieces, ctx.coefs, ctx.shapes, ctx.dtypes))]
    return grads, [None] * len(grads), None, None


register_autograd(global_load_balancing_losses, _glbls_backward, setup_context=_glbls_setup)


# ---------------------------------------------------------------------------------------------
# fused gradient buckets
# ---------------------------------------------------------------------------------------------


@dataclass
class Bucket:
    """Gradients of one parameter class, flattened and all-reduced together over ``group``."""
    name: str                      # e.g. "expert#0"
    kind: str                      # "dense" | "router" | "expert"
    group: str                     # "dense" | "edp"
    params: list[str]              # parameter names in the graph module
    numel: int
    nbytes: int


@dataclass
class _Pending:
    ready: set = field(default_factory=set)
    works: list = field(default_factory=list)
    next_bucket: int = 0
    finalize_queued: bool = False


class GradBucketer:
    """Launch each bucket's all-reduce as soon as all its gradients are accumulated in backward
    (buckets are launched in index order on every rank, so collectives match), and wait for them
    at the end of backward. Gradients become those of the mean loss over every rank's batch, i.e.
    of one process on the global batch: a bucket is averaged over its group of s ranks, and a
    gradient whose group is smaller than the world (expert data parallel) is scaled by s / world
    as it arrives, before accumulation. So a gradient accumulated over several backward passes,
    synced each time (like DDP without ``no_sync``) or once, is the sum of the passes' gradients:
    the part synced before is the same on every rank of the group and averages to itself.

    A bucket holds frozen parameters too (``requires_grad=False``, e.g. frozen before compile and
    unfrozen later): its all-reduce carries only the parameters that require a gradient at that
    backward (the same on every rank, as DDP requires), and it is ready once they all are."""

    def __init__(self, buckets: list[Bucket], params: dict[str, torch.nn.Parameter], world_size: int):
        self.buckets, self.params, self.world_size = buckets, params, world_size
        self.bucket_of = {name: i for i, b in enumerate(buckets) for name in b.params}
        self.enabled = True
        self.state = _Pending()
        self.launched_in_backward = 0     # buckets launched from a gradient hook, before backward ended
        self.ready_at_first_launch = None  # gradients accumulated when the first bucket was launched
        self.handles = []
        for bucket in buckets:
            scale = groups.size(bucket.group) / world_size
            for name in bucket.params:
                self.handles += _hooks_of(params[name], self._hook(name),
                                          (lambda grad, scale=scale: grad * scale) if scale != 1 else None)

    def _hook(self, name: str):
        def hook(param):
            if not self.enabled:
                return
            state = self.state
            if not state.finalize_queued:
                state.finalize_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._finalize)
            state.ready.add(name)
            launched = state.next_bucket
            self._launch_ready()
            self.launched_in_backward += state.next_bucket - launched
            if launched == 0 and state.next_bucket > 0:
                self.ready_at_first_launch = len(state.ready)
        return hook

    def _bucket_ready(self, index: int) -> bool:
        return all(name in self.state.ready for name in self._trained(index))

    def _trained(self, index: int) -> list[str]:
        """The bucket's parameters that require a gradient now (frozen ones are left out)."""
        return [name for name in self.buckets[index].params if self.params[name].requires_grad]

    def _launch_ready(self, force: bool = False) -> None:
        state = self.state
        while state.next_bucket < len(self.buckets) and (force or self._bucket_ready(state.next_bucket)):
            state.works.append(self._launch(state.next_bucket))
            state.next_bucket += 1

    def _launch(self, index: int):
        bucket = self.buckets[index]
        names = self._trained(index)     # frozen: no gradient made, none sent (no weight decay moves it)
        for name in names:
            param = self.params[name]
            if param.grad is None:           # unused this step: contributes zeros, like DDP
                param.grad = torch.zeros_like(param)
        pg, size = group_of(bucket.group), groups.size(bucket.group)
        if pg is None or size == 1 or not names:    # nothing to reduce: scaled by 1 / world on arrival
            return names, None, None
        flat = torch.cat([self.params[name].grad.reshape(-1) for name in names]).div_(size)
        return names, flat, dist.all_reduce(flat, group=pg, async_op=True)

    def _finalize(self) -> None:
        self._launch_ready(force=True)
        for names, flat, work in self.state.works:
            if work is None:
                continue
            work.wait()
            offset = 0
            for name in names:
                param = self.params[name]
                param.grad.copy_(flat[offset: offset + param.numel()].view_as(param))
                offset += param.numel()
        self.state = _Pending()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _hooks_of(param: torch.nn.Parameter, after_accumulate, on_grad=None) -> list:
    """Register ``after_accumulate`` (and the gradient hook ``on_grad``) on ``param``, also when it
    is frozen: torch refuses hooks on a tensor without ``requires_grad``, but a leaf keeps them
    through ``requires_grad_`` switches, so they fire once it is unfrozen."""
    frozen = not param.requires_grad
    param.requires_grad_(True)
    try:
        handles = [param.register_post_accumulate_grad_hook(after_accumulate)]
        if on_grad is not None:
            handles.append(param.register_hook(on_grad))
    finally:
        param.requires_grad_(not frozen)
    return handles


# torch.autocast: expert matmuls in the autocast dtype, the rest on their inputs as they come
follow_autocast("moesys::ep_counts", cast=False)
follow_autocast("moesys::ep_dispatch", cast=False)
follow_autocast("moesys::ep_combine", cast=False)
follow_autocast("moesys::ep_undispatch", cast=False)
follow_autocast("moesys::all_reduce_sum", cast=False)
follow_autocast("moesys::global_load_balancing_loss", cast=False)
follow_autocast("moesys::global_load_balancing_losses", cast=False)
