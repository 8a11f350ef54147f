"""Argument checks the canonical ops (``torch.ops.moesys.*``) and the kernels (``moesys_kernels.*``)
share: a tensor of the wrong shape, dtype or expert range is refused by name, with the sizes, before
a reshape or an index could take it silently (a reshape regroups elements into other tokens, an
out-of-range id lengthens ``counts_E``, a top-k past the kept groups picks masked experts).

Shape legend: T tokens · D model dim · F expert hidden · H up rows · E experts · K top-k · N = T*K.

    >>> import torch
    >>> from moesys_compile.ops.checks import check_ids
    >>> check_ids(torch.tensor([[0, 4]]), 4)
    Traceback (most recent call last):
    ...
    moesys_compile.errors.OpInputError: ids_TK[0, 1] is 4, outside [0, num_experts (4)): expert ids must come from a top-k over this layer's 4 experts
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moesys_compile.errors import OpInputError
from moesys_compile.ops.activations import check_activation, is_gated

SCORE_FUNCS = ("softmax", "sigmoid")


def check_route_args(logits_TE: Tensor, top_k: int, score_func: str, bias_E: Optional[Tensor], n_groups: int,
                     topk_groups: int) -> None:
    """Routing arguments: [T, E] logits, 1 <= top_k <= E, an [E] bias, groups that divide E and
    leave at least top_k experts."""
    if logits_TE.dim() != 2:
        raise OpInputError(f"logits_TE must be [T, E], got shape {tuple(logits_TE.shape)}")
    num_experts = logits_TE.shape[1]
    if score_func not in SCORE_FUNCS:
        raise OpInputError(f"score_func {score_func!r} is not supported; use one of {SCORE_FUNCS}")
    if not 1 <= top_k <= num_experts:
        raise OpInputError(f"top_k ({top_k}) must be in [1, num_experts ({num_experts})]")
    if bias_E is not None and tuple(bias_E.shape) != (num_experts,):
        raise OpInputError(f"bias_E has shape {tuple(bias_E.shape)}, expected ({num_experts},)")
    if n_groups > 1:
        if num_experts % n_groups:
            raise OpInputError(f"num_experts ({num_experts}) is not divisible by n_groups ({n_groups})")
        if not 1 <= topk_groups <= n_groups:
            raise OpInputError(f"topk_groups ({topk_groups}) must be in [1, n_groups ({n_groups})]")
        if top_k > topk_groups * (num_experts // n_groups):
            raise OpInputError(f"top_k ({top_k}) exceeds the {topk_groups} x {num_experts // n_groups} experts "
                               f"left by group-limited routing")


def check_ids(ids_TK: Tensor, num_experts: int, x_TD: Optional[Tensor] = None, id_range: bool = True,
              x_name: str = "x_TD") -> None:
    """[T, K] integer ids (of ``x_TD``'s T tokens where given), each in [0, num_experts) unless
    ``id_range`` is False (a caller whose ``permute`` checks them)."""
    if ids_TK.dim() != 2:
        raise OpInputError(f"ids_TK must be [T, K], got shape {tuple(ids_TK.shape)}")
    if ids_TK.dtype not in (torch.int64, torch.int32):
        raise OpInputError(f"ids_TK must be int64 or int32, got {ids_TK.dtype}")
    if num_experts < 1:
        raise OpInputError(f"num_experts ({num_experts}) must be >= 1")
    if x_TD is not None and (x_TD.dim() != 2 or x_TD.shape[0] != ids_TK.shape[0]):
        raise OpInputError(f"{x_name} has shape {tuple(x_TD.shape)} but ids_TK has {ids_TK.shape[0]} tokens")
    if id_range:
        check_id_range(ids_TK, num_experts)


def check_id_range(ids_TK: Tensor, num_experts: int) -> None:
    """Every id in [0, num_experts). On CUDA an asynchronous assert (no host sync in the hot path;
    the kernels skip such ids, so nothing is written out of bounds before it fires)."""
    if ids_TK.is_cuda:
        torch._assert_async(((ids_TK >= 0) & (ids_TK < num_experts)).all(),
                            f"ids_TK holds an expert id outside [0, num_experts ({num_experts}))")
        return
    bad_TK = (ids_TK < 0) | (ids_TK >= num_experts)
    if bad_TK.any():
        token, k = (int(i) for i in bad_TK.nonzero()[0])
        raise OpInputError(f"ids_TK[{token}, {k}] is {int(ids_TK[token, k])}, outside [0, num_experts "
                           f"({num_experts})): expert ids must come from a top-k over this layer's "
                           f"{num_experts} experts")


def check_balance_args(scores_TE: Tensor, ids_TK: Tensor) -> None:
    """The load-balancing loss's inputs: [T, E] router scores and the [T, K] ids chosen from them."""
    if scores_TE.dim() != 2:
        raise OpInputError(f"scores_TE must be [T, E], got shape {tuple(scores_TE.shape)}")
    check_ids(ids_TK, scores_TE.shape[1], scores_TE, x_name="scores_TE")


def check_capacity_factor(capacity_factor: float) -> None:
    """GShard capacity factor: a finite number > 0, or 0 for dropless routing."""
    if not 0 <= capacity_factor < float("inf"):
        raise OpInputError(f"capacity_factor ({capacity_factor}) must be a finite number > 0 (GShard capacity per "
                           f"expert), or 0 for dropless routing")


def check_combine_weights(weights_TK: Tensor, ids_TK: Tensor) -> None:
    """One combine weight per routed slot: ``weights_TK`` has ``ids_TK``'s [T, K] shape."""
    if weights_TK.shape != ids_TK.shape:
        raise OpInputError(f"weights_TK has shape {tuple(weights_TK.shape)} but ids_TK {tuple(ids_TK.shape)}: "
                           f"give one combine weight per routed slot")


def check_experts_args(x: Tensor, counts_E: Optional[Tensor], w_up_EHD: Tensor, w_down_EDF: Tensor,
                       activation: str, x_name: str = "x_ND") -> None:
    """Expert weights that fit each other, the activation and ``x`` ([*, D], one dtype); ``counts_E``
    (where given) one count per expert."""
    check_activation(activation)
    if w_up_EHD.dim() != 3 or w_down_EDF.dim() != 3:
        raise OpInputError(f"w_up_EHD {tuple(w_up_EHD.shape)} and w_down_EDF {tuple(w_down_EDF.shape)} must be 3-D")
    num_experts, rows_h, dim = w_up_EHD.shape
    ffn = w_down_EDF.shape[2]
    want_h = 2 * ffn if is_gated(activation) else ffn
    if rows_h != want_h:
        raise OpInputError(f"w_up_EHD has {rows_h} rows per expert but activation {activation!r} with "
                           f"w_down_EDF's F = {ffn} needs H = {want_h}")
    if tuple(w_down_EDF.shape[:2]) != (num_experts, dim):
        raise OpInputError(f"w_down_EDF {tuple(w_down_EDF.shape)} does not match w_up_EHD {tuple(w_up_EHD.shape)} "
                           f"(expected [{num_experts}, {dim}, {ffn}])")
    if x.dim() != 2 or x.shape[1] != dim:
        raise OpInputError(f"{x_name} has shape {tuple(x.shape)}, expected [*, {dim}] (D of w_up_EHD)")
    if counts_E is not None and tuple(counts_E.shape) != (num_experts,):
        raise OpInputError(f"counts_E has shape {tuple(counts_E.shape)}, expected ({num_experts},)")
    if x.dtype != w_up_EHD.dtype or x.dtype != w_down_EDF.dtype:
        raise OpInputError(f"{x_name} ({x.dtype}), w_up_EHD ({w_up_EHD.dtype}) and w_down_EDF ({w_down_EDF.dtype}) "
                           f"must share a dtype; cast the expert weights to {x.dtype} (or {x_name} to theirs)")


def check_dropout_keep(keep_NF: Optional[Tensor], num_rows: int, ffn: int) -> None:
    """``keep_NF`` (where given): one row of F mask values per routed row."""
    if keep_NF is None:
        return
    want = (num_rows, ffn)
    if tuple(keep_NF.shape) != want:
        raise OpInputError(f"keep_NF has shape {tuple(keep_NF.shape)}, expected {list(want)} (one row of F "
                           f"per routed row): draw it with moesys.expert_dropout_keep")


def check_unpermute_args(y_ND: Tensor, order_N: Tensor, weights_TK: Tensor, op: str = "unpermute") -> None:
    """``y_ND``, ``order_N`` and ``weights_TK`` agree on N = T*K rows."""
    if y_ND.dim() != 2 or order_N.numel() != y_ND.shape[0] or weights_TK.numel() != y_ND.shape[0]:
        raise OpInputError(f"{op}: y_ND {tuple(y_ND.shape)}, order_N {tuple(order_N.shape)} and weights_TK "
                           f"{tuple(weights_TK.shape)} must agree on N = T*K rows")
