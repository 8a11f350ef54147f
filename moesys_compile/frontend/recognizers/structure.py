"""Structural analysis of MoE blocks we did not write: which child routes, which holds the expert
weights and in what layout, which activation the experts use. Facts are read from shapes and then
checked by running the module on a few random tokens (a *probe*), so a family nobody listed is
recognised when it computes what we think it computes, and left alone when it does not.

Shape legend: T tokens · D model dim · F expert hidden · H up rows (2F gated) · E experts · K top-k.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from ... import ops

ROUTER_NAMES = ("gate", "router", "wg", "gating", "switch")
SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp", "shared")
SHARED_GATE_NAMES = ("shared_expert_gate", "shared_gate")
GROUP_ATTRS = (("n_group", "num_group", "n_groups", "num_groups"), ("topk_group", "topk_groups"))
SCALING_ATTRS = ("routed_scaling_factor", "routed_scaling", "scaling_factor")
PROBE_SEED = 1234


_LEFT: dict[str, tuple[str, str]] = {}   # path -> (kind, reason) of blocks seen and not canonicalized


def leave(path: str, kind: str, reason: str) -> None:
    """Record why the block at ``path`` stays as it is (for its BlockReport); recognizers then return
    this None, meaning "no recognition"."""
    _LEFT[path] = (kind, reason)


def take_left() -> dict[str, tuple[str, str]]:
    taken = dict(_LEFT)
    _LEFT.clear()
    return taken


def generator() -> torch.Generator:
    """Probes use their own generator: recognising a model must not move the user's RNG."""
    return torch.Generator().manual_seed(PROBE_SEED)


def first_param(module: nn.Module) -> Optional[Tensor]:
    return next(iter(module.parameters()), None)


def on_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


def fetch(module: nn.Module, dotted: str) -> Any:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def close(a: Tensor, b: Tensor) -> tuple[bool, float]:
    """Equal up to the rounding of the dtype (the probe's verdict) and the max abs difference."""
    if a.shape != b.shape:
        return False, float("inf")
    tol = max({torch.float64: 1e-9, torch.float32: 2e-5}.get(t.dtype, 2e-2) for t in (a, b))
    a, b = a.detach().double(), b.detach().double()
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    scale = max(b.abs().max().item() if b.numel() else 0.0, 1.0)
    return diff <= tol * scale, diff


# ---------------------------------------------------------------------------------------------
# routers
# ---------------------------------------------------------------------------------------------


@dataclass
class RouterSpec:
    """How a router turns tokens into (weights_TK, ids_TK). ``score_func`` None: an unusual router,
    run as the model's own (traced) code; its outputs are picked by position."""
    path: str                          # child name of the router inside the block
    top_k: int
    num_experts: int
    weight: str = "weight"             # dotted attribute of the [E, D] weight inside the router
    logit_bias: Optional[str] = None   # dotted attribute of a [E] bias added to the logits (Linear bias)
    score_func: Optional[str] = None
    renormalize: bool = True
    choice_bias: Optional[str] = None  # e.g. DeepSeek-V3 ``e_score_correction_bias``
    n_groups: int = 1
    topk_groups: int = 1
    routed_scaling: float = 1.0
    fp32_logits: bool = True           # False: logits in the weight's dtype (softmax still in fp32)
    outputs: dict = field(default_factory=dict)   # positions in its output: {"weights": i, "ids": j, "logits": k}
    arity: int = 0                                # length of the router's output tuple (0: not a flat tuple)

    @property
    def known(self) -> bool:
        return self.score_func is not None

    def describe(self) -> str:
        if not self.known:
            return f"own router '{self.path}' (traced)"
        parts = [f"{self.score_func}", f"top{self.top_k}"]
        if self.n_groups > 1:
            parts.append(f"groups {self.topk_groups}/{self.n_groups}")
        if self.choice_bias:
            parts.append("bias")
        if self.renormalize:
            parts.append("renorm")
        if self.routed_scaling != 1.0:
            parts.append(f"x{self.routed_scaling:g}")
        return "-".join(parts)


