"""lower_kernels: pick the implementation of every MoE op for the plan's device, and fuse adjacent
MoE ops into one kernel where one exists."""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.utils._pytree import tree_leaves

from moesys_compile import ops
from moesys_compile.errors import warn_user
from moesys_compile.frontend.annotation import CostModel, bound_unbacked_sizes
from moesys_compile.ir import bound_args, expert_biases, infer_val, is_op
from moesys_compile.passes.decompose_moe import effective_capacity_factor


def lower_kernels(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    """Rewrite canonical MoE ops into ``torch.ops.moesys_kernels.*`` with an explicit implementation.

    **Contract**

    - Reads: calls to ``torch.ops.moesys.{route, permute, grouped_mlp, unpermute, moe_experts,
      load_balancing_loss}`` and ``torch.ops.moesys_ring.expert_group_mlp``, the ``meta["val"]`` of
      their inputs, and from the plan ``kernels`` ("auto" | "triton" | "torch"; default "auto"),
      ``device`` (default "cpu") and ``mode`` ("infer" does not keep the up projection for a
      backward pass).
    - Writes: each such call becomes a ``moesys_kernels`` op (an expert group stays itself, with
      the experts kernel inside) whose ``impl`` argument is "triton" or "torch" (never "auto": the
      graph says what runs) and whose ``meta["moesys"]["lowered_to"]``
      is "<impl>:<kernel>", e.g. "triton:moe_fused_swiglu", "torch:grouped_mlp". New nodes get
      ``meta["val"]`` by fake propagation and the ``layer``/``cost`` of the nodes they replace (a
      fused node the activation bytes of its outputs, and ``meta["moesys"]["scratch_bytes"]``: what
      its kernel allocates besides them). Positional keys (``section``, ``slot``: where a node sits
      in a partitioned graph) come from the node a new node is inserted before, so sections stay
      contiguous in graph order; a fusion whose weights would leave their section is not made
      (its ops are lowered one by one). Falling back to torch (no Triton, a device Triton cannot
      run on, an fp64 tensor, experts with biases or an activation outside
      ``ops.TRITON_ACTIVATIONS``) is noted with its reason via ``ctx.note``; where the plan asked
      for ``kernels="triton"`` and Triton cannot run on its device at all, it is also warned about
      once per process (a user who never runs ``inspect`` would not see the note). Expert biases
      pass through to the lowered op. An experts call with the experts' dropout mask (``keep_NF``,
      training mode) stays the canonical op, which applies it (noted: the kernels take no mask).
    - Keeps: graph outputs and numerics (same functions, forward and backward); the aux loss;
      every node not named above. Running the pass twice changes nothing the second time.

    "auto" means Triton on CUDA when Triton is importable, torch otherwise; "triton" also runs
    Triton on CPU tensors when ``TRITON_INTERPRET=1`` (that is how the tests exercise it).

    **Pseudo-code**

        impl = choose(plan.kernels, plan.device)             # per node: fp64 -> "torch"
        for rule in RULES:                                   # fusions before single-op lowerings
            for node in graph.nodes: rule(node)              # rewrites, or None for no match
        RULES:
          unpermute(grouped_mlp(permute(x, ids, E, cap)[0], permute[1], w_up, w_down, act), permute[2], w)
              (x_ND and y_ND used nowhere else; grouped_mlp and unpermute in one section)
            -> counts, order = sort_slots(ids, E, cap); y = fused_experts(x, order, counts, w, w_up, w_down, act)[0]
          moe_experts(x, ids, w, w_up, w_down, act, cf) -> sort_slots(ids, E, -1, cf); fused_experts(...)[0]
          route(logits, ...)               -> route_topk(logits, ...)     (+ counts_E, score_sum_E)
          load_balancing_loss(route[2], route[1], coef)
                                           -> balance_loss(route_topk[3], route_topk[4], route[1], coef)
          permute | grouped_mlp | unpermute -> the moesys_kernels op of the same name
          moesys_ring.expert_group_mlp(..., impl)  -> the same node with impl, label and scratch_bytes
    """
    from moesys_compile import kernels  # imported on first use: it imports Triton (slow) if present

    plan = getattr(ctx, "plan", None)
    lowering = _Lowering(gm, ctx, kernels,
                         choice=getattr(plan, "kernels", "auto") or "auto",
                         device=getattr(plan, "device", "cpu") or "cpu",
                         save_h=getattr(plan, "mode", "train") != "infer")
    for rule in RULES:
        for node in list(gm.graph.nodes):
            if not node._erased and node.op == "call_function":  # skip nodes a rule already erased
                rule(node, lowering)
    gm.recompile()
    return gm


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


# Keys that say where a node sits in a partitioned graph (ring_partition, schedule_prefetch): a new
# node takes them from its position, not from the node it replaces.
POSITIONAL_KEYS = ("section", "slot")


def same_section(*nodes: fx.Node) -> bool:
    """The nodes lie in one ring section (always true in a graph that was not partitioned)."""
    return len({n.meta.get("moesys", {}).get("section") for n in nodes}) == 1


def _getitem_of(node: Any, index: int, parent: Optional[fx.Node] = None) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem
            and node.args[1] == index and (parent is None or node.args[0] is parent))


