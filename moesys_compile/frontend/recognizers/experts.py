"""Expert weight layouts of MoE blocks we did not write: stacked 3-D weights (views, optionally
with stacked [E, H] / [E, D] biases and a clamped SwiGLU: gpt-oss), split over two children
(JetMoE), flat [E*F, D] matrices (DBRX), or per-expert MLPs in a ModuleList or a ModuleDict
(Switch Transformers' ``expert_0`` ...; their Linears' biases stacked too). Every reading the
shapes allow is a candidate; the block probe (``probe.exact_form``) picks the true one.

Shape legend: D model dim · F expert hidden · H up rows (2F gated) · E experts.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from ... import ops
from ..adapters import adapted_weight, adapter_paths, in_adapter
from .structure import CLAMP_ATTRS, PROBE_SEED, close, fetch, generator, number_attr

def expert_modules(experts: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of each expert of a ModuleList or ModuleDict of expert MLPs, in expert order
    (a ModuleDict's insertion order: ``expert_0``, ``expert_1``, ...; the block probe checks it);
    a ModuleDict's parameterless children are not experts (NLLB-MoE's ``token_dropout``). Empty
    for any other module."""
    if isinstance(experts, nn.ModuleList):
        return list(experts.named_children())
    if isinstance(experts, nn.ModuleDict):
        return [(name, m) for name, m in experts.named_children() if any(True for _ in m.parameters())]
    return []


def expert_dropouts(experts: nn.Module, experts_name: str) -> dict[str, nn.Module]:
    """The dropout modules with p > 0 inside the experts, by path in the block (Switch
    Transformers' ``expert_0.dropout`` between the projections): the canonical experts have no
    dropout, so they compute the same only while these are in eval mode."""
    prefix = f"{experts_name}." if experts_name else ""
    return {prefix + name: m for name, m in experts.named_modules()
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0}


def expert_dropout_reason(dropouts: dict[str, nn.Module], why: str,
                          otherwise: str = "compile in eval mode for inference") -> str:
    """Why experts with ``dropouts`` in training mode have no canonical form (``why``: what
    ``dropout_place_problem`` or the block found), and the fixes: that dropout at 0, or ``otherwise``."""
    first, module = next(iter(dropouts.items()))
    return (f"its experts apply dropout in training ({len(dropouts)} dropout modules, '{first}' with "
            f"p={module.p:g}), and {why}; build the model with that dropout at 0 (Hugging Face: the config field "
            f"it comes from, such as dropout_rate=0 or activation_dropout=0), or {otherwise}")


@contextlib.contextmanager
def dropouts_off(dropouts: Iterable[nn.Module]) -> Iterator[None]:
    """Within, ``dropouts`` are in eval mode (a block probed with its experts' dropout on would
    compare random draws); after, each has its own flag back."""
    flags = [(dropout, dropout.training) for dropout in dropouts]
    for dropout, _ in flags:
        dropout.eval()
    try:
        yield
    finally:
        for dropout, flag in flags:
            dropout.training = flag


def dropout_place_problem(expert: nn.Module, weights: tuple[Tensor, Tensor], biases: tuple, activation: str,
                          p: float) -> str:
    """Why ``expert`` (the first of the experts whose stacked ``weights`` and ``biases`` the
    canonical form reads) does not apply its dropout as the canonical experts do: with p on the
    activation, between the projections ("" when it does). The expert runs in training mode on
    random rows, and the canonical experts with ``moesys.expert_dropout_keep``'s mask drawn from the
    same random state (the mask a dropout module on the activation draws) must give its output."""
    w_up_EHD, w_down_EDF = weights
    rows = torch.randn(8, w_up_EHD.shape[2], generator=generator()).to(w_up_EHD.device, w_up_EHD.dtype)
    counts_E = torch.zeros(w_up_EHD.shape[0], dtype=torch.long, device=w_up_EHD.device)
    counts_E[0] = rows.shape[0]
    flags = [(module, module.training) for module in expert.modules()]
    devices = [rows.device] if rows.is_cuda else []
    try:
        expert.train()
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(PROBE_SEED)
            want = expert(rows)
            torch.manual_seed(PROBE_SEED)
            keep_NF = torch.ops.moesys.expert_dropout_keep(rows, 1, w_down_EDF.shape[2], p)
            got = torch.ops.moesys.grouped_mlp(rows, counts_E, w_up_EHD, w_down_EDF, activation, *biases, keep_NF)
    except Exception as exc:  # noqa: BLE001 - the reason names it
        return f"its first expert cannot be run alone on [rows, dim] to check where ({type(exc).__name__}: {exc})"
    finally:
        for module, flag in flags:
            module.training = flag
    same, diff = close(got, want) if isinstance(want, Tensor) else (False, float("inf"))
    return "" if same else (f"they do not act as one dropout of the activation between the projections, where the "
                            f"canonical experts apply it (the first expert in training mode differs by {diff:.3g} "
                            f"from the canonical experts under the mask it draws)")


