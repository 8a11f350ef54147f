"""Capturing Hugging Face transformers models as they are.

Their ``forward`` takes keyword arguments, builds caches and masks, and returns a ``ModelOutput``;
v5 models are not fx-traceable (the fx tracer cannot re-code ``**kwargs`` forwards), but non-strict
``torch.export`` captures them once the KV cache is off. This adapter, entered around capture by
``tracing.capture``:

* turns the cache off (``config.use_cache = False``; restored afterwards): training programs and
  ring inference run full sequences, and a cache object is not a tensor output;
* refuses ``use_cache=True`` in the example (``refuse_use_cache``; the binder refuses it in a call);
* reads position ids that restart mid-row (packed sequences) as eager reads them with the
  example's arguments: as one sequence where eager's call builds a cache (``config.use_cache``
  on), as packed sequences where it does not;
* makes ``module.to(...)`` inside ``forward`` a no-op when nothing would change (Switch
  Transformers' router re-assigns ``self.classifier = self.classifier.to(self.dtype)`` on every
  call, which export cannot replay on its tracked parameters);
* builds the all-ones attention mask inside the graph for an encoder-decoder model whose example
  leaves ``attention_mask`` out (``_default_mask_built``): eager builds it only when not compiling
  (``is_torchdynamo_compiling``), so the captured encoder would index a None mask;
* asks for ``torch.export`` first (fx would fail anyway);
* gives canonical MoE blocks the model's own aux-loss coefficient (``router_aux_loss_coef``);
* warns when gradient checkpointing is on: capture runs ``torch.utils.checkpoint`` as plain code,
  so the program computes the same values but keeps every activation (no recomputation).

The output type survives: export's output spec rebuilds the model's own ``ModelOutput`` subclass
(fields that were None stay None), so ``program(ids).logits`` works as ``model(ids).logits`` does.
transformers is never imported here; a model can only be a Hugging Face model if it already is.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import types
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from ..errors import UntraceableModelError, warn_user
from .adapters import peft_base_model

# what a causal LM multiplies its load-balancing loss by: its own attribute (set from whichever
# config field its family uses), else a config field (a base model without the LM head)
AUX_COEF_ATTRIBUTES = ("router_aux_loss_coef", "aux_loss_coef")
AUX_COEF_FIELDS = ("router_aux_loss_coef", "aux_loss_coef", "aux_loss_alpha", "moe_loss_weight")
AUX_COEF_SUBCONFIGS = ("text_config", "ffn_config")


def is_hf_model(model: nn.Module) -> bool:
    """A Hugging Face model, or a PEFT ``PeftModel`` around one (its ``forward`` passes the model's
    arguments on, its attributes read through to the model's: see ``adapters``)."""
    transformers = sys.modules.get("transformers")
    wrapped = peft_base_model(model)
    return transformers is not None and isinstance(model if wrapped is None else wrapped, transformers.PreTrainedModel)


def _configs(model: nn.Module) -> list:
    """The model's config and the sub-configs its submodules hold (text_config, ...), once each."""
    found: dict[int, object] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            found.setdefault(id(config), config)
    return list(found.values())


def aux_loss_coef(model: nn.Module) -> Optional[float]:
    """The model's load-balancing coefficient (JetMoE's ``aux_loss_coef``, DBRX's
    ``ffn_config.moe_loss_weight``, ...); None where it names none."""
    config = getattr(model, "config", None)
    holders = [model, config, *(getattr(config, name, None) for name in AUX_COEF_SUBCONFIGS)]
    fields = [AUX_COEF_ATTRIBUTES] + [AUX_COEF_FIELDS] * (len(holders) - 1)
    return next((float(value) for holder, names in zip(holders, fields) for name in names
                 if isinstance(value := getattr(holder, name, None), (int, float)) and not isinstance(value, bool)),
                None)


def apply_aux_loss_coef(model: nn.Module) -> None:
    """Canonical blocks get the model's coefficient (0 for aux-loss-free models such as DeepSeek-V3)."""
    coef = aux_loss_coef(model)
    for module in model.modules():
        if getattr(module, "_moesys_canonical", False) and hasattr(module, "aux_loss_coef") and coef is not None:
            module.aux_loss_coef = coef


@contextlib.contextmanager
def _cache_off(model: nn.Module) -> Iterator[bool]:
    saved = [(config, config.use_cache) for config in _configs(model) if hasattr(config, "use_cache")]
    for config, _ in saved:
        config.use_cache = False
    try:
        yield True     # True: try torch.export before fx
    finally:
        for config, value in saved:
            config.use_cache = value


def eager_builds_cache(model: nn.Module, example_inputs: Sequence[Any], example_kwargs: dict) -> bool:
    """Whether ``model(*example_inputs, **example_kwargs)`` in eager builds a KV cache: its
    ``use_cache`` argument, else ``config.use_cache``, as transformers' ``merge_with_config_defaults``
    resolves it (off in training with gradient checkpointing on)."""
    use_cache = given_keyword(_example_arguments(model, example_inputs, example_kwargs), "use_cache", "kwargs")
    if use_cache is None:
        use_cache = getattr(getattr(model, "config", None), "use_cache", None)
    return bool(use_cache) and not (model.training and _checkpointing_on(model))


def _checkpointing_on(model: nn.Module) -> bool:
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


@contextlib.contextmanager
def _packing_detection_off() -> Iterator[None]:
    """transformers reads position ids that restart mid-row as packed sequences (a block-diagonal
    mask) only when no cache and no attention mask is given; eager's default call passes a cache,
    so it never does. Capture runs without a cache, and ``find_packed_sequence_indices`` always
    answers with a mask while tracing: it answers None here, as it does in such an eager call."""
    masking_utils = sys.modules.get("transformers.masking_utils")
    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if original is None:
        yield
        return
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


def _to_if_needed(module: nn.Module, *args, **kwargs) -> nn.Module:
    """``module.to(...)``, returning ``module`` untouched when its tensors already match."""
    device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
    tensors = list(module.parameters()) + list(module.buffers())
    if all((device is None or t.device == device) and (dtype is None or not t.is_floating_point() or t.dtype == dtype)
           for t in tensors):
        return module
    return nn.Module.to(module, *args, **kwargs)


def _phimoe_rotary_forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's rotary embedding with a scaled ``rope_type`` (its ``longrope`` config), as eager
    computes it but traceable: eager picks ``long_mscale`` or ``short_mscale`` with a Python
    branch on ``max(position_ids) + 1`` against ``original_max_position_embeddings``, here a
    ``torch.where``; the frequencies come from the config (``rope_init_fn``), as in eager."""
    parameters = self.config.rope_parameters
    inv_freq, _ = self.rope_init_fn(self.config)
    longer = position_ids.max() + 1 > parameters["original_max_position_embeddings"]
    mscale = torch.where(longer, parameters["long_mscale"], parameters["short_mscale"])
    freqs = position_ids[..., None].float() * inv_freq.to(device=x.device, dtype=torch.float)
    angles = torch.cat((freqs, freqs), dim=-1)
    return (angles.cos() * mscale).to(x.dtype), (angles.sin() * mscale).to(x.dtype)


def _takes_traceable_rotary(module: nn.Module) -> bool:
    """A PhiMoE rotary embedding with a scaled rope type whose forward is the one
    ``_phimoe_rotary_forward`` stands in for (its mscale branch on the positions)."""
    if type(module).__name__ != "PhimoeRotaryEmbedding":
        return False
    parameters = getattr(getattr(module, "config", None), "rope_parameters", None) or {}
    if parameters.get("rope_type", "default") == "default" or not {"long_mscale", "short_mscale"} <= set(parameters):
        return False
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    return 'rope_parameters["long_mscale"]' in source and "self.rope_init_fn(self.config)" in source


def _dynamic_ntk_rotary_forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type=None):
    """A rotary embedding with dynamic NTK scaling (``rope_type`` "dynamic"), traceable. Eager
    recomputes the frequencies with Python branches on L = max(position_ids) + 1: scaled for L when
    L is longer than every call before, back to the original ones when L is within the original
    length. Here they come from the call's own L (``torch.where``): the original frequencies up
    to the original length, else transformers' own dynamic NTK function at L, as eager computes
    them when it grows. That is eager's result for every call no longer than the original length
    and every call longer than all before it (prefill, then the decoding steps). After a longer
    call, eager keeps that call's frequencies for a shorter one still past the original length,
    where this computes the shorter one's. The model's own forward reads them in place of its
    ``inv_freq`` buffer, which the program leaves alone: the model, called eagerly later, keeps its
    own state."""
    update = type(self).forward   # transformers' dynamic_rope_update wrapper around the forward
    rope_type = self.rope_type if layer_type is None else self.rope_type[layer_type]
    prefix, by_layer = ("", {}) if layer_type is None else (f"{layer_type}_", {"layer_type": layer_type})
    if "dynamic" not in rope_type:   # another layer type's rope: transformers' own update
        return update(self, x, position_ids, **by_layer)
    length = position_ids.max() + 1
    scaled, _ = update.__globals__["ROPE_INIT_FUNCTIONS"][rope_type](self.config, x.device, seq_len=length,
                                                                     **by_layer)
    original = getattr(self, f"{prefix}original_inv_freq").to(x.device)
    buffers, name = self._buffers, f"{prefix}inv_freq"
    kept, buffers[name] = buffers[name], torch.where(length > self.original_max_seq_len, scaled, original)
    try:   # the model's own forward reads the call's frequencies; its buffer is left as it was
        return update.__wrapped__(self, x, position_ids, **by_layer)
    finally:
        buffers[name] = kept


def _takes_dynamic_ntk_rotary(module: nn.Module) -> bool:
    """A rotary embedding whose forward is transformers' ``dynamic_rope_update`` around its own,
    with a dynamic rope type (in at least one layer type, where it has several)."""
    update = getattr(type(module), "forward", None)
    if getattr(update, "__wrapped__", None) is None or "ROPE_INIT_FUNCTIONS" not in getattr(update, "__globals__", {}):
        return False
    if not update.__code__.co_filename.endswith("modeling_rope_utils.py"):
        return False
    rope_type = getattr(module, "rope_type", None)
    types_used = list(rope_type.values()) if isinstance(rope_type, dict) else [rope_type]
    return any(isinstance(kind, str) and "dynamic" in kind for kind in types_used)


@contextlib.contextmanager
def _capturable(model: nn.Module, packing_detected: bool) -> Iterator[bool]:
    modules = list(model.modules())
    rotary = {module: _phimoe_rotary_forward for module in modules if _takes_traceable_rotary(module)}
    rotary.update({module: _dynamic_ntk_rotary_forward for module in modules if _takes_dynamic_ntk_rotary(module)})
    for module in modules:
        object.__setattr__(module, "to", types.MethodType(_to_if_needed, module))
    for module, forward in rotary.items():
        object.__setattr__(module, "forward", types.MethodType(forward, module))
    try:
        with _cache_off(model) as export_first, \
                (contextlib.nullcontext() if packing_detected else _packing_detection_off()):
            yield export_first
    finally:
        for module in modules:
            module.__dict__.pop("to", None)
        for module in rotary:
            module.__dict__.pop("forward", None)


MASKED_INPUTS = ("input_ids", "inputs_embeds")   # what an encoder's default all-ones mask takes its [B, S] from


def needs_default_mask(model: nn.Module, example_inputs: Sequence[Any], example_kwargs: dict) -> bool:
    """An encoder-decoder model (T5, Switch Transformers) whose forward takes ``attention_mask``
    and whose example leaves it out: its encoder builds the all-ones default only when not
    compiling, so capture must build it instead. Decoder-only models build their masks inside the
    graph themselves and are left alone."""
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return False
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    given = _example_arguments(model, example_inputs, example_kwargs)
    return "attention_mask" in parameters and given.get("attention_mask") is None and any(
        isinstance(given.get(name), torch.Tensor) for name in MASKED_INPUTS)


@contextlib.contextmanager
def _default_mask_built(model: nn.Module) -> Iterator[None]:
    """While capturing, ``model.forward`` given no ``attention_mask`` gets the all-ones [B, S] mask
    of its input ids (or embeddings), built in the graph from their shape: what eager's
    ``attention_mask=None`` means to the encoder (every token attended), and what it passes on to
    the decoder's cross-attention (which then attends every encoder token too)."""
    forward = model.forward
    signature = inspect.signature(forward)

    def forward_with_mask(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind_partial(*args, **kwargs)
        tokens = next((bound.arguments[name] for name in MASKED_INPUTS
                       if isinstance(bound.arguments.get(name), torch.Tensor)), None)
        if bound.arguments.get("attention_mask") is None and tokens is not None:
            bound.arguments["attention_mask"] = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
        return forward(*bound.args, **bound.kwargs)
    forward_with_mask.__signature__ = signature
    from .tracing import forward_replaced     # tracing imports this module
    with forward_replaced(model, forward_with_mask):
        yield


def warn_checkpointing_dropped(model: nn.Module) -> None:
    """Hugging Face checkpoints layers only in train mode; the captured graph has no checkpoint
    regions (export traces through ``torch.utils.checkpoint``), so activation memory does not shrink."""
    flag = next((name for name in ("is_activation_checkpointing", "is_gradient_checkpointing")
                 if hasattr(type(model), name)), None)     # newer transformers deprecate the second name
    if model.training and flag is not None and getattr(model, flag):
        warn_user(f"{type(model).__name__} has gradient checkpointing on, which the compiled program does not "
                  f"keep: it computes the same loss and gradients but stores every activation; call "
                  f"model.gradient_checkpointing_disable() before compiling, and lower the batch size if "
                  f"memory runs out")


def refuse_use_cache(model: nn.Module, arguments: dict, where: str) -> None:
    """``use_cache=True`` (given directly or through ``**kwargs``) asks a Hugging Face model for a
    KV cache, which programs do not take nor return: refused, naming ``where`` it was given."""
    if not is_hf_model(model):
        return
    if given_keyword(arguments, "use_cache", "kwargs") is True:
        raise ValueError(f"{type(model).__name__}: use_cache=True in {where}, but programs are captured without a KV "
                         f"cache and return none; decode with program.generate (ring programs keep their own "
                         f"cache), or leave use_cache out or False")


# forward keywords that only switch what a Hugging Face model returns (or whether it keeps a cache);
# a call may restate the value the program was compiled with (``use_cache=False`` in a training loop)
OUTPUT_SWITCHES = ("use_cache", "return_dict", "output_attentions", "output_hidden_states", "output_router_logits")


def switch_defaults(model: nn.Module) -> dict[str, Any]:
    """The value each of ``OUTPUT_SWITCHES`` takes in ``model``'s forward when a call leaves it
    out (its config's field), for a Hugging Face model; empty for any other model."""
    if not is_hf_model(model):
        return {}
    config = model.config
    defaults = {name: bool(getattr(config, name, False)) for name in OUTPUT_SWITCHES}
    defaults["return_dict"] = bool(getattr(config, "return_dict", True))
    return defaults


def given_keyword(arguments: dict, name: str, var_keyword: Optional[str]) -> Any:
    """The value of keyword ``name`` in bound ``arguments``, given directly or through
    ``**var_keyword``; None where it was not given."""
    if name in arguments:
        return arguments[name]
    return arguments.get(var_keyword, {}).get(name) if var_keyword else None


def _example_arguments(model: nn.Module, example_inputs: Sequence[Any], example_kwargs: dict) -> dict:
    """The example bound to ``model.forward``'s names (its keywords as given where it does not bind)."""
    try:
        return dict(inspect.signature(model.forward).bind_partial(*example_inputs, **example_kwargs).arguments)
    except TypeError:
        return dict(example_kwargs)


DECODER_INPUTS = ("decoder_input_ids", "decoder_inputs_embeds", "labels")


def check_hf_example(model: nn.Module, example_inputs: Sequence[Any], example_kwargs: dict) -> None:
    """Refuse, before capture, a Hugging Face example that asks for a KV cache or lacks an
    encoder-decoder model's decoder inputs."""
    refuse_use_cache(model, _example_arguments(model, example_inputs, example_kwargs), "example_kwargs")
    check_decoder_inputs(model, example_inputs, example_kwargs)


def check_decoder_inputs(model: nn.Module, example_inputs: Sequence[Any], example_kwargs: dict) -> None:
    """An encoder-decoder model (T5, Switch Transformers) runs its decoder on ``decoder_input_ids``
    (or on ``labels`` shifted right): without them its forward fails deep in the decoder."""
    config = getattr(model, "config", None)
    if not is_hf_model(model) or not getattr(config, "is_encoder_decoder", False):
        return
    given = _example_arguments(model, example_inputs, example_kwargs)
    if not any(given.get(name) is not None for name in DECODER_INPUTS):
        raise UntraceableModelError(
            f"{type(model).__name__} is an encoder-decoder model: its forward needs decoder_input_ids (or labels), "
            f"which the example does not give; pass them in example_kwargs (generate supports decoder-only models)")


def hf_capture_adapter(model: nn.Module, example_inputs: Sequence[Any] = (),
                       example_kwargs: Optional[dict] = None) -> Optional[contextlib.AbstractContextManager]:
    """``tracing.CAPTURE_ADAPTERS`` entry: None for models that are not Hugging Face models, nor
    the decoding graphs of one (``hf_decode.CachedDecoding``, which hold it as ``hf_model``).
    Packed-sequence position ids are read as eager reads them with the example's arguments."""
    inner = getattr(model, "hf_model", model)
    if not is_hf_model(inner):
        return None
    wrapped = peft_base_model(inner)                    # a PeftModel's: its flags are the model's own
    hf_model = inner if wrapped is None else wrapped
    apply_aux_loss_coef(hf_model)
    warn_checkpointing_dropped(hf_model)
    capturable = _capturable(model, packing_detected=not eager_builds_cache(inner, example_inputs, example_kwargs or {}))
    if inner is not model or not needs_default_mask(model, example_inputs, example_kwargs or {}):
        return capturable
    return _both(capturable, _default_mask_built(model))


@contextlib.contextmanager
def _both(first: contextlib.AbstractContextManager, second: contextlib.AbstractContextManager) -> Iterator[bool]:
    """``first`` then ``second`` entered; yields what ``first`` yields (export first or not)."""
    with first as value, second:
        yield value
