"""Activation accounting of the ring: the device bytes a call's live activations take, from a
liveness walk over the graph with each node's annotated bytes (views share their base's bytes),
as sympy expressions in B and S evaluated at a call's batch and sequence length. Used by
``ring_partition`` (the workspace it reserves), ``ring_expert_groups`` and the ring program
(``peak_device_bytes``).
"""

from __future__ import annotations

from typing import Optional

import sympy
import torch
import torch.fx as fx

from ..frontend.annotation import B, S
from ..ir import moesys_meta, tensors_in


def activation_exprs(gm: fx.GraphModule, ctx) -> list:
    """Per node (graph order): bytes it allocates, as sympy expressions in B and S. Inputs count
    (they sit on the device). Views and weight reads allocate nothing (their bytes belong to
    their base), except views of state carried to another layer: the ring copies those out of
    the slot."""
    exprs = []
    for node in gm.graph.nodes:
        cost = moesys_meta(node).get("cost")
        own = cost.activation_bytes if cost is not None else 0
        if node.op == "placeholder" or (own == 0 and _is_state_view(node) and _used_outside_layer(node)):
            own = sum((_numel(ctx, t) * t.element_size() for t in tensors_in(node.meta.get("val"))), 0)
        exprs.append(own)
    return exprs


def _numel(ctx, t: torch.Tensor):
    total = 1
    for size in t.shape:
        total = total * ctx.annotation.expr(size)
    return total


def _is_state_view(node: fx.Node) -> bool:
    root = alias_root(node)
    return root is not node and root.op == "get_attr"


def _used_outside_layer(node: fx.Node) -> bool:
    layer = moesys_meta(node).get("layer")
    return any(moesys_meta(user).get("layer") != layer for user in node.users if user.op != "output")


def alias_root(node: fx.Node) -> fx.Node:
    """The node whose storage ``node`` views (itself unless it allocates nothing and reads a tensor)."""
    while node.op not in ("placeholder", "get_attr"):
        cost = moesys_meta(node).get("cost")
        if cost is None or cost.activation_bytes != 0:
            break
        sources = [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)
                   or isinstance(a.meta.get("val"), (tuple, list))]
        if not sources:
            break
        node = sources[0]
    return node