def _router_weight(router: nn.Module, dim: int) -> Optional[tuple[str, Optional[str], int]]:
    """(weight attr, logit-bias attr, E): the single [E, D] matrix a router scores tokens with."""
    found = [(name, p) for name, p in router.named_parameters() if p.dim() == 2 and p.shape[1] == dim]
    if len(found) != 1:
        return None
    name, weight = found[0]
    owner = name.rpartition(".")[0]
    bias_name = f"{owner}.bias" if owner else "bias"
    bias = dict(router.named_parameters()).get(bias_name)
    return name, (bias_name if bias is not None and bias.shape == (weight.shape[0],) else None), weight.shape[0]


def _attr(router: nn.Module, names: Sequence[str], default: Any) -> Any:
    return next((getattr(router, n) for n in names if isinstance(getattr(router, n, None), (int, float))), default)


def _choice_bias(router: nn.Module, num_experts: int, logit_bias: Optional[str]) -> Optional[str]:
    tensors = itertools.chain(router.named_buffers(), router.named_parameters())
    return next((name for name, t in tensors if name != logit_bias and "bias" in name.rsplit(".", 1)[-1]
                 and t.shape == (num_experts,)), None)


def _split_router_outputs(outputs: Any, num_tokens: int, num_experts: int) -> Optional[dict]:
    """Positions of ids [T,K] (integer), weights [T,K] (float) and logits [T,E] in the outputs."""
    leaves = tree_leaves(outputs)
    found: dict = {}
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, Tensor) or leaf.dim() != 2 or leaf.shape[0] != num_tokens:
            continue
        if not leaf.is_floating_point():
            found.setdefault("ids", i)
        elif leaf.shape[1] == num_experts and "logits" not in found:
            found["logits"] = i
        else:
            found.setdefault("weights", i)
    if "ids" not in found:
        return None
    top_k = leaves[found["ids"]].shape[1]
    if "weights" not in found and top_k == num_experts and "logits" in found:
        found["weights"] = found.pop("logits")   # K == E: the [T, E] float output is the weights
    return found if "weights" in found else None


def _sorted_routes(weights_TK: Tensor, ids_TK: Tensor) -> tuple[Tensor, Tensor]:
    ids_sorted, order = ids_TK.long().sort(dim=-1)
    return weights_TK.gather(1, order), ids_sorted


def _randomized(router: nn.Module, gen: torch.Generator) -> nn.Module:
    """A copy of the router with random weights and biases: zero-initialised routers tie every
    score, which would make any routing rule look like any other."""
    probe = copy.deepcopy(router)
    with torch.no_grad():
        for t in itertools.chain(probe.parameters(), probe.buffers()):
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype) * (0.1 if t.dim() == 1 else 1.0))
    return probe


def _candidates(router: nn.Module, spec: RouterSpec) -> list[dict]:
    groups = _attr(router, GROUP_ATTRS[0], 1), _attr(router, GROUP_ATTRS[1], 1)
    scaling = float(_attr(router, SCALING_ATTRS, 1.0))
    bias = _choice_bias(router, spec.num_experts, spec.logit_bias)
    low_precision = fetch(router, spec.weight).dtype not in (torch.float32, torch.float64)
    options = itertools.product(ops.SCORE_FUNCS, (True, False), {None, bias}, {(1, 1), groups}, {1.0, scaling},
                                (True, False) if low_precision else (True,))
    return [dict(score_func=s, renormalize=r, choice_bias=b, n_groups=g[0], topk_groups=g[1], routed_scaling=c,
                 fp32_logits=f)
            for s, r, b, g, c, f in options if g[0] >= 1 and (g[0] == 1 or spec.num_experts % g[0] == 0)]


def router_logits(router: nn.Module, spec: RouterSpec, x_TD: Tensor) -> Tensor:
    """Router logits in fp32 (DeepSeek-V3, DeepSpeed) or in the weight's dtype (Mixtral, Qwen),
    whichever the probe found the router to use; scores are always computed in fp32."""
    weight = fetch(router, spec.weight)
    bias = fetch(router, spec.logit_bias) if spec.logit_bias else None
    if spec.fp32_logits:
        return F.linear(x_TD.float(), weight.float(), None if bias is None else bias.float())
    return F.linear(x_TD.to(weight.dtype), weight, bias)