class _Lowering:
    """State shared by the rules: the implementation choice and how to create nodes."""

    def __init__(self, gm: fx.GraphModule, ctx, kernels, choice: str, device: str, save_h: bool):
        if choice not in ("auto", "triton", "torch"):
            raise ValueError(f"plan.kernels ({choice!r}) must be 'auto', 'triton' or 'torch'")
        self.gm, self.ctx, self.save_h = gm, ctx, save_h
        self.ops = torch.ops.moesys_kernels
        self.triton_dtypes = kernels.TRITON_DTYPES
        self.notes: set[str] = set()
        reason = kernels.triton_unavailable(device)
        if choice == "torch":
            self.impl = "torch"
        elif choice == "auto":
            self.impl = "triton" if reason is None and torch.device(device).type == "cuda" else "torch"
            if reason is not None and torch.device(device).type == "cuda":
                self.note(f"kernels: auto on {device}: {reason}; using the torch kernels")
        else:
            self.impl = "triton" if reason is None else "torch"
            if reason is not None:
                self.note(f"kernels: triton requested but {reason}; using the torch kernels")
                _warn_once(f"Plan(kernels='triton') on device {device!r}: {reason}, so the torch kernels run "
                           f"instead; set kernels='auto' (Triton where it can run) or 'torch' to choose them")

    def note(self, message: str) -> None:
        if message in self.notes:
            return
        self.notes.add(message)
        if hasattr(self.ctx, "note"):
            self.ctx.note(message)

    def impl_for(self, *tensor_nodes: Any) -> str:
        """The plan's implementation, or torch for a dtype the Triton kernels do not take."""
        if self.impl == "triton":
            for node in tensor_nodes:
                value = node.meta.get("val") if isinstance(node, fx.Node) else None
                if isinstance(value, torch.Tensor) and value.dtype not in self.triton_dtypes:
                    self.note(f"{node.name} is {value.dtype}; the Triton kernels take fp32/bf16/fp16, using torch")
                    return "torch"
        return self.impl

    def _fake_mode(self, args: tuple):
        vals = [n.meta["val"] for n in _nodes_in(args) if n.meta.get("val") is not None]
        return torch._guards.detect_fake_mode(vals) or getattr(self.ctx, "fake_mode", None)

    def call(self, target: Callable, args: tuple, like: list[fx.Node], lowered_to: Optional[str] = None,
             cost_from: Optional[list[fx.Node]] = None) -> fx.Node:
        """Insert ``target(*args)`` at the current insertion point with val and moesys meta."""
        node = self.gm.graph.call_function(target, args)
        base = dict(like[0].meta.get("moesys", {})) if like else {}
        costs = [n.meta.get("moesys", {}).get("cost") for n in (like if cost_from is None else cost_from)]
        if costs and all(c is not None for c in costs):
            base["cost"] = functools.reduce(operator.add, costs)
        elif "cost" in base:  # nothing to inherit (a getitem, a new helper node): zero cost
            base["cost"] = type(base["cost"])()
        base.pop("lowered_to", None)
        if lowered_to:
            base["lowered_to"] = lowered_to
        at = node.next.meta.get("moesys", {})  # the node it was inserted before
        for key in POSITIONAL_KEYS:
            base.pop(key, None)
            if key in at:
                base[key] = at[key]
        node.meta["moesys"] = base
        for key in ("nn_module_stack", "stack_trace"):
            if like and key in like[0].meta:
                node.meta[key] = like[0].meta[key]
        self._set_val(node)
        return node

    def charge_outputs_only(self, node: fx.Node) -> None:
        """Make ``node``'s activation bytes those of its own outputs: it inherited the cost of ops
        whose intermediates the fused kernel never keeps (the ring sizes its workspace from these)."""
        cost, annotation = node.meta.get("moesys", {}).get("cost"), getattr(self.ctx, "annotation", None)
        if cost is not None and annotation is not None and "val" in node.meta:
            _bound_new_sizes(self.gm, annotation, node)
            outputs = CostModel(self.gm, annotation).out_bytes(node)
            node.meta["moesys"]["cost"] = dataclasses.replace(cost, activation_bytes=outputs)

    def charge_expert_kernel(self, node: fx.Node) -> None:
        """A lowered grouped_mlp / fused_experts: activation bytes of its outputs, and
        ``meta["moesys"]["scratch_bytes"]``, what its kernel allocates besides them."""
        self.charge_outputs_only(node)
        annotation = getattr(self.ctx, "annotation", None)
        if annotation is not None and all("val" in n.meta for n in _nodes_in(node.args)):
            node.meta["moesys"]["scratch_bytes"] = expert_scratch(node, annotation)

    def experts_impl(self, node: fx.Node, args: dict[str, Any], *tensor_nodes: Any) -> str:
        """``impl_for`` the experts node's tensors, and torch where the Triton kernels do not
        implement the experts: expert biases, an activation outside ``ops.TRITON_ACTIVATIONS``."""
        impl = self.impl_for(*tensor_nodes)
        biased = bool(expert_biases(args))
        if impl == "triton" and (biased or not ops.has_triton_kernel(args["activation"])):
            why = "expert biases" if biased else f"activation {args['activation']!r}"
            self.note(f"{node.meta.get('moesys', {}).get('module') or node.name}: the Triton kernels take no "
                      f"{why}; the torch experts kernel runs these experts")
            return "torch"
        return impl

    def getitem(self, parent: fx.Node, index: int) -> fx.Node:
        return self.call(operator.getitem, (parent, index), [parent], cost_from=[])

    def _set_val(self, node: fx.Node) -> None:
        inputs = list(_nodes_in(node.args))
        if any("val" not in n.meta for n in inputs):
            return  # an unannotated graph (e.g. a bare symbolic trace): nothing to propagate
        if node.target is operator.getitem:
            node.meta["val"] = node.args[0].meta["val"][node.args[1]]
            return
        mode = self._fake_mode(node.args)
        if mode is not None:
            infer_val(node, mode)

    def erase(self, *nodes: fx.Node) -> None:
        for node in nodes:
            if not node._erased and not node.users:
                self.gm.graph.erase_node(node)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """A warning shown once per process (a plan is lowered again for every ring it builds)."""
    if message not in _WARNED:
        _WARNED.add(message)
        warn_user(message)


