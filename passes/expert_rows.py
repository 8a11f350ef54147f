"""Which expert rows each weight of an MoE layer comes from, and how a rank rebuilds its own.

The canonical ``grouped_mlp`` reads ``w_up_EHD``/``w_down_EDF`` (and expert biases
``b_up_EH``/``b_down_ED`` when the experts have them); the model may keep them another
way: stacked ``[E, ...]`` parameters read as they are or transposed, separate gate/up stacks
concatenated, or a ModuleList of per-expert Linears stacked in forward. Each weight is produced by
a small pure graph from ``get_attr`` nodes. A rank that owns experts [lo, hi) gets that producer
rebuilt for rows [lo, hi) only, the row range pushed down to the parameters: a stacked parameter
is sharded along dim 0, a per-expert parameter is kept whole or dropped from the rank's graph.
How each op's dim-0 rows come from its inputs is data (``row_sources``). A weight may also add an
update per expert computed from dense parameters (PEFT's LoRA on the expert weights:
``W + scaling · lhs @ rhs``, in export's ``wrap_with_autocast`` region): every rank holds those
whole, so the walk stops at them and takes their rows [lo, hi) with a slice, and a region whose
body computes row by row is called again on its inputs' rows.

Shape legend: E experts · L experts of this rank · H up-projection rows · D dim · F hidden.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
from torch import nn

from moesys_compile.errors import PlanError
from moesys_compile.frontend.annotation import Cost, CostModel
from moesys_compile.frontend.canonicalize import moe_parameter_classes
from moesys_compile.ir import expert_tensors, infer_val, is_op, moesys_meta, region_body, target_name
from moesys_compile.runtime.groups import Topology

# ops whose output has exactly the rows (and shape) of their first input
_SAME_SHAPE_OPS = {"contiguous", "clone", "detach", "alias", "to", "_to_copy", "type", "float", "double", "half",
                   "bfloat16", "requires_grad_"}
_CAT_OPS = {"cat", "concat", "concatenate"}
# ops whose output row i is computed from row i of each input that has the output's rows (inputs
# of other shapes broadcast): a weight plus an update per expert (PEFT's LoRA on expert weights)
_ROW_WISE_OPS = {"add", "sub", "mul", "div", "bmm", "baddbmm"}
# what a region's body (export's ``wrap_with_autocast`` / ``wrap_with_set_grad_enabled``) may hold
# for the region to be rebuilt on rows: row-wise ops, and ``set_`` (a parametrization's no-op)
_REGION_BODY_OPS = _SAME_SHAPE_OPS | _ROW_WISE_OPS | {"set_"}


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


def expert_rows_of(node: fx.Node) -> int:
    return int(node.meta["val"].shape[0])


def _ndim(node: fx.Node) -> int:
    return node.meta["val"].dim()


def row_sources(node: fx.Node) -> Optional[tuple[str, list]]:
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
    if name in _ROW_WISE_OPS:
        inputs = [x for x in node.args if isinstance(x, fx.Node) and "val" in x.meta and _ndim(x) == _ndim(node)
                  and expert_rows_of(x) == expert_rows_of(node)]
        return ("aligned", inputs) if inputs else None
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
            starts.append(starts[-1] + expert_rows_of(x))
        return "split", [_Piece(x, s, expert_rows_of(x)) for x, s in zip(first, starts)]
    return None


def producers(nodes: list[fx.Node]) -> list[fx.Node]:
    """``nodes`` and every node they are computed from."""
    found: dict[fx.Node, None] = {}
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node not in found:
            found[node] = None
            stack.extend(node.all_input_nodes)
    return list(found)


def reads_experts(node: fx.Node, classes: dict[str, str]) -> bool:
    """Whether ``node`` is computed from an expert parameter (else from dense ones only)."""
    return any(n.op == "get_attr" and classes.get(str(n.target)) == "expert" for n in producers([node]))


def region_call(node: fx.Node) -> Optional[fx.Node]:
    """The region call (a higher-order op such as export's ``wrap_with_autocast``) whose output
    ``node`` takes (``getitem(region, i)``); None for any other node."""
    if node.op != "call_function" or node.target is not operator.getitem or not isinstance(node.args[0], fx.Node):
        return None
    region = node.args[0]
    return region if isinstance(getattr(region, "target", None), torch._ops.HigherOrderOperator) else None


def _has_rows(node: fx.Node, rows: int) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows


class ExpertRows:
    """Rebuilds the expert-weight producers of one rank: ``local(weight, lo, hi)`` is a node
    computing rows [lo, hi) of ``weight`` from this rank's parameters only."""

    def __init__(self, gm: fx.GraphModule, ctx, topo: Topology):
        self.gm, self.ctx, self.topo = gm, ctx, topo
        self.memo: dict[tuple[fx.Node, int, int], fx.Node] = {}
        self.sharded: dict[str, tuple[int, int, int]] = {}
        self.where = ""
        self.classes = moe_parameter_classes(ctx.model)

    def unsupported(self, node: fx.Node, why: str) -> PlanError:
        return PlanError(
            f"{self.where} ({_describe_layout(self.ctx, self.where)}): cannot shard its experts over "
            f"expert_parallel={self.topo.expert_parallel}: node '{node.name}' ({target_name(node)}) {why}. "
            f"Expert weights must be rows of stacked [E, ...] "
            f"parameters (read as they are, transposed within dims > 0, or concatenated) or a stack of "
            f"per-expert weights (a ModuleList of expert MLPs); keep that layout, or use expert_parallel=1")

    def local(self, node: fx.Node, lo: int, hi: int) -> fx.Node:
        if lo == 0 and hi == expert_rows_of(node):
            return node
        key = (node, lo, hi)
        if key not in self.memo:
            if not reads_experts(node, self.classes):     # dense (a per-expert update): every rank has it all
                self.memo[key] = self._copy_op(torch.ops.aten.slice.Tensor, (node, 0, lo, hi), like=node)
            elif node.op == "get_attr":
                self.memo[key] = self._shard(node, lo, hi)
            else:
                self.memo[key] = self._rebuild(node, lo, hi)
        return self.memo[key]

    def _rebuild(self, node: fx.Node, lo: int, hi: int) -> fx.Node:
        region = region_call(node)
        if region is not None:          # getitem(region(...), i): the region rebuilt on the rows
            return self._copy(node, (self._local_region(region, lo, hi, expert_rows_of(node)), node.args[1]))
        sources = row_sources(node)
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

    def _local_region(self, region: fx.Node, lo: int, hi: int, rows: int) -> fx.Node:
        """The region called on rows [lo, hi) of its inputs that have ``rows`` rows, when its body
        computes row by row (a cast or set_, an update added per expert)."""
        key = (region, lo, hi)
        if key not in self.memo:
            body = next(b for b in (region_body(self.gm, a) for a in region.all_input_nodes) if b is not None)
            off = [n for n in body.graph.nodes if n.op not in ("placeholder", "output")
                   and _op_name(n) not in _REGION_BODY_OPS]
            if off:
                raise self.unsupported(region, f"is a region whose body computes '{off[0].name}' "
                                               f"({target_name(off[0])}), which is not row by row")
            args = fx.node.map_arg(region.args, lambda n: self.local(n, lo, hi) if _has_rows(n, rows) else n)
            self.memo[key] = self._copy(region, args)
        return self.memo[key]

    def _copy_op(self, target, args: tuple, like: fx.Node) -> fx.Node:
        """A new call of ``target`` with ``like``'s layer and module."""
        node = self.gm.graph.create_node("call_function", target, args)
        infer_val(node, self.ctx.fake_mode)
        self._note_source(node, like)
        return node

    def _note_source(self, new: fx.Node, source_node: fx.Node) -> None:
        source = moesys_meta(source_node)
        moesys_meta(new).update(layer=source.get("layer"), module=source.get("module"))
        moesys_meta(new)["cost"] = CostModel(self.gm, self.ctx.annotation).cost(new)

    def _copy(self, node: fx.Node, args: tuple) -> fx.Node:
        """``node``'s op (call_function or call_method) on new arguments, with ``meta["val"]`` and
        ``meta["moesys"]``."""
        new = self.gm.graph.create_node(node.op, node.target, args, dict(node.kwargs))
        if isinstance(node.target, torch._ops.HigherOrderOperator):
            values = fx.node.map_arg(args, lambda n: region_body(self.gm, n) or n.meta["val"])
            with self.ctx.fake_mode:
                new.meta["val"] = node.target(*values, **node.kwargs)
        elif node.op == "call_function":
            infer_val(new, self.ctx.fake_mode)
        else:
            (this, *rest), kwargs = fx.node.map_arg((args, new.kwargs), lambda n: n.meta["val"])
            with self.ctx.fake_mode:
                new.meta["val"] = getattr(this, str(node.target))(*rest, **kwargs)
        self._note_source(new, node)
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
    """The expert weights (w_up, w_down and any expert biases) of every grouped_mlp / moe_experts node."""
    return [w for n in gm.graph.nodes if is_op(n, "grouped_mlp", "moe_experts") for w in expert_tensors(n)]


def expert_owners(weights: list[fx.Node], strict: bool = True) -> dict[str, int]:
    """Per-expert parameters (target -> the expert it belongs to) under the expert weights; stacked
    parameters (rows of several experts) are not listed. Producers it does not understand are
    skipped (the sharding walk reports them); a parameter shared by two experts is an error when
    ``strict`` (it cannot be sharded) and left out otherwise."""
    owners: dict[str, int] = {}
    tied: set[str] = set()

    def walk(node: fx.Node, first: int) -> None:
        sources = row_sources(node) if node.op != "get_attr" else None
        if sources is None:
            return
        kind, inputs = sources
        for piece in inputs if kind == "split" else [_Piece(x, 0, expert_rows_of(x)) for x in inputs]:
            if not piece.whole:
                walk(piece.source, first + piece.start)
                continue
            for param in (n for n in producers([piece.source]) if n.op == "get_attr"):
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


def check_producers(ctx, mlps: list[fx.Node], weight_producers: list[fx.Node]) -> None:
    """Expert weights must be computed from parameters (expert ones, sharded, and dense ones, which
    every rank holds whole: an update per expert), and what is computed from expert parameters
    read by the experts only."""
    classes = moe_parameter_classes(ctx.model)
    inside = set(weight_producers) | set(mlps)
    for mlp in mlps:
        key = moesys_meta(mlp).get("module") or mlp.name
        for node in producers(expert_tensors(mlp)):
            if node.op == "placeholder":
                raise PlanError(f"{key}: the expert weights are computed from the input '{node.target}'; "
                                f"expert_parallel cannot shard them")
            outside = [u for u in node.users if u not in inside]
            if outside and reads_experts(node, classes):
                raise PlanError(f"{key}: '{node.name}' ({target_name(node)}), part of the expert weights, is also "
                                f"read by '{outside[0].name}' ({target_name(outside[0])}); the experts cannot be "
                                f"sharded while other code reads their weights (use expert_parallel=1)")


def _parameters_read(gm: fx.GraphModule, node: fx.Node) -> list[str]:
    """The parameters ``node`` reads by name: a ``get_attr``'s target, a leaf module's parameters."""
    if node.op == "get_attr":
        return [str(node.target)]
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return [name for name, _ in module.named_parameters(prefix=str(node.target), remove_duplicate=False)]
    return []


def check_dense_uses(gm: fx.GraphModule, ctx, weight_producers: list[fx.Node]) -> None:
    """No code but the experts reads an expert parameter, under its name or a tied one (a dense
    layer sharing an expert's weight): a rank holds only its own experts' weights, whole per-expert
    ones or rows of stacked ones, while a dense use needs the whole tensor on every rank."""
    classes = moe_parameter_classes(ctx.model)
    params = dict(ctx.model.named_parameters(remove_duplicate=False))
    experts: dict[int, str] = {}
    for name, param in params.items():
        if classes.get(name) == "expert":
            experts.setdefault(id(param), name)
    inside = set(weight_producers)
    for node in gm.graph.nodes:
        for read in [] if node in inside else _parameters_read(gm, node):
            expert = experts.get(id(params[read])) if read in params else None
            if expert is not None:
                raise _dense_use_error(ctx, node, read, expert)


def _dense_use_error(ctx, node: fx.Node, read: str, expert: str) -> PlanError:
    ep = ctx.plan.expert_parallel
    if read == expert:
        what, fix = f"expert weight '{expert}'", f"read '{expert}' in its expert only"
    else:
        what, fix = (f"'{read}' is the same parameter as expert weight '{expert}' (tied), so it",
                     f"untie them (give '{read}' a parameter of its own)")
    return PlanError(f"{what} is read outside the experts by '{node.name}' ({target_name(node)}): at "
                     f"expert_parallel={ep} an expert's weights are sharded across the EP ranks (each rank holds "
                     f"only its own experts), but a dense use needs the whole tensor on every rank; {fix}, or use "
                     f"expert_parallel=1")


def drop_unused(gm: fx.GraphModule, ctx, weight_producers: list[fx.Node]) -> list[str]:
    """Erase the old producer nodes nothing reads any more; drop the parameters no node reads."""
    dropped, old = [], set(weight_producers)
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