def route_known(router: nn.Module, spec: RouterSpec, x_TD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    bias = fetch(router, spec.choice_bias) if spec.choice_bias else None
    logits_TE = router_logits(router, spec, x_TD)
    routed = torch.ops.moesys.route(logits_TE, spec.top_k, spec.score_func, spec.renormalize, bias,
                                    spec.n_groups, spec.topk_groups, spec.routed_scaling)
    _run_forward_hooks(router, spec, x_TD, {"logits": logits_TE, "weights": routed[0], "ids": routed[1]})
    return routed


def _run_forward_hooks(router: nn.Module, spec: RouterSpec, x_TD: Tensor, values: dict) -> None:
    """The router module is no longer called, but hooks on it still expect its output: Hugging Face
    records router logits that way (``output_router_logits=True`` feeds the model's own aux loss).
    Hooks see the router's output tuple rebuilt from the canonical values."""
    if not router._forward_hooks or not spec.arity or set(spec.outputs) != set(values):
        return
    output = [None] * spec.arity
    for name, position in spec.outputs.items():
        output[position] = values[name]
    for hook_id, hook in list(router._forward_hooks.items()):
        if hook_id in router._forward_hooks_with_kwargs:
            hook(router, (x_TD,), {}, tuple(output))
        else:
            hook(router, (x_TD,), tuple(output))


def analyze_router(router: nn.Module, path: str, dim: int) -> tuple[Optional[RouterSpec], str]:
    """Identify the routing rule of ``router`` (a child of an MoE block) by probing a randomised
    copy against every rule ``moesys.route`` can express. Returns (spec, why)."""
    weight = _router_weight(router, dim)
    if weight is None:
        return None, f"'{path}' has no single [num_experts, {dim}] weight"
    weight_name, logit_bias, num_experts = weight
    gen = generator()
    probe = _randomized(router, gen)
    param = first_param(router)
    x_TD = torch.randn(16, dim, generator=gen).to(device=param.device, dtype=param.dtype)
    with torch.no_grad():
        try:
            outputs = probe(x_TD)
        except Exception as exc:  # noqa: BLE001 - any failure means "not a router we can call on [T, D]"
            return None, f"'{path}' cannot be called on [tokens, {dim}]: {type(exc).__name__}: {exc}"
        positions = _split_router_outputs(outputs, 16, num_experts)
        if positions is None:
            return None, f"'{path}' does not return top-k ids and weights"
        leaves = tree_leaves(outputs)
        top_k = leaves[positions["ids"]].shape[1]
        arity = len(outputs) if isinstance(outputs, tuple) and len(outputs) == len(leaves) else 0
        shape = dict(outputs=positions, arity=arity)
        spec = RouterSpec(path, top_k, num_experts, weight_name, logit_bias, **shape)
        expected = _sorted_routes(leaves[positions["weights"]], leaves[positions["ids"]])
        for option in _candidates(probe, spec):
            trial = RouterSpec(path, top_k, num_experts, weight_name, logit_bias, **option, **shape)
            weights_TK, ids_TK, _ = route_known(probe, trial, x_TD)
            got = _sorted_routes(weights_TK, ids_TK)
            if torch.equal(got[1], expected[1]) and close(got[0], expected[0])[0]:
                return trial, f"router '{path}': {trial.describe()}"
    return spec, f"router '{path}' matches no rule moesys.route expresses; it stays the model's own code"


# ---------------------------------------------------------------------------------------------
# experts
# ---------------------------------------------------------------------------------------------


@dataclass
class ExpertsSpec:
    """Where the stacked expert weights come from. ``stacked``: 3-D parameters read as (transposed)
    views; otherwise per-expert Linear weights gathered with torch.stack in forward (a copy per
    step, reported in the BlockReport)."""
    path: str
    num_experts: int
    dim: int
    ffn_dim: int
    activation: str
    up: tuple[str, ...]          # stacked: (param,), per-expert: weight paths inside one expert
    down: str
    stacked: bool
    transpose_up: bool = False
    transpose_down: bool = False

    def weights(self, experts: nn.Module) -> tuple[Tensor, Tensor]:
        """(w_up_EHD, w_down_EDF) of ``experts`` in the canonical layout."""
        if self.stacked:
            w_up_EHD = fetch(experts, self.up[0])
            w_down_EDF = fetch(experts, self.down)
            return (w_up_EHD.transpose(1, 2) if self.transpose_up else w_up_EHD,
                    w_down_EDF.transpose(1, 2) if self.transpose_down else w_down_EDF)
        w_up_EHD = torch.stack([torch.cat([fetch(e, name) for name in self.up]) for e in experts])
        w_down_EDF = torch.stack([fetch(e, self.down) for e in experts])
        return w_up_EHD, w_down_EDF

    def param_names(self) -> list[str]:
        if self.stacked:
            return [self.up[0], self.down]
        return [f"{i}.{name}" for i in range(self.num_experts) for name in (*self.up, self.down)]

    def describe(self) -> str:
        layout = "stacked views" if self.stacked else "per-expert Linears, stacked each forward (copies)"
        return f"{self.activation}, {layout}"


def stacked_candidates(experts: nn.Module, path: str, dim: int) -> list[ExpertsSpec]:
    """Layouts of a module holding 3-D expert weights: up [E, H, D] or [E, D, H], down [E, D, F]
    or [E, F, D]. Every reading the shapes allow is returned; the block probe picks the true one."""
    params = {name: p for name, p in experts.named_parameters(recurse=False)}
    if any(p.dim() != 3 for p in params.values()) or len(params) != 2:
        return []
    specs = []
    for (up_name, up), (down_name, down) in itertools.permutations(params.items(), 2):
        num_experts = up.shape[0]
        for t_up, t_down in itertools.product((False, True), repeat=2):
            up_EHD = up.transpose(1, 2) if t_up else up
            down_EDF = down.transpose(1, 2) if t_down else down
            if up_EHD.shape[2] != dim or down_EDF.shape[1] != dim or down.shape[0] != num_experts:
                continue
            ffn_dim = down_EDF.shape[2]
            for activation in ops.ACTIVATIONS:
                if up_EHD.shape[1] == ops.up_rows(ffn_dim, activation):
                    specs.append(ExpertsSpec(path, num_experts, dim, ffn_dim, activation, (up_name,), down_name,
                                             True, t_up, t_down))
    return specs


def _expert_linears(expert: nn.Module, dim: int) -> Optional[tuple[tuple[str, ...], str, int]]:
    """Bias-free Linear layers of one expert: the up side reads D, the last one writing D is down."""
    linears = [(name, m) for name, m in expert.named_modules() if isinstance(m, nn.Linear)]
    if len(linears) < 2 or any(m.bias is not None for _, m in linears):
        return None
    down = next((n for n, m in linears if m.out_features == dim and m.in_features != dim), linears[-1][0])
    modules = dict(linears)
    ups = tuple(n for n, _ in linears if n != down)
    ffn_dim = modules[down].in_features
    if len(ups) > 2 or modules[down].out_features != dim or any(
            modules[n].in_features != dim or modules[n].out_features != ffn_dim for n in ups):
        return None
    return tuple(f"{n}.weight" for n in ups), f"{down}.weight", ffn_dim


def per_expert_candidates(experts: nn.Module, path: str, dim: int) -> list[ExpertsSpec]:
    """Layouts of a ModuleList of expert MLPs (gate/up/down or w1/w3/w2 or Linear-act-Linear)."""
    if not isinstance(experts, nn.ModuleList) or not len(experts):
        return []
    found = _expert_linears(experts[0], dim)
    if found is None:
        return []
    ups, down, ffn_dim = found
    specs = []
    for order in itertools.permutations(ups):
        for activation in ops.ACTIVATIONS:
            if ops.is_gated(activation) == (len(order) == 2):
                specs.append(ExpertsSpec(path, len(experts), dim, ffn_dim, activation, order, down, False))
    return specs


def experts_candidates(experts: nn.Module, path: str, dim: int) -> list[ExpertsSpec]:
    return stacked_candidates(experts, path, dim) or per_expert_candidates(experts, path, dim)
