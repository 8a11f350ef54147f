"""Expert groups for ring_partition: a ``grouped_mlp`` whose experts do not fit one slot of the
ring runs as a sum of ``moesys_ring.expert_group_mlp`` calls, one per group of experts, each
reading slices ``w[lo:hi]`` of the expert weights (registered on the graph module and streamed
through the ring like any weight).

    grouped_mlp(x_ND, counts_E, w_up_EHD, w_down_EDF, act)
      == expert_group_mlp(x_ND, counts_E, w_up_EHD[0:g], w_down_EDF[0:g], 0, act)
       + expert_group_mlp(x_ND, counts_E, w_up_EHD[g:2g], w_down_EDF[g:2g], g, act) + ...

(expert biases, when the experts have them, are sliced the same way).

Every row of ``x_ND`` belongs to one expert, so exactly one term computes it (the others give
zeros there): the sum has the same rows and values as the single call.

Shape suffixes: N routed rows (tokens x top-k), D model dim, H up-projection width, F expert
hidden dim, E experts, G experts of one group.
"""

from __future__ import annotations

import operator
from typing import Optional

import sympy
import torch
import torch.fx as fx
from torch import Tensor

from moesys_compile import ops
from moesys_compile.frontend.annotation import B, S, CostModel
from moesys_compile.ir import bound_args, expert_tensors, fetch, infer_val, is_op, moesys_meta
from moesys_compile.ops.autocast import follow_autocast
from moesys_compile.ops.first_order import register_autograd
from moesys_compile.passes.expert_rows import ExpertRows, row_sources
from moesys_compile.runtime.workspace import activation_exprs, evaluate_workspace, liveness_plan, scratch_exprs

# ---------------------------------------------------------------------------------------------
# the op: the rows of one expert group
# ---------------------------------------------------------------------------------------------


def _group_rows(counts_E: Tensor, first: int, count: int) -> list[tuple[int, int, int]]:
    """(local expert, start row, end row) of experts [first, first + count); one host sync."""
    counts = counts_E.tolist()
    start = sum(counts[:first])
    rows = []
    for local, size in enumerate(counts[first:first + count]):
        rows.append((local, start, start + size))
        start += size
    return rows


def expert_group_reference(x_ND: Tensor, counts_E: Tensor, w_up_GHD: Tensor, w_down_GDF: Tensor, first_expert: int,
                           activation: str = "swiglu", b_up_GH: Optional[Tensor] = None,
                           b_down_GD: Optional[Tensor] = None) -> Tensor:
    """Differentiable: grouped_mlp restricted to experts [first, first + G); other rows are 0."""
    rows = _group_rows(counts_E, first_expert, w_up_GHD.shape[0])
    start, end = rows[0][1], rows[-1][2]
    group = counts_E[first_expert:first_expert + w_up_GHD.shape[0]]
    y_nD = ops.grouped_mlp_reference(x_ND[start:end], group, w_up_GHD, w_down_GDF, activation, b_up_GH, b_down_GD)
    return x_ND.new_zeros((x_ND.shape[0], w_down_GDF.shape[1])).index_copy(
        0, torch.arange(start, end, device=x_ND.device), y_nD)


@torch.library.custom_op("moesys_ring::expert_group_mlp", mutates_args=())
def expert_group_mlp(x_ND: Tensor, counts_E: Tensor, w_up_GHD: Tensor, w_down_GDF: Tensor, first_expert: int,
                     activation: str = "swiglu", impl: str = "auto", b_up_GH: Optional[Tensor] = None,
                     b_down_GD: Optional[Tensor] = None) -> Tensor:
    """Rows of experts [first_expert, first_expert + G) of ``moesys.grouped_mlp``, zeros elsewhere;
    summed over a partition of the experts it is grouped_mlp (each row is nonzero in one group).
    The group's rows run through the experts kernel (``moesys_kernels.grouped_mlp``, keeping no h;
    ``impl`` as there), so its temporaries are the kernel's (``group_scratch_bytes``)."""
    from moesys_compile import kernels  # noqa: F401  (registers moesys_kernels; imports Triton if present)
    y_ND = x_ND.new_zeros((x_ND.shape[0], w_down_GDF.shape[1]))
    rows = _group_rows(counts_E, first_expert, w_up_GHD.shape[0])
    start, end = rows[0][1], rows[-1][2]
    if end > start:
        group = counts_E[first_expert:first_expert + w_up_GHD.shape[0]]
        y_ND[start:end], _ = torch.ops.moesys_kernels.grouped_mlp(x_ND[start:end], group, w_up_GHD, w_down_GDF,
                                                                  activation, False, impl, b_up_GH, b_down_GD)
    return y_ND