def liveness_plan(gm: fx.GraphModule) -> tuple[list[int], list[list[int]]]:
    """For each node index: its alias root's index, and the roots freed after it runs."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    roots = [index[alias_root(n)] for n in nodes]
    last_use = list(range(len(nodes)))
    for i, node in enumerate(nodes):
        for user in node.users:
            last_use[roots[i]] = max(last_use[roots[i]], index[user])
    frees: list[list[int]] = [[] for _ in nodes]
    for root in set(roots):
        frees[last_use[root]].append(root)
    return roots, frees


# CUDA's caching allocator hands out blocks in multiples of 512 bytes; counting every allocation
# that way keeps the estimate at or above what torch.cuda.max_memory_allocated reports.
ALLOCATION_GRANULE = 512


def _granule(nbytes: int) -> int:
    return -(-nbytes // ALLOCATION_GRANULE) * ALLOCATION_GRANULE


def peak_live_bytes(own_bytes: list[int], roots: list[int], frees: list[list[int]],
                    transient: Optional[dict[int, int]] = None) -> int:
    """Largest sum of live allocations while the graph runs in order (``transient``: extra bytes
    alive only while node i runs)."""
    live = peak = 0
    size = [0] * len(own_bytes)
    for i, nbytes in enumerate(own_bytes):
        nbytes = _granule(nbytes)
        size[roots[i]] += nbytes
        live += nbytes
        peak = max(peak, live + (transient or {}).get(i, 0))
        for root in frees[i]:
            live -= size[root]
            size[root] = 0
    return peak


def scratch_exprs(gm: fx.GraphModule) -> list:
    """Per node (graph order): bytes its kernel allocates besides its outputs while it runs
    (``meta["moesys"]["scratch_bytes"]``, sympy in B and S; 0 where not set)."""
    return [moesys_meta(node).get("scratch_bytes", 0) for node in gm.graph.nodes]


def evaluate_workspace(exprs: list, liveness: tuple, batch: int, seq: int,
                       transient: Optional[dict[int, int]] = None, scratch: Optional[list] = None) -> int:
    """Peak live activation bytes of the whole graph at (batch, seq); ``scratch`` (per node, as
    from ``scratch_exprs``) adds to ``transient``."""
    values = {B: batch, S: seq}
    own = [int(sympy.sympify(e).xreplace(values)) for e in exprs]
    extra = dict(transient or {})
    for i, e in enumerate(scratch or []):
        if e:
            extra[i] = extra.get(i, 0) + int(sympy.sympify(e).xreplace(values))
    return peak_live_bytes(own, *liveness, extra)


# ---------------------------------------------------------------------------------------------
# micro-batches: each section runs over the batch one slice at a time
# ---------------------------------------------------------------------------------------------


def carried_bytes(full_bytes: list[int], roots: list[int], frees: list[list[int]], section_of: list[int],
                  sections: int, slice_bytes: Optional[list[int]] = None, gathered: frozenset = frozenset()
                  ) -> list[int]:
    """Per section, and last the graph's outputs: bytes of the values held for the whole batch
    while the sections run in micro-batches — what earlier sections (or the graph inputs, section
    -1) produced and a later node still reads, and the section's own outputs, all slices of them.
    ``section_of`` per node; the output node's is ``sections``, so the graph's outputs stay.

    With ``slice_bytes`` (per node, at one slice's batch) a section's own outputs count, while it
    runs, as the slices before the last — the last one is among the section's temporaries
    (``slice_peaks``) — except the ``gathered`` roots (graph outputs copied into one whole tensor
    at the first slice, which that tensor holds from the start)."""
    root_bytes, root_slice = _root_bytes(full_bytes, roots), _root_bytes(slice_bytes or [], roots)
    freed_in = {root: section_of[i] for i, freed in enumerate(frees) for root in freed}
    change = [0] * (sections + 2)
    for root, nbytes in root_bytes.items():
        made, freed = section_of[root], min(freed_in.get(root, sections), sections)
        if nbytes and freed > made:          # read past the section that made it: held whole
            last_slice = root_slice.get(root, 0) if made >= 0 and root not in gathered else 0
            change[max(made, 0)] += nbytes - last_slice
            change[max(made, 0) + 1] += last_slice
            change[freed + 1] -= nbytes
    held, running = [], 0
    for k in range(sections + 1):
        running += change[k]
        held.append(running)
    return held


def _root_bytes(node_bytes: list[int], roots: list[int]) -> dict[int, int]:
    """Allocated bytes per alias root: its own and its views' (each rounded to the granule)."""
    total: dict[int, int] = {}
    for i, nbytes in enumerate(node_bytes):
        total[roots[i]] = total.get(roots[i], 0) + _granule(nbytes)
    return total


def slice_peaks(slice_bytes: list[int], roots: list[int], frees: list[list[int]], section_of: list[int],
                sections: int, transient: Optional[dict[int, int]] = None) -> list[int]:
    """Per section: the peak of its own temporaries while it runs one micro-batch (``slice_bytes``
    per node at the slice's batch; ``transient``: a kernel's scratch while node i runs). Values
    of earlier sections are ``carried_bytes``' and are not counted again."""
    peaks, live, size = [0] * sections, [0] * sections, [0] * len(slice_bytes)
    for i, nbytes in enumerate(slice_bytes):
        k = section_of[i]
        if not 0 <= k < sections:
            continue
        nbytes = _granule(nbytes)
        size[roots[i]] += nbytes
        live[k] += nbytes
        peaks[k] = max(peaks[k], live[k] + (transient or {}).get(i, 0))
        for root in frees[i]:
            if section_of[root] == k:
                live[k] -= size[root]
                size[root] = 0
    return peaks
