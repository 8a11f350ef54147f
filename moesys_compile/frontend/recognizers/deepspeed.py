"""``deepspeed.moe.layer.MoE`` in canonical form.

The layer keeps its parameter names (``deepspeed_moe.gate.wg.weight``,
``deepspeed_moe.experts.deepspeed_experts.<i>.<...>``) and its output contract
``(output, l_aux, exp_counts)``. DeepSpeed's gate is softmax top-k (k=1: the winning probability;
k>=2: renormalised over the chosen k), its ``l_aux`` counts first choices for k <= 2 and every
choice for k > 2. Only configurations whose result does not depend on random numbers or on
DeepSpeed's capacity order are canonicalized: ``drop_tokens=False``, no noisy gate, no sampled
second expert, ``ep_size=1`` (``Plan.expert_parallel`` shards experts instead), no residual MoE.
An expert module's dropout on its activation is the one randomness taken: the canonical experts
apply it (``CanonicalMoEBlock.expert_dropout_p``).

Shape legend: T tokens · D model dim · E experts · K top-k.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops import ACTIVATIONS
from ..canonicalize import Recognition
from .block import CanonicalMoEBlock
from .experts import activation_hint, dropouts_off, expert_dropouts, per_expert_candidates
from .probe import BlockProbe, exact_form, token_scales
from .structure import RouterSpec, generator, leave, on_meta, router_randomized

KIND = "deepspeed.moe.layer.MoE"
EXPERTS_PATH = "deepspeed_moe.experts.deepspeed_experts"
GATE_PATH = "deepspeed_moe.gate"


class CanonicalDeepSpeedMoE(CanonicalMoEBlock):
    """Returns ``(output, l_aux, exp_counts)`` like the DeepSpeed layer; ``l_aux`` is also the
    value summed into ``program.aux_loss`` (DeepSpeed users scale it themselves)."""

    def balance_loss(self, scores_TE: Tensor, ids_TK: Tensor) -> Tensor:
        first_choices = ids_TK[:, :1] if self.top_k <= 2 else ids_TK
        return torch.ops.moesys.load_balancing_loss(scores_TE, first_choices, 1.0)

    def forward(self, hidden_states: Tensor, used_token: Optional[Tensor] = None):
        if used_token is not None:
            raise ValueError(f"{self.source}: used_token masks are not supported by the canonical form; "
                             f"mask the tokens before the layer")
        y_TD, l_aux, ids_TK = self.experts_output(hidden_states.reshape(-1, self.dim))
        exp_counts_E = F.one_hot(ids_TK, self.num_experts).sum((0, 1))
        return y_TD.reshape(hidden_states.shape), l_aux, exp_counts_E


def _is_deepspeed_moe(module: nn.Module) -> bool:
    layer = sys.modules.get("deepspeed.moe.layer")   # never import DeepSpeed ourselves
    return layer is not None and isinstance(module, layer.MoE)


def _unsupported(module: nn.Module) -> Optional[str]:
    gate = module.get_submodule(GATE_PATH)
    if module.use_residual:
        return "use_residual=True (Residual MoE mixes an MLP in with a learned coefficient) is not canonicalized"
    if module.ep_size != 1:
        return (f"ep_size ({module.ep_size}) != 1: the layer holds only its local experts; build it with "
                f"ep_size=1 and set Plan.expert_parallel instead")
    if gate.drop_tokens:
        return ("drop_tokens=True: DeepSpeed drops by its own capacity order (min_capacity, random token "
                "selection); build the layer with drop_tokens=False (dropless) or set Plan.capacity_factor")
    if gate.noisy_gate_policy not in (None, "None"):
        return f"noisy_gate_policy={gate.noisy_gate_policy!r} adds random noise to routing"
    if gate.k == 2 and gate.top2_2nd_expert_sampling:
        return "top2_2nd_expert_sampling=True samples the second expert with Gumbel noise; set it False"
    return None


def recognize_deepspeed_moe(module: nn.Module, path: str) -> Optional[Recognition]:
    """Recognizer for ``deepspeed.moe.layer.MoE`` (see the module docstring)."""
    if not _is_deepspeed_moe(module):
        return None
    why = _unsupported(module)
    if why is None and on_meta(module):
        why = "parameters are on the meta device; materialise the model before compiling"
    if why is not None:
        return leave(path, KIND, why)
    gate = module.get_submodule(GATE_PATH)
    num_experts, dim = gate.wg.weight.shape
    router = RouterSpec(GATE_PATH, gate.k, num_experts, "wg.weight", None, "softmax", renormalize=gate.k > 1)
    experts = module.get_submodule(EXPERTS_PATH)
    forms = [dict(experts=spec) for spec in per_expert_candidates(experts, EXPERTS_PATH, dim, biases=False)]
    if not forms:
        return leave(path, KIND, "each expert must be a bias-free MLP (Linear-act-Linear, or gate/up/down "
                                 "Linears); biased or other experts are not canonicalized")

    def build(form: dict) -> CanonicalDeepSpeedMoE:
        return CanonicalDeepSpeedMoE(module, router, form["experts"], kind=KIND)

    with dropouts_off(expert_dropouts(experts, EXPERTS_PATH).values()):   # the canonical mask draws otherwise
        found, best, why = _probe(module, forms, build)
    if found is None:
        closest = why or f"closest max abs diff {best:.3g}; canonical activations: {', '.join(ACTIVATIONS)}"
        return leave(path, KIND, f"no canonical form of its {len(forms)} candidate expert layouts reproduces the "
                                 f"layer's output ({closest}{activation_hint(experts)})")
    replacement = build(found)
    refusal = replacement.expert_dropout_refusal()     # before any tracing: it runs an expert
    if refusal:
        return leave(path, KIND, refusal)
    return Recognition(kind=KIND, replacement=replacement, details=replacement.details())


def _probe(module: nn.Module, forms: list[dict], build) -> tuple[Optional[dict], float, str]:
    """``probe.exact_form`` of the layer, its gate randomised and its tokens scaled as for any block
    (``hf._probe_forms``); DeepSpeed's top-1 gate asserts tokens >= min_capacity."""
    gate = module.get_submodule(GATE_PATH)
    dim = gate.wg.weight.shape[1]
    weights = [p for p in module.get_submodule(EXPERTS_PATH).parameters() if p.dim() >= 2]
    scales, tokens = token_scales(weights, dim), (1, max(8, gate.min_capacity))
    with router_randomized(module, GATE_PATH, generator(), dim) as rescale:
        return exact_form(module, forms, build, lambda: BlockProbe(
            module, dim, pick=lambda out: out[0], tokens=tokens, scales=scales, rescale=rescale))