@expert_group_mlp.register_fake
def _expert_group_mlp_fake(x_ND, counts_E, w_up_GHD, w_down_GDF, first_expert, activation="swiglu", impl="auto",
                           b_up_GH=None, b_down_GD=None):
    return x_ND.new_empty((x_ND.shape[0], w_down_GDF.shape[1]))


def group_scratch_bytes(num_rows, w_up_GHD: Tensor, w_down_GDF: Tensor, impl: str, threads: int,
                        activation: str = "swiglu"):
    """Bytes an expert_group_mlp call allocates besides its output, at most (``num_rows``: N, an
    int or a sympy expression): the experts kernel's scratch, and its output rows before they are
    placed in the output (all N rows when every row goes to this group)."""
    from moesys_compile.kernels.experts import forward_scratch_bytes
    dim, ffn, size = w_down_GDF.shape[1], w_down_GDF.shape[2], w_up_GHD.element_size()
    return forward_scratch_bytes(num_rows, dim, ffn, w_up_GHD.shape[1], size, fused=False, save_h=False, impl=impl,
                                 threads=threads, activation=activation) + num_rows * dim * size


def _expert_group_setup(ctx, inputs, output):
    x_ND, counts_E, w_up, w_down, first, activation, _, b_up, b_down = inputs
    ctx.save_for_backward(x_ND, counts_E, w_up, w_down, b_up, b_down)
    ctx.first, ctx.activation = first, activation


def _expert_group_backward(ctx, grad_y_ND):
    x_ND, counts_E, w_up, w_down, b_up, b_down = ctx.saved_tensors
    with torch.enable_grad():
        x_ND, w_up, w_down, b_up, b_down = [None if t is None else t.detach().requires_grad_(True)
                                            for t in (x_ND, w_up, w_down, b_up, b_down)]
        y_ND = expert_group_reference(x_ND, counts_E, w_up, w_down, ctx.first, ctx.activation, b_up, b_down)
        leaves = [t for t in (x_ND, w_up, w_down, b_up, b_down) if t is not None]
        grads = iter(torch.autograd.grad(y_ND, leaves, grad_y_ND, allow_unused=True))
    grad_x, grad_up, grad_down = next(grads), next(grads), next(grads)
    grad_b_up = None if b_up is None else next(grads)
    grad_b_down = None if b_down is None else next(grads)
    return grad_x, None, grad_up, grad_down, None, None, None, grad_b_up, grad_b_down


register_autograd(expert_group_mlp, _expert_group_backward, setup_context=_expert_group_setup)


# ---------------------------------------------------------------------------------------------
# the rewrite
# ---------------------------------------------------------------------------------------------


def _weight_chain(weight: fx.Node) -> Optional[list[fx.Node]]:
    """The nodes from a parameter read to an expert weight argument, get_attr first: the read,
    then ops that keep the expert rows in place (transposes within dims > 0, casts: gpt-oss reads
    ``gate_up_proj`` [E, D, H] transposed), each read by the next only; None for other producers."""
    chain = [weight]
    while chain[-1].op != "get_attr":
        sources = row_sources(chain[-1])
        if sources is None or sources[0] != "aligned" or len(sources[1]) != 1:
            return None
        chain.append(sources[1][0])
    return chain[::-1] if all(len(n.users) == 1 for n in chain) else None


def splittable_weights(node: fx.Node) -> Optional[list[fx.Node]]:
    """The parameter reads (get_attr) of a grouped_mlp's expert weights (w_up, w_down, then any
    expert biases), when each weight is its parameter's rows in place and only the grouped_mlp
    reads it; else None."""
    if not is_op(node, "grouped_mlp"):
        return None
    chains = [_weight_chain(w) for w in expert_tensors(node)]
    return None if any(c is None for c in chains) else [c[0] for c in chains]


class _GroupRows(ExpertRows):
    """Rows [lo, hi) of expert weights for one expert group: each parameter read becomes a slice
    registered for the ring (a parameter is sliced once per group), the ops after it are rebuilt
    on the slice."""

    def __init__(self, gm: fx.GraphModule, ctx, slices: dict):
        super().__init__(gm, ctx, topo=None)
        self.slices = slices

    def _shard(self, node: fx.Node, lo: int, hi: int) -> fx.Node:
        return _slice_attr(self.gm, self.ctx, node, lo, hi, self.slices)