def _bound_new_sizes(gm: fx.GraphModule, annotation, node: fx.Node) -> None:
    """Give every data-dependent size in ``node``'s value a bound in B and S before it is charged:
    rows after an expert-parallel dispatch (``u0``) come from fake values propagated after
    annotate(), which bounded only the sizes of the traced graph (``Cost.evaluate`` cannot turn an
    unbounded ``u0`` into bytes)."""
    sizes = [v for v in tree_leaves(node.meta.get("val")) if isinstance(v, (torch.Tensor, torch.SymInt))]
    if free_unbacked_symbols(sizes) - set(annotation.unbacked_bounds):
        bound_unbacked_sizes(gm, annotation)


def _nodes_in(args: Any):
    found: list[fx.Node] = []
    fx.node.map_arg(args, found.append)
    return found


def _suffix(impl: str, name: str, activation: str) -> str:
    """Triton kernels are specialised per activation (it is fused in), the torch path is one."""
    return f"triton:{name}_{activation}" if impl == "triton" else f"torch:{name}"


# ---------------------------------------------------------------------------------------------
# rules: each takes (node, lowering) and returns the replacement node, or None for no match
# ---------------------------------------------------------------------------------------------


def fuse_dispatch_experts_combine(node: fx.Node, lw: _Lowering) -> Optional[fx.Node]:
    if not is_op(node, "unpermute"):
        return None
    combine = bound_args(node)
    experts = combine["y_ND"]
    if not (is_op(experts, "grouped_mlp") and len(experts.users) == 1):
        return None
    mlp = bound_args(experts)
    if mlp.get("keep_NF") is not None:
        return None   # lower_single notes why it stays
    x_sorted = mlp["x_ND"]
    if not (_getitem_of(x_sorted, 0) and is_op(x_sorted.args[0], "permute") and len(x_sorted.users) == 1):
        return None
    dispatch = x_sorted.args[0]
    if not (_getitem_of(mlp["counts_E"], 1, dispatch) and _getitem_of(combine["order_N"], 2, dispatch)):
        return None
    if not same_section(experts, node):
        return None  # the fused node goes before the combine: the expert weights would change section
    if any(user is not x_sorted and not (_getitem_of(user, 1) or _getitem_of(user, 2)) for user in dispatch.users):
        return None  # x_ND is read elsewhere too: the rows must be materialised
    perm = bound_args(dispatch)
    impl = lw.experts_impl(experts, mlp, perm["x_TD"], mlp["w_up_EHD"])
    graph = lw.gm.graph
    with graph.inserting_before(dispatch):
        sort = lw.call(lw.ops.sort_slots.default, (perm["ids_TK"], perm["num_experts"], perm["capacity"], 0.0, impl),
                       [dispatch], f"{impl}:sort_slots")
        lw.charge_outputs_only(sort)   # x_ND is never materialised: the sort holds counts and order only
        counts, order = lw.getitem(sort, 0), lw.getitem(sort, 1)
    with graph.inserting_before(node):
        fused = lw.call(lw.ops.fused_experts.default,
                        (perm["x_TD"], order, counts, combine["weights_TK"], mlp["w_up_EHD"], mlp["w_down_EDF"],
                         mlp["activation"], lw.save_h, impl, *expert_biases(mlp)),
                        [experts], _suffix(impl, "moe_fused", mlp["activation"]), cost_from=[experts, node])
        lw.charge_expert_kernel(fused)   # y_ND lives inside the kernel only
        y = lw.getitem(fused, 0)
    node.replace_all_uses_with(y)
    lw.erase(node, experts, x_sorted)
    for user in list(dispatch.users):  # other readers of counts / order now read the sort
        user.replace_all_uses_with(counts if user.args[1] == 1 else order)
        lw.erase(user)
    lw.erase(dispatch)
    return y


