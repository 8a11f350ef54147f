"""Recognise experts modules that are called with their routing: ``experts(tokens, ids, weights)``.

Hugging Face transformers v5 gives most MoE families such a module (``MixtralExperts``,
``Gemma4TextExperts``, ``DeepseekV4Experts``, ...): stacked 3-D weights and a forward that takes
the tokens [T, D], the top-k expert ids [T, K] and their weights [T, K]. Where the block around it
cannot be canonicalized as a whole (Gemma 4 routes inside its decoder layer, DeepSeek-V4 hashes
token ids, ZAYA's router is an MLP with a skip expert, Inkling's also gates the shared expert),
the experts module alone still can be: the routing stays the model's traced code, and the
experts become one ``moesys.moe_experts`` call, so expert parallelism, the kernels and the ring
take them like any canonical block.

    block (left as traced code)
      ├─ <routing>    traced code: ids [T, K], weights [T, K]
      └─ experts      CanonicalRoutedExperts(tokens, ids, weights) -> moesys.moe_experts

The layout and activation are found by probing (``probe.exact_form``) on random tokens, ids and
weights, in both argument orders. The report says why the block around the experts was left
(``inspect``: "... their routing stays the traced code of the block around them, left as it is:
<reason>"). An id outside [0, E) is refused by ``moesys.moe_experts``, naming the slot (Hugging
Face's experts read the id E as "no expert" only in their own expert-parallel mode; ZAYA's router
maps its skip expert to expert 0 with weight 0 itself).

Shape legend: T tokens · D model dim · E experts · K top-k.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..canonicalize import Recognition, named_like_moe
from .block import adopt, block_kind
from .experts import ExpertsSpec, expert_dropouts, experts_candidates
from .probe import BlockProbe, exact_form, token_scales
from .structure import generator, leave, left_around, on_meta

PROBE_TOKENS = 16
PROBE_TOP_K = 2
CALLERS_ROUTING = "the caller's (traced)"   # the ``router`` of the report's details


class CanonicalRoutedExperts(nn.Module):
    """An experts module called with its routing, in canonical form (see the module docstring). It
    holds the original's parameters under their names; the routing is its caller's."""

    _moesys_canonical = True
    router_path = None      # no router of its own: routing is the caller's code
    aux_loss = None         # nor a load-balancing loss
    extra_outputs = ()      # it returns the experts' output alone
    flat_output = False

    def __init__(self, original: nn.Module, experts: ExpertsSpec, ids_first: bool = True):
        super().__init__()
        adopt(self, original)
        self.experts_spec = experts
        self.ids_first = ids_first              # forward(tokens, ids, weights), else (tokens, weights, ids)
        self.argument_names = call_parameters(original)    # the original's: a caller may pass them by name
        self.num_experts, self.dim, self.ffn_dim = experts.num_experts, experts.dim, experts.ffn_dim
        self.activation = experts.activation
        self.top_k: Optional[int] = None        # the caller's: read from the ids at each call
        self.source = f"{type(original).__module__}.{type(original).__qualname__}"
        self.kind = block_kind(original)

    @property
    def expert_param_names(self) -> list[str]:
        return self.experts_spec.param_names()

    def forward(self, *args: Tensor, **kwargs: Tensor) -> Tensor:
        hidden_states, first, second = (dict(zip(self.argument_names, args), **kwargs)[name]
                                         for name in self.argument_names)
        ids, weights = (first, second) if self.ids_first else (second, first)
        x_TD = hidden_states.reshape(-1, self.dim)
        ids_TK = ids.reshape(x_TD.shape[0], -1).long()
        weights_TK = weights.reshape(ids_TK.shape)
        w_up_EHD, w_down_EDF = self.experts_spec.weights(self)
        biases = self.experts_spec.biases(self)
        extra = biases if any(b is not None for b in biases) else ()
        y_TD = torch.ops.moesys.moe_experts(x_TD, ids_TK, weights_TK, w_up_EHD, w_down_EDF, self.activation, 0.0,
                                            *extra)
        return y_TD.reshape(hidden_states.shape)

    def details(self) -> dict[str, Any]:
        return dict(num_experts=self.num_experts, top_k="the caller's", dim=self.dim, ffn_dim=self.ffn_dim,
                    activation=self.activation, router=CALLERS_ROUTING, experts=self.experts_spec.describe())

    def extra_repr(self) -> str:
        return (f"from {self.source}: num_experts={self.num_experts}, dim={self.dim}, ffn_dim={self.ffn_dim}, "
                f"activation={self.activation!r}, routing given by the caller")


class _Call(NamedTuple):
    """One probe call's arguments."""
    x_TD: Tensor
    ids_TK: Tensor
    weights_TK: Tensor


