"""The canonical stand-in for an MoE block we did not write.

It adopts the original block's children, parameters and buffers under their original names (so
``state_dict`` keys do not change and nothing is copied), and computes

    route (moesys.route, or the block's own router as traced code; a router returning a
           capacity-masked dispatch mask is called on the block's [B, S, D] input and gives the
           tokens past its capacity weight 0)
      -> moesys.moe_experts on views of the stacked expert weights (and expert biases), dropless or
         with the block's own GShard capacity factor; a block that weights the experts' inputs
         (Llama 4: expert(weight x token)) runs them top-1 on the T*K weighted slots, summed per token
      -> (+ shared expert, optionally sigmoid-gated) (x output scale) (+ output bias)
      -> moesys.load_balancing_loss

Shape legend: T tokens · D model dim · F expert hidden · H up rows · E experts · K top-k.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ...errors import MoesysError
from ...nn import _is_capturing, flatten_tokens
from ..canonicalize import Recognition
from ..hf_capture import AUX_COEF_ATTRIBUTES
from .experts import ExpertsSpec, dropout_place_problem, expert_dropout_reason, expert_dropouts, expert_modules
from .structure import (RouterSpec, call_router, dispatched_routes, number_attr, route_known, router_logits,
                        router_values)


def block_kind(module: nn.Module) -> str:
    """Report name of a block: ``hf.<Class>`` for transformers classes, the class name otherwise."""
    cls = type(module)
    return f"hf.{cls.__name__}" if cls.__module__.startswith("transformers.") else cls.__name__


def adopt(new: nn.Module, original: nn.Module, reserved: tuple[str, ...] = ()) -> None:
    """Register the original's children, parameters and buffers on ``new`` under the same names.
    Stateless children named in ``reserved`` (JetMoE's ``activation`` module) are not adopted: the
    canonical form computes what they did under that attribute name."""
    for name, child in original.named_children():
        if name in reserved and not any(True for _ in itertools.chain(child.parameters(), child.buffers())):
            continue
        new.add_module(name, child)
    for name, param in original.named_parameters(recurse=False):
        new.register_parameter(name, param)
    for name, buffer in original.named_buffers(recurse=False):
        new.register_buffer(name, buffer, persistent=name not in original._non_persistent_buffers_set)
    new.training = original.training     # its own flag: the adopted children keep theirs


@contextlib.contextmanager
def _offload_hooks_loaded(modules: list[nn.Module]):
    """Around reading weights of ``modules`` without calling them: the offload hooks accelerate
    attaches as ``_hf_hook`` (``cpu_offload``, ``disk_offload``, a ``device_map`` with offloaded
    modules) load weights in their ``pre_forward`` and drop them in ``post_forward``; run both, as a
    call of each module would. Without such hooks (and while capturing) nothing happens."""
    hooked = [] if _is_capturing() else list(dict.fromkeys(
        m for module in modules for m in module.modules() if getattr(m, "_hf_hook", None) is not None))
    for module in hooked:
        module._hf_hook.pre_forward(module)
    try:
        yield
    finally:
        for module in hooked:
            module._hf_hook.post_forward(module, None)


def own_aux_loss_coef(block: nn.Module) -> float:
    """The block's own numeric ``router_aux_loss_coef`` / ``aux_loss_coef`` (a user's block holding
    ``aux_loss_coef = 0.01``), else 0."""
    coef = number_attr(block, AUX_COEF_ATTRIBUTES, 0.0)
    return 0.0 if isinstance(coef, bool) else float(coef)


class CanonicalMoEBlock(nn.Module):
    """A recognised MoE block in canonical form (see the module docstring).

    ``aux_loss`` holds ``aux_loss_coef`` x the load-balancing loss of the last eager forward;
    compiled programs expose the sum over layers as ``program.aux_loss``. The coefficient is the
    block's own ``router_aux_loss_coef`` / ``aux_loss_coef`` unless given (0 where it has none; a
    Hugging Face model's config sets it afterwards, ``hf_capture.apply_aux_loss_coef``).
    ``capacity_factor`` > 0: slots past GShard capacity are dropped, as the probed block drops them.
    """

    _moesys_canonical = True

    def __init__(self, original: nn.Module, router: RouterSpec, experts: ExpertsSpec,
                 shared: Optional[str] = None, shared_gate: Optional[str] = None,
                 aux_loss_coef: Optional[float] = None, kind: Optional[str] = None, output_bias: Optional[str] = None,
                 output_scale: float = 1.0, extra_outputs: tuple[str, ...] = (), capacity_factor: float = 0.0,
                 weights_on_input: bool = False, flat_output: bool = False):
        super().__init__()
        if aux_loss_coef is None:
            aux_loss_coef = own_aux_loss_coef(original)
        adopt(self, original, reserved=("activation",))
        self.router_spec, self.experts_spec = router, experts
        self.shared_path, self.shared_gate_path = shared, shared_gate
        self.output_bias = output_bias     # the block's own [D] bias added to its output (JetMoE)
        self.output_scale = output_scale   # 0.5: routed and shared experts averaged (Cohere2-MoE)
        # router values the block returns after its output, as the original did ("weights", "ids",
        # "logits"): gpt-oss returns (output, router scores), Llama 4 (output, router logits)
        self.extra_outputs = tuple(extra_outputs)
        # the top-k weights scale the experts' inputs, not their outputs (Llama 4)
        self.weights_on_input = weights_on_input
        self.flat_output = flat_output     # the output as [tokens, dim], not in the input's shape (Llama 4)
        self.num_experts, self.top_k = experts.num_experts, router.top_k
        self.dim, self.ffn_dim, self.activation = experts.dim, experts.ffn_dim, experts.activation
        self.capacity_factor: Optional[float] = capacity_factor or None   # None: dropless
        self.aux_loss_coef = aux_loss_coef
        self.source = f"{type(original).__module__}.{type(original).__qualname__}"
        self.kind = kind or block_kind(original)
        self.aux_loss: Optional[Tensor] = None
        # dropout inside the experts (Switch Transformers' between the projections): applied with
        # moesys.expert_dropout_keep while those modules are in training mode
        self.expert_dropouts = tuple(expert_dropouts(self.get_submodule(experts.path), experts.path))
        self._dropout_problem: Optional[str] = None   # expert_dropout_problem's answer, once asked

    def _dropout_modules(self) -> dict[str, nn.Module]:
        return {path: self.get_submodule(path) for path in self.expert_dropouts}

    def expert_dropout_refusal(self) -> str:
        """For a recogniser, after the block is built (before any tracing: the check runs an
        expert): why a block in training mode is left because of its experts' dropout, "" where it
        is not."""
        dropouts = self._dropout_modules()
        problem = self.expert_dropout_problem()
        if not problem or not any(dropout.training for dropout in dropouts.values()):
            return ""
        return expert_dropout_reason(dropouts, problem)

    def expert_dropout_p(self) -> float:
        """The probability of the experts' dropout now: 0 while its modules are in eval mode;
        refused in training mode where it has no place in the canonical experts."""
        dropouts = self._dropout_modules()
        if not any(dropout.training for dropout in dropouts.values()):
            return 0.0
        problem = self.expert_dropout_problem()
        if problem:
            raise MoesysError(f"the canonicalized MoE block {self.source} runs in training mode, but "
                              + expert_dropout_reason(dropouts, problem, otherwise="run it in eval mode"))
        return next(iter(dropouts.values())).p

    def expert_dropout_problem(self) -> str:
        """Why the experts' dropout modules have no place in the canonical experts ("" when they
        have, or when there are none), checked once: they must share one p and act as dropout on
        the activation between the projections. The first expert is run in training mode on random
        rows and compared with the canonical experts under ``expert_dropout_keep``'s mask from the
        same random state."""
        if self._dropout_problem is None:
            self._dropout_problem = self._find_dropout_problem() if self.expert_dropouts else ""
        return self._dropout_problem

    def _find_dropout_problem(self) -> str:
        dropouts = self._dropout_modules()
        probabilities = sorted({dropout.p for dropout in dropouts.values()})
        if len(probabilities) > 1:
            return f"their dropout modules differ in p ({probabilities}), where the canonical experts have one"
        experts = self.get_submodule(self.experts_spec.path)
        listed = expert_modules(experts)
        if not listed:
            return "they are stacked weights, whose dropout's place cannot be checked one expert at a time"
        return dropout_place_problem(listed[0][1], self.expert_weights(), self.expert_biases(), self.activation,
                                     probabilities[0])

    @property
    def expert_param_names(self) -> list[str]:
        """Names (relative to this block) of the parameters holding expert rows, e.g.
        ``["experts.gate_up_proj", "experts.down_proj"]``: what expert parallelism shards."""
        prefix = f"{self.experts_spec.path}." if self.experts_spec.path else ""
        return [prefix + name for name in self.experts_spec.param_names()]

    @property
    def router_path(self) -> str:
        return self.router_spec.path

    def expert_weights(self) -> tuple[Tensor, Tensor]:
        """(w_up_EHD, w_down_EDF): views of the original parameters (or a stack of them)."""
        return self.experts_spec.weights(self.get_submodule(self.experts_spec.path))

    def expert_biases(self) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(b_up_EH, b_down_ED): the experts' biases, None where they have none."""
        return self.experts_spec.biases(self.get_submodule(self.experts_spec.path))

    def route(self, x_TD: Tensor, tokens_shape: Optional[torch.Size] = None
              ) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        """(weights_TK, ids_TK, scores_TE or None, logits_TE or None) for the tokens;
        ``tokens_shape``: the block's input shape, which a router counting its capacity per
        sequence is called on."""
        router = self.get_submodule(self.router_spec.path)
        args = tuple(getattr(self, name) for name in self.router_spec.args)
        if self.router_spec.known:
            logits_TE = router_logits(router, self.router_spec, x_TD)
            # three names: torch.fx unpacks a traced call's result by the count of names, not by *
            weights_TK, ids_TK, scores_TE = route_known(router, self.router_spec, x_TD, args, logits_TE)
            return weights_TK, ids_TK, scores_TE, logits_TE
        if self.router_spec.per_sequence and tokens_shape is not None:
            outputs = router(x_TD.reshape(tokens_shape), *args)
            leaves = [v.reshape(x_TD.shape[0], -1) if isinstance(v, Tensor) else v for v in router_values(outputs)]
        else:
            leaves = router_values(call_router(router, self.router_spec, x_TD, args))
        where = self.router_spec.outputs
        logits_TE = leaves[where["logits"]] if "logits" in where else None
        scores_TE = None if logits_TE is None else logits_TE.float().softmax(-1)
        if "dispatch" in where:
            return (*dispatched_routes(leaves[where["dispatch"]], leaves[where["weights"]], logits_TE), scores_TE,
                    logits_TE)
        return leaves[where["weights"]], leaves[where["ids"]].long(), scores_TE, logits_TE

    def shared_output(self, x_TD: Tensor) -> Tensor:
        shared_TD = self.get_submodule(self.shared_path)(x_TD)
        if self.shared_gate_path:
            shared_TD = torch.sigmoid(self.get_submodule(self.shared_gate_path)(x_TD)) * shared_TD
        return shared_TD

    def balance_loss(self, scores_TE: Tensor, ids_TK: Tensor) -> Tensor:
        return torch.ops.moesys.load_balancing_loss(scores_TE, ids_TK, self.aux_loss_coef)

    def experts_output(self, x_TD: Tensor) -> tuple[Tensor, Optional[Tensor], Tensor]:
        """(y_TD, aux_loss or None, ids_TK): the routed experts plus the shared expert."""
        return self._experts(x_TD)[:3]

    def _experts(self, x_TD: Tensor, tokens_shape: Optional[torch.Size] = None
                 ) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor, Optional[Tensor]]:
        """``experts_output``, the top-k weights and the router logits (``tokens_shape``: as in
        ``route``)."""
        read_directly = [self.get_submodule(self.experts_spec.path)]
        if self.router_spec.known:               # its weight is read, the router module is not called
            read_directly.append(self.get_submodule(self.router_spec.path))
        dropout_p = self.expert_dropout_p()
        with _offload_hooks_loaded(read_directly):
            weights_TK, ids_TK, scores_TE, logits_TE = self.route(x_TD, tokens_shape)
            rows_RD, ids_RK, weights_RK, top_k = x_TD, ids_TK, weights_TK, self.top_k
            if self.weights_on_input:   # one row per routed slot, weighted, and top-1 to its expert
                rows_RD = (x_TD.unsqueeze(1) * weights_TK.unsqueeze(-1).to(x_TD.dtype)).flatten(0, 1)
                ids_RK, weights_RK, top_k = ids_TK.reshape(-1, 1), torch.ones_like(weights_TK).reshape(-1, 1), 1
            w_up_EHD, w_down_EDF = self.expert_weights()
            biases = self.expert_biases()
            extra = biases if any(b is not None for b in biases) else ()   # bias-free: the five-weight call
            if dropout_p > 0:    # after the biases: one mask row per routed slot (k a constant, not a traced size)
                extra = (*biases, torch.ops.moesys.expert_dropout_keep(rows_RD, top_k, self.ffn_dim, dropout_p))
            y_TD = torch.ops.moesys.moe_experts(rows_RD, ids_RK, weights_RK, w_up_EHD, w_down_EDF, self.activation,
                                                self.capacity_factor or 0.0, *extra)
            if self.weights_on_input:
                y_TD = y_TD.view(x_TD.shape[0], self.top_k, -1).sum(1)
        if self.shared_path:
            y_TD = y_TD + self.shared_output(x_TD)
        if self.output_scale != 1.0:
            y_TD = y_TD * self.output_scale
        if self.output_bias:
            y_TD = y_TD + getattr(self, self.output_bias)
        aux_loss = None if scores_TE is None else self.balance_loss(scores_TE, ids_TK)
        if aux_loss is not None and not _is_capturing():
            self.aux_loss = aux_loss
        return y_TD, aux_loss, ids_TK, weights_TK, logits_TE

    def forward(self, hidden_states: Tensor) -> Any:
        x_TD = flatten_tokens(hidden_states, self.dim, f"the canonicalized MoE block {self.source}")
        y_TD, _, ids_TK, weights_TK, logits_TE = self._experts(x_TD, hidden_states.shape)
        y = y_TD if self.flat_output else y_TD.reshape(hidden_states.shape)
        if not self.extra_outputs:
            return y
        routed = {"weights": weights_TK, "ids": ids_TK, "logits": logits_TE}
        return (y, *(routed[name] for name in self.extra_outputs))

    def details(self) -> dict[str, Any]:
        facts = dict(num_experts=self.num_experts, top_k=self.top_k, dim=self.dim, ffn_dim=self.ffn_dim,
                     activation=self.activation, router=self.router_spec.describe())
        facts["experts"] = self.experts_spec.describe()
        if self.capacity_factor:
            facts["capacity_factor"] = self.capacity_factor
        if "dispatch" in self.router_spec.outputs:
            facts["capacity"] = self._router_capacity()
        if self.expert_dropouts:
            p = self.get_submodule(self.expert_dropouts[0]).p
            facts["expert_dropout"] = (f"{len(self.expert_dropouts)} modules, p={p:g} between the projections in "
                                       f"training mode (moesys.expert_dropout_keep)")
        if self.shared_path:
            facts["shared"] = self.shared_path + (f"*sigmoid({self.shared_gate_path})" if self.shared_gate_path else "")
        if self.output_scale != 1.0:
            facts["output_scale"] = self.output_scale
        if self.weights_on_input:
            facts["weights"] = "scale the experts' inputs"
        if self.output_bias:
            facts["output_bias"] = self.output_bias
        if self.extra_outputs:
            facts["returns"] = "(output, " + ", ".join(f"router {name}" for name in self.extra_outputs) + ")"
        if not self.experts_spec.stacked:
            with torch.no_grad():
                tensors = [*self.expert_weights(), *(b for b in self.expert_biases() if b is not None)]
                copies = [t for t in tensors if t._base is None]   # not views: built each step
            if copies:
                facts["stack_copy_bytes"] = sum(w.numel() * w.element_size() for w in copies)
        return facts

    def _router_capacity(self) -> str:
        """The capacity a router applies itself (Switch Transformers' ``expert_capacity``)."""
        router = self.get_submodule(self.router_spec.path)
        count = number_attr(router, ("expert_capacity",), None)
        where = "per sequence" if self.router_spec.per_sequence else "over the tokens of a call"
        held = f"{count} tokens per expert" if count is not None else "the router's own"
        return f"{held} {where}, applied by router '{self.router_spec.path}'; tokens past it weighted 0"

    def extra_repr(self) -> str:
        return (f"from {self.source}: num_experts={self.num_experts}, top_k={self.top_k}, dim={self.dim}, "
                f"ffn_dim={self.ffn_dim}, activation={self.activation!r}, router={self.router_spec.describe()}"
                + (f", capacity_factor={self.capacity_factor:g}" if self.capacity_factor else ""))


def recognize_canonical_block(module: nn.Module, path: str) -> Optional[Recognition]:
    """A block canonicalized earlier (compiling the same model twice) is canonical as it is."""
    if isinstance(module, CanonicalMoEBlock):
        return Recognition(kind=module.kind, details=module.details())
    return None