def lower_moe_experts(node: fx.Node, lw: _Lowering) -> Optional[fx.Node]:
    if not is_op(node, "moe_experts"):
        return None
    args = bound_args(node)
    if _keeps_dropout(node, args, lw):
        return None
    w_up = args["w_up_EHD"].meta.get("val") if isinstance(args["w_up_EHD"], fx.Node) else None
    if w_up is None:
        lw.note(f"{node.name}: w_up_EHD has no meta['val'] (unknown expert count); left as it is")
        return None
    impl = lw.experts_impl(node, args, args["x_TD"], args["w_up_EHD"])
    factor = float(args["capacity_factor"] or 0.0)
    if getattr(getattr(lw.ctx, "plan", None), "capacity_factor", None) is not None:
        factor = effective_capacity_factor(lw.ctx, node)  # the plan overrides the layer, as in decompose_moe
    with lw.gm.graph.inserting_before(node):
        sort = lw.call(lw.ops.sort_slots.default, (args["ids_TK"], int(w_up.shape[0]), -1, factor, impl),
                       [node], f"{impl}:sort_slots", cost_from=[])
        counts, order = lw.getitem(sort, 0), lw.getitem(sort, 1)
        fused = lw.call(lw.ops.fused_experts.default,
                        (args["x_TD"], order, counts, args["weights_TK"], args["w_up_EHD"], args["w_down_EDF"],
                         args["activation"], lw.save_h, impl, *expert_biases(args)),
                        [node], _suffix(impl, "moe_fused", args["activation"]))
        lw.charge_expert_kernel(fused)
        y = lw.getitem(fused, 0)
    node.replace_all_uses_with(y)
    lw.erase(node)
    return y


