"""expert_parallel: shard experts over the EP group and route tokens to them with all-to-all.

Shape legend: T tokens · D dim · E experts · R EP ranks · L = E/R local experts · N = T*K slots ·
M rows received by this rank.

The canonical ``grouped_mlp`` reads ``w_up_EHD``/``w_down_EDF``; the model may keep them another
way: stacked ``[E, ...]`` parameters read as they are or transposed, separate gate/up stacks
concatenated, or a ModuleList of per-expert Linears stacked in forward. Each weight is produced by
a small pure graph from ``get_attr`` nodes. A rank that owns experts [lo, hi) gets that producer
rebuilt for rows [lo, hi) only, the row range pushed down to the parameters: a stacked parameter
is sharded along dim 0, a per-expert parameter is kept whole or dropped from the rank's graph.
How each op's dim-0 rows come from its inputs is data (``_row_sources``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
from torch import nn

import moesys_compile.runtime.collectives  # noqa: F401  registers moesys::ep_* ops
import moesys_compile.runtime.token_exchange  # noqa: F401  registers moesys::ep_token_* ops
from moesys_compile.errors import PlanError
from moesys_compile.frontend.annotation import Cost, CostModel
from moesys_compile.frontend.canonicalize import moe_parameter_classes
from moesys_compile.ir import infer_val, is_op, moesys_meta, target_name
from moesys_compile.passes.decompose_moe import new_node
from moesys_compile.runtime.groups import Topology

# ops whose output has exactly the rows (and shape) of their first input
_SAME_SHAPE_OPS = {"contiguous", "clone", "detach", "alias", "to", "_to_copy", "type", "float", "double", "half",
                   "bfloat16", "requires_grad_"}
_CAT_OPS = {"cat", "concat", "concatenate"}


# ---------------------------------------------------------------------------------------------
# how the expert rows of a weight come from its inputs
# ---------------------------------------------------------------------------------------------


@dataclass
class _Piece:
    """Rows [start, start + rows) of a node come from ``source`` (``whole``: source is one expert)."""
    source: fx.Node
    start: int
    rows: int
    whole: bool = False


def _op_name(node: fx.Node) -> Optional[str]:
    if node.op == "call_method":
        return str(node.target)
    if node.op != "call_function":
        return None
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.name.split("::")[-1]
    return getattr(node.target, "__name__", None)


def _arg(node: fx.Node, index: int, name: str, default):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _rows(node: fx.Node) -> int:
    return int(node.meta["val"].shape[0])


def _ndim(node: fx.Node) -> int:
    return node.meta["val"].dim()


def _row_sources(node: fx.Node) -> Optional[tuple[str, list]]:
    """("aligned", inputs): every input has the node's rows (transpose of dims > 0, casts, cat
    along dim > 0); ("split", pieces): the rows are partitioned among the inputs (stack or cat
    along dim 0, unsqueeze(0)). None: the op mixes or moves dim 0 (or is not known)."""
    name = _op_name(node)
    if name is None or not node.args or "val" not in node.meta:
        return None
    first = node.args[0]
    if name in ("transpose", "swapaxes", "swapdims"):
        dims = {_arg(node, 1, "dim0", 0) % _ndim(first), _arg(node, 2, "dim1", 0) % _ndim(first)}
        return ("aligned", [first]) if 0 not in dims else None
    if name == "permute":
        dims = _arg(node, 1, "dims", ())
        dims = node.args[1:] if isinstance(dims, int) else dims     # x.permute(0, 2, 1)
        return ("aligned", [first]) if dims and dims[0] % _ndim(first) == 0 else None
    if name in _SAME_SHAPE_OPS and isinstance(first, fx.Node):
        same = tuple(first.meta["val"].shape) == tuple(node.meta["val"].shape)
        return ("aligned", [first]) if same else None
    if name == "unsqueeze" and _arg(node, 1, "dim", None) == 0:
        return "split", [_Piece(first, 0, 1, whole=True)]
    if name == "stack" and _arg(node, 1, "dim", 0) == 0:
        return "split", [_Piece(x, i, 1, whole=True) for i, x in enumerate(first)]
    if name in _CAT_OPS:
        dim = _arg(node, 1, "dim", 0) % _ndim(node)
        if dim:
            return "aligned", list(first)
        starts = [0]
        for x in first:
            starts.append(starts[-1] + _rows(x))
        return "split", [_Piece(x, s, _rows(x)) for x, s in zip(first, starts)]
    return None


def _producers(nodes: list[fx.Node]) -> list[fx.Node]:
    """``nodes`` and every node they are computed from."""
    found: dict[fx.Node, None] = {}
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node not in found:
            found[node] = None
            stack.extend(node.all_input_nodes)
    return list(found)


class _ExpertRows:
    """Rebuilds the expert-weight producers of one rank: ``local(weight, lo, hi)`` is a node
    computing rows [lo, hi) of ``weight`` from this rank's parameters only."""

    def __init__(self, gm: fx.GraphModule, ctx, topo: Topology):
        self.gm, self.ctx, self.topo = gm, ctx, topo
        self.memo: dict[tuple[fx.Node, int, int], fx.Node] = {}
        self.sharded: dict[str, tuple[int, int, int]] = {}
        self.where = ""

    def unsupported(self, node: fx.Node, why: str) -> PlanError:
        return PlanError(
            f"{self.where} ({_describe_layout(self.ctx, self.where)}): cannot shard its experts over "
            f"expert_parallel={self.topo.expert_parallel}: node '{node.name}' ({target_name(node)}) {why}. "
            f"Expert weights must be rows of stacked [E, ...] "
            f"parameters (read as they are, transposed within dims > 0, or concatenated) or a stack of "
            f"per-expert weights (a ModuleList of expert MLPs); keep that layout, or use expert_parallel=1")

    def local(self, node: fx.Node, lo: int, hi: int) -> fx.Node:
        if lo == 0 and hi == _rows(node):
            return node
        key = (node, lo, hi)
        if key not in self.memo:
            self.memo[key] = self._shard(node, lo, hi) if node.op == "get_attr" else self._rebuild(node, lo, hi)
        return self.memo[key]

    def _rebuild(self, node: fx.Node, lo: int, hi: int) -> fx.Node:
        sources = _row_sources(node)
        if sources is None:
            raise self.unsupported(node, "mixes or moves the expert dimension (dim 0)")
        kind, inputs = sources
        if kind == "aligned":
            mapping = {x: self.local(x, lo, hi) for x in inputs}
            args = fx.node.map_arg(node.args, lambda n: mapping.get(n, n))
        else:
            kept = []
            for piece in inputs:
                start, end = max(lo, piece.start), min(hi, piece.start + piece.rows)
                if start < end:
                    kept.append(piece.source if piece.whole else
                                self.local(piece.source, start - piece.start, end - piece.start))
            args = (kept, *node.args[1:])
        return self._copy(node, args)

    def _copy(self, node: fx.Node, args: tuple) -> fx.Node:
        """``node``'s op (call_function or call_method) on new arguments, with ``meta["val"]`` and
        ``meta["moesys"]``."""
        new = self.gm.graph.create_node(node.op, node.target, args, dict(node.kwargs))
        if node.op == "call_function":
            infer_val(new, self.ctx.fake_mode)
        else:
            (this, *rest), kwargs = fx.node.map_arg((args, new.kwargs), lambda n: n.meta["val"])
            with self.ctx.fake_mode:
                new.meta["val"] = getattr(this, str(node.target))(*rest, **kwargs)
        source = moesys_meta(node)
        moesys_meta(new).update(layer=source.get("layer"), module=source.get("module"))
        moesys_meta(new)["cost"] = CostModel(self.gm, self.ctx.annotation).cost(new)
        return new

    def _shard(self, node: fx.Node, lo: int, hi: int) -> fx.Node:
        """Replace a stacked [E, ...] parameter in the graph module by its rows [lo, hi)."""
        target = str(node.target)
        if target in self.sharded and self.sharded[target][:2] != (lo, hi):
            raise self.unsupported(node, f"is needed as rows {self.sharded[target][:2]} and as rows {(lo, hi)}")
        if target not in self.sharded:
            holder = _own_holder(self.gm, self.ctx, target)
            attr = target.rpartition(".")[2]
            full = getattr(holder, attr)
            # a view of the model's rows, not a copy: like the dense parameters, the program
            # shares the model's storage and the rank keeps no second copy of its experts
            setattr(holder, attr, nn.Parameter(full.detach()[lo:hi], requires_grad=full.requires_grad))
            self.sharded[target] = (lo, hi, full.shape[0])
        node.meta["val"] = self.ctx.fake_mode.from_tensor(self.gm.get_parameter(target), static_shapes=True)
        meta = moesys_meta(node)
        if meta.get("sharding") != "expert":
            meta.update(sharding="expert", expert_range=self.sharded[target])
            meta["cost"] = Cost(param_bytes=meta["cost"].param_bytes * (hi - lo) // self.sharded[target][2])
        return node


def _describe_layout(ctx, path: str) -> str:
    """``MixtralSparseMoeBlock, experts.gate_up_proj [8, 28, 16], ...`` for error messages."""
    try:
        module = ctx.model.get_submodule(path)
    except AttributeError:
        return "unknown block"
    names = list(getattr(module, "expert_param_names", ()))
    shapes = [f"{name} {list(module.get_parameter(name).shape)}" for name in names[:3]]
    more = f", ... ({len(names)} expert parameters)" if len(names) > 3 else ""
    return ", ".join([getattr(module, "kind", type(module).__name__), *shapes]) + more


def _own_holder(gm: fx.GraphModule, ctx, target: str) -> nn.Module:
    """The graph module's own holder of parameter ``target`` (never one it shares with the model)."""
    holder_path = target.rpartition(".")[0]
    holder = gm.get_submodule(holder_path) if holder_path else gm
    model_holder = ctx.model.get_submodule(holder_path) if holder_path else ctx.model
    if holder is model_holder:
        raise PlanError(f"expert parameter '{target}' lives on a module the graph shares with the model; "
                        f"it cannot be sharded in place (do not declare '{holder_path}' a leaf module)")
    return holder


def expert_weights(gm: fx.GraphModule) -> list[fx.Node]:
    """The (w_up, w_down) arguments of every grouped_mlp / moe_experts node."""
    return [w for n in gm.graph.nodes if is_op(n, "grouped_mlp", "moe_experts")
            for w in (n.args[2:4] if is_op(n, "grouped_mlp") else n.args[3:5])]


def expert_owners(weights: list[fx.Node], strict: bool = True) -> dict[str, int]:
    """Per-expert parameters (target -> the expert it belongs to) under the expert weights; stacked
    parameters (rows of several experts) are not listed. Producers it does not understand are
    skipped (the sharding walk reports them); a parameter shared by two experts is an error when
    ``strict`` (it cannot be sharded) and left out otherwise."""
    owners: dict[str, int] = {}
    tied: set[str] = set()

    def walk(node: fx.Node, first: int) -> None:
        sources = _row_sources(node) if node.op != "get_attr" else None
        if sources is None:
            return
        kind, inputs = sources
        for piece in inputs if kind == "split" else [_Piece(x, 0, _rows(x)) for x in inputs]:
            if not piece.whole:
                walk(piece.source, first + piece.start)
                continue
            for param in (n for n in _producers([piece.source]) if n.op == "get_attr"):
                expert = owners.setdefault(str(param.target), first + piece.start)
                if expert != first + piece.start and strict:
                    raise PlanError(f"parameter '{param.target}' is part of experts {expert} and "
                                    f"{first + piece.start}; tied expert weights cannot be sharded (use "
                                    f"expert_parallel=1)")
                if expert != first + piece.start:
                    tied.add(str(param.target))

    for weight in weights:
        walk(weight, 0)
    return {name: expert for name, expert in owners.items() if name not in tied}


def _check_producers(ctx, mlps: list[fx.Node], producers: list[fx.Node]) -> None:
    """Expert weights must be computed from expert parameters only, and read by the experts only."""
    classes = moe_parameter_classes(ctx.model)
    inside = set(producers) | set(mlps)
    for mlp in mlps:
        key = moesys_meta(mlp).get("module") or mlp.name
        for node in _producers(list(mlp.args[2:4])):
            if node.op == "placeholder" or node.op == "get_attr" and classes.get(str(node.target)) != "expert":
                raise PlanError(f"{key}: the expert weights are computed from '{node.target}', which is not an "
                                f"expert parameter of a recognised MoE block; expert_parallel cannot shard them")
            outside = [u for u in node.users if u not in inside]
            if outside:
                raise PlanError(f"{key}: '{node.name}' ({target_name(node)}), part of the expert weights, is also "
                                f"read by '{outside[0].name}' ({target_name(outside[0])}); the experts cannot be "
                                f"sharded while other code reads their weights (use expert_parallel=1)")


def _drop_unused(gm: fx.GraphModule, ctx, producers: list[fx.Node]) -> list[str]:
    """Erase the old producer nodes nothing reads any more; drop the parameters no node reads."""
    dropped, old = [], set(producers)
    for node in reversed(list(gm.graph.nodes)):
        if node in old and not node.users:
            if node.op == "get_attr":
                dropped.append(str(node.target))
            gm.graph.erase_node(node)
    still_read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for target in dropped:
        if target not in still_read:
            delattr(_own_holder(gm, ctx, target), target.rpartition(".")[2])
    return [t for t in dropped if t not in still_read]


def _a2a_cost(x: fx.Node, ctx, ranks: int, copies: int = 1) -> Cost:
    """Bytes one rank sends to the others for ``copies`` rows per row of ``x`` (at most)."""
    value = x.meta["val"]
    rows, dim = ctx.annotation.expr(value.shape[0]), value.shape[1]
    return Cost(comm_bytes=rows * copies * dim * value.element_size() * (ranks - 1) / ranks)


def _sole_unpermute(mlp: fx.Node) -> Optional[fx.Node]:
    """The ``unpermute`` that alone reads ``mlp`` when the layer is the plain decomposition
    (permute -> grouped_mlp -> unpermute, the permuted rows read by the experts only, the order
    and counts by the layer's own ops): the shape the token exchange replaces. Else None."""
    users = list(mlp.users)
    permute = mlp.args[0].args[0] if mlp.args[0].op == "call_function" and mlp.args[0].args else None
    if len(users) != 1 or not is_op(users[0], "unpermute") or not is_op(permute, "permute"):
        return None
    unpermute = users[0]
    allowed = {mlp, unpermute} | {n for n in unpermute.graph.nodes if is_op(n, "record_drops")}
    outputs = list(permute.users)
    if any(not set(item.users) <= allowed for item in outputs) or len(mlp.args[0].users) != 1:
        return None
    return unpermute if unpermute.args[1] in outputs and unpermute.args[0] is mlp else None


def _slot_exchange(gm, ctx, mlp: fx.Node, w_up_LHD: fx.Node, w_down_LDF: fx.Node, ranks: int):
    """One row per routed slot each way: x_ND -> dispatch -> experts -> combine -> y_ND."""
    x_ND, counts_E, _, _, activation = mlp.args
    order_N = next(u for u in x_ND.args[0].users if u.args[1] == 2)
    recv_RL = new_node(gm, ctx, torch.ops.moesys.ep_counts.default, (counts_E, "ep", ranks), mlp, cost=Cost())
    x_MD = new_node(gm, ctx, torch.ops.moesys.ep_dispatch.default, (x_ND, counts_E, recv_RL, "ep"), mlp,
                    cost=_a2a_cost(x_ND, ctx, ranks))
    local_counts_L = new_node(gm, ctx, torch.ops.aten.sum.dim_IntList, (recv_RL, [0]), mlp, cost=Cost())
    y_MD = new_node(gm, ctx, torch.ops.moesys.grouped_mlp.default,
                    (x_MD, local_counts_L, w_up_LHD, w_down_LDF, activation), mlp, cost=moesys_meta(mlp)["cost"])
    y_ND = new_node(gm, ctx, torch.ops.moesys.ep_combine.default, (y_MD, counts_E, recv_RL, order_N, "ep"), mlp,
                    cost=_a2a_cost(x_ND, ctx, ranks))
    mlp.replace_all_uses_with(y_ND)
    return x_MD, y_ND, [mlp]


def _token_exchange(gm, ctx, mlp: fx.Node, unpermute: fx.Node, w_up_LHD: fx.Node, w_down_LDF: fx.Node,
                    ranks: int):
    """One row per (rank, token) each way: the permute, the slot rows and the unpermute go; the
    plan op sorts the slots, and the experts' rank weights and sums a token's outputs."""
    permute = mlp.args[0].args[0]
    x_TD, ids_TK, num_experts, capacity = permute.args
    weights_TK, activation = unpermute.args[2], mlp.args[4]
    top_k = ids_TK.meta["val"].shape[1]
    plan = new_node(gm, ctx, torch.ops.moesys.ep_token_plan.default,
                    (ids_TK, weights_TK, num_experts, capacity, "ep", ranks), mlp, cost=Cost())
    outs = [new_node(gm, ctx, operator.getitem, (plan, i), mlp, cost=Cost()) for i in range(7)]
    counts_E, order_N, send_token_S, slot_row_M, recv_RL, rows_2R, weights_M = outs
    for item in list(permute.users):
        if item.args[1] in (1, 2):             # counts and order: the drop statistics read them
            item.replace_all_uses_with(counts_E if item.args[1] == 1 else order_N)
    local_counts_L = new_node(gm, ctx, torch.ops.aten.sum.dim_IntList, (recv_RL, [0]), mlp, cost=Cost())
    x_MD = new_node(gm, ctx, torch.ops.moesys.ep_token_dispatch.default,
                    (x_TD, send_token_S, slot_row_M, rows_2R, "ep"), mlp,
                    cost=_a2a_cost(x_TD, ctx, ranks, min(top_k, ranks)))
    y_MD = new_node(gm, ctx, torch.ops.moesys.grouped_mlp.default,
                    (x_MD, local_counts_L, w_up_LHD, w_down_LDF, activation), mlp, cost=moesys_meta(mlp)["cost"])
    y_TD = new_node(gm, ctx, torch.ops.moesys.ep_token_combine.default,
                    (y_MD, weights_M, send_token_S, slot_row_M, rows_2R, ids_TK, "ep"), mlp,
                    cost=_a2a_cost(x_TD, ctx, ranks, min(top_k, ranks)))
    unpermute.replace_all_uses_with(y_TD)
    return x_MD, y_TD, [unpermute, mlp, *permute.users, permute]


def _parallelize_one(gm: fx.GraphModule, ctx, mlp: fx.Node, rows: _ExpertRows) -> None:
    topo = rows.topo
    ranks = topo.expert_parallel
    key = moesys_meta(mlp).get("module") or mlp.name
    experts = _rows(mlp.args[2])
    lo, hi = topo.ep_index * experts // ranks, (topo.ep_index + 1) * experts // ranks
    unpermute = _sole_unpermute(mlp) if ctx.plan.ep_exchange == "token" else None
    # the token exchange reads the top-k weights, so it goes where the unpermute was
    with gm.graph.inserting_before(unpermute or mlp):
        rows.where = key
        w_up_LHD, w_down_LDF = rows.local(mlp.args[2], lo, hi), rows.local(mlp.args[3], lo, hi)
        if unpermute is not None:
            dispatch, combine, replaced = _token_exchange(gm, ctx, mlp, unpermute, w_up_LHD, w_down_LDF, ranks)
        else:
            dispatch, combine, replaced = _slot_exchange(gm, ctx, mlp, w_up_LHD, w_down_LDF, ranks)
    moesys_meta(dispatch)["a2a"] = ("dispatch", key)
    moesys_meta(combine)["a2a"] = ("combine", key)
    for node in replaced:
        gm.graph.erase_node(node)
    if ctx.plan.ep_exchange == "token" and unpermute is None:
        ctx.note(f"{key}: ep_exchange='token' needs permute -> grouped_mlp -> unpermute with nothing else "
                 f"reading them; this layer exchanges one row per slot instead")
    how = "one row per (rank, token), summed before the return" if unpermute is not None else "one row per slot"
    ctx.note(f"{key}: experts {lo}..{hi - 1} of {experts} on this rank (ep_index {topo.ep_index}); "
             f"dispatch/combine all-to-all over EP group ranks {topo.ep_ranks} ({how}; uneven splits)")


def _shard_experts(gm: fx.GraphModule, ctx, mlps: list[fx.Node], topo: Topology) -> None:
    weights = [w for mlp in mlps for w in mlp.args[2:4]]
    producers = _producers(weights)
    _check_producers(ctx, mlps, producers)
    rows = _ExpertRows(gm, ctx, topo)
    for mlp in mlps:
        _parallelize_one(gm, ctx, mlp, rows)
    dropped = _drop_unused(gm, ctx, producers)
    ctx.extras["expert_shards"] = dict(rows.sharded)
    if dropped:
        ctx.note(f"{len(dropped)} per-expert parameter(s) of other ranks' experts left out of this rank's graph")


def _globalize_aux_losses(gm: fx.GraphModule, ctx) -> int:
    losses = [n for n in gm.graph.nodes if is_op(n, "load_balancing_loss")]
    for node in losses:
        scores_TE, ids_TK, coef = node.args
        with gm.graph.inserting_before(node):
            both = new_node(gm, ctx, torch.ops.moesys.global_load_balancing_loss.default,
                            (scores_TE, ids_TK, coef, "dense"), node, cost=moesys_meta(node)["cost"])
            new = new_node(gm, ctx, operator.getitem, (both, 0), node, cost=Cost())
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    return len(losses)


def expert_parallel(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    """Per-rank expert parallelism: local expert shards plus dispatch/combine all-to-all.

    **Contract.** Needs ``decompose_moe`` to have run (``permute -> grouped_mlp -> unpermute``
    with ``meta["val"]``), ``ctx.rank`` and ``plan.world_size``/``expert_parallel``. Writes (every
    plan): ``ctx.extras["expert_owners"]`` (per-expert parameter -> its expert index, for
    ModuleList-style experts). With ep > 1: the graph module holds only this rank's experts --
    stacked ``[E, ...]`` parameters become their ``[E/R, ...]`` rows (``meta["moesys"]["sharding"]
    = "expert"``, ``"expert_range" = (lo, hi, E)``, ``ctx.extras["expert_shards"][target]``),
    other ranks' per-expert parameters are removed. ``plan.ep_exchange="token"`` (default):
    ``permute``/``unpermute`` give way to ``ep_token_plan`` -> ``ep_token_dispatch`` -> experts ->
    ``ep_token_combine`` (a token crosses to a rank once, its outputs come back weighted and summed;
    a layer whose permuted rows something else reads keeps the slot exchange, with a note); "slot":
    ``ep_counts``/``ep_dispatch``/``ep_combine`` around the experts, one row per slot. Either way
    the two row exchanges are tagged ``meta["moesys"]["a2a"] = ("dispatch"|"combine", layer
    module)`` with ``comm_bytes`` costs (token: at most min(K, ep) rows per token).
    With world_size > 1 each ``load_balancing_loss`` becomes ``global_load_balancing_loss`` over
    all ranks, so the aux loss (and its gradient) equals that of one process on the global batch.
    The model's modules are never modified (the graph module's holders are its own); a shard is a
    view of the model's tensor, so training updates those rows in place, as it does the dense
    parameters the program shares with the model. Row counts
    after dispatch are data dependent (unbacked sizes in ``meta["val"]``). Expert weights computed
    in a way that moves dim 0 (or read elsewhere) raise a PlanError naming the block and node.

    **Pseudo-code.**

        record expert_owners from the weight producers (stack entry i -> expert i)
        if ep == 1 and world == 1: note "no-op"; return
        for mlp in grouped_mlp nodes (ep > 1):
            w_up, w_down := producers rebuilt for rows [ep_index*L, (ep_index+1)*L):
                stacked parameter -> its rows; stack/cat(dim 0) -> the pieces in range;
                transpose/cast/cat(dim > 0) -> same op on the inputs' rows; else PlanError
            token exchange (plain permute -> mlp -> unpermute):
              counts, order, send_S, row_M, recv_RL, rows, w_M = ep_token_plan(ids_TK, weights_TK, E, cap)
              x_MD = ep_token_dispatch(x_TD, send_S, row_M, rows)   # unique (rank, token) rows
              y_MD = grouped_mlp(x_MD, recv_RL.sum(0), w_up, w_down)
              y_TD = ep_token_combine(y_MD, w_M, send_S, row_M, rows, ids_TK)  # weighted sum first
              record_drops reads the plan's counts and order; permute, unpermute erased
            slot exchange:
              recv_RL = ep_counts(counts_E)                       # all-to-all of counts
              x_MD   = ep_dispatch(x_ND, counts_E, recv_RL)       # uneven all-to-all, expert-major
              y_MD   = grouped_mlp(x_MD, recv_RL.sum(0), w_up, w_down)
              y_ND   = ep_combine(y_MD, counts_E, recv_RL, order_N)  # reverse all-to-all, zero pad
        erase the old producers; drop parameters nothing reads
        if world > 1: load_balancing_loss -> global_load_balancing_loss(group="dense")
    """
    plan = ctx.plan
    ctx.extras["expert_owners"] = expert_owners(expert_weights(gm), strict=plan.expert_parallel > 1)
    if plan.expert_parallel == 1 and plan.world_size == 1:
        ctx.note("expert_parallel is a no-op: expert_parallel=1 and world_size=1 (single device)")
        return gm
    if any(is_op(n, "moe_experts") for n in gm.graph.nodes):
        raise PlanError("expert_parallel needs decompose_moe, which did not run (remove 'decompose_moe' from "
                        "plan.disable_passes)")
    topo = Topology.of(ctx.rank, plan.world_size, plan.expert_parallel)
    if plan.expert_parallel > 1:
        _shard_experts(gm, ctx, [n for n in gm.graph.nodes if is_op(n, "grouped_mlp")], topo)
    else:
        ctx.note(f"expert_parallel=1: every rank holds all experts (pure data parallelism over {plan.world_size})")
    count = _globalize_aux_losses(gm, ctx)
    ctx.note(f"rank {ctx.rank}: EP group {topo.ep_ranks}, expert-data-parallel group {topo.edp_ranks}; "
             f"{count} load-balancing loss(es) use global statistics over all {plan.world_size} ranks")
    gm.delete_all_unused_submodules()
    return gm
