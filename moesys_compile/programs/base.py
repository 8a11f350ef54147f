"""Program: the compiled model as an ``nn.Module`` that shares the model's parameters."""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from ..errors import warn_user
from ..frontend.adapters import peft_base_model
from ..frontend.modes import grad_mode_kept, modules_in_eval_mode
from .train_mode import warn_if_mode_changes_code


# the model's attributes a program answers for it: what transformers' Trainer and generation
# utilities read from the model they are given (which loss it computes, its config, ...)
MODEL_ATTRIBUTES = ("config", "loss_type", "accepts_loss_kwargs", "main_input_name", "generation_config")
_SIGNED_CLASSES: dict[tuple[type, Any], type] = {}
# what only a training program does, and what to do instead with an infer program, which computes
# with the model's own (unsharded) tensors
_TRAINING_ONLY = {
    "save": "save the model itself (model.save_pretrained(DIR), or torch.save(model.state_dict(), PATH))",
    "load": "load the weights into the model (mc.load_into(model, DIR)) and compile it again, or stream them "
            "through a ring with Plan(weights_checkpoint=DIR, device_budget=...)",
    "full_state_dict": "model.state_dict() is the whole model",
    **dict.fromkeys(("clip_grad_norm_", "no_sync", "grad_scaler"),
                    "to train, compile with Plan(mode='train'), whose program syncs gradients over the ranks"),
}


def _signed_class(cls: type, model: nn.Module) -> type:
    """A subclass of ``cls`` whose ``forward`` shows the model's forward signature (the program
    binds calls by it): tools that read the signature from the class or the bound method (the HF
    Trainer keeps the dataset columns and finds the label names from it) see the model's. For a
    PEFT model, its base model's, which the Trainer reads there too (a PeftModel's own forward
    takes ``*args, **kwargs`` and passes them on)."""
    base = peft_base_model(model)
    model_forward = type(model if base is None else base).forward
    key = (cls, model_forward)
    if key not in _SIGNED_CLASSES:
        run = cls.forward

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return run(self, *args, **kwargs)
        forward.__signature__ = inspect.signature(model_forward)
        forward.__doc__ = run.__doc__
        _SIGNED_CLASSES[key] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                                             "__qualname__": cls.__qualname__})
    return _SIGNED_CLASSES[key]


def _keep_non_persistent(gm, model: torch.nn.Module) -> None:
    """torch.fx registers the buffers a graph reads as persistent: the model's non-persistent ones
    (rotary tables) leave the graph module's state_dict again, so ``program.state_dict()`` without
    its ``graph_module.`` prefix loads into the model as it is."""
    for path, module in model.named_modules(remove_duplicate=False):
        for name in module._non_persistent_buffers_set:
            holder, _, attr = f"{path}.{name}".lstrip(".").rpartition(".")
            try:
                owner = gm.get_submodule(holder)
            except AttributeError:
                continue
            if attr in owner._buffers:
                owner._non_persistent_buffers_set.add(attr)


def _unread_state(program: Optional["Program"]) -> dict[str, torch.Tensor]:
    """The model's state_dict entries that the captured graph does not hold: tensors its forward
    never reads (an expert's unused buffer, a module the forward skips), which the capture leaves
    out; not the expert tensors that another rank holds. Nothing for a graph whose program is gone."""
    if program is None:
        return {}
    gm = program.graph_module
    held = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    held |= {name for name, _ in gm.named_buffers(remove_duplicate=False)}
    return {name: tensor for name, tensor in program.context.model.state_dict(keep_vars=True).items()
            if name not in held and not program.held_by_another_rank(name)}


def _add_unread_state(program_ref: weakref.ref, module, state: dict, prefix: str, local_metadata) -> None:
    for name, tensor in _unread_state(program_ref()).items():
        state[prefix + name] = tensor.detach()


