"""PEFT adapters (LoRA and the others) on a compiled model.

A ``peft.PeftModel`` is compiled as it is: its adapter layers are code of the model like any
other, traced into the graph, so the program computes what the PeftModel computes when it was
compiled, and trains the adapters' parameters (and whatever else has ``requires_grad``) under
their PEFT names. A Hugging Face model inside one is captured as a Hugging Face model
(``hf_capture.is_hf_model`` looks through the wrapper).

What PEFT switches at run time does not reach a captured graph: ``disable_adapter()`` (the
reference pass of preference training), ``set_adapter``, ``merge_adapter`` (which also adds the
update into the shared base weights, so a program that still adds it would count it twice). The
program therefore records the adapters' state when it is compiled (``AdapterState``) and refuses a
call made in another one, saying what changed. peft is never imported here: a model can only be
a PeftModel if peft is already loaded.

Inside MoE blocks: a LoRA layer around an expert's Linear stands for that Linear with the weight
``W + scaling · B @ A`` (``is_lora_linear``, ``adapted_weight``; the experts recognizer stacks
those), its A and B counting as the expert's parameters. LoRA on stacked expert parameters
(PEFT's ``ParamWrapper``) is traced code around the experts, which stay canonical; the report
names it (``parameter_adapters_note``), and expert parallelism slices its A and B per rank
(``passes/expert_rows.py``).
"""

from __future__ import annotations

import sys
from typing import Optional

from torch import Tensor, nn

from ..errors import UntraceableModelError
from ..ir import fetch


def _peft():
    return sys.modules.get("peft")


def peft_base_model(model: nn.Module) -> Optional[nn.Module]:
    """The model a ``PeftModel`` wraps (``get_base_model()``, with the adapter layers in it); None
    for any other model."""
    peft = _peft()
    return model.get_base_model() if peft is not None and isinstance(model, peft.PeftModel) else None


# PEFT methods that pass their virtual tokens as a KV cache (past_key_values), which programs do not take
CACHE_PROMPT_METHODS = ("PREFIX_TUNING",)


def check_peft_model(model: nn.Module) -> None:
    """Refuse, before capture, an adapter that feeds the model a KV cache (prefix tuning)."""
    if peft_base_model(model) is None:
        return
    method = str(getattr(model.active_peft_config, "peft_type", ""))
    if method.rpartition(".")[2] in CACHE_PROMPT_METHODS:
        raise UntraceableModelError(
            f"{type(model).__name__}: its active adapter '{model.active_adapter}' is {method.rpartition('.')[2]}, "
            f"which passes its virtual tokens to the model as a KV cache (past_key_values); programs are captured "
            f"without a cache: use prompt tuning (PromptTuningConfig, virtual tokens as input embeddings) or LoRA")


def untraceable_adapter_fix(model: nn.Module, path: str) -> Optional[str]:
    """The fix to show where capture failed inside a PEFT adapter layer's own code (LoHa and LoKr
    draw a random number for their module dropout in training mode); None elsewhere."""
    peft = _peft()
    if peft is None or path == "<root>":
        return None
    from peft.tuners.tuners_utils import BaseTunerLayer
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    if not isinstance(module, BaseTunerLayer):
        return None
    mode = "training" if module.training else "eval"
    method = type(module).__module__.split(".")[2:3] or ["adapter"]     # peft.tuners.<method>.layer
    otherwise = " or compile in eval mode" if module.training else ""
    return (f"'{path}' is a PEFT {method[0]} layer ({type(module).__name__}), whose {mode}-mode forward cannot be "
            f"captured: use an adapter method that can (LoRA, DoRA, IA3, AdaLoRA, VeRA){otherwise}")


def is_lora_linear(module: nn.Module) -> bool:
    """A PEFT LoRA layer around an ``nn.Linear`` whose update is a weight: ``W + scaling · B @ A``
    (no DoRA magnitude, no bias of its own, not a transposed Conv1D)."""
    peft = _peft()
    if peft is None:
        return False
    from peft.tuners.lora import Linear as LoraLinear
    return (isinstance(module, LoraLinear) and isinstance(module.base_layer, nn.Linear) and not module.fan_in_fan_out
            and not any(module.use_dora.values()) and all(m.bias is None for m in module.lora_B.values()))