def _keeps_dropout(node: fx.Node, args: dict[str, Any], lw: _Lowering) -> bool:
    """An experts call with the experts' dropout mask (``keep_NF``, training mode) stays the
    canonical op, which applies it: the kernels take none (noted)."""
    if args.get("keep_NF") is None:
        return False
    lw.note(f"{node.meta.get('moesys', {}).get('module') or node.name}: dropout between the experts' projections "
            f"(keep_NF) is applied by {node.target}, which runs these experts; the kernels take no mask")
    return True


def lower_route(node: fx.Node, lw: _Lowering) -> Optional[fx.Node]:
    if not is_op(node, "route"):
        return None
    a = bound_args(node)
    impl = lw.impl_for(a["logits_TE"])
    name = f"route_{a['score_func']}" + ("_grouped" if a["n_groups"] > 1 else "")
    with lw.gm.graph.inserting_before(node):
        new = lw.call(lw.ops.route_topk.default,
                      (a["logits_TE"], a["top_k"], a["score_func"], a["renormalize"], a["bias_E"], a["n_groups"],
                       a["topk_groups"], a["routed_scaling"], impl),
                      [node], f"triton:{name}" if impl == "triton" else "torch:route")
    node.replace_all_uses_with(new)  # readers are getitem 0..2: same positions in the wider tuple
    lw.erase(node)
    return new


def fuse_balance_loss(node: fx.Node, lw: _Lowering) -> Optional[fx.Node]:
    if not is_op(node, "load_balancing_loss"):
        return None
    a = bound_args(node)
    scores, ids = a["scores_TE"], a["ids_TK"]
    if not (_getitem_of(scores, 2) and _getitem_of(ids, 1, scores.args[0])
            and is_op(scores.args[0], "route_topk", namespace="moesys_kernels")):
        return None
    routing = scores.args[0]
    with lw.gm.graph.inserting_before(node):
        counts, sums = lw.getitem(routing, 3), lw.getitem(routing, 4)
        loss = lw.call(lw.ops.balance_loss.default, (counts, sums, ids, a["coef"]), [node], "torch:balance_loss")
    node.replace_all_uses_with(loss)
    lw.erase(node)
    if not scores.users:  # the loss was the only reader of the T x E scores
        lw.erase(scores)
    return loss


def lower_single(node: fx.Node, lw: _Lowering) -> Optional[fx.Node]:
    if is_op(node, "permute"):
        a = bound_args(node)
        impl = lw.impl_for(a["x_TD"])
        target, args, name = lw.ops.permute.default, (a["x_TD"], a["ids_TK"], a["num_experts"], a["capacity"],
                                                       impl), f"{impl}:permute"
    elif is_op(node, "unpermute"):
        a = bound_args(node)
        impl = lw.impl_for(a["y_ND"])
        target, args, name = lw.ops.unpermute.default, (a["y_ND"], a["order_N"], a["weights_TK"], impl), \
            f"{impl}:unpermute"
    elif is_op(node, "grouped_mlp"):
        a = bound_args(node)
        if _keeps_dropout(node, a, lw):
            return None
        impl = lw.experts_impl(node, a, a["x_ND"], a["w_up_EHD"])
        target, args, name = lw.ops.grouped_mlp.default, (a["x_ND"], a["counts_E"], a["w_up_EHD"], a["w_down_EDF"],
                                                           a["activation"], lw.save_h, impl, *expert_biases(a)), \
            _suffix(impl, "grouped_mlp", a["activation"])
    else:
        return None
    with lw.gm.graph.inserting_before(node):
        new = lw.call(target, args, [node], name)
        if target is lw.ops.grouped_mlp.default:
            lw.charge_expert_kernel(new)
        out = lw.getitem(new, 0) if target is lw.ops.grouped_mlp.default else new  # (y_ND, h_NH)
    node.replace_all_uses_with(out)
    lw.erase(node)
    return out