class RoutedExpertsProbe(BlockProbe):
    """``BlockProbe`` for a module called as ``module(tokens, ids, weights)`` (or with the weights
    before the ids, ``ids_first=False``): random tokens at each scale, every token routed to K
    distinct random experts with random positive weights; then, at the last scale, a crowd: every
    token routed to the same K experts, which overflows any capacity the experts would drop past."""

    CANNOT_RUN = "it cannot run as experts(tokens [T, D], ids [T, K], weights [T, K])"

    def __init__(self, original: nn.Module, dim: int, num_experts: int, scales, ids_first: bool = True):
        super().__init__(original, dim, tokens=(1, PROBE_TOKENS), scales=scales)
        gen = generator()
        top_k = min(PROBE_TOP_K, num_experts)
        spread_TK = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(PROBE_TOKENS)])
        crowd_TK = torch.arange(top_k).expand(PROBE_TOKENS, top_k)
        weights_TK = torch.rand(PROBE_TOKENS, top_k, generator=gen) + 0.1
        self.ids_first = ids_first
        calls = [(scale, x[0], spread_TK, False) for scale, x, _ in self.inputs]
        calls.append((*calls[-1][:2], crowd_TK, True))
        self.inputs = [(scale, _Call(x_TD, ids_TK.to(x_TD.device), weights_TK.to(x_TD.device, x_TD.dtype)), crowded)
                       for scale, x_TD, ids_TK, crowded in calls]

    def _flat_output(self, output: Tensor, call: _Call) -> bool:
        return False        # the experts return their tokens' shape

    def _run(self, module: nn.Module, call: _Call) -> Any:
        routing = (call.ids_TK, call.weights_TK) if self.ids_first else (call.weights_TK, call.ids_TK)
        with torch.no_grad(), torch.random.fork_rng(devices=[call.x_TD.device] if call.x_TD.is_cuda else []):
            out = module(call.x_TD.clone(), *routing)
        if module is self.original and not isinstance(out, Tensor):
            self.problem = f"the experts return a {type(out).__name__}, not one tensor"
        return out if isinstance(out, Tensor) else None


def call_parameters(module: nn.Module) -> Optional[tuple[str, str, str]]:
    """The names of ``forward``'s parameters (tokens and the two of the routing), when it takes
    exactly three that may be passed by position (the tokens required; gpt-oss defaults the
    routing to None)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(params) != 3 or len(positional) != 3 or positional[0].default is not positional[0].empty:
        return None
    return tuple(p.name for p in positional)


def _candidates(module: nn.Module) -> list[ExpertsSpec]:
    """Stacked layouts for every model dim the 3-D weights allow (the module does not say which)."""
    stacked = [p for p in module.parameters(recurse=False) if p.dim() == 3]
    if len(stacked) != 2 or stacked[0].shape[0] != stacked[1].shape[0]:
        return []
    dims = dict.fromkeys(size for p in stacked for size in p.shape[1:])
    return [spec for dim in dims for spec in experts_candidates(module, "", dim)]


def recognize_routed_experts(module: nn.Module, path: str) -> Optional[Recognition]:
    """Recognizer for experts modules called with their routing (see the module docstring); it sees
    only the modules no block recognizer claimed."""
    if isinstance(module, CanonicalRoutedExperts):      # canonicalized by an earlier compile
        return Recognition(kind=module.kind, details=module.details())
    if not path or call_parameters(module) is None:
        return None
    candidates = _candidates(module)
    if not candidates:
        return None
    kind = block_kind(module)
    if on_meta(module):
        return leave(path, kind, "parameters are on the meta device; materialise the model before compiling")
    dropouts = expert_dropouts(module, "")
    if dropouts:
        return leave(path, kind, f"its experts hold dropout modules ({sorted(dropouts)}), which a module called "
                                 f"with its routing has no canonical place for")
    found, best, problem = _probe_forms(module, candidates)
    if found is None and not named_like_moe(module):    # three arguments and 3-D weights, but not experts
        return None
    if found is None:
        return leave(path, kind, f"called with its routing, but no canonical form of its experts reproduces it "
                                 f"({problem or f'closest max abs diff {best:.3g} over {2 * len(candidates)} forms'})")
    form = dict(experts=found["experts"], ids_first=found["ids_first"])
    return _recognition(module, form, _routing_note(path))


def _probe_forms(module: nn.Module, candidates: list[ExpertsSpec]) -> tuple[Optional[dict], float, str]:
    """``probe.exact_form`` over the candidate layouts, per model dim and argument order."""
    best, problem = float("inf"), ""
    weights = [p for p in module.parameters(recurse=False) if p.dim() == 3]
    for dim in dict.fromkeys(spec.dim for spec in candidates):
        scales = token_scales(weights, dim)
        for ids_first in (True, False):
            forms = [dict(experts=spec, ids_first=ids_first) for spec in candidates if spec.dim == dim]
            found, diff, why = exact_form(module, forms, lambda form: _build(module, form),
                                          lambda: RoutedExpertsProbe(module, dim, forms[0]["experts"].num_experts,
                                                                     scales, ids_first))
            if found is not None:
                return found, diff, ""
            best, problem = min(best, diff), problem or why
    return None, best, problem


def _routing_note(path: str) -> str:
    """The report's reason: the routing stays traced code, and why the block around was left (the
    same for the twins in other layers)."""
    around = left_around(path)
    why = f" of the block around them, left as it is: {around[1]}" if around else ""
    return f"experts canonical (moesys.moe_experts); their routing stays the traced code{why}"


def _build(module: nn.Module, form: dict) -> CanonicalRoutedExperts:
    return CanonicalRoutedExperts(module, form["experts"], form["ids_first"])


def _recognition(module: nn.Module, form: dict, note: str) -> Recognition:
    """The experts in the probed ``form``; a twin (the same experts in another layer, in a twin of
    the block, left for the same reason) takes the same form and note."""
    replacement = _build(module, form)
    return Recognition(kind=block_kind(module), replacement=replacement, details=replacement.details(), note=note,
                       for_twin=lambda twin: _recognition(twin, form, note))