@dataclass
class ExpertsSpec:
    """Where the stacked expert weights come from. ``stacked``: 3-D parameters read as (transposed)
    views; ``flat``: 2-D [E*rows, D] parameters read as [E, rows, D] views (two up matrices are
    concatenated per step); otherwise per-expert Linear weights gathered with torch.stack in
    forward. Copies are reported in the BlockReport."""
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
    flat: bool = False
    # [E, H] bias added to the up projection, [E, D] to the down one: stacked, the parameter's name;
    # per-expert, the attribute of each Linear that holds it ("bias"), stacked in forward like the weights
    up_bias: Optional[str] = None
    down_bias: Optional[str] = None
    # per-expert: the experts' child names, in expert order (a ModuleList's "0", "1", ...; a
    # ModuleDict's "expert_0", ...)
    expert_names: tuple[str, ...] = ()
    # per-expert: the parameters inside one expert of the PEFT LoRA layers around its Linears (their
    # A and B matrices), whose update each forward adds to the weights it stacks
    adapter_params: tuple[str, ...] = ()

    def weights(self, experts: nn.Module) -> tuple[Tensor, Tensor]:
        """(w_up_EHD, w_down_EDF) of ``experts`` in the canonical layout."""
        if self.flat:
            ups = [fetch(experts, name).view(self.num_experts, -1, self.dim) for name in self.up]
            w_down_EFD = fetch(experts, self.down).view(self.num_experts, -1, self.dim)
            return ups[0] if len(ups) == 1 else torch.cat(ups, dim=1), w_down_EFD.transpose(1, 2)
        if self.stacked:
            w_up_EHD = fetch(experts, self.up[0])
            w_down_EDF = fetch(experts, self.down)
            return (w_up_EHD.transpose(1, 2) if self.transpose_up else w_up_EHD,
                    w_down_EDF.transpose(1, 2) if self.transpose_down else w_down_EDF)
        listed = [e for _, e in expert_modules(experts)]
        w_up_EHD = torch.stack([torch.cat([adapted_weight(e, name) for name in self.up]) for e in listed])
        w_down_EDF = torch.stack([adapted_weight(e, self.down) for e in listed])
        return w_up_EHD, w_down_EDF

    def biases(self, experts: nn.Module) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(b_up_EH, b_down_ED) of ``experts``, None where the experts have no such bias."""
        if self.stacked or self.flat:
            return tuple(None if name is None else fetch(experts, name) for name in (self.up_bias, self.down_bias))
        up_names, down_names = self._per_expert_biases()
        listed = [e for _, e in expert_modules(experts)]
        b_up_EH = torch.stack([torch.cat([fetch(e, name) for name in up_names]) for e in listed]) if up_names else None
        b_down_ED = torch.stack([fetch(e, down_names[0]) for e in listed]) if down_names else None
        return b_up_EH, b_down_ED

    def _per_expert_biases(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Paths inside one expert of its up Linears' biases and of its down Linear's (() if none)."""
        def beside(weight: str, attr: Optional[str]) -> tuple[str, ...]:
            owner = weight.rpartition(".")[0]
            return () if attr is None else (f"{owner}.{attr}" if owner else attr,)
        return tuple(n for w in self.up for n in beside(w, self.up_bias)), beside(self.down, self.down_bias)

    def param_names(self) -> list[str]:
        if self.flat:
            return [*self.up, self.down]
        if self.stacked:
            return [self.up[0], self.down, *(b for b in (self.up_bias, self.down_bias) if b)]
        up_biases, down_biases = self._per_expert_biases()
        experts = self.expert_names or tuple(str(i) for i in range(self.num_experts))
        return [f"{expert}.{name}" for expert in experts
                for name in (*self.up, self.down, *up_biases, *down_biases, *self.adapter_params)]

    def describe(self) -> str:
        if self.flat:
            layout = "flat views" if len(self.up) == 1 else "flat, gate/up concatenated each forward (copies)"
        else:
            layout = "stacked views" if self.stacked else "per-expert Linears, stacked each forward (copies)"
        if self.adapter_params:
            layout += ", with their LoRA updates"
        biases = [kind for kind, name in (("up", self.up_bias), ("down", self.down_bias)) if name]
        return f"{self.activation}, {layout}" + (f", {'/'.join(biases)} biases" if biases else "")