def split_reserve(gm: fx.GraphModule, ctx, nodes: list[fx.Node], batch: int, seq: int) -> int:
    """Extra peak activation bytes at the example shape once the grouped_mlp ``nodes`` run as
    expert groups: where one output was, the running sum, a group's rows and their new sum are
    alive together, and a group's kernel scratch takes the place of the grouped_mlp's (the
    liveness walk with that transient added)."""
    if ctx.plan.options.get("ring_workspace") is not None or not nodes:
        return 0
    values = {B: batch, S: seq}
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    transient, scratch = {}, scratch_exprs(gm)
    for node in nodes:
        val = node.meta["val"]
        rows = ctx.annotation.expr(val.shape[0])
        out = int(sympy.sympify(rows).xreplace(values)) * val[0].numel() * val.element_size()
        counted = int(sympy.sympify(moesys_meta(node)["cost"].activation_bytes).xreplace(values))
        transient[index[node]] = 3 * out - counted
        up, down = (w.meta["val"] for w in expert_tensors(node)[:2])
        scratch[index[node]] = group_scratch_bytes(rows, up, down, "any", torch.get_num_threads(),
                                                   bound_args(node)["activation"])
    exprs, liveness = activation_exprs(gm, ctx), liveness_plan(gm)
    return (evaluate_workspace(exprs, liveness, batch, seq, transient, scratch=scratch)
            - evaluate_workspace(exprs, liveness, batch, seq, scratch=scratch_exprs(gm)))


def split_into_groups(gm: fx.GraphModule, ctx, node: fx.Node, per_group: int, slices: dict) -> fx.Node:
    """Replace the grouped_mlp ``node`` by a sum of expert_group_mlp over groups of ``per_group``
    experts; its weight reads are replaced by slices, recorded in ``slices`` (attribute name ->
    (weight it slices, lo, hi)). New nodes get ``val``, ``layer``, ``module`` and ``cost``, the
    groups also ``scratch_bytes``. Returns the node of the sum."""
    weights = expert_tensors(node)
    chains = [_weight_chain(w) for w in weights]
    num_experts = weights[0].meta["val"].shape[0]
    x_ND, counts_E = node.args[:2]
    activation = bound_args(node)["activation"]
    flops = moesys_meta(node)["cost"].flops
    rows = _GroupRows(gm, ctx, slices)
    with gm.graph.inserting_before(node):
        total = None
        for lo in range(0, num_experts, per_group):
            hi = min(num_experts, lo + per_group)
            up, down, *biases = (rows.local(w, lo, hi) for w in weights)
            args = (x_ND, counts_E, up, down, lo, activation, *(("auto", *biases) if biases else ()))
            part = _new_node(gm, ctx, torch.ops.moesys_ring.expert_group_mlp.default, args, node,
                             flops * (hi - lo) / num_experts)
            moesys_meta(part)["scratch_bytes"] = group_scratch_bytes(
                ctx.annotation.expr(x_ND.meta["val"].shape[0]), args[2].meta["val"], args[3].meta["val"], "any",
                torch.get_num_threads(), activation)
            total = part if total is None else _new_node(gm, ctx, operator.add, (total, part), node)
    node.replace_all_uses_with(total)
    gm.graph.erase_node(node)
    for chain in chains:
        for dead in reversed(chain):
            gm.graph.erase_node(dead)
    return total


def _new_node(gm: fx.GraphModule, ctx, target, args: tuple, like: fx.Node, flops=None) -> fx.Node:
    node = gm.graph.call_function(target, args)
    infer_val(node, ctx.fake_mode)
    meta = moesys_meta(node)
    meta.update(layer=moesys_meta(like).get("layer"), module=moesys_meta(like).get("module"))
    meta["cost"] = CostModel(gm, ctx.annotation).cost(node)
    if flops is not None:
        meta["cost"].flops = flops
    return node


def _slice_attr(gm: fx.GraphModule, ctx, weight: fx.Node, lo: int, hi: int, slices) -> fx.Node:
    name = f"ring_{str(weight.target).replace('.', '_')}_{lo}_{hi}"
    gm.register_buffer(name, fetch(gm, str(weight.target)).detach()[lo:hi], persistent=False)
    node = gm.graph.get_attr(name)
    with ctx.fake_mode:
        node.meta["val"] = weight.meta["val"][lo:hi]
    moesys_meta(node).update(layer=moesys_meta(weight).get("layer"), module=moesys_meta(weight).get("module"))
    moesys_meta(node)["cost"] = CostModel(gm, ctx.annotation).cost(node)
    slices[name] = (str(weight.target), lo, hi)
    return node


# torch.autocast: expert matmuls in the autocast dtype, the rest on their inputs as they come
follow_autocast("moesys_ring::expert_group_mlp", cast=True)
