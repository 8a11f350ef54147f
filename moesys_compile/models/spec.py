"""Resolve a MODEL spec from the command line into a model and example inputs.

    tiny-moe                      a built-in preset (``--config n_layers=8`` overrides fields)
    package.module:factory        ``factory(**overrides)`` returns a model, or (model, example_inputs);
                                  a model's ``example_inputs(batch, seq)`` method, if any, makes the
                                  inputs at the (B, S) asked for, else a returned example is used as is
    hf:<family> | a local dir     Hugging Face transformers models (moesys_compile.models.hf)
"""

from __future__ import annotations

import ast
import contextlib
import json
import importlib
import inspect
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import PRESETS, build


# Config fields that cap the sequence length: the presets' own, then Hugging Face's.
MAX_SEQ_FIELDS = ("max_seq_len", "max_position_embeddings")


def seq_limit(model: nn.Module) -> Optional[tuple[str, int]]:
    """The config field that caps the model's sequence length and its value (``("max_seq_len",
    512)`` for tiny-moe), or None where the model has no config or its config names no cap."""
    config = getattr(model, "config", None)
    for field in MAX_SEQ_FIELDS:
        limit = getattr(config, field, None)
        if isinstance(limit, int) and not isinstance(limit, bool):
            return field, limit
    return None


