"""KV-cache decoding of Hugging Face causal LMs through a ring program (``program.generate``).

Two graphs are captured from the model, each taking and returning the KV cache as plain tensors,
so that they lower and stream through the ring like any graph:

    prefill  (ids, mask[, positions])               -> (last logits, keys, values)
    step     (ids, keys, values, mask[, positions]) -> (last logits, keys', values')

``keys`` and ``values`` stack every layer's cache as [batch, layers, kv heads, positions, head
dim]. Inside, a transformers ``DynamicCache`` is filled from them, so masks, sliding windows and
rotary positions are the model's own code. Batch, prompt length and cache length stay symbolic
(the step's ``symbolic_dims``: the cache holds S positions, the mask S + 1), so the ring sizes
each call's activations and one pair of graphs serves every later ``generate`` that fits its
workspace (``generate._refusal``); they are lowered at the first call's prompt and longest cache
rounded up to powers of two. Both graphs are lowered with one workspace, the forward graph's where it is the
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
from .frontend.annotation import B, S
from .plan import Plan
from .programs.ring_calls import power_of_two_at_least


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


# what a cache layer keeps besides (or instead of) one key and one value tensor, by the attribute
# transformers' layer classes hold it in; a layer that is no DynamicLayer keeps a cache of its own
NOT_KV_ONLY = (("recurrent_states", "convolution and recurrent states"), ("indexer_keys", "indexer keys"))


def _kept(layer) -> Optional[str]:
    """What a cache layer keeps where it is not one key and one value tensor; None where it is."""
    for attribute, kept in NOT_KV_ONLY:
        if hasattr(layer, attribute):
            return kept
    key_value_layer = getattr(sys.modules["transformers"].cache_utils, "DynamicLayer", None)
    if key_value_layer is None or isinstance(layer, key_value_layer):   # no layer classes: cannot tell
        return None
    return "a cache of another kind"


def refuse_cache_layers(model: nn.Module) -> None:
    """Raise ``NotCacheable`` naming the layers where the model's own cache (``DynamicCache(config=
    model.config)``) is not one key and one value tensor: Mamba and linear-attention layers
    (Jamba, GraniteMoeHybrid, MiniMax; with or without keys and values beside them) keep
    convolution and recurrent states, sparse-attention layers (DeepSeek-V3.2, GLM-MoE-DSA) keep
    indexer keys too, DeepSeek-V4's compressed attention and Nemotron-H's layers without attention
    keep caches of other classes. Captured with a key/value cache, such a model fails inside its
    own code with an error naming neither (an ``IndexError`` of the cache's layer list). Not
    checked where ``DynamicCache`` takes no config or cannot build one from this config."""
    cache_class = sys.modules["transformers"].DynamicCache
    if "config" not in inspect.signature(cache_class.__init__).parameters:
        return
    try:
        layers = list(cache_class(config=model.config).layers)
    except Exception:  # noqa: BLE001 - a config the cache cannot read: capture decides
        return
    found: dict[str, dict[int, str]] = {}
    for index, layer in enumerate(layers):
        if (kept := _kept(layer)) is not None:
            found.setdefault(kept, {})[index] = type(layer).__name__
    if found:                                     # the first kind found, with every layer of it
        kept, named = next(iter(found.items()))
        raise NotCacheable(f"its cache layer(s) {sorted(named)} ({', '.join(sorted(set(named.values())))}) "
                           f"keep {kept}, not only one key and one value tensor")


class CachedDecoding(nn.Module):
    """A Hugging Face causal LM (``hf_model``) with its KV cache as tensors; see the module doc."""

    def __init__(self, model: nn.Module):
        super().__init__()
        refuse_cache_layers(model)
        self.hf_model = model
        accepted = inspect.signature(model.forward).parameters
        self.takes_positions = "position_ids" in accepted
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
        # transformers renames ``past_key_values`` to ``cache`` (the old name stays a deprecated alias)
        self.cache_keyword = "cache" if "cache" in accepted else "past_key_values"

    def decode(self, ids: torch.Tensor, cache, mask: torch.Tensor, positions: Optional[torch.Tensor]):
        extra = {"position_ids": positions} if positions is not None else {}
        extra[self.cache_keyword] = cache
        out = self.hf_model(input_ids=ids, attention_mask=mask, use_cache=True, **extra, **self.last_only)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return (logits[:, -1:], *_stacked(cache))


class CachedPrefill(CachedDecoding):
    def forward(self, input_ids, attention_mask, position_ids=None):
        return self.decode(input_ids, _new_cache(), attention_mask, position_ids)


class CachedStep(CachedDecoding):
    # one new token per sequence; symbolic: the batch and the cache length (the mask covers the
    # new token too)
    symbolic_dims = {"input_ids": {0: B}, "position_ids": {0: B}, "keys": {0: B, 3: S}, "values": {0: B, 3: S},
                     "attention_mask": {0: B, 1: S + 1}}

    def forward(self, input_ids, keys, values, attention_mask, position_ids=None):
        cache = _new_cache()
        for layer in range(keys.shape[1]):
            cache.update(keys[:, layer], values[:, layer], layer)
        return self.decode(input_ids, cache, attention_mask, position_ids)


def generation_positions(mask: torch.Tensor, prompt_length: Optional[int] = None) -> torch.Tensor:
    """The positions of a sequence whose first ``prompt_length`` tokens (default: all) are the
    prompt, as transformers' ``generate`` gives them: the prompt's from its padding mask
    (cumulative sum - 1, 0 at pads), then one more per later token after the prompt's last one, so
    a right-padded prompt's new tokens follow its last pad's position (left padding: its count)."""
    prompt_length = mask.shape[1] if prompt_length is None else prompt_length
    prompt = mask[:, :prompt_length].long()
    positions = (prompt.cumsum(-1) - 1).masked_fill(prompt == 0, 0)
    later = torch.arange(1, mask.shape[1] - prompt_length + 1, device=mask.device)
    return torch.cat([positions, positions[:, -1:] + later], dim=1)


def graph_kwargs(wrapper: CachedDecoding, mask: torch.Tensor, prompt_length: Optional[int] = None) -> dict:
    """The mask of the whole sequence so far and, where the model takes them, the positions of the
    tokens of this call (``generation_positions``; ``prompt_length``: the prompt's, default all)."""
    if not wrapper.takes_positions:
        return {"attention_mask": mask}
    positions = generation_positions(mask, prompt_length)
    if isinstance(wrapper, CachedStep):
        positions = positions[:, -1:]          # the new token's
    return {"attention_mask": mask, "position_ids": positions}


def _prepare(wrapper: CachedDecoding, args: tuple, kwargs: dict, plan: Plan) -> tuple[fx.GraphModule, object]:
    """Capture (through the Hugging Face capture adapter) and annotate, as ``api.prepare`` does. The
    model's blocks were canonicalised when the program was compiled; they are the same modules."""
    from .api import _capture_and_annotate, examples_where_the_model_is
    from .pipeline import CompileContext
    gm, annotation = _capture_and_annotate(wrapper, *examples_where_the_model_is(wrapper, args, kwargs), (),
                                           for_program=True)
    binder = gm.meta["moesys_binder"]
    ctx = CompileContext(plan=plan, model=wrapper, annotation=annotation, blocks=[],
                         input_names=binder.traced_names, capture=binder.capture)
    ctx.extras["binder"] = binder
    return gm, ctx


def _cache_shapes(prefill) -> tuple[torch.Size, torch.Size, torch.dtype]:
    """Shapes and dtype of the keys and values the prefill graph returns (from its fake values;
    batch and positions symbolic, the other dims plain ints)."""
    gm, ctx = prefill
    output = next(n for n in gm.graph.nodes if n.op == "output")
    flat = ctx.extras["binder"].model_output(output.args[0][0])
    keys, values = (node.meta["val"] for node in flat[1:3])
    return keys.shape, values.shape, keys.dtype


def step_inputs(prefill, ids: torch.Tensor, mask: torch.Tensor, length: int, device="cpu") -> tuple:
    """The args and mask of a step over a cache of ``length`` positions after the prompt ``ids``
    (empty keys and values: on ``device="meta"`` only their shapes, to size a call)."""
    key_shape, value_shape, dtype = _cache_shapes(prefill)
    batch = ids.shape[0]
    keys = torch.zeros(batch, *key_shape[1:3], length, key_shape[4], dtype=dtype, device=device)
    values = torch.zeros(batch, *value_shape[1:3], length, value_shape[4], dtype=dtype, device=device)
    mask = torch.cat([mask, mask.new_ones(batch, length + 1 - mask.shape[1])], dim=1)
    return (ids[:, -1:], keys, values), mask


def lower_cached(program, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                 workspace: Optional[int] = None, ahead: bool = True) -> tuple:
    """The prefill and step graphs sharing one ring layout (no step for one new token), lowered at
    the prompt and the longest cache (prompt + max_new_tokens - 2 positions) rounded up to powers
    of two (``ahead``), so that later calls up to those sizes take them; where the budget does not
    hold those, at the call's own sizes, then for one sequence (the ring runs the call in
    micro-batches). ``workspace``: at least that activation workspace (what a ring estimated for
    micro-batches). Raises what capture raised for a model whose cache cannot be taken this way
    (``NotCacheable``, an export error)."""
    from .passes.ring_partition import RingBudgetTooSmall
    prompt, longest = ids.shape[1], ids.shape[1] + max_new_tokens - 2
    rounded = (*_left_padded(ids, mask, power_of_two_at_least(prompt)), power_of_two_at_least(max(longest, 2)))
    candidates = ([rounded] if ahead else []) + [(ids, mask, longest), (ids[:1], mask[:1], longest)]
    examples = [c for i, c in enumerate(candidates)                          # each size once
                if all((c[0].shape, c[2]) != (before[0].shape, before[2]) for before in candidates[:i])]
    for attempt, (example_ids, example_mask, example_longest) in enumerate(examples):
        try:
            return _lower_pair(program, example_ids, example_mask, example_longest if max_new_tokens > 1 else None,
                               workspace)
        except RingBudgetTooSmall:
            if attempt == len(examples) - 1:
                raise


def _left_padded(ids: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt as long as ``length`` (an example for capture: only its sizes matter)."""
    pad = length - ids.shape[1]
    return (torch.cat([ids.new_zeros(ids.shape[0], pad), ids], dim=1),
            torch.cat([mask.new_ones(mask.shape[0], pad), mask], dim=1))


def _lower_pair(program, ids: torch.Tensor, mask: torch.Tensor, longest: Optional[int],
                workspace: Optional[int]) -> tuple:
    prepared, lowered = _lower_each(program.context.model, ids, mask, longest,
                                    _with_workspace(program.plan, workspace))
    if longest is None:
        return lowered[0], None
    return _sharing_one_layout(program, prepared, lowered)


def _lower_each(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, longest: Optional[int],
                plan: Plan) -> tuple[list, list]:
    """The prefill of ``ids`` and (``longest`` given) the step over a cache of ``longest``
    positions after it, each lowered under ``plan``: (their captures, as ``_prepare`` returns
    them, and their lowered graphs)."""
    from .api import lower_prepared
    prefill = CachedPrefill(model)
    prepared = [_prepare(prefill, (ids,), graph_kwargs(prefill, mask), plan)]
    lowered = [lower_prepared(prepared[0])]
    if longest is not None:
        step = CachedStep(model)
        args, step_mask = step_inputs(lowered[0], ids, mask, longest)   # the cache in the ring's dtype
        prepared.append(_prepare(step, args, graph_kwargs(step, step_mask, ids.shape[1]), plan))
        lowered.append(lower_prepared(prepared[1]))
    return prepared, lowered


# a budget no lowering is refused at: where only the minimum budget of each graph is wanted
_ROOMY_BUDGET = 2 ** 60


def least_budgets(program, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> dict[str, int]:
    """The smallest budget (``RingLayout.min_budget``) of the prefill and of the step graph at the
    last sizes ``lower_cached`` tries (one sequence of the call's prompt, the longest cache), each
    lowered where the budget does not refuse it: the budget a refusal of the pair states is the
    largest of them (the prefill's alone is short of the step's, whose cache is longer)."""
    longest = ids.shape[1] + max_new_tokens - 2 if max_new_tokens > 1 else None
    roomy = dataclasses.replace(program.plan, device_budget=_ROOMY_BUDGET)
    _, lowered = _lower_each(program.context.model, ids[:1], mask[:1], longest, roomy)
    return {name: ctx.extras["ring"].min_budget for name, (_, ctx) in zip(("prefill", "step"), lowered)}


def _with_workspace(plan: Plan, workspace: Optional[int]) -> Plan:
    return plan if workspace is None else dataclasses.replace(plan, options={**plan.options,
                                                                             "ring_workspace": workspace})


def _sharing_one_layout(program, prepared: list, lowered: list) -> tuple:
    """The two graphs lowered again, where needed, with one workspace, so that they share one ring
    layout and switching between them keeps the slot memory: the largest of theirs and the
    forward graph's (switching to and from ``program(ids)`` keeps it too), else the larger of
    theirs when the forward's leaves slots too small for them; failing both, as they are."""
    from .api import lower_prepared
    from .passes.ring_partition import RingBudgetTooSmall
    own = [ctx.extras["ring"].workspace for _, ctx in lowered]
    forward = program.forward_graph[1].extras["ring"].workspace
    for workspace in sorted({max(*own, forward), max(own)}, reverse=True):
        plan = _with_workspace(program.plan, workspace)
        try:
            return tuple(done if done_workspace == workspace else lower_prepared(captured, plan)
                         for done, done_workspace, captured in zip(lowered, own, prepared))
        except RingBudgetTooSmall:
            continue
    return lowered