def _activations(experts: nn.Module) -> list[str]:
    """The activations a module's experts may use: the plain ones; a clamped SwiGLU when the module
    holds a finite ``limit`` (with its ``alpha``: the interleaved gpt-oss form; HY-V4 has none); a
    softcapped SwiGLU when submodules hold the gate's and up's ``softcap`` (Inkling 2's ``act_fn``)."""
    alpha = number_attr(experts, ("alpha", "swiglu_alpha"), None)
    limit = number_attr(experts, CLAMP_ATTRS, None)
    found = [ops.clamped_swiglu(alpha, limit)] if limit is not None and math.isfinite(limit) else []
    caps = {path: m.softcap for path, m in experts.named_modules()
            if isinstance(getattr(m, "softcap", None), (int, float))}
    gate = [cap for path, cap in caps.items() if "gate" in path.rsplit(".", 1)[-1]]
    up = [cap for path, cap in caps.items() if "up" in path.rsplit(".", 1)[-1]]
    if len(gate) == len(up) == 1:
        found.append(ops.softcapped_swiglu(gate[0], up[0]))
    return [*ops.ACTIVATIONS, *found]


def activation_hint(experts: nn.Module) -> str:
    """The experts' own activation module, when they have one (``act_fn``, or the parameterless leaf
    of a listed expert: ``nn.GELU(approximate='tanh')``), for the reason of a block left as it is:
    the likely cause when it is none of ours (a Mish, a quick GELU) or only near one."""
    listed = expert_modules(experts)
    holder = listed[0][1] if listed else experts
    act = getattr(holder, "act_fn", None)
    if not isinstance(act, nn.Module) and holder is not experts:
        act = next((m for m in holder.modules() if not any(True for _ in m.children())
                    and not any(True for _ in m.parameters(recurse=False))
                    and not isinstance(m, nn.modules.dropout._DropoutNd)), None)
    return f"; the experts' activation module is {act!r}" if isinstance(act, nn.Module) else ""


def _bias_readings(params: dict[str, Tensor], num_experts: int, rows_h: int, dim: int) -> list[tuple]:
    """(up bias, down bias) names for the module's 2-D parameters: an [E, H] up bias and/or an
    [E, D] down bias; every assignment the shapes allow (none when there are no 2-D parameters)."""
    names = [name for name, p in params.items() if p.dim() == 2]
    readings = []
    for up, down in itertools.product([None, *names], repeat=2):
        used = [n for n in (up, down) if n]
        if len(used) != len(set(used)) or set(used) != set(names):
            continue
        if up and params[up].shape != (num_experts, rows_h) or down and params[down].shape != (num_experts, dim):
            continue
        readings.append((up, down))
    return readings


def stacked_candidates(experts: nn.Module, path: str, dim: int,
                       names: Optional[Sequence[str]] = None) -> list[ExpertsSpec]:
    """Layouts of a module holding 3-D expert weights: up [E, H, D] or [E, D, H], down [E, D, F]
    or [E, F, D], optionally with [E, H] / [E, D] biases (the module's own 2-D parameters).
    ``names``: the two weights' dotted paths when they sit in children of their own (JetMoE's
    ``input_linear.weight``/``output_linear.weight``); by default the module's own parameters.
    Every reading the shapes allow is returned; the block probe picks the true one."""
    params = ({name: fetch(experts, name) for name in names} if names is not None
              else dict(experts.named_parameters(recurse=False)))
    stacked = {name: p for name, p in params.items() if p.dim() == 3}
    if len(stacked) != 2 or any(p.dim() not in (2, 3) for p in params.values()):
        return []
    specs = []
    for (up_name, up), (down_name, down) in itertools.permutations(stacked.items(), 2):
        num_experts = up.shape[0]
        for t_up, t_down in itertools.product((False, True), repeat=2):
            up_EHD = up.transpose(1, 2) if t_up else up
            down_EDF = down.transpose(1, 2) if t_down else down
            if up_EHD.shape[2] != dim or down_EDF.shape[1] != dim or down.shape[0] != num_experts:
                continue
            ffn_dim = down_EDF.shape[2]
            for activation in _activations(experts):
                if up_EHD.shape[1] != ops.up_rows(ffn_dim, activation):
                    continue
                for up_bias, down_bias in _bias_readings(params, num_experts, up_EHD.shape[1], dim):
                    specs.append(ExpertsSpec(path, num_experts, dim, ffn_dim, activation, (up_name,), down_name,
                                             True, t_up, t_down, up_bias=up_bias, down_bias=down_bias))
    return specs