def adapter_paths(module: nn.Module) -> list[str]:
    """The paths of the LoRA layers (``is_lora_linear``) inside ``module``."""
    return [name for name, m in module.named_modules() if name and is_lora_linear(m)]


def in_adapter(name: str, adapters: list[str]) -> bool:
    """Whether ``name`` (a module or parameter path) is part of one of the LoRA layers at
    ``adapters`` other than the Linear it wraps (its A and B matrices)."""
    return any(name.startswith(f"{adapter}.") and not name.startswith(f"{adapter}.base_layer") for adapter in adapters)


def adapted_weight(module: nn.Module, weight_path: str) -> Tensor:
    """The weight at ``weight_path`` inside ``module`` as its Linear applies it: for the base layer of
    a LoRA layer, its weight plus the update of each active adapter (none while the adapters are
    disabled or merged into it, as the layer's forward then calls the base layer alone)."""
    weight = fetch(module, weight_path)
    holder_path, _, attr = weight_path.rpartition(".")[0].rpartition(".")
    holder = fetch(module, holder_path) if holder_path else module
    if attr != "base_layer" or not is_lora_linear(holder) or holder.disable_adapters or holder.merged:
        return weight
    for adapter in holder.active_adapters:
        if adapter in holder.lora_A:
            weight = weight + holder.get_delta_weight(adapter)
    return weight


def parameter_adapters_note(model: nn.Module, path: str) -> str:
    """For a report: the PEFT ``ParamWrapper`` layers around the module at ``path`` (LoRA on its
    parameters, ``target_parameters``), which add their update to its weights at each call; empty
    where none wraps it."""
    peft = _peft()
    if peft is None:
        return ""
    from peft.tuners.lora import ParamWrapper
    wrappers = []
    while path:
        path = path.rpartition(".")[0]
        module = model.get_submodule(path)
        if not isinstance(module, ParamWrapper):
            break
        wrappers.append((path, module.parameter_name))
    if not wrappers:
        return ""
    names = ", ".join(sorted(name for _, name in wrappers))
    return f"; PEFT's ParamWrapper '{wrappers[-1][0]}' adds its LoRA update to {names} at each call"


class AdapterState:
    """The adapters' state of a PeftModel, as PEFT switches it: enabled or not, which are active,
    which are merged (model level, and per adapter layer). ``of(model)`` is None for other models."""

    def __init__(self, model: nn.Module, layers: list[nn.Module]):
        self.model = model
        self.layers = layers
        self.compiled = self.read()

    @classmethod
    def of(cls, model: nn.Module) -> Optional["AdapterState"]:
        if peft_base_model(model) is None:
            return None
        from peft.tuners.tuners_utils import BaseTunerLayer
        return cls(model, [m for m in model.modules() if isinstance(m, BaseTunerLayer)])

    def read(self) -> dict[str, object]:
        layers = self.layers
        return {"disabled": bool(getattr(self.model, "_adapters_disabled", False))
                or any(layer.disable_adapters for layer in layers),
                "active": tuple(self.model.active_adapters),
                "merged": tuple(sorted({name for layer in layers for name in layer.merged_adapters}))}

    def check(self, model_name: str) -> None:
        """Refuse a call made with the adapters switched since the program was compiled."""
        now = self.read()
        if now == self.compiled:
            return
        raise RuntimeError(
            f"{model_name}: its PEFT adapters are {_describe(now)} now, but were {_describe(self.compiled)} when the "
            f"program was compiled, which is what its graph computes; call the PeftModel itself for a pass with them "
            f"switched (a reference pass under disable_adapter()), or compile a program in that state")


def _describe(state: dict[str, object]) -> str:
    merged = f", {list(state['merged'])} merged into the base weights" if state["merged"] else ""
    return f"{'disabled' if state['disabled'] else 'enabled'} (active {list(state['active'])}{merged})"
