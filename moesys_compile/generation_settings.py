"""The generation settings ``program.generate`` decodes with, as ``model.generate`` would: a
model's ``generation_config`` merged with the call's settings (``generation_settings``), refused
by name where they ask for more than greedy search or multinomial sampling, and applied through
transformers' own logits processors and warpers (``TokenChoice``). ``generate`` decodes greedily
(``model.generate(do_sample=False)``) unless the call itself asks for sampling.

    >>> config = generation_settings(model, {"repetition_penalty": 1.2})     # doctest: +SKIP
    >>> choice = TokenChoice(config, ids, mask, max_new_tokens=16)
    >>> token = choice.next_token(sequence, logits)
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

from .errors import warn_user
from .models.transformer import Transformer


def check_can_generate(model: nn.Module) -> None:
    """Refuse a model that transformers itself does not decode: an encoder-decoder model (the
    decoding graphs hold one causal LM) and one whose ``can_generate()`` is False (no LM head that
    predicts the next token, e.g. a masked LM)."""
    name = type(model).__name__
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError(f"generate: {name} is an encoder-decoder model; encoder-decoder models are not supported by "
                         f"generate (it decodes causal LMs); decode it eagerly with {name}.generate(...)")
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and not can_generate():
        raise ValueError(f"generate: {name} cannot generate text (transformers' {name}.can_generate() is False: it "
                         f"is no causal LM); compile a model with a causal LM head (a *ForCausalLM class) to "
                         f"generate, or call the program for {name}'s own outputs")


# Settings of a GenerationConfig that change the tokens greedy decoding picks and that generate
# does not implement: (field, whether a value sets it, why).
_UNSUPPORTED = (
    ("guidance_scale", lambda v: v not in (None, 1, 1.0), "classifier-free guidance runs the model a second time "
                                                          "without the prompt"),
    ("watermarking_config", lambda v: v is not None, "watermarking is not implemented"),
    ("token_healing", lambda v: bool(v), "token healing needs the tokenizer"),
    ("stop_strings", lambda v: v is not None, "stopping on strings needs the tokenizer"),
    ("max_time", lambda v: v is not None, "stopping on the clock is not implemented"),
    ("return_dict_in_generate", lambda v: bool(v), "generate returns the token ids only"),
)

# Arguments of model.generate besides the GenerationConfig fields that generate does not take:
# (argument, why).
_GENERATE_ARGUMENTS = (
    ("logits_processor", "logits processors of your own are not applied"),
    ("stopping_criteria", "stopping criteria of your own are not applied"),
    ("prefix_allowed_tokens_fn", "constrained decoding is not implemented"),
    ("assistant_model", "assisted decoding is not implemented"),
    ("negative_prompt_ids", "classifier-free guidance runs the model a second time without the prompt"),
    ("negative_prompt_attention_mask", "classifier-free guidance runs the model a second time without the prompt"),
    ("custom_generate", "it decodes with its own greedy loop"),
    ("inputs_embeds", "it decodes from token ids (pass them as ids)"),
)

# GenerationConfig fields behind each decoding mode that is not greedy search.
_MODE_FIELDS = {"beam_search": "num_beams", "group_beam_search": "num_beams, num_beam_groups",
                "constrained_beam_search": "constraints, force_words_ids", "contrastive_search": "penalty_alpha, top_k",
                "assisted_generation": "prompt_lookup_num_tokens, assistant_early_exit, use_mtp",
                "dola_generation": "dola_layers"}


def generation_settings(model: nn.Module, overrides: dict[str, Any]):
    """The ``GenerationConfig`` that ``model.generate(**overrides)`` decodes with: a
    ``generation_config`` passed in ``overrides`` (else an empty one), its unset fields filled
    from ``model.generation_config``, then the other ``overrides`` on top, as transformers merges
    them; ``do_sample`` as the call asks (``_sampling_asked``: greedy unless ``do_sample=True``
    is passed, or a ``generation_config`` with it). None for a model without generation settings
    (the built-in models), which decode plain greedy.

    Contract: refuses (ValueError naming the field and the fix) a name that is no GenerationConfig
    field, an argument of ``model.generate`` in ``_GENERATE_ARGUMENTS`` (``logits_processor``, ...),
    a decoding mode other than greedy search or sampling (``num_beams`` > 1, ...) and a setting in
    ``_UNSUPPORTED``. ``do_sample=True`` in
    the model's own config does not make ``generate`` sample: it is greedy unless the call asks,
    and the sampling settings (temperature, top_k, top_p, ...) apply only to a call that samples."""
    overrides = dict(overrides)
    if isinstance(model, Transformer) and overrides:
        raise ValueError(f"generate({', '.join(f'{k}=...' for k in overrides)}): the built-in models decode "
                         f"plain greedy and take no generation settings; call generate(ids, max_new_tokens)")
    if isinstance(model, Transformer) or (getattr(model, "generation_config", None) is None and not overrides):
        return None
    from transformers import GenerationConfig
    given = overrides.pop("generation_config", None)
    if given is not None and not isinstance(given, GenerationConfig):
        raise TypeError(f"generate(generation_config=...): a transformers GenerationConfig is expected (got a "
                        f"{type(given).__name__}); pass GenerationConfig(**settings), or the settings as keywords")
    sampling = _sampling_asked(given, overrides)
    config = copy.deepcopy(given) if given is not None else GenerationConfig()
    base = getattr(model, "generation_config", None)
    if base is not None:
        config.update(**base.to_dict(), defaults_only=True, allow_custom_entries=True)
    config.update(**_sampling_defaults(), defaults_only=True)
    _refuse_generate_arguments(overrides)
    unknown = config.update(**overrides)
    if unknown:
        raise ValueError(f"generate({', '.join(f'{k}=...' for k in unknown)}): not a generation setting (a "
                         f"GenerationConfig field); program.generate takes ids, max_new_tokens, attention_mask, "
                         f"streamer and generation settings only")
    config.do_sample = sampling
    _check_decoding_mode(model, config, overrides, given)
    return config


# the warpers' settings, which transformers 5 leaves unset in a GenerationConfig and fills with its
# global defaults (top_k 50, ...) as generate starts; older versions set them on construction
_SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")


def _sampling_defaults() -> dict[str, Any]:
    """transformers' global defaults of the warpers' settings, where it has them."""
    from transformers import GenerationConfig
    defaults = getattr(GenerationConfig, "_get_default_generation_params", None)
    return {} if defaults is None else {k: v for k, v in defaults().items() if k in _SAMPLING_FIELDS}


def _sampling_asked(given, overrides: dict) -> bool:
    """Whether this call samples: ``do_sample`` passed to it, else that of the ``generation_config``
    passed (``model.generate`` would sample with either); the model's own ``do_sample`` is not
    asked for by the call, and ``generate`` stays greedy then."""
    if "do_sample" in overrides:
        return bool(overrides["do_sample"])
    return bool(given is not None and getattr(given, "do_sample", False))


def _refuse_generate_arguments(overrides: dict) -> None:
    """Refuse, by name, an argument of ``model.generate`` in ``_GENERATE_ARGUMENTS`` (None, as
    leaving it out, is taken); ``overrides`` then holds no such argument."""
    for name, why in _GENERATE_ARGUMENTS:
        if overrides.get(name) is not None:
            raise ValueError(f"generate({name}=...): program.generate does not take this argument of model.generate: "
                             f"{why}; drop it, or decode eagerly with model.generate")
        overrides.pop(name, None)


# transformers' model-agnostic default when no setting bounds the length: 20 new tokens
DEFAULT_NEW_TOKENS = 20


def new_token_count(model: nn.Module, config, prompt: int, max_new_tokens: Optional[int],
                    max_length: Optional[int]) -> int:
    """How many tokens ``generate`` adds to prompts of ``prompt`` tokens, as ``model.generate``
    counts them: ``max_new_tokens`` of the call, else of the generation settings ``config``, else
    their ``max_length`` (``max_length`` of the call, over the model's) less the prompt, else 20
    (within ``max_position_embeddings``), with transformers' warning. Refuses a call that gives both
    (transformers drops max_length with a warning), a length that leaves no new token, and a
    built-in model called without max_new_tokens (it has no generation settings)."""
    if max_new_tokens is not None and max_length is not None:
        raise ValueError(f"generate(max_new_tokens={max_new_tokens}, max_length={max_length}): give one of them "
                         f"(max_new_tokens counts the new tokens, max_length the prompt's {prompt} too)")
    if max_new_tokens is not None:
        return max_new_tokens
    if config is None:
        raise TypeError(f"generate(ids, max_new_tokens): max_new_tokens is missing, and {type(model).__name__} has "
                        f"no generation_config to take it from; pass it, e.g. generate(ids, 16)")
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    length, where = max_length, "passed to generate"
    if length is None and config.max_length is not None:
        length, where = config.max_length, f"{type(model).__name__}.generation_config"
    if length is None:
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        length, where = prompt + DEFAULT_NEW_TOKENS, "transformers' default of 20 new tokens"
        length = min(length, limit) if isinstance(limit, int) else length
        warn_user(f"generate: no max_new_tokens or max_length given, so it generates up to {length - prompt} tokens "
                  f"({where}, as model.generate); pass max_new_tokens to choose")
    if length <= prompt:
        raise ValueError(f"generate: max_length ({length}, {where}) leaves no new token after prompts of {prompt} "
                         f"tokens; give a max_length above {prompt}, or max_new_tokens")
    return length - prompt


# the decoding modes of transformers' ``GenerationMode`` that generate implements
_DECODING_MODES = ("greedy_search", "sample")


def _check_decoding_mode(model: nn.Module, config, overrides: dict, given=None) -> None:
    """Refuse a config whose decoding is neither greedy search nor sampling, or that sets a field of
    ``_UNSUPPORTED``, naming where the field was set: ``overrides`` of the call, the
    ``generation_config`` passed (``given``) or the model's. (Several sequences per prompt without
    sampling are refused by transformers' own validation as the settings merge.)"""
    def source(fields: str) -> str:
        names = [field.strip() for field in fields.split(",")]
        if any(name in overrides for name in names):
            return "passed to generate"
        if given is not None and any(name in given.to_diff_dict() for name in names):
            return "in the generation_config passed to generate"
        return f"{type(model).__name__}.generation_config"
    mode = config.get_generation_mode().value
    if mode not in _DECODING_MODES:
        fields = _MODE_FIELDS.get(mode, mode)
        raise ValueError(f"generate: {fields} ({source(fields)}) asks for {mode.replace('_', ' ')}, but "
                         f"program.generate decodes greedily or samples; unset {fields} (pass num_beams=1, the others "
                         f"None, to generate or on model.generation_config), or decode eagerly with model.generate")
    for field, is_set, why in _UNSUPPORTED:
        value = getattr(config, field, None)
        if is_set(value):
            raise ValueError(f"generate: {field}={value!r} ({source(field)}) is not supported: {why}; unset it "
                             f"(generate(..., {field}=None) or on model.generation_config), or decode eagerly "
                             f"with model.generate")


def logits_processors(config, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> list:
    """The logits processors ``model.generate`` builds from ``config`` for the prompts ``ids``
    (``mask``: their padding), in its order, each transformers' own class, then its warpers where
    ``config`` samples (``sampling_warpers``); they take the sequence so far (prompt included) and
    the last position's logits."""
    import transformers as tf
    prompt, device = ids.shape[1], ids.device
    eos = stop_ids(config)[0]
    eos = torch.tensor(eos, device=device) if eos else None
    min_length = config.min_length if config.min_new_tokens is None else prompt + config.min_new_tokens
    begin = prompt + 1 if prompt == 1 and config.forced_bos_token_id is not None else prompt
    rules = [
        (config.sequence_bias is not None, lambda: tf.SequenceBiasLogitsProcessor(config.sequence_bias)),
        (config.encoder_repetition_penalty not in (None, 1.0),
         lambda: tf.EncoderRepetitionPenaltyLogitsProcessor(config.encoder_repetition_penalty, ids)),
        (config.repetition_penalty not in (None, 1.0),      # the left padding is no part of the prompt
         lambda: tf.RepetitionPenaltyLogitsProcessor(config.repetition_penalty, (mask != 0).int().argmax(dim=1))),
        (bool(config.no_repeat_ngram_size), lambda: tf.NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size)),
        (bool(config.encoder_no_repeat_ngram_size),
         lambda: tf.EncoderNoRepeatNGramLogitsProcessor(config.encoder_no_repeat_ngram_size, ids)),
        (config.bad_words_ids is not None, lambda: tf.NoBadWordsLogitsProcessor(config.bad_words_ids, eos)),
        (eos is not None and bool(min_length), lambda: tf.MinLengthLogitsProcessor(min_length, eos, device=device)),
        (eos is not None and bool(config.min_new_tokens),
         lambda: tf.MinNewTokensLengthLogitsProcessor(prompt, config.min_new_tokens, eos, device=device)),
        (config.forced_bos_token_id is not None, lambda: tf.ForcedBOSTokenLogitsProcessor(config.forced_bos_token_id)),
        (config.forced_eos_token_id is not None,
         lambda: tf.ForcedEOSTokenLogitsProcessor(prompt + max_new_tokens, config.forced_eos_token_id, device=device)),
        (config.remove_invalid_values is True, tf.InfNanRemoveLogitsProcessor),
        (config.exponential_decay_length_penalty is not None,
         lambda: tf.ExponentialDecayLengthPenalty(config.exponential_decay_length_penalty, eos, prompt)),
        (config.suppress_tokens is not None,
         lambda: tf.SuppressTokensLogitsProcessor(config.suppress_tokens, device=device)),
        (config.begin_suppress_tokens is not None,
         lambda: tf.SuppressTokensAtBeginLogitsProcessor(config.begin_suppress_tokens, begin, device=device)),
    ]
    warpers = sampling_warpers(config) if config.do_sample else []
    return [make() for applies, make in rules if applies] + warpers   # renormalize_logits (a log-softmax
    # last) changes neither the argmax nor the softmax that sampling draws from


def sampling_warpers(config) -> list:
    """The warpers ``model.generate(do_sample=True)`` appends after its processors for one sequence
    per beam (``min_tokens_to_keep`` 1), in its order; ``top_h`` where this transformers has it."""
    import transformers as tf
    top_h = getattr(config, "top_h", None)
    rules = [
        (config.temperature not in (None, 1.0), lambda: tf.TemperatureLogitsWarper(config.temperature)),
        (top_h is not None, lambda: tf.TopHLogitsWarper(top_h=top_h)),
        (config.top_k not in (None, 0), lambda: tf.TopKLogitsWarper(top_k=config.top_k)),
        (config.top_p is not None and config.top_p < 1.0, lambda: tf.TopPLogitsWarper(top_p=config.top_p)),
        (config.min_p is not None, lambda: tf.MinPLogitsWarper(min_p=config.min_p)),
        (config.typical_p is not None and config.typical_p < 1.0, lambda: tf.TypicalLogitsWarper(mass=config.typical_p)),
        (config.epsilon_cutoff is not None and 0.0 < config.epsilon_cutoff < 1.0,
         lambda: tf.EpsilonLogitsWarper(epsilon=config.epsilon_cutoff)),
        (config.eta_cutoff is not None and 0.0 < config.eta_cutoff < 1.0,
         lambda: tf.EtaLogitsWarper(epsilon=config.eta_cutoff)),
    ]
    return [make() for applies, make in rules if applies]


class TokenChoice:
    """Choice and stopping as in ``model.generate``: the last position's logits, in float32,
    through the logits processors of the generation settings ``config`` (None: none) with the
    sequence so far, then the argmax, or where ``config`` samples, one draw from their softmax
    (``torch.multinomial`` on the global generator, for every sequence at each step, as
    transformers draws); a sequence that has produced an end-of-sequence id gets the pad id from
    then on; decoding ends once all have. ``ids``, ``mask``: the prompts and their padding
    (``mask`` all ones where there is none). ``streamer`` (transformers' ``BaseStreamer``, e.g.
    ``TextStreamer``): given the prompts now and each chosen token, on the CPU, as
    ``model.generate`` gives them; its ``end()`` is the caller's."""

    def __init__(self, config, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, streamer=None):
        self.eos, self.pad = stop_ids(config)
        self.processors = [] if config is None else logits_processors(config, ids, mask, max_new_tokens)
        self.sampling = config is not None and bool(config.do_sample)
        self.done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        self.streamer = streamer
        if streamer is not None:
            streamer.put(ids.cpu())

    def next_token(self, sequence: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        scores = logits[:, -1].to(dtype=torch.float32, device=sequence.device)
        for processor in self.processors:
            scores = processor(sequence, scores)
        if self.sampling:
            token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            token = scores.argmax(-1)
        if self.eos:
            token = torch.where(self.done, torch.tensor(self.pad, device=token.device), token)
            self.done |= torch.isin(token, torch.tensor(self.eos, device=token.device))
        if self.streamer is not None:
            self.streamer.put(token.cpu())
        return token

    @property
    def all_done(self) -> bool:
        return bool(self.eos) and bool(self.done.all())


def padding_mask(config, ids: torch.Tensor) -> Optional[torch.Tensor]:
    """The mask ``model.generate`` infers for prompts passed without one: the pad id's positions
    masked out where the generation settings ``config`` have a pad id that is no end-of-sequence
    id and the prompts hold it; else None (every position counts)."""
    pad = next(iter(_token_ids(getattr(config, "pad_token_id", None))), None)
    if pad is None or pad in stop_ids(config)[0] or not bool((ids == pad).any()):
        return None
    return (ids != pad).long()


def stop_ids(config) -> tuple[list[int], Optional[int]]:
    """End-of-sequence ids and the pad id of generation settings (None: neither; transformers pads
    with the first EOS id when there is no pad id), as Python ints however they were given (an
    int, a NumPy integer, a list, a tensor of any dims, as ``model.generate`` takes them)."""
    eos = _token_ids(getattr(config, "eos_token_id", None))
    pad = _token_ids(getattr(config, "pad_token_id", None))
    return eos, pad[0] if pad else (eos[0] if eos else None)


def _token_ids(value) -> list[int]:
    """Token ids given as None, an integer, a sequence of them or a tensor, as a list of ints."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]
