"""KV-cache decoding of Hugging Face causal LMs through a ring program (``program.generate``).

Two graphs are captured from the model, each taking and returning the KV cache as plain tensors,
so that they lower and stream through the ring like any graph:

    prefill  (ids, mask[, positions])               -> (last logits, keys, values)
    step     (ids, keys, values, mask[, positions]) -> (last logits, keys', values')

``keys`` and ``values`` stack every layer's cache as [batch, layers, kv heads, positions, head
dim]. Inside, a transformers ``DynamicCache`` is filled from them, so masks, sliding windows and
rotary positions are the model's own code. The step is captured once per (batch, prompt, new
tokens) with the cache length symbolic, at the longest cache of the run, so that every step fits
the workspace. Both graphs are lowered with one workspace, the forward graph's where it is the
largest, so that they share one ring layout and a switch keeps the slot memory
(``_sharing_one_layout``, ``RingProgram.runtime``). A model whose cache is not one key and one
value tensor of one shape per layer (state-space or linear-attention layers, a cache class of its
own) cannot decode this way; it recomputes the whole sequence each step
(``generate.recompute_decode``), with a warning.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Optional

import torch
import torch.fx as fx
from torch import nn

from .errors import MoesysError
from .plan import Plan


class NotCacheable(MoesysError):
    """The model's cache is not one key and one value tensor of one shape per layer."""


def _new_cache():
    return sys.modules["transformers"].DynamicCache()


def _stacked(cache) -> tuple[torch.Tensor, torch.Tensor]:
    layers = list(getattr(cache, "layers", ()))
    keys = [getattr(layer, "keys", None) for layer in layers]
    values = [getattr(layer, "values", None) for layer in layers]
    if not layers or any(not isinstance(t, torch.Tensor) for t in keys + values):
        raise NotCacheable(f"the model filled {len(layers)} cache layer(s), not a key and a value tensor in each")
    if any(t.shape != keys[0].shape for t in keys) or any(t.shape != values[0].shape for t in values):
        raise NotCacheable(f"its layers' caches differ in shape ({[tuple(t.shape) for t in keys]})")
    return torch.stack(keys, 1), torch.stack(values, 1)


class CachedDecoding(nn.Module):
    """A Hugging Face causal LM (``hf_model``) with its KV cache as tensors; see the module doc."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.hf_model = model
        accepted = inspect.signature(model.forward).parameters
        self.takes_positions = "position_ids" in accepted
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}

    def decode(self, ids: torch.Tensor, cache, mask: torch.Tensor, positions: Optional[torch.Tensor]):
        extra = {"position_ids": positions} if positions is not None else {}
        out = self.hf_model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                            **extra, **self.last_only)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return (logits[:, -1:], *_stacked(cache))


class CachedPrefill(CachedDecoding):
    def forward(self, input_ids, attention_mask, position_ids=None):
        return self.decode(input_ids, _new_cache(), attention_mask, position_ids)


class CachedStep(CachedDecoding):
    # one new token per sequence; the batch and the cache length stay symbolic
    export_dynamic_dims = {"input_ids": (0,), "position_ids": (0,), "keys": (0, 3), "values": (0, 3)}

    def forward(self, input_ids, keys, values, attention_mask, position_ids=None):
        cache = _new_cache()
        for layer in range(keys.shape[1]):
            cache.update(keys[:, layer], values[:, layer], layer)
        return self.decode(input_ids, cache, attention_mask, position_ids)


def graph_kwargs(wrapper: CachedDecoding, mask: torch.Tensor) -> dict:
    """The mask of the whole sequence so far and, where the model takes them, the positions of the
    tokens of this call, as transformers' ``generate`` derives them (left padding shifts them)."""
    if not wrapper.takes_positions:
        return {"attention_mask": mask}
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    if isinstance(wrapper, CachedStep):
        positions = positions[:, -1:]          # the new token's
    return {"attention_mask": mask, "position_ids": positions}


def _lower(wrapper: CachedDecoding, args: tuple, kwargs: dict, plan: Plan) -> tuple[fx.GraphModule, object]:
    """Capture (through the Hugging Face capture adapter), annotate and run the infer pipeline. The
    model's blocks were canonicalised when the program was compiled; they are the same modules."""
    from .api import _capture_and_annotate
    from .passes import pipeline_for
    from .pipeline import CompileContext, run_pipeline
    gm, annotation = _capture_and_annotate(wrapper, args, kwargs, (), for_program=True)
    binder = gm.meta["moesys_binder"]
    ctx = CompileContext(plan=plan, model=wrapper, annotation=annotation, blocks=[],
                         input_names=binder.traced_names, capture=binder.capture)
    ctx.extras["binder"] = binder
    return run_pipeline(gm, ctx, pipeline_for("infer")), ctx


def _cache_shapes(lowered) -> tuple[torch.Size, torch.Size, torch.dtype]:
    """Shapes and dtype of the keys and values the prefill graph returns (from its fake values)."""
    gm, ctx = lowered
    output = next(n for n in gm.graph.nodes if n.op == "output")
    flat = ctx.extras["binder"].model_output(output.args[0][0])
    keys, values = (node.meta["val"] for node in flat[1:3])
    return keys.shape, values.shape, keys.dtype


def lower_cached(program, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> tuple:
    """The prefill and step graphs of one (batch, prompt, new tokens), sharing one ring layout;
    the step at the longest cache (prompt + max_new_tokens - 2 positions). Raises what capture
    raised for a model whose cache cannot be taken this way (``NotCacheable``, an export error)."""
    model = program.context.model
    prefill = CachedPrefill(model)
    prefill_call = (prefill, (ids,), graph_kwargs(prefill, mask))
    prefill_lowered = _lower(*prefill_call, program.plan)
    key_shape, value_shape, dtype = _cache_shapes(prefill_lowered)
    if max_new_tokens == 1:
        return prefill_lowered, None
    longest = ids.shape[1] + max_new_tokens - 2
    batch = ids.shape[0]          # the cache's own dims (layers, heads, head dim) are plain ints
    keys = torch.zeros(batch, *key_shape[1:3], longest, key_shape[4], dtype=dtype)
    values = torch.zeros(batch, *value_shape[1:3], longest, value_shape[4], dtype=dtype)
    step_mask = torch.cat([mask, mask.new_ones(mask.shape[0], max_new_tokens - 1)], dim=1)
    step = CachedStep(model)
    step_call = (step, (ids[:, -1:], keys, values), graph_kwargs(step, step_mask))
    return _sharing_one_layout(program, (prefill_call, step_call), (prefill_lowered, _lower(*step_call, program.plan)))


def _sharing_one_layout(program, calls: tuple, lowered: tuple) -> tuple:
    """The two graphs lowered again, where needed, with one workspace, so that they share one ring
    layout and switching between them keeps the slot memory: the largest of theirs and the
    forward graph's (switching to and from ``program(ids)`` keeps it too), else the larger of
    theirs when the forward's leaves slots too small for them; failing both, as they are."""
    from .passes.ring_partition import RingBudgetTooSmall
    own = [ctx.extras["ring"].workspace for _, ctx in lowered]
    forward = program.forward_graph[1].extras["ring"].workspace
    for workspace in sorted({max(*own, forward), max(own)}, reverse=True):
        plan = dataclasses.replace(program.plan, options={**program.plan.options, "ring_workspace": workspace})
        try:
            return tuple(done if done_workspace == workspace else _lower(*call, plan)
                         for done, done_workspace, call in zip(lowered, own, calls))
        except RingBudgetTooSmall:
            continue
    return lowered