def _expert_linears(expert: nn.Module, dim: int,
                    biases: bool) -> Optional[tuple[tuple[str, ...], str, int, Optional[str], Optional[str]]]:
    """(up weights, down weight, F, up bias, down bias) of one expert's Linear layers: the up side
    reads D, the last one writing D is down. With ``biases``, the up Linears may all hold a bias
    and the down one may too (the bias attribute, "bias"; None where they hold none); else the
    Linears must be bias-free."""
    adapters = adapter_paths(expert)     # a LoRA layer stands for the Linear it wraps
    linears = [(name, m) for name, m in expert.named_modules() if isinstance(m, nn.Linear)
               and not in_adapter(name, adapters)]
    if len(linears) < 2:
        return None
    down = next((n for n, m in linears if m.out_features == dim and m.in_features != dim), linears[-1][0])
    modules = dict(linears)
    ups = tuple(n for n, _ in linears if n != down)
    ffn_dim = modules[down].in_features
    if len(ups) > 2 or modules[down].out_features != dim or any(
            modules[n].in_features != dim or modules[n].out_features != ffn_dim for n in ups):
        return None
    up_biased = {modules[n].bias is not None for n in ups}
    down_biased = modules[down].bias is not None
    if len(up_biased) > 1 or not biases and (True in up_biased or down_biased):
        return None   # some up Linears biased, others not: no one [E, H] bias
    return (tuple(f"{n}.weight" for n in ups), f"{down}.weight", ffn_dim, "bias" if True in up_biased else None,
            "bias" if down_biased else None)


def per_expert_candidates(experts: nn.Module, path: str, dim: int, biases: bool = True) -> list[ExpertsSpec]:
    """Layouts of a ModuleList or ModuleDict of expert MLPs (gate/up/down or w1/w3/w2 or
    Linear-act-Linear), with the Linears' biases stacked like their weights (``biases=False``:
    bias-free MLPs only)."""
    listed = expert_modules(experts)
    if not listed:
        return []
    names = tuple(name for name, _ in listed)
    found = _expert_linears(listed[0][1], dim, biases)
    if found is None:
        return []
    ups, down, ffn_dim, up_bias, down_bias = found
    adapters = adapter_paths(listed[0][1])
    adapter_params = tuple(n for n, _ in listed[0][1].named_parameters() if in_adapter(n, adapters))
    specs = []
    for order in itertools.permutations(ups):
        for activation in ops.ACTIVATIONS:
            if ops.is_gated(activation) == (len(order) == 2):
                specs.append(ExpertsSpec(path, len(listed), dim, ffn_dim, activation, order, down, False,
                                         up_bias=up_bias, down_bias=down_bias, expert_names=names,
                                         adapter_params=adapter_params))
    return specs


def flat_candidates(experts: nn.Module, path: str, dim: int, num_experts: int) -> list[ExpertsSpec]:
    """Layouts of 2-D [E*F, D] expert matrices (DBRX's ``w1``/``v1``/``w2``): one of them is down
    (read as [E, F, D], transposed), the others up (gated when two)."""
    params = dict(experts.named_parameters())
    rows = {p.shape[0] for p in params.values()}
    if not 2 <= len(params) <= 3 or any(p.dim() != 2 or p.shape[1] != dim for p in params.values()) or \
            len(rows) != 1 or next(iter(rows)) % num_experts:
        return []
    ffn_dim = next(iter(rows)) // num_experts
    specs = []
    for down in params:
        for ups in itertools.permutations([name for name in params if name != down]):
            for activation in ops.ACTIVATIONS:
                if ops.is_gated(activation) == (len(ups) == 2):
                    specs.append(ExpertsSpec(path, num_experts, dim, ffn_dim, activation, ups, down, False, flat=True))
    return specs


def experts_candidates(experts: nn.Module, path: str, dim: int, names: Optional[Sequence[str]] = None,
                       num_experts: int = 0) -> list[ExpertsSpec]:
    if names is not None:
        return stacked_candidates(experts, path, dim, names)
    return (stacked_candidates(experts, path, dim) or per_expert_candidates(experts, path, dim)
            or flat_candidates(experts, path, dim, num_experts))
