"""The torch path of the expert MLP ops (``experts.py``): ``experts_forward_torch`` and
``experts_backward_torch``, with the same contract as the Triton path (``grouped_mlp.py``).

Shape legend: T tokens · D model dim · F expert hidden · H up rows (2F gated, F otherwise) ·
E experts · K top-k · N = T*K rows (expert-sorted slots).

On CPU the GEMMs are torch.mm (oneDNN/MKL) per expert; what decides the rest is memory: a fresh
multi-MB tensor is page-faulted on first touch, which costs more than the elementwise work on
it. So rows go through in blocks of about two million activation elements (many small experts
share a block and its elementwise calls; GEMMs stay one per expert), every temporary lives in a
per-thread workspace reused across calls, and the ops write with ``out=``. The only fresh tensors
are the outputs (and h_NH, kept for backward). No scatter-add either: the K rows of a token are
gathered and summed in order (deterministic). A forward that keeps no h (inference) allocates its
temporaries per call instead: they are freed when it returns, which is what a budgeted ring counts.

Threads (``cpu_threads.py``): with n > 1 intra-op threads, n threads take runs of expert rows.

Expert biases (``b_up_EH``, ``b_down_ED``) go into the GEMMs (addmm); an activation outside
``BUFFERED_ACTIVATIONS`` (gpt-oss's clamped SwiGLU, relu², ...) runs as its reference function on each
block.
"""

import torch
from torch import Tensor

from moesys_compile.kernels import cpu_threads
from moesys_compile.kernels.permute import inverse_order
from moesys_compile.ops import TRITON_ACTIVATIONS, activation_backward, apply_activation, group_bounds, is_gated

_CHUNK_ELEMENTS = 1 << 21   # activation elements per block (rows x F): few calls, big GEMMs
_MIN_CHUNK_ROWS = 64
BUFFERED_ACTIVATIONS = TRITON_ACTIVATIONS   # written into the workspace buffers by hand (as Triton fuses them)
GATHER_ROWS = 4096          # rows gathered at a time when the K rows of every token are summed
PARTIAL_GRAD_BYTES = 64 << 20   # backward: weight-gradient buffers of experts split between threads, at most