def _take_unread_state(program_ref: weakref.ref, pending: dict, module, state: dict, prefix: str, local_metadata,
                       strict, missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """Consumed here (torch would call them unexpected) into ``pending``, copied into the model's
    tensors once the graph's own have loaded."""
    pending.clear()          # what a load refused later (another rank's shard) left
    for name, tensor in _unread_state(program_ref()).items():
        key = prefix + name
        if key not in state:
            missing_keys.append(key)
        elif state[key].shape != tensor.shape:
            error_msgs.append(f"size mismatch for {key}: copying a tensor of shape {tuple(state.pop(key).shape)} "
                              f"from the state dict, the shape in the model is {tuple(tensor.shape)}")
        else:
            pending[tensor] = state.pop(key)


@torch.no_grad()
def _load_unread_state(pending: dict, module, incompatible_keys) -> None:
    for tensor, saved in pending.items():
        tensor.copy_(saved)
    pending.clear()


def _keep_unread_state(program: "Program") -> None:
    """``program.state_dict()`` holds every entry of the model's, as DDP's holds its module's, so
    that without its ``graph_module.`` prefix it loads into the model; ``load_state_dict`` fills
    the model's tensors that the graph does not hold from it."""
    ref, gm, pending = weakref.ref(program), program.graph_module, {}
    gm.register_state_dict_post_hook(functools.partial(_add_unread_state, ref))
    gm.register_load_state_dict_pre_hook(functools.partial(_take_unread_state, ref, pending))
    gm.register_load_state_dict_post_hook(functools.partial(_load_unread_state, pending))


class Program(nn.Module):
    """Runs the compiled graph; ``program(*args, **kwargs)`` returns what the model returns.

    ``program.aux_loss`` holds the summed load-balancing loss of the last forward (inside the
    autograd graph; None for a model without MoE layers). ``program.graph_module`` is the final
    fx graph, ``program.context`` the compile context (snapshots, notes, annotation). Its
    ``forward`` shows the model's signature, and it answers ``MODEL_ATTRIBUTES`` (``config``,
    ``loss_type``, ...) from the model, as the HF Trainer expects of a model.

    A Hugging Face model called with ``labels`` and ``config.output_router_logits=True`` already
    adds ``router_aux_loss_coef`` x its own load-balancing loss to ``out.loss`` (as in eager):
    train on ``out.loss`` alone then; reading ``program.aux_loss`` after such a call warns once,
    since adding it would count the penalty twice.
    """

    def __init__(self, gm: fx.GraphModule, ctx):
        super().__init__()
        self.graph_module = gm
        self.plan = ctx.plan
        self._aux_loss: Optional[torch.Tensor] = None
        self._loss_has_aux = False     # the last output's .loss already includes the model's aux loss
        self._warned_aux = False
        object.__setattr__(self, "context", ctx)   # not a submodule: keep it out of state_dict
        # torch.export writes the parameters' dtype into the graph: one of them tells a later cast
        floating = [p for p in gm.parameters() if p.is_floating_point()] if ctx.capture == "export" else []
        self._captured_dtype = (floating[0], floating[0].dtype) if floating else None
        _keep_non_persistent(gm, ctx.model)
        _keep_unread_state(self)
        self.__class__ = _signed_class(type(self), ctx.model)

    def held_by_another_rank(self, name: str) -> bool:
        """``name`` (of the model's state) is held on another rank only (an expert shard there)."""
        return False

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in MODEL_ATTRIBUTES and hasattr(self.context.model, name):
                return getattr(self.context.model, name)
            if name == "generate":
                raise AttributeError(f"a {type(self).__name__} compiled with mode={self.plan.mode!r} and no "
                                     f"device_budget has no generate: greedy decoding is part of ring inference; "
                                     f"compile with Plan(mode='infer', device_budget=...)") from None
            if name in _TRAINING_ONLY:
                raise AttributeError(f"{type(self).__name__}.{name}: only a program compiled with mode='train' has "
                                     f"{name}; {_TRAINING_ONLY[name]}") from None
            raise

    @property
    def aux_loss(self) -> Optional[torch.Tensor]:
        if self._loss_has_aux and not self._warned_aux:
            self._warned_aux = True
            model = self.context.extras["binder"].model_name
            warn_user(f"{model}'s out.loss already includes its own load-balancing loss "
                      f"(config.output_router_logits=True adds router_aux_loss_coef x out.aux_loss); "
                      f"program.aux_loss is a load-balancing penalty too (each compiled MoE layer's "
                      f"Switch loss, summed over the layers: not scaled as transformers' pooled one), so "
                      f"adding it to out.loss counts it twice: train on out.loss alone (the model's own "
                      f"penalty), or set config.output_router_logits=False before compiling and add "
                      f"program.aux_loss (the per-layer penalty)")
        return self._aux_loss

    @aux_loss.setter
    def aux_loss(self, value: Optional[torch.Tensor]) -> None:
        self._aux_loss = value

    def train(self, mode: bool = True) -> "Program":
        """Switch dropout (``train_mode``); the first switch to the mode the model was not
        compiled in warns if its code differs there in more than dropout."""
        super().train(mode)
        warn_if_mode_changes_code(self.graph_module, mode, self.context.extras["binder"].model_name)
        return self

    def activation_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """What the HF Trainer calls for ``TrainingArguments(gradient_checkpointing=True)``: the
        captured graph has no checkpoint regions, so this warns and changes nothing."""
        warn_user(f"{self.context.extras['binder'].model_name}: activation (gradient) checkpointing cannot be turned "
                  f"on in a compiled program, whose captured graph has no checkpoint regions: it computes the same "
                  f"loss and gradients but stores every activation; leave "
                  f"TrainingArguments(gradient_checkpointing=...) off, and lower the batch size if memory runs out")

    gradient_checkpointing_enable = activation_checkpointing_enable

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Refused for ``copy.deepcopy``, ``pickle`` and ``torch.save`` alike."""
        raise TypeError(f"a compiled {type(self).__name__} cannot be copied or pickled (its graph holds the "
                        f"capture's symbolic shapes and process groups); for a copy (an EMA of the weights) "
                        f"copy the model before compiling, or the tensors of program.state_dict(); to save, "
                        f"use program.save(DIR) or torch.save(program.state_dict(), PATH)")

    def _check_dtype(self) -> None:
        if self._captured_dtype is not None and self._captured_dtype[0].dtype != self._captured_dtype[1]:
            param, dtype = self._captured_dtype
            raise TypeError(f"{self.context.extras['binder'].model_name} was captured by torch.export with "
                            f"{dtype} parameters, which its graph has fixed, but they are {param.dtype} now: cast "
                            f"the model before compiling (model.to({param.dtype}), then mc.compile), not the "
                            f"program or model after")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._check_dtype()
        binder = self.context.extras["binder"]
        in_mode = modules_in_eval_mode(self.graph_module) if self.plan.mode == "infer" else contextlib.nullcontext()
        with grad_mode_kept(), in_mode:   # grad mode: also where a call fails inside a no_grad region of the model
            output, aux_loss = self.graph_module(*binder.graph_inputs(args, kwargs))
        self.aux_loss = aux_loss
        output = binder.model_output(output)
        self._loss_has_aux = getattr(output, "loss", None) is not None and getattr(output, "aux_loss", None) is not None
        return output