@dataclass
class LoadedModel:
    model: nn.Module
    example_inputs: Callable[[int, int], tuple]   # (batch, seq) -> positional example inputs
    description: str
    # set when example_inputs ignores (batch, seq): the factory's own example's (B, S), or (B,)
    example_size: Optional[tuple[int, ...]] = None


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["n_layers=8", "activation=gelu", "tie_word_embeddings=false"]`` -> {"n_layers": 8,
    "activation": "gelu", "tie_word_embeddings": False}: a Python literal, else a JSON one (as in
    a config.json), else the string."""
    overrides: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--config {pair!r} must look like key=value")
        overrides[key.strip()] = _literal(raw)
    return overrides


def _literal(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        pass
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def model_and_overrides(model: str | None, pairs: list[str] | None) -> tuple[str | None, dict[str, Any]]:
    """MODEL and the parsed ``--config`` pairs of a command line. ``--config`` takes one or more
    values, so in ``--config n_layers=2 MODEL`` the parser hands MODEL over as a last pair; a
    trailing value without ``=`` is taken back as MODEL when no MODEL was read elsewhere."""
    pairs = list(pairs or [])
    if model is None and pairs and "=" not in pairs[-1]:
        model = pairs.pop()
    return model, parse_overrides(pairs)


def token_inputs(vocab_size: int) -> Callable[[int, int], tuple]:
    def make(batch: int, seq: int) -> tuple:
        generator = torch.Generator().manual_seed(0)
        return (torch.randint(0, vocab_size, (batch, seq), generator=generator),)
    return make


def _from_factory(spec: str, overrides: dict[str, Any]) -> LoadedModel:
    """``package.module:factory``, imported as ``python -m`` would: the current directory too."""
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:      # a console script's path lacks it
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load model factory {spec!r}: {exc}") from exc
    if not callable(factory):
        raise ValueError(f"{spec} is {type(factory).__name__} {factory!r}, not a factory: name a function or class "
                         f"that returns a model, or (model, example_inputs)")
    _check_factory_parameters(spec, factory, overrides)
    made = factory(**overrides)
    _check_positional_input(spec, made[0] if isinstance(made, tuple) and made else made)
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        model, example = made
        if isinstance(example, Mapping):
            raise ValueError(f"{spec} returned (model, {type(example).__name__}): the example inputs are given to "
                             f"forward positionally; return (model, (ids, ...)), or (model, (batch,)) when forward "
                             f"takes the dict as one argument")
        example = tuple(example) if isinstance(example, (tuple, list)) else (example,)
        if hasattr(model, "example_inputs"):                  # the model's own hook honours (batch, seq)
            return LoadedModel(model, model.example_inputs, spec)
        return LoadedModel(model, lambda batch, seq: example, spec, _example_size(example))
    if not isinstance(made, nn.Module):
        raise ValueError(f"{spec} returned {type(made).__name__}; return an nn.Module or (model, example_inputs)")
    if hasattr(made, "example_inputs"):
        return LoadedModel(made, made.example_inputs, spec)
    vocab = getattr(getattr(made, "config", None), "vocab_size", None)
    if vocab is None:
        raise ValueError(f"{spec}: cannot guess example inputs; return (model, example_inputs) from the factory "
                         f"or give the model an example_inputs(batch, seq) method")
    return LoadedModel(made, token_inputs(vocab), spec)


def _check_positional_input(spec: str, model: Any) -> None:
    """The command line calls the model with its inputs (the token ids) as ``forward``'s positional
    arguments: a ``forward`` that takes none (``def forward(self, *, input_ids)``) is named, rather
    than failing as a model that does not run."""
    if not isinstance(model, nn.Module):
        return
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                  inspect.Parameter.VAR_POSITIONAL)
    if not any(p.kind in positional for p in signature.parameters.values()):
        raise ValueError(f"{spec}: {type(model).__name__}.forward{signature} takes no positional argument, and the "
                         f"command line passes the token ids as its first one; give forward a positional parameter "
                         f"for them (def forward(self, input_ids, ...))")


def _check_factory_parameters(spec: str, factory: Callable, overrides: dict[str, Any]) -> None:
    """The ``--config`` overrides that ``factory`` takes as keyword arguments, refused by name
    (with the parameters it has) rather than as the call's TypeError."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):       # no signature to read (a builtin): the call itself says
        return
    params = signature.parameters
    named = [p for p in params.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    takes = ", ".join(map(str, named)) or "none"
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = [key for key in overrides if key not in params or params[key].kind is params[key].POSITIONAL_ONLY]
        if unknown:
            raise ValueError(f"--config {', '.join(unknown)}: {spec} has no such parameter; its parameters: {takes}")
    try:
        signature.bind(**overrides)
    except TypeError as exc:
        raise ValueError(f"{spec}: {exc}; give them with --config NAME=VALUE (its parameters: {takes})") from None


def _example_size(example: tuple) -> tuple[int, ...]:
    """(B, S) of a fixed example: the first two dims of its first tensor (fewer if it has fewer)."""
    first = next((value for value in example if isinstance(value, torch.Tensor) and value.dim() > 0), None)
    return tuple(first.shape[:2]) if first is not None else ()


def load_model(spec: str, overrides: dict[str, Any] | None = None, weights: bool = True) -> LoadedModel:
    """``weights=False``: the model's parameters on the meta device (``empty_weights``), for a ring
    that streams them from a checkpoint; a local directory is then built from its config alone."""
    from ..frontend.empty_weights import empty_weights
    with contextlib.nullcontext() if weights else empty_weights():
        return _load(spec, dict(overrides or {}), weights)


def _load(spec: str, overrides: dict[str, Any], weights: bool) -> LoadedModel:
    if spec in PRESETS:
        model = build(spec, **overrides)
        return LoadedModel(model, token_inputs(model.config.vocab_size), spec)
    if os.path.isdir(spec):
        _refuse_training_checkpoint(spec)
    if spec.startswith("hf:") or os.path.isdir(spec):
        from .hf import load_hf  # optional: needs transformers
        return load_hf(spec, overrides, weights)
    if ":" in spec:
        return _from_factory(spec, overrides)
    raise ValueError(_not_a_directory(spec) or f"unknown MODEL {spec!r}: use a built-in name "
                     f"({', '.join(sorted(PRESETS))}), package.module:factory, hf:<family> or a local Hugging Face "
                     f"directory")


def _not_a_directory(spec: str) -> Optional[str]:
    """For a MODEL written as a path (a file, or a name with a path separator) that is no
    directory: what it is instead; None for any other name."""
    if os.path.isfile(spec):
        return (f"MODEL {spec!r} is a file; give the Hugging Face directory that holds the model's config.json "
                f"and weights ({os.path.dirname(os.path.abspath(spec))})")
    if os.sep in spec or spec.startswith(("~", ".")):
        home = "; a leading ~ is not expanded inside quotes" if spec.startswith("~") else ""
        return f"MODEL {spec!r}: no such directory{home}"
    return None


def _refuse_training_checkpoint(path: str) -> None:
    """A training checkpoint given as MODEL holds weights but no model to build them into: say what
    it is and how to use it (the model it was trained from as MODEL, the checkpoint by its flag)."""
    from ..runtime.checkpoint import LATEST, META, latest_step
    from ..runtime.sources import HF_WEIGHTS
    weights = next((name for name in HF_WEIGHTS if os.path.isfile(os.path.join(path, name))), None)
    resume = f"moesys-compile train --model MODEL --ckpt-dir {path} to resume training (from a run's root), "
    if os.path.isfile(os.path.join(path, META)):
        what = f"one step's training checkpoint (it holds {META})"
    elif latest_step(path) is not None:
        what = f"a training run's checkpoint root (it holds {LATEST!r} or step_N directories)"
    elif weights and not os.path.isfile(os.path.join(path, "config.json")):
        what = (f"a directory of weights ({weights}) without a config.json, as the HF Trainer and accelerate save a "
                f"compiled program")
        resume = ""
    else:
        return
    raise ValueError(f"MODEL {path!r} is {what}: weights without a model to build; pass the model it was trained "
                     f"from as MODEL (with the same --config) and the checkpoint by its own flag: "
                     f"moesys-compile infer MODEL --checkpoint {path} to run it, {resume}or "
                     f"mc.load_into(model, {path!r})")