def block_target(ffn: int) -> int:
    return max(_MIN_CHUNK_ROWS, min(4096, _CHUNK_ELEMENTS // max(ffn, 1)))


def _blocks(bounds: list[tuple[int, int, int]], ffn: int) -> list[list[tuple[int, int, int, bool]]]:
    """Row blocks for the elementwise work, each a list of (expert, start, end, first piece of the
    expert?) segments that get one GEMM each. Small experts are packed whole into a block of about
    ``_CHUNK_ELEMENTS / F`` rows (one activation call for many experts); an expert over twice that
    is cut into equal pieces (and its weight gradients accumulate over them)."""
    target = block_target(ffn)
    blocks, block, rows = [], [], 0
    for expert, start, end in bounds:
        pieces = -(-(end - start) // (2 * target))
        step = -(-(end - start) // pieces)
        for lo in range(start, end, step):
            hi = min(lo + step, end)
            if block and rows + hi - lo > target:
                blocks.append(block)
                block, rows = [], 0
            block.append((expert, lo, hi, lo == start))
            rows += hi - lo
    return blocks + [block] if block else blocks


# the GELU activations: aten's ``approximate`` argument for each
_GELU_APPROXIMATE = {"geglu": "none", "gelu": "none", "geglu_tanh": "tanh", "gelu_tanh": "tanh"}


def _scalar_act(x: Tensor, activation: str, out: Tensor) -> Tensor:
    if activation in ("swiglu", "silu"):
        return torch.ops.aten.silu.out(x, out=out)
    if activation in _GELU_APPROXIMATE:
        return torch.ops.aten.gelu.out(x, approximate=_GELU_APPROXIMATE[activation], out=out)
    return torch.clamp_min(x, 0, out=out)


def _scalar_act_backward(grad: Tensor, x: Tensor, activation: str, out: Tensor) -> Tensor:
    if activation in ("swiglu", "silu"):
        return torch.ops.aten.silu_backward.grad_input(grad, x, grad_input=out)
    if activation in _GELU_APPROXIMATE:
        return torch.ops.aten.gelu_backward.grad_input(grad, x, approximate=_GELU_APPROXIMATE[activation],
                                                       grad_input=out)
    return torch.ops.aten.threshold_backward.grad_input(grad, x, 0, grad_input=out)


def _project(rows: Tensor, weight: Tensor, bias_E, expert: int, out: Tensor) -> Tensor:
    """out = rows @ weight^T (+ the expert's bias row)."""
    if bias_E is None:
        return torch.mm(rows, weight.t(), out=out)
    return torch.addmm(bias_E[expert], rows, weight.t(), out=out)


def _act_into(h: Tensor, activation: str, act_gate: Tensor, a: Tensor) -> Tensor:
    """a = act(h) (gated: act(gate) * up, with act(gate) left in ``act_gate``)."""
    if activation not in BUFFERED_ACTIVATIONS:
        return a.copy_(apply_activation(h, activation))
    if not is_gated(activation):
        return _scalar_act(h, activation, a)
    ffn = h.shape[1] // 2
    _scalar_act(h[:, :ffn], activation, act_gate)
    return torch.mul(act_gate, h[:, ffn:], out=a)


def _act_in_place(h: Tensor, activation: str) -> Tensor:
    """act(h) written over h, for a forward that does not keep h (gated: over the gate half)."""
    if activation not in BUFFERED_ACTIVATIONS:
        return apply_activation(h, activation)
    if not is_gated(activation):
        return _scalar_act(h, activation, h)
    gate = h[:, :h.shape[1] // 2]
    return torch.mul(_scalar_act(gate, activation, gate), h[:, gate.shape[1]:], out=gate)


def _act_backward_into(h: Tensor, grad_a: Tensor, act_gate: Tensor, activation: str, tmp: Tensor,
                       grad_h: Tensor) -> Tensor:
    if activation not in BUFFERED_ACTIVATIONS:
        return grad_h.copy_(activation_backward(h, grad_a, activation))
    if not is_gated(activation):
        return _scalar_act_backward(grad_a, h, activation, grad_h)
    ffn = h.shape[1] // 2
    _scalar_act_backward(torch.mul(grad_a, h[:, ffn:], out=tmp), h[:, :ffn], activation, grad_h[:, :ffn])
    torch.mul(grad_a, act_gate, out=grad_h[:, ffn:])
    return grad_h


def _sum_slots(rows_ND: Tensor, slots_N: Tensor, weights_TK: Tensor, weighted: bool, keep: bool = True) -> Tensor:
    """out_TD[t] = sum over k of (weights[t, k] *) the row of slot t*K + k, gathered a token chunk
    at a time into a workspace buffer (no scatter-add: each token's K rows are summed in order)."""
    num_tokens, top_k = weights_TK.shape
    inv_N = inverse_order(slots_N)
    out = rows_ND.new_empty((num_tokens, rows_ND.shape[1]))
    buf, = cpu_threads.workspace([(max(top_k, min(slots_N.numel(), GATHER_ROWS)), rows_ND.shape[1])], rows_ND,
                                 keep=keep)
    step = max(1, buf.shape[0] // top_k)
    w_T1K = weights_TK.to(rows_ND.dtype).unsqueeze(1)
    for t0 in range(0, num_tokens, step):
        t1 = min(t0 + step, num_tokens)
        rows = torch.index_select(rows_ND, 0, inv_N[t0 * top_k:t1 * top_k], out=buf[:(t1 - t0) * top_k])
        rows = rows.view(t1 - t0, top_k, -1)
        if weighted:
            torch.bmm(w_T1K[t0:t1], rows, out=out[t0:t1].unsqueeze(1))
        else:
            torch.sum(rows, 1, out=out[t0:t1])
    return out


def _partial_grads(runs: list, grads: list[Tensor]) -> dict:
    """{(run index, expert): one buffer per tensor of ``grads`` (the [E, ...] gradients of the
    weights and biases)} for the runs that hold a later piece of an expert split between runs: the
    run with its first piece writes the expert's gradient, the others write their own buffers,
    added in after all runs (no two threads write one tensor)."""
    seen, partials = set(), {}
    for index, run in enumerate(runs):
        for expert, _, _ in run:
            if expert in seen:
                partials[(index, expert)] = tuple(torch.empty_like(g[expert]) for g in grads)
            seen.add(expert)
    return partials


def _block_rows(blocks: list) -> int:
    return max((block[-1][2] - block[0][1] for block in blocks), default=1)


def experts_forward_torch(x: Tensor, counts_E: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor, activation: str,
                          slots_N=None, weights_TK=None, save_h: bool = True, b_up_EH=None, b_down_ED=None):
    """Same contract as ``experts_forward_triton``. With ``slots_N`` each block's token rows are
    gathered into the workspace, its output rows weighted in place, and the K rows of every token
    summed at the end."""
    fused = slots_N is not None
    bounds = group_bounds(counts_E)
    kept = bounds[-1][2] if bounds else 0
    num_rows = slots_N.numel() if fused else x.shape[0]
    rows_h, dim, ffn = w_up_EHD.shape[1], x.shape[1], w_down_EDF.shape[2]
    h_NH = x.new_empty((num_rows if save_h else 0, rows_h))
    if fused:
        y_rows, = cpu_threads.workspace([(num_rows, dim)], x, "rows", keep=save_h)
        tokens_N = slots_N // weights_TK.shape[1]
    else:
        y_rows = x.new_empty((num_rows, dim))
    y_rows[kept:] = 0  # rows of dropped slots

    def work(run):
        blocks = _blocks(run, ffn)
        rows = _block_rows(blocks)
        act_rows = rows if save_h else 0     # without a saved h the activation overwrites h_buf
        x_buf, h_buf, gate_buf, a_buf = cpu_threads.workspace(
            [(rows if fused else 0, dim), (0 if save_h else rows, rows_h), (act_rows, ffn), (act_rows, ffn)], x,
            keep=save_h)
        for block in blocks:
            b0, b1 = block[0][1], block[-1][2]
            x_b = torch.index_select(x, 0, tokens_N[b0:b1], out=x_buf[:b1 - b0]) if fused else x[b0:b1]
            h_b = h_NH[b0:b1] if save_h else h_buf[:b1 - b0]
            for expert, start, end, _ in block:
                _project(x_b[start - b0:end - b0], w_up_EHD[expert], b_up_EH, expert, h_b[start - b0:end - b0])
            if save_h:
                a_b = _act_into(h_b, activation, gate_buf[:b1 - b0], a_buf[:b1 - b0])
            else:
                a_b = _act_in_place(h_b, activation)
            for expert, start, end, _ in block:
                _project(a_b[start - b0:end - b0], w_down_EDF[expert], b_down_ED, expert, y_rows[start:end])

    cpu_threads.over_runs(work, cpu_threads.expert_runs(bounds, torch.get_num_threads()))
    if fused:  # the top-k weights are applied in the combine
        return _sum_slots(y_rows, slots_N, weights_TK, weighted=True, keep=save_h), h_NH
    return y_rows, h_NH


def experts_backward_torch(grad_out: Tensor, x: Tensor, counts_E: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor,
                           h_NH: Tensor, activation: str, slots_N=None, weights_TK=None, need_grad_x: bool = True,
                           b_up_EH=None, b_down_ED=None):
    """Gradients of ``experts_forward_torch``: (grad_x, grad_w_up, grad_w_down, grad_weights_TK or
    None, grad_b_up or None, grad_b_down or None). ``need_grad_x=False`` (the rows' source needs no
    gradient, e.g. the first layer's input) skips the grad_h @ W_up GEMMs and returns None for grad_x."""
    fused = slots_N is not None
    bounds = group_bounds(counts_E)
    kept = bounds[-1][2] if bounds else 0
    num_rows = slots_N.numel() if fused else x.shape[0]
    rows_h, dim, ffn = w_up_EHD.shape[1], x.shape[1], w_down_EDF.shape[2]
    saved = h_NH.shape[0] == num_rows
    # [E, ...] gradients written per expert: the weights', then the biases' the experts have
    grad_w_up, grad_w_down = torch.empty_like(w_up_EHD), torch.empty_like(w_down_EDF)
    grad_b_up = None if b_up_EH is None else torch.empty_like(b_up_EH)
    grad_b_down = None if b_down_ED is None else torch.empty_like(b_down_ED)
    expert_grads = [g for g in (grad_w_up, grad_w_down, grad_b_up, grad_b_down) if g is not None]
    idle = sorted(set(range(counts_E.numel())) - {expert for expert, _, _ in bounds})
    for grad in expert_grads:
        grad[idle] = 0    # experts without rows get zero gradients
    gx_rows = None
    if fused:
        tokens_N = slots_N // weights_TK.shape[1]
        scale_N1 = weights_TK.reshape(-1)[slots_N].to(x.dtype)[:, None]
        # fp32 sums for bf16/fp16 rows; fp64 rows keep fp64 (an fp32 sum would cap gradcheck at ~1e-7)
        grad_w_N = torch.zeros(num_rows, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        if need_grad_x:
            gx_rows, = cpu_threads.workspace([(num_rows, dim)], x, "rows")
    elif need_grad_x:
        gx_rows = x.new_empty((num_rows, dim))
    if need_grad_x:
        gx_rows[kept:] = 0

    runs = cpu_threads.expert_runs(bounds, torch.get_num_threads(),
                                   max_splits=PARTIAL_GRAD_BYTES // sum(g[0].nbytes for g in expert_grads))
    partials = _partial_grads(runs, expert_grads)

    def work(index_and_run):
        index, run = index_and_run
        blocks = _blocks(run, ffn)
        rows = _block_rows(blocks)
        g_rows = rows if fused else 0
        x_buf, g_buf, h_buf, gate_buf, a_buf, ga_buf, tmp_buf, gh_buf = cpu_threads.workspace(
            [(g_rows, dim), (g_rows, dim), (0 if saved else rows, rows_h), (rows, ffn), (rows, ffn),
             (rows, ffn), (rows, ffn), (rows, rows_h)], x)
        for block in blocks:
            b0, b1 = block[0][1], block[-1][2]
            n = b1 - b0
            if fused:
                x_b = torch.index_select(x, 0, tokens_N[b0:b1], out=x_buf[:n])
                g_b = torch.index_select(grad_out, 0, tokens_N[b0:b1], out=g_buf[:n])
            else:
                x_b, g_b = x[b0:b1], grad_out[b0:b1]
            segments = [(expert, slice(start - b0, end - b0), first) for expert, start, end, first in block]
            if saved:
                h_b = h_NH[b0:b1]
            else:
                h_b = h_buf[:n]
                for expert, rs, _ in segments:
                    _project(x_b[rs], w_up_EHD[expert], b_up_EH, expert, h_b[rs])
            a_b = _act_into(h_b, activation, gate_buf[:n], a_buf[:n])
            grad_a = ga_buf[:n]
            for expert, rs, _ in segments:
                torch.mm(g_b[rs], w_down_EDF[expert], out=grad_a[rs])
            g_weighted = not fused   # g_b holds the weighted output gradient (what the down bias gets)
            if fused:  # d/d weight = <grad_y @ W_down, a> (+ <grad_y, b_down>); then grad_a and (grad_y or a)
                torch.sum(torch.mul(grad_a, a_b, out=tmp_buf[:n]), 1, dtype=grad_w_N.dtype, out=grad_w_N[b0:b1])
                if b_down_ED is not None:
                    for expert, rs, _ in segments:
                        grad_w_N[b0 + rs.start:b0 + rs.stop] += (g_b[rs] @ b_down_ED[expert]).to(grad_w_N.dtype)
                grad_a.mul_(scale_N1[b0:b1])
                (g_b if dim < ffn else a_b).mul_(scale_N1[b0:b1])  # the smaller one, for grad w_down
                g_weighted = dim < ffn
            grad_h = _act_backward_into(h_b, grad_a, gate_buf[:n], activation, tmp_buf[:n], gh_buf[:n])
            for expert, rs, first in segments:
                gw_up, gw_down, *gb = partials.get((index, expert), tuple(g[expert] for g in expert_grads))
                bias_rows = []
                if b_up_EH is not None:
                    bias_rows.append(grad_h[rs].sum(0))
                if b_down_ED is not None:
                    bias_rows.append(g_b[rs].sum(0) if g_weighted else g_b[rs].t() @ scale_N1[b0:b1][rs, 0])
                if first:
                    torch.mm(g_b[rs].t(), a_b[rs], out=gw_down)
                    torch.mm(grad_h[rs].t(), x_b[rs], out=gw_up)
                    for target, value in zip(gb, bias_rows):
                        target.copy_(value)
                else:  # a later piece of an expert cut in several
                    gw_down.addmm_(g_b[rs].t(), a_b[rs])
                    gw_up.addmm_(grad_h[rs].t(), x_b[rs])
                    for target, value in zip(gb, bias_rows):
                        target.add_(value)
                if need_grad_x:
                    torch.mm(grad_h[rs], w_up_EHD[expert], out=gx_rows[b0 + rs.start:b0 + rs.stop])

    cpu_threads.over_runs(work, list(enumerate(runs)))
    for (_, expert), buffers in sorted(partials.items()):   # in run order: deterministic sums
        for grad, buffer in zip(expert_grads, buffers):
            grad[expert] += buffer
    if not fused:
        return gx_rows, grad_w_up, grad_w_down, None, grad_b_up, grad_b_down
    grad_x = _sum_slots(gx_rows, slots_N, weights_TK, weighted=False) if need_grad_x else None
    grad_weights_N = torch.empty_like(grad_w_N)
    grad_weights_N[slots_N] = grad_w_N
    return (grad_x, grad_w_up, grad_w_down, grad_weights_N.view(weights_TK.shape).to(weights_TK.dtype), grad_b_up,
            grad_b_down)