def expert_scratch(node: fx.Node, annotation) -> Any:
    """The scratch bytes (sympy in B, S) of the expert kernel ``node`` runs: a lowered
    ``grouped_mlp`` / ``fused_experts`` (its own implementation), or a canonical ``grouped_mlp`` /
    ``moe_experts`` (the larger of the fused kernels this pass can make of it); 0 for other nodes.
    The torch path's share is for this thread's intra-op threads now."""
    from moesys_compile.kernels.experts import forward_scratch_bytes
    lowered = is_op(node, "grouped_mlp", "fused_experts", namespace="moesys_kernels")
    if not (lowered or is_op(node, "grouped_mlp", "moe_experts")):
        return 0
    args = bound_args(node)
    rows_arg = "x_ND" if "x_ND" in args else "order_N" if "order_N" in args else "ids_TK"
    rows_val, w_up, w_down = (args[name].meta.get("val") if isinstance(args[name], fx.Node) else None
                              for name in (rows_arg, "w_up_EHD", "w_down_EDF"))
    if not all(isinstance(v, torch.Tensor) for v in (rows_val, w_up, w_down)):
        return 0   # shapes unknown (an unannotated graph): nothing to charge
    if rows_arg == "x_ND":
        rows = annotation.expr(rows_val.shape[0])
    else:   # N = T*K slots: the sort order, or the routed ids
        rows = functools.reduce(operator.mul, (annotation.expr(size) for size in rows_val.shape), 1)
    fused = not is_op(node, "grouped_mlp", namespace="moesys_kernels")
    return forward_scratch_bytes(rows, w_up.shape[2], w_down.shape[2], w_up.shape[1], w_up.element_size(), fused,
                                 save_h=bool(args.get("save_h", False)), impl=args.get("impl", "any") if lowered
                                 else "any", threads=torch.get_num_threads(), activation=args["activation"])


def lower_expert_group(node: fx.Node, lw: _Lowering) -> Optional[fx.Node]:
    """An expert group of the ring (``moesys_ring.expert_group_mlp``) runs the experts kernel on its
    rows: the node gets the implementation, its label and the kernel's scratch, in place."""
    if not is_op(node, "expert_group_mlp", namespace="moesys_ring"):
        return None
    from moesys_compile.passes.ring_expert_groups import group_scratch_bytes
    a = bound_args(node)
    impl = lw.experts_impl(node, a, a["x_ND"], a["w_up_GHD"])
    node.args = (a["x_ND"], a["counts_E"], a["w_up_GHD"], a["w_down_GDF"], a["first_expert"], a["activation"], impl,
                 *expert_biases(a))
    node.kwargs = {}
    meta = node.meta.setdefault("moesys", {})
    meta["lowered_to"] = _suffix(impl, "expert_group_mlp", a["activation"])
    values = [a[name].meta.get("val") if isinstance(a[name], fx.Node) else None
              for name in ("x_ND", "w_up_GHD", "w_down_GDF")]
    annotation = getattr(lw.ctx, "annotation", None)
    if annotation is not None and all(isinstance(v, torch.Tensor) for v in values):
        meta["scratch_bytes"] = group_scratch_bytes(annotation.expr(values[0].shape[0]), values[1], values[2], impl,
                                                    torch.get_num_threads(), a["activation"])
    return node


RULES: list[Callable[[fx.Node, _Lowering], Optional[fx.Node]]] = [
    fuse_dispatch_experts_combine, lower_moe_experts, lower_route, fuse_balance_loss, lower_single,
    lower_expert_group,
]
