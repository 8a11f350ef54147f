"""Decoding through a ring program (``RingProgram.generate``), greedy or sampled, and its eager references.

The built-in LMs decode with a KV cache: a traced ``DecodeStep`` graph (the model with its cache
as an input and an output) runs prefill and every step through the ring; it is lowered at the
first call's prompt and longest step rounded up to powers of two, and later calls within those
sizes reuse it. Hugging Face causal LMs decode with theirs through the prefill and step graphs
of ``hf_decode`` (``cached_decode``; symbolic in batch, prompt and cache length, so later calls
that fit them reuse them), as ``model.generate`` would decode (greedily, or sampling where the call
passes ``do_sample=True``), with the settings of their ``generation_config`` and of the call
(``generation_settings``) applied by transformers' own logits processors and warpers
(``TokenChoice``); a model whose cache cannot be captured as tensors recomputes the whole
sequence each step.

    >>> program.generate(ids, 16, repetition_penalty=1.2)     # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch import nn

from .errors import MoesysError, PlanError, warn_user
from .frontend.hf_capture import is_hf_model
from .frontend.tracing import MoesysTracer
from .generation_settings import (TokenChoice, check_can_generate, generation_settings, new_token_count, padding_mask,
                                  stop_ids)
from .hf_decode import NotCacheable, generation_positions, graph_kwargs, least_budgets, lower_cached, step_inputs
from .models.transformer import Transformer
from .plan import Plan, format_bytes
from .programs.binding import CapturedSizeError
from .programs.ring_calls import RingBudgetError, call_sizer, power_of_two_at_least


class DecodeStep(nn.Module):
    """One incremental step of a built-in Transformer with the KV cache as one tensor, so that
    the step traces to a plain graph: ``(ids_BS, start_pos, kv_BX) -> (logits_BSV, kv_BX')``
    where ``kv_BX`` flattens [B, layers, 2, heads, P, head_dim] (2-D, so annotation treats only
    the batch as symbolic). It calls the model's own forward with its cache dicts, so the math
    is the model's."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model
        cfg = model.config
        self.cache_dims = (len(model.layers), 2, cfg.n_heads, cfg.dim // cfg.n_heads)

    def forward(self, ids_BS: torch.Tensor, start_pos: int, kv_BX: torch.Tensor):
        layers, two, heads, head_dim = self.cache_dims
        kv = kv_BX.view(kv_BX.shape[0], layers, two, heads, -1, head_dim)
        caches = [{"k": kv[:, i, 0], "v": kv[:, i, 1]} for i in range(layers)]
        logits_BSV = self.model(ids_BS, caches=caches, start_pos=start_pos)
        kv_new = torch.stack([t for c in caches for t in (c["k"], c["v"])], dim=1)
        return logits_BSV, kv_new.flatten(1)


@contextlib.contextmanager
def traced_factories():
    """While tracing: ``torch.ones`` with traced sizes becomes a graph call (the model's cached
    attention builds its mask that way, which plain fx tracing rejects). Scoped to the trace,
    so the generated code calls the real ``torch.ones``."""
    original = torch.ones

    def ones(*args, **kwargs):
        proxies = [a for a in (*args, *kwargs.values()) if isinstance(a, fx.Proxy)]
        if proxies:
            return proxies[0].tracer.create_proxy("call_function", original, args, kwargs)
        return original(*args, **kwargs)
    torch.ones = ones
    try:
        yield
    finally:
        torch.ones = original


def lower_decode(step: DecodeStep, plan: Plan, example: tuple):
    """Capture ``step`` with fx (see ``traced_factories``), annotate it, run the infer pipeline."""
    from moesys_compile.passes import pipeline_for
    from .api import examples_where_the_model_is
    from .frontend import annotate
    from .frontend.tracing import expose_aux_loss, fx_trace, traced_names
    from .pipeline import CompileContext, run_pipeline
    from .programs import InputBinder
    example = examples_where_the_model_is(step, example, {})[0]     # the ring's calls come on Plan.device
    with traced_factories():
        gm = fx_trace(step, example, {}, MoesysTracer())
    binder = InputBinder(step, traced_names(step, example, {})[0], "fx", None)
    expose_aux_loss(gm)
    annotation = annotate(gm, binder.remember_example(example, {}))
    ctx = CompileContext(plan=plan, model=step, annotation=annotation, blocks=[], input_names=binder.traced_names,
                         capture="fx")
    ctx.extras["binder"] = binder
    return run_pipeline(gm, ctx, pipeline_for("infer")), ctx


def empty_cache(model: Transformer, batch: int, length: int, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    cfg = model.config
    return torch.zeros(batch, cfg.n_layers * 2 * cfg.n_heads * length * (cfg.dim // cfg.n_heads), dtype=dtype,
                       device=device)


def prompt_ids(ids: Optional[torch.Tensor], input_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """The prompts of ``generate``, given as its first argument or as ``input_ids=`` (as
    ``model.generate`` takes them)."""
    if ids is not None and input_ids is not None:
        raise TypeError("generate: the prompts were given twice, as ids and as input_ids=; pass one of them")
    if ids is None and input_ids is None:
        raise TypeError("generate: no prompts given; pass their token ids: generate(ids, max_new_tokens) or "
                        "generate(input_ids=ids, max_new_tokens=n) (it decodes from token ids, not inputs_embeds)")
    return ids if ids is not None else input_ids


def _check_ids(ids: torch.Tensor) -> None:
    """The prompts: a [batch, seq] tensor of integer token ids."""
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"generate(ids, max_new_tokens): ids must be [batch, seq] token ids, a tensor (got a "
                         f"{type(ids).__name__}); pass torch.tensor(ids)")
    if ids.dim() != 2:
        raise ValueError(f"generate(ids, max_new_tokens): ids must be [batch, seq] token ids (got shape "
                         f"{tuple(ids.shape)}); pass ids[None] for a single prompt")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"generate(ids, max_new_tokens): ids must be integer token ids (got {ids.dtype}); pass "
                        f"ids.long()")
    if ids.numel() == 0:      # the next token is read from the last prompt position: there must be one
        fix = "pass one prompt at least" if ids.shape[0] == 0 else "start each prompt with a token, e.g. bos_token_id"
        raise ValueError(f"generate(ids, max_new_tokens): ids must hold at least one prompt of at least one token "
                         f"(got shape {tuple(ids.shape)}); {fix}")


def _check_mask(ids: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
    """A padding mask has one entry per prompt token: a tensor of the prompts' [batch, seq] shape."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        got = f"{tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else f"a {type(mask).__name__}"
        raise ValueError(f"generate(attention_mask=...): the mask is {got} but the prompts are {tuple(ids.shape)}; "
                         f"a padding mask has one entry per prompt token (1 a token, 0 padding): give it the "
                         f"prompts' shape")


def _check_decodable(model: nn.Module, ids: torch.Tensor, max_new_tokens: int) -> None:
    _check_ids(ids)
    if max_new_tokens < 1:
        raise ValueError(f"generate(ids, max_new_tokens): max_new_tokens must be >= 1 (got {max_new_tokens}); "
                         f"without new tokens there is nothing to generate")
    longest = getattr(getattr(model, "config", None), "max_seq_len", None)
    if longest is not None and ids.shape[1] + max_new_tokens > longest:
        raise ValueError(f"prompt ({ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_seq_len ({longest})")


@contextlib.contextmanager
def _longest_step_fits(ids: torch.Tensor, max_new_tokens: int, what_grows: str,
                       least: Optional[Callable[[], dict[str, int]]] = None):
    """Restate a budget refusal of the decoding graphs in ``generate``'s terms: the prompts, or
    the last step, whose activations hold ``what_grows`` at prompt + new tokens. ``least``: the
    minimum budget of each of several graphs (``hf_decode.least_budgets``), of which the refusal
    names only the first that failed; the largest is stated, so that one retry at it works."""
    from .passes.ring_partition import RingBudgetTooSmall
    try:
        yield
    except RingBudgetTooSmall as exc:
        batch, prompt = ids.shape
        cause = exc.cause if least is None else _least_budget(exc, least)
        raise RingBudgetTooSmall(exc.pass_name, exc.ran_before, PlanError(
            f"generate(max_new_tokens={max_new_tokens}) of {batch} prompt(s) of {prompt} tokens: the prompts or "
            f"the last decoding step, which holds {what_grows} at {prompt + max_new_tokens - 1} positions, do not "
            f"fit Plan.device_budget ({cause}); lower max_new_tokens, pass shorter prompts, or raise "
            f"Plan.device_budget")) from exc


def _least_budget(exc: Exception, least: Callable[[], dict[str, int]]) -> str:
    """The refusal ``exc`` of one decoding graph, stated with the largest minimum of all of them."""
    from .passes.ring_partition import RingBudgetTooSmall
    try:
        minimums = least()
    except RingBudgetTooSmall:
        return str(exc.cause)
    minimum = max(minimums.values())
    each = " and ".join(f"the {name} graph's {nbytes} bytes" for name, nbytes in minimums.items())
    return (f"the minimum for decoding is {minimum} bytes ({format_bytes(minimum)}), the largest of {each}; "
            f"the first graph refused: {exc.cause}")


def decode(program, ids: torch.Tensor, max_new_tokens: Optional[int],
           attention_mask: Optional[torch.Tensor] = None, **settings: Any) -> torch.Tensor:
    """``program.generate``: the built-in models through their traced ``DecodeStep`` graph
    (``builtin_decode``), Hugging Face models with their own cache (``cached_decode``) and the
    generation settings of ``model.generate`` (``generation_settings``: the model's
    ``generation_config`` with ``settings`` over it; each prompt repeated
    ``num_return_sequences`` times where the call samples several). A batch whose decoding the budget cannot hold
    at once is decoded in groups of prompts (``_decode_in_groups``), each as ``model.generate``
    would decode it; a prompt that does not fit alone is refused. ``max_new_tokens`` None: from
    ``max_length`` or the model's ``generation_config``, as ``model.generate`` takes it
    (``new_token_count``). ``streamer``: as ``model.generate``'s, given the prompts, then each
    step's new tokens, then ``end()``; a batch streams at once, so it is not decoded in groups."""
    from .passes.ring_partition import RingBudgetTooSmall
    model = program.context.model
    program.context.extras["binder"].check_adapters()      # the decoding graphs are lowered from the model
    _check_ids(ids)
    check_can_generate(model)
    streamer = settings.pop("streamer", None)
    config = generation_settings(model, settings)
    max_new_tokens = new_token_count(model, config, ids.shape[1], max_new_tokens, settings.get("max_length"))
    _check_decodable(model, ids, max_new_tokens)
    if attention_mask is not None and isinstance(model, Transformer):
        raise ValueError("generate(attention_mask=...): the built-in models take no padding mask; decode prompts "
                         "of one length together (or one prompt at a time)")
    _check_mask(ids, attention_mask)
    mask = padding_mask(config, ids) if attention_mask is None else attention_mask
    ids, mask = _sequences_per_prompt(config, ids, mask)
    try:
        out = _decode(program, ids, max_new_tokens, mask, config, streamer)
    except (RingBudgetError, RingBudgetTooSmall) as exc:
        if ids.shape[0] == 1:
            raise
        if streamer is not None:
            raise _streamed_batch_refused(exc, ids.shape[0]) from exc
        return _decode_in_groups(program, ids, max_new_tokens, mask, config)
    if streamer is not None:
        streamer.end()
    return out


def _sequences_per_prompt(config, ids: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple:
    """The prompts and their mask with each row repeated ``num_return_sequences`` times in a row,
    as ``model.generate`` expands them (``generation_settings`` allows more than one only where
    the call samples)."""
    repeats = getattr(config, "num_return_sequences", None) or 1
    if repeats == 1:
        return ids, mask
    return ids.repeat_interleave(repeats, dim=0), None if mask is None else mask.repeat_interleave(repeats, dim=0)


def _streamed_batch_refused(exc: Exception, batch: int) -> RingBudgetError:
    """The budget refusal ``exc`` of a batch decoded with a streamer, which the batch would have
    escaped by being decoded in groups: the streamer is given every prompt's token at each step."""
    return RingBudgetError(f"{exc} (a streamer is given the tokens of all {batch} prompts at each step, so a batch "
                           f"with a streamer is decoded at once, not in groups of prompts as without one: pass fewer "
                           f"prompts per call, or no streamer)")


def _decode(program, ids: torch.Tensor, max_new_tokens: int, mask: Optional[torch.Tensor], config,
            streamer=None) -> torch.Tensor:
    if isinstance(program.context.model, Transformer):
        return builtin_decode(program, ids, max_new_tokens, streamer)
    return cached_decode(program, ids, max_new_tokens, mask, config, streamer)


def _decode_in_groups(program, ids: torch.Tensor, max_new_tokens: int, mask: Optional[torch.Tensor],
                      config) -> torch.Tensor:
    """Decode the first prompt alone, which lowers the decoding graphs for one sequence (symbolic
    in batch); then the rest in groups of as many prompts as those graphs lowered for them could
    hold (``_largest_group``), halved where that lowering refuses them. A group that ended early
    (every sequence at an end-of-sequence id) is padded with the pad id, as ``model.generate`` pads
    finished sequences."""
    from .passes.ring_partition import RingBudgetTooSmall
    batch = ids.shape[0]
    outputs, runs, start, size = [], [], 0, 1
    while start < batch:
        group = slice(start, start + size)
        try:
            outputs.append(_decode(program, ids[group], max_new_tokens, None if mask is None else mask[group], config))
        except (RingBudgetError, RingBudgetTooSmall):
            if size == 1:
                raise
            size //= 2
            continue
        runs.append(program.stats)
        start += size
        if len(runs) == 1 and start < batch:
            size = max(_largest_group(program, ids[start:], max_new_tokens, None if mask is None else mask[start:]), 1)
    length = max(out.shape[1] for out in outputs)
    pad = stop_ids(config)[1]
    outputs = [torch.cat([out, out.new_full((out.shape[0], length - out.shape[1]), pad)], dim=1)
               if out.shape[1] < length else out for out in outputs]
    program.stats = combine_stats(runs)
    program.stats["prompt_groups"] = len(runs)
    return torch.cat(outputs, dim=0)


def _largest_group(program, ids: torch.Tensor, max_new_tokens: int, mask: Optional[torch.Tensor]) -> int:
    """How many of ``ids``'s prompts the stored decoding graphs, lowered for them, could hold at
    once (0: not even one); activations grow with the batch, so a bisection finds it."""
    low, high = 0, ids.shape[0]
    while low < high:
        middle = (low + high + 1) // 2
        fits = _stored_graphs(program, ids[:middle], max_new_tokens, None if mask is None else mask[:middle], "own")
        low, high = (middle, high) if fits is not None else (low, middle - 1)
    return low


def _stored_graphs(program, ids: torch.Tensor, max_new_tokens: int, mask: Optional[torch.Tensor],
                   room: str) -> Optional[tuple]:
    """The decoding graphs an earlier call lowered, where they (``room`` "own": the same graphs
    lowered for this call, as in ``_call_refused``) take this call; sized without building rings."""
    if isinstance(program.context.model, Transformer):
        return _stored_step_graph(program, ids, max_new_tokens, room)
    decoding = program.__dict__.get("_decode_lowered", {})
    if "cached" in decoding and decoding["cached"] is None:        # the model recomputes
        return _stored_recompute_graph(program, ids, max_new_tokens, mask, room)
    return _stored_cached_graphs(program, ids, torch.ones_like(ids) if mask is None else mask, max_new_tokens, room)


def builtin_decode(program, ids: torch.Tensor, max_new_tokens: int, streamer=None) -> torch.Tensor:
    """Greedy decoding of a built-in model: prefill and every step run the traced ``DecodeStep``
    graph through the program's ring (``_decode_step_graph``: reused by the later calls it
    bounds); each token the argmax of the last position's logits (``TokenChoice`` without
    settings)."""
    model = program.context.model
    dtype = _decode_dtype(program)
    key, lowered = _decode_step_graph(program, ids, max_new_tokens)
    runtime = program.runtime(key, lowered)
    runtime.check_shapes = False         # _decode_step_graph sized every step of the call
    choice = TokenChoice(None, ids, torch.ones_like(ids), max_new_tokens, streamer)
    kv, step_ids, position, tokens, steps = empty_cache(model, ids.shape[0], 0, dtype), ids, 0, [], []
    for _ in range(max_new_tokens):
        ((logits, kv), _aux), stats = runtime([step_ids, position, kv])
        steps.append(stats)
        position += step_ids.shape[1]
        step_ids = choice.next_token(ids, logits)[:, None]
        tokens.append(step_ids)
    program.stats = combine_stats(steps)
    program.stats["decode"] = "kv_cache"
    return torch.cat([ids, *tokens], dim=1)


def _decode_step_graph(program, ids: torch.Tensor, max_new_tokens: int) -> tuple:
    """(runtime key, lowered ``DecodeStep``) for ``builtin_decode``: the last one where it bounds
    this call (``_stored_step_graph``), else one lowered at the prompt and the longest step rounded
    up to powers of two (within ``max_seq_len``), or at the call's own sizes where the budget does
    not hold that."""
    from .passes.ring_partition import RingBudgetTooSmall
    stored = _stored_step_graph(program, ids, max_new_tokens)
    if stored is not None:
        return stored
    model = program.context.model
    prompt = ids.shape[1]
    longest = prompt + max_new_tokens - 1          # positions the last step attends over
    positions = min(power_of_two_at_least(longest), model.config.max_seq_len)
    sizes = [(min(power_of_two_at_least(prompt), positions), positions), (prompt, longest)]
    for tokens, positions in sizes:
        try:
            with _longest_step_fits(ids, max_new_tokens, "its KV cache"):
                lowered = lower_decode(DecodeStep(model), program.plan, _step_bound(program, ids, tokens, positions))
        except RingBudgetTooSmall:
            if (tokens, positions) == sizes[-1]:
                raise
            continue
        if _call_refused(lowered, _step_bound(program, ids, tokens, positions, "meta"), {}, "whole") is None:
            break
    decoding = program.__dict__.setdefault("_decode_lowered", {})
    decoding["builtin"] = (("decode", next(_LOWERINGS)), lowered, (tokens, positions))
    return decoding["builtin"][:2]


def _stored_step_graph(program, ids: torch.Tensor, max_new_tokens: int, room: str = "whole") -> Optional[tuple]:
    """The stored ``DecodeStep`` graph where it bounds this call. A graph lowered at (prompt P,
    positions L) bounds every step of a call whose prompt is at most P and whose last step attends
    over at most L positions: its example is a P-token input over a cache of L - P positions, and
    no step's activations or cache outgrow it. Its steps run unchecked, so never in micro-batches
    (``room`` "whole", or "own" as in ``_call_refused``)."""
    stored = program.__dict__.get("_decode_lowered", {}).get("builtin")
    if stored is None:
        return None
    key, lowered, (tokens, positions) = stored
    prompt = ids.shape[1]
    if prompt <= tokens and prompt + max_new_tokens - 1 <= positions and \
            _call_refused(lowered, _step_bound(program, ids, tokens, positions, "meta"), {}, room) is None:
        return key, lowered
    return None


def _step_bound(program, ids: torch.Tensor, tokens: int, positions: int, device=None) -> tuple:
    """``DecodeStep`` inputs of ``tokens`` ids (per prompt of ``ids``) over a cache that makes
    ``positions`` with them, as the step is traced: the cache in the dtype of the keys the model
    computes (``ring_partition`` propagates the graph again in the ring's dtype, in which
    ``builtin_decode`` passes it); on ``device`` "meta" to size a call without allocating its cache."""
    model = program.context.model
    batch = ids.shape[0]
    return (ids.new_zeros(batch, tokens, device=device), 0,
            empty_cache(model, batch, positions - tokens, _model_cache_dtype(model), device or "cpu"))


def _model_cache_dtype(model: Transformer) -> torch.dtype:
    """The dtype of the keys and values the built-in model computes: its attention projection's."""
    return model.layers[0].attn.qkv.weight.dtype


def _decode_dtype(program) -> torch.dtype:
    """The built-in model's cache dtype in the ring: the ring's weights' (``Plan.dtype``), else
    the model's own (``_model_cache_dtype``)."""
    return program.context.extras["ring"].dtype or _model_cache_dtype(program.context.model)


def cached_decode(program, ids: torch.Tensor, max_new_tokens: int, attention_mask: Optional[torch.Tensor] = None,
                  config=None, streamer=None) -> torch.Tensor:
    """Greedy decoding of a Hugging Face causal LM with its KV cache (``hf_decode``): the prompt
    through the prefill graph, then one token per step through the step graph, each through the
    ring; chooses, ends and pads as ``recompute_decode``. The graphs of an earlier call serve this one when
    it fits their workspace (``_cached_graphs``). A model whose cache cannot be captured as
    tensors falls back to ``recompute_decode``, with a warning naming why."""
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    graphs = _cached_graphs(program, ids, mask, max_new_tokens)
    if graphs is None:
        return recompute_decode(program, ids, max_new_tokens, attention_mask, config, streamer)
    key, (prefill, step) = graphs
    choice = TokenChoice(config, ids, mask, max_new_tokens, streamer)
    prompt = ids.shape[1]
    logits, keys, values, stats = _cached_call(program, key + ("prefill",), prefill, (ids,), mask, prompt)
    steps, out = [stats], ids
    for new in range(max_new_tokens):
        token = choice.next_token(out, logits)
        out = torch.cat([out, token[:, None]], dim=1)
        if new == max_new_tokens - 1 or choice.all_done:
            break
        mask = _grow(mask, 1)
        try:
            logits, keys, values, stats = _cached_call(program, key + ("step",), step, (token[:, None], keys, values),
                                                       mask, prompt)
        except CapturedSizeError:    # export fixed a longer cache for the step: the prefill fills this one
            logits, keys, values, stats = _cached_call(program, key + ("prefill",), prefill, (out,), mask, prompt)
        steps.append(stats)
    program.stats = combine_stats(steps)
    program.stats["decode"] = "kv_cache"
    return out


def _cached_graphs(program, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> Optional[tuple]:
    """(runtime key, (prefill, step)) for this call: the program's last pair where it takes the
    call, else a pair lowered for it (``hf_decode.lower_cached``); None, with a warning, where
    this call recomputes instead: for every call of a model whose cache cannot be captured as
    tensors or that is no Hugging Face model, for this call alone where the graphs captured for it
    refuse its sizes."""
    from .passes.ring_partition import RingBudgetTooSmall
    decoding = program.__dict__.setdefault("_decode_lowered", {})
    if "cached" in decoding and decoding["cached"] is None:
        return None
    if not is_hf_model(program.context.model):       # its cache (if any) is of its own making
        warn_user(f"generate: no KV cache for {type(program.context.model).__name__}: it is not a Hugging Face model "
                  f"(transformers.PreTrainedModel); each step recomputes the whole sequence")
        decoding["cached"] = None
        return None
    stored = _stored_cached_graphs(program, ids, mask, max_new_tokens)
    if stored is not None:
        return stored
    try:
        with _longest_step_fits(ids, max_new_tokens, "its KV cache",
                                lambda: least_budgets(program, ids, mask, max_new_tokens)):
            graphs = lower_cached(program, ids, mask, max_new_tokens)
    except RingBudgetTooSmall:
        raise
    except Exception as exc:  # noqa: BLE001 - any capture failure: decode without a cache
        _warn_recomputing(program, exc)
        decoding["cached"] = None
        return None
    refusal = _refusal(graphs, ids, mask, max_new_tokens)
    if isinstance(refusal, CapturedSizeError):
        try:               # export fixed a size of the graphs lowered ahead: the call's own sizes
            graphs = lower_cached(program, ids, mask, max_new_tokens, ahead=False)
            refusal = _refusal(graphs, ids, mask, max_new_tokens)
        except RingBudgetTooSmall:
            pass
    if isinstance(refusal, RingBudgetError) and refusal.sliced_bytes:
        try:               # the workspace the ring estimated for running the call in micro-batches
            graphs = lower_cached(program, ids, mask, max_new_tokens, workspace=refusal.sliced_bytes)
            refusal = _refusal(graphs, ids, mask, max_new_tokens)
        except RingBudgetTooSmall:
            pass
    decoding["cached"] = (("cached", next(_LOWERINGS)), graphs)
    if isinstance(refusal, RingBudgetError):       # decode decodes a batch in groups
        batch, prompt = ids.shape
        raise RingBudgetError(f"generate(max_new_tokens={max_new_tokens}) of {batch} prompt(s) of {prompt} tokens: "
                              f"{refusal.reason}, with the prompts' KV cache; lower max_new_tokens, pass shorter "
                              f"prompts or raise Plan.device_budget", refusal.reason)
    if refusal is not None:                # later calls may still fit them
        _warn_recomputing(program, NotCacheable(f"the graphs captured for this call refuse its sizes: {refusal}"))
        return None
    return decoding["cached"]


def _stored_cached_graphs(program, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                          room: str = "ring") -> Optional[tuple]:
    stored = program.__dict__.get("_decode_lowered", {}).get("cached")
    return stored if stored is not None and _refusal(stored[1], ids, mask, max_new_tokens, room) is None else None


def _warn_recomputing(program, why: Exception) -> None:
    warn_user(f"generate: {type(program.context.model).__name__} cannot decode with a KV cache captured as tensors "
              f"({type(why).__name__}: {str(why).splitlines()[0][:300]}); every step recomputes the whole sequence "
              f"instead")


_LOWERINGS = itertools.count()      # tells the rings of successive lowerings apart


def _refusal(graphs: tuple, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
             room: str = "ring") -> Optional[Exception]:
    """Why lowered graphs cannot run this call (None: they can), by the budget or by the conditions
    export recorded on the sizes: the prompt through the prefill, the last step through the step
    graph (a step whose shorter cache the step graph refuses runs through the prefill); sized
    without building their rings (``room`` as in ``_call_refused``)."""
    prefill, step = graphs
    calls = [(*prefill, (ids,), mask)]
    if max_new_tokens > 1:
        if step is None:
            return NotCacheable("no step graph: it was lowered for one new token")
        args, step_mask = step_inputs(prefill, ids, mask, ids.shape[1] + max_new_tokens - 2, device="meta")
        calls.append((*step, args, step_mask))
    return next(filter(None, (_call_refused((gm, ctx), args, graph_kwargs(ctx.model, call_mask, ids.shape[1]), room)
                              for gm, ctx, args, call_mask in calls)), None)


def _call_refused(lowered: tuple, args: tuple, kwargs: dict, room: str = "ring") -> Optional[Exception]:
    """Why a lowered graph's ring cannot run this call (None: it can): the budget, or a condition
    export recorded on the sizes; sized without building the ring. ``room``: "ring", its ring as
    lowered (in micro-batches where needed); "whole", that ring with the whole batch at once;
    "own", a ring of the graph lowered for this call (its activations within the most workspace
    the budget leaves; ``_decode_in_groups`` sizes groups with it)."""
    gm, ctx = lowered
    sizer = call_sizer(gm, ctx)
    try:
        flat = ctx.extras["binder"].graph_inputs(args, kwargs)
        if room == "own":
            needed = sizer.activation_bytes(flat)
            if needed > sizer.largest_workspace:
                return RingBudgetError(f"about {needed} bytes of activations, more than the {sizer.largest_workspace} "
                                       f"bytes a ring of this graph can leave them")
            return None
        slices, _ = sizer.plan_call(flat)
    except (RingBudgetError, CapturedSizeError) as exc:
        return exc
    if room == "whole" and len(slices) > 1:
        return RingBudgetError(f"it runs only in {len(slices)} micro-batches")
    return None


def _cached_call(program, key: tuple, lowered: tuple, args: tuple, mask: torch.Tensor, prompt_length: int) -> tuple:
    """One call of a ``hf_decode`` graph through its ring, ``mask`` covering the sequence so far
    (its first ``prompt_length`` tokens the prompt): (last logits, keys, values, stats)."""
    _, ctx = lowered
    binder = ctx.extras["binder"]
    inputs = binder.graph_inputs(args, graph_kwargs(ctx.model, mask, prompt_length))
    (output, _aux), stats = program.runtime(key, lowered)(inputs)
    return (*binder.model_output(output), stats)


def recompute_decode(program, ids: torch.Tensor, max_new_tokens: int, attention_mask: Optional[torch.Tensor] = None,
                     config=None, streamer=None) -> torch.Tensor:
    """Greedy decoding of any causal LM (a Hugging Face model): every step one ring forward over
    the whole sequence so far, no KV cache, through a graph lowered at the longest step's length
    rounded up to a power of two (where the budget holds it), so that each step fits the
    workspace; later calls that fit it reuse it. As ``model.generate(do_sample=False)``: a padding
    mask grows by one per step, positions as transformers gives them (``generation_positions``); each
    token is chosen by ``TokenChoice`` (the generation settings of ``config``), a sequence that
    has produced an end-of-sequence id gets the pad id, and decoding ends once all have."""
    model = program.context.model
    graph = _recompute_graph(program, ids, max_new_tokens, attention_mask)
    choice = TokenChoice(config, ids, torch.ones_like(ids) if attention_mask is None else attention_mask,
                          max_new_tokens, streamer)
    steps, out, mask = [], ids, attention_mask
    for _ in range(max_new_tokens):
        key, lowered = graph or _length_graph(program, out, mask, ids, max_new_tokens)
        binder = lowered[1].extras["binder"]
        inputs = binder.graph_inputs((out,), _mask_inputs(model, mask, ids.shape[1]))
        (output, _aux), stats = program.runtime(key, lowered)(inputs)
        steps.append(stats)
        token = choice.next_token(out, first_tensor(binder.model_output(output)))
        out, mask = torch.cat([out, token[:, None]], dim=1), None if mask is None else _grow(mask, 1)
        if choice.all_done:
            break
    program.stats = combine_stats(steps)
    program.stats["decode"] = "recompute"
    return out


def _recompute_graph(program, ids: torch.Tensor, max_new_tokens: int, mask: Optional[torch.Tensor]) -> Optional[tuple]:
    """(runtime key, lowered forward) for ``recompute_decode``: the last one where it takes the
    prompt and the longest step (``_stored_recompute_graph``), else one lowered at the longest step
    rounded up to a power of two, or at its own length where the budget does not hold that. None
    where export fixed the sequence length in the graph (the model's code loops over it, as the
    reference selective scan of mamba layers does): every step then lowers a graph of its own
    length (``_length_graph``), for this call and every later one."""
    from .api import lower
    from .passes.ring_partition import RingBudgetTooSmall
    kind = ("recompute", mask is not None)
    decoding = program.__dict__.setdefault("_decode_lowered", {})
    if kind in decoding and decoding[kind] is None:
        return None
    stored = _stored_recompute_graph(program, ids, max_new_tokens, mask)
    if stored is not None:
        return stored
    model = program.context.model
    longest = ids.shape[1] + max_new_tokens - 1
    with _longest_step_fits(ids, max_new_tokens, "the whole sequence, recomputed each step"):
        try:
            lowered = lower(model, program.plan, *_recompute_inputs(model, ids, mask, power_of_two_at_least(longest)))
        except RingBudgetTooSmall:
            lowered = None
        refusals = [] if lowered is None else [_call_refused(lowered, *call)
                                               for call in _recompute_calls(model, ids, max_new_tokens, mask)]
        fixed = next((r for r in refusals if isinstance(r, CapturedSizeError)), None)
        if fixed is not None:
            warn_user(f"generate: the graph captured from {type(model).__name__} holds its sequence length fixed "
                      f"({str(fixed).split(' (export')[0][:200]}); every step lowers a graph of its own length (kept "
                      f"for later calls), which takes a while")
            decoding[kind] = None
            return None
        if lowered is None or any(refusals):
            lowered = lower(model, program.plan, *_recompute_inputs(model, ids, mask, longest))
    decoding[kind] = ((*kind, next(_LOWERINGS)), lowered)
    return decoding[kind]


def _length_graph(program, out: torch.Tensor, mask: Optional[torch.Tensor], ids: torch.Tensor,
                  max_new_tokens: int) -> tuple:
    """(runtime key, lowered forward) at the length of the sequence so far ``out`` (``ids``: the
    prompts), for a model whose graph holds the sequence length fixed (``_recompute_graph``): the
    one lowered at that length before where it takes this step, else one lowered for it."""
    from .api import lower
    model = program.context.model
    step = ((out,), _mask_inputs(model, mask, ids.shape[1]))
    graphs = program.__dict__.setdefault("_decode_lowered", {}).setdefault("recompute_lengths", {})
    kind = (out.shape[1], mask is not None)
    if kind not in graphs or _call_refused(graphs[kind][1], *step) is not None:
        with _longest_step_fits(ids, max_new_tokens, "the whole sequence, recomputed each step"):
            graphs[kind] = (("recompute", *kind, next(_LOWERINGS)), lower(model, program.plan, *step))
    return graphs[kind]


def _stored_recompute_graph(program, ids: torch.Tensor, max_new_tokens: int, mask: Optional[torch.Tensor],
                            room: str = "ring") -> Optional[tuple]:
    stored = program.__dict__.get("_decode_lowered", {}).get(("recompute", mask is not None))
    calls = _recompute_calls(program.context.model, ids, max_new_tokens, mask)
    return stored if stored is not None and not any(_call_refused(stored[1], *call, room) for call in calls) else None


def _recompute_calls(model: nn.Module, ids: torch.Tensor, max_new_tokens: int, mask: Optional[torch.Tensor]) -> list:
    """The first and the longest step of a recomputing call, as (args, kwargs)."""
    return [_recompute_inputs(model, ids, mask, length) for length in (ids.shape[1], ids.shape[1] + max_new_tokens - 1)]


def _recompute_inputs(model: nn.Module, ids: torch.Tensor, mask: Optional[torch.Tensor], length: int) -> tuple:
    """A step's inputs at ``length`` tokens: the prompt followed by new tokens, the mask grown."""
    grown = length - ids.shape[1]
    return (torch.cat([ids, ids.new_zeros(ids.shape[0], grown)], dim=1),), \
        _mask_inputs(model, None if mask is None else _grow(mask, grown), ids.shape[1])


def _grow(mask: torch.Tensor, steps: int) -> torch.Tensor:
    return torch.cat([mask, mask.new_ones(mask.shape[0], steps)], dim=1)


def _mask_inputs(model: nn.Module, mask: Optional[torch.Tensor], prompt_length: int) -> dict:
    """The keyword inputs of a padded step: the mask, and where the model takes ``position_ids``
    the positions transformers' ``generate`` gives the sequence so far (its first
    ``prompt_length`` tokens the prompt; ``hf_decode.generation_positions``)."""
    if mask is None:
        return {}
    inputs = {"attention_mask": mask}
    if "position_ids" in inspect.signature(model.forward).parameters:
        inputs["position_ids"] = generation_positions(mask, prompt_length)
    return inputs


def combine_stats(steps: list[dict]) -> dict:
    """Sum the per-call records of a generate() run (or the records of runs, for a batch decoded
    in groups).

    Efficiency of the run = sum of the calls' bounds / sum of their walls, a call's bound being
    max(transfer, compute). Each step needs the token of the one before, so no step's transfer
    can hide behind another step's compute: max(sum transfer, sum compute) would be a bound no
    schedule reaches (a compute-bound prompt cannot hide the transfer-bound steps after it).
    ``pooled_efficiency`` keeps that figure for comparison."""
    total = dict(steps[-1])
    for key in ("bytes_moved", "transfer_seconds", "compute_seconds", "stall_seconds", "wall_seconds"):
        total[key] = sum(s[key] for s in steps)
    total["peak_device_bytes"] = max(s["peak_device_bytes"] for s in steps)
    wall = total["wall_seconds"]
    total["bound_seconds"] = sum(s.get("bound_seconds", max(s["transfer_seconds"], s["compute_seconds"]))
                                 for s in steps)
    pooled = max(total["transfer_seconds"], total["compute_seconds"])
    total["efficiency"] = total["bound_seconds"] / wall if wall else 0.0
    total["pooled_efficiency"] = pooled / wall if wall else 0.0
    total["steps"] = sum(s.get("steps", 1) for s in steps)
    return total


@torch.inference_mode()
def eager_generate(model: Transformer, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Reference greedy decoding with the model's own KV cache (eager, all weights resident)."""
    if not isinstance(model, Transformer):
        raise MoesysError(f"eager_generate decodes the built-in models; for {type(model).__name__} use "
                          f"model.generate(ids, max_new_tokens=n, do_sample=False)")
    _check_decodable(model, ids, max_new_tokens)
    caches = [{} for _ in model.layers]
    step_ids, position, tokens = ids, 0, []
    for _ in range(max_new_tokens):
        logits = model(step_ids, caches=caches, start_pos=position)
        position += step_ids.shape[1]
        step_ids = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(step_ids)
    return torch.cat([ids, *tokens], dim=1)


@torch.inference_mode()
def reference_generate(model: nn.Module, ids: torch.Tensor, max_new_tokens: int, **settings: Any) -> torch.Tensor:
    """Eager decoding: greedy by ``eager_generate`` for the built-in models, else the model's own
    ``generate(do_sample=False, **settings)`` (Hugging Face; ``settings`` may ask for sampling)."""
    if isinstance(model, Transformer):
        return eager_generate(model, ids, max_new_tokens)
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                          **{"do_sample": False, **settings})


def first_tensor(output):
    """The logits of a model's output: a tensor; a mapping's ``"logits"`` or an object's
    ``.logits`` (a ``ModelOutput``, a dataclass); else the first tensor it holds (a tuple's, a
    mapping's, a dataclass's, depth first).

        >>> first_tensor({"hidden": h_BSD, "logits": logits_BSV}) is logits_BSV     # doctest: +SKIP
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    found = next(_tensors_in(output), None)
    if found is None:
        raise MoesysError(f"the model's output ({type(output).__name__}) holds no tensor to take as the logits: "
                          f"they are read from a mapping's 'logits', a .logits attribute, or else the first tensor of "
                          f"the output; return the [batch, seq, vocab] logits there")
    return found


def _tensors_in(output) -> Iterator[torch.Tensor]:
    """The tensors of a model's output in order, depth first (mappings, sequences, dataclasses)."""
    if isinstance(output, torch.Tensor):
        yield output
        return
    if isinstance(output, Mapping):
        items = output.values()
    elif isinstance(output, (tuple, list)):
        items = output
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        items = (getattr(output, field.name) for field in dataclasses.fields(output))
    else:
        return
    for item in items:
        yield from _tensors_in(item)
