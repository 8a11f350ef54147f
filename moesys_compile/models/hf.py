"""Hugging Face transformers models for the CLI and tests, without downloading anything.

    hf:<family>          random init from a tiny config of that family (``--config key=value``
                         overrides any config field; ``seed=N`` picks the init)
    hf:<model_type>      any other transformers model type: its default (full-size) config + overrides
    /path/to/dir         a local Hugging Face directory (config.json + safetensors weights)

    >>> from moesys_compile.models.hf import load_hf      # doctest: +SKIP
    >>> loaded = load_hf("hf:mixtral", {"num_hidden_layers": 1})
    >>> loaded.model(*loaded.example_inputs(2, 8)).logits.shape
    torch.Size([2, 8, 128])
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import json
import logging
import os
from typing import Any

import torch

from ..errors import torch_logs_silenced
from .spec import LoadedModel, token_inputs

_ATTN = dict(num_attention_heads=4, num_key_value_heads=2)
_LLAMA_LIKE = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, max_position_embeddings=128, **_ATTN)
_MOE = dict(_LLAMA_LIKE, num_experts_per_tok=2)
_MLA = dict(_MOE, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=8)
_MOE_MLA = dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1, n_group=1,
                topk_group=1)
_INDEXER = dict(index_topk=8, index_head_dim=8, index_n_heads=2)       # DeepSeek sparse attention
_INKLING_ATTN = dict(head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
                     sliding_window_size=8, d_rel=4, rel_extent=16)
_INKLING2 = dict(_MOE, moe_intermediate_size=32, n_routed_experts=4, **_INKLING_ATTN, unpadded_vocab_size=128,
                 n_layers_per_attn_res_block=1)

# family -> (transformers model_type, tiny config). Every MoE family has router jitter off and
# enough experts that top-k is a real choice.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("mixtral", dict(_LLAMA_LIKE, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                                router_jitter_noise=0.0)),
    "qwen2_moe": ("qwen2_moe", dict(_LLAMA_LIKE, intermediate_size=64, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("qwen3_moe", dict(_LLAMA_LIKE, intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                                    num_experts_per_tok=2)),
    "phimoe": ("phimoe", dict(_LLAMA_LIKE, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)),
    "gpt_oss": ("gpt_oss", dict(_LLAMA_LIKE, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                head_dim=8, layer_types=["full_attention", "full_attention"])),
    "olmoe": ("olmoe", dict(_LLAMA_LIKE, intermediate_size=32, num_experts=4, num_experts_per_tok=2)),
    "deepseek_v3": ("deepseek_v3", dict(_LLAMA_LIKE, num_key_value_heads=4, intermediate_size=64,
                                        moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                                        n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
                                        routed_scaling_factor=2.5, q_lora_rank=16, kv_lora_rank=16,
                                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)),
    "dbrx": ("dbrx", dict(vocab_size=128, d_model=32, n_heads=4, n_layers=2, max_seq_len=128,
                          attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                          ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2))),
    "jetmoe": ("jetmoe", dict(_LLAMA_LIKE, intermediate_size=32, kv_channels=8, num_local_experts=4,
                              num_experts_per_tok=2)),
    "granitemoe": ("granitemoe", dict(_MOE, intermediate_size=32, num_local_experts=4)),
    "granitemoeshared": ("granitemoeshared", dict(_MOE, intermediate_size=32, shared_intermediate_size=64,
                                                  num_local_experts=4)),
    "granitemoehybrid": ("granitemoehybrid", dict(_MOE, intermediate_size=32, shared_intermediate_size=64,
                                                  num_local_experts=4, layer_types=["mamba", "attention"],
                                                  mamba_n_heads=8, mamba_d_head=8, mamba_d_state=8,
                                                  mamba_n_groups=1)),
    "qwen3_next": ("qwen3_next", dict(_MOE, intermediate_size=64, moe_intermediate_size=32, head_dim=8,
                                      shared_expert_intermediate_size=64, num_experts=4,
                                      layer_types=["linear_attention", "full_attention"], linear_key_head_dim=8,
                                      linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4)),
    "qwen3_5_moe": ("qwen3_5_moe_text", dict(_MOE, intermediate_size=64, moe_intermediate_size=32, head_dim=8,
                                             shared_expert_intermediate_size=64, num_experts=4,
                                             layer_types=["linear_attention", "full_attention"],
                                             linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                                             linear_num_value_heads=4)),
    "glm4_moe_lite": ("glm4_moe_lite", dict(_MLA, intermediate_size=64, moe_intermediate_size=32,
                                            n_routed_experts=4, n_shared_experts=1, n_group=1, topk_group=1)),
    "glm4_moe": ("glm4_moe", dict(_MOE, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4,
                                  n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1)),
    "dots1": ("dots1", dict(_MOE, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4,
                            n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1)),
    "deepseek_v2": ("deepseek_v2", dict(_MLA, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4,
                                        n_shared_experts=1, first_k_dense_replace=1)),
    "ernie4_5_moe": ("ernie4_5_moe", dict(_MOE, intermediate_size=64, moe_intermediate_size=32, moe_num_experts=4,
                                          moe_k=2, moe_num_shared_experts=1)),
    "hunyuan_v1_moe": ("hunyuan_v1_moe", dict(_MOE, intermediate_size=64, head_dim=8, num_experts=4, moe_topk=2)),
    "minimax": ("minimax", dict(_MOE, intermediate_size=32, head_dim=8, num_local_experts=4,
                                router_jitter_noise=0.0)),
    "minimax_m2": ("minimax_m2", dict(_MOE, intermediate_size=32, head_dim=8, num_local_experts=4,
                                      router_jitter_noise=0.0)),
    "llama4": ("llama4_text", dict(_MOE, intermediate_size=32, head_dim=8, num_local_experts=4,
                                   router_jitter_noise=0.0)),
    "afmoe": ("afmoe", dict(_MOE, intermediate_size=64, moe_intermediate_size=32, head_dim=8, num_experts=4,
                            num_shared_experts=1)),
    "cohere2_moe": ("cohere2_moe", dict(_MOE, intermediate_size=32, head_dim=8, num_experts=4, num_shared_experts=1)),
    "exaone_moe": ("exaone_moe", dict(_MOE, intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                                      first_k_dense_replace=1, n_group=1, topk_group=1, num_shared_experts=1)),
    "solar_open": ("solar_open", dict(_MOE, head_dim=8, moe_intermediate_size=32, n_routed_experts=4,
                                      n_shared_experts=1, n_group=1, topk_group=1)),
    "mimo_v2_flash": ("mimo_v2_flash", dict(_MOE, intermediate_size=64, moe_intermediate_size=32, head_dim=8,
                                            v_head_dim=8, n_routed_experts=4, n_group=1, topk_group=1)),
    "lfm2_moe": ("lfm2_moe", dict(_MOE, intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                                  num_dense_layers=1, layer_types=["conv", "full_attention"])),
    "flex_olmo": ("flex_olmo", dict(_MOE, intermediate_size=32, num_experts=4, pad_token_id=0)),
    "laguna": ("laguna", dict(_MOE, intermediate_size=64, head_dim=8, moe_intermediate_size=32,
                              shared_expert_intermediate_size=64, num_experts=4)),
    "granitemoe_swa": ("granitemoe_swa", dict(_MOE, intermediate_size=32, shared_intermediate_size=64,
                                              num_local_experts=4)),
    "hy_v3": ("hy_v3", dict(_MOE, intermediate_size=64, head_dim=8, moe_intermediate_size=32, num_experts=4,
                            num_shared_experts=1)),
    # families new in transformers 5.2x; multimodal ones by their text model (gemma4 -> gemma4_text)
    "deepseek_v32": ("deepseek_v32", dict(_MLA, **_MOE_MLA, **_INDEXER, first_k_dense_replace=1, head_dim=8)),
    "glm_moe_dsa": ("glm_moe_dsa", dict(_MLA, **_MOE_MLA, **_INDEXER, first_k_dense_replace=1, head_dim=8)),
    "mistral4": ("mistral4", dict(_MLA, **_MOE_MLA)),
    "axk1": ("axk1", dict(_MLA, **_MOE_MLA, mlp_layer_types=["dense", "sparse"], head_dim=8)),
    "axk2": ("axk2", dict(_MLA, **_MOE_MLA, **_INDEXER, mlp_layer_types=["dense", "sparse"], head_dim=8,
                          gated_norm_rank=4)),
    "dots3_note": ("dots3_note_text", dict(_MLA, **_MOE_MLA, **_INDEXER, mlp_layer_types=["dense", "sparse"],
                                           per_layer_config={}, head_dim=8, sliding_window=8,
                                           shared_experts_intermediate_size=32, pad_token_id=0)),
    "hy_v4": ("hy_v4", dict(_MLA, **_MOE_MLA, **_INDEXER, mlp_layer_types=["dense", "sparse"], head_dim=8, hc_mult=2,
                            pad_token_id=0)),
    "kimi_linear": ("kimi_linear", dict(_MLA, intermediate_size=64, moe_intermediate_size=32, q_lora_rank=None,
                                        num_experts=4, num_experts_per_token=2, num_shared_experts=1, head_dim=8,
                                        linear_head_dim=8, linear_num_heads=4, pad_token_id=0,
                                        layer_types=["linear_attention", "full_attention"],
                                        mlp_layer_types=["dense", "sparse"])),
    "bailing_hybrid": ("bailing_hybrid", dict(_MLA, intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                                              num_experts_per_token=2, num_shared_experts=1, num_expert_group=1,
                                              topk_group=1, first_k_dense_replace=0, head_dim=8, pad_token_id=0,
                                              layer_types=["linear_attention", "full_attention"],
                                              num_nextn_predict_layers=0)),
    "deepseek_v4": ("deepseek_v4", dict(_MOE, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
                                        num_key_value_heads=1, head_dim=16, q_lora_rank=16, qk_rope_head_dim=8,
                                        hc_mult=2, o_groups=2, o_lora_rank=16, index_n_heads=2, index_head_dim=8,
                                        index_topk=8, sliding_window=8, num_nextn_predict_layers=0,
                                        mlp_layer_types=["hash_moe", "moe"])),
    "longcat_flash": ("longcat_flash", dict(vocab_size=128, hidden_size=32, num_layers=2, num_attention_heads=4,
                                            num_key_value_heads=4, ffn_hidden_size=64, expert_ffn_hidden_size=16,
                                            n_routed_experts=4, zero_expert_num=2, moe_topk=2, q_lora_rank=16,
                                            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, head_dim=8,
                                            v_head_dim=8, max_position_embeddings=128)),
    "qwen4_exp": ("qwen4_exp_text", dict(_MOE, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                         num_experts=4, head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8,
                                         linear_num_key_heads=2, linear_num_value_heads=4, hc_count=2, hc_lowrank=8,
                                         ple_embed_dim=32, heads_per_ngram=2, ngram_vocab_size_base=1000,
                                         split_ngram_parts=4, layer_types=["linear_attention", "indexed_attention"],
                                         indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=8,
                                         indexer_compress_ratio=2)),
    "nemotron_h": ("nemotron_h", dict(_ATTN, vocab_size=128, hidden_size=32, max_position_embeddings=128,
                                      num_experts_per_tok=2, intermediate_size=64, moe_intermediate_size=32,
                                      moe_shared_expert_intermediate_size=64, n_routed_experts=4, head_dim=8,
                                      layers_block_type=["moe", "full_attention"], use_mamba_kernels=False,
                                      ssm_state_size=8, mamba_num_heads=8, mamba_head_dim=8, n_groups=1,
                                      chunk_size=8)),
    "jamba": ("jamba", dict(_MOE, intermediate_size=32, num_experts=4, expert_layer_period=1, expert_layer_offset=0,
                            attn_layer_period=1, attn_layer_offset=0, use_mamba_kernels=False, mamba_d_state=8,
                            mamba_dt_rank=4)),
    "zaya": ("zaya", dict(_MOE, moe_intermediate_size=32, num_experts=4, head_dim=8, router_hidden_size=16,
                          num_experts_per_tok=1)),                         # ZAYA1 routes top-1 only
    "inkling": ("inkling_text", dict(_MOE, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4,
                                     n_shared_experts=1, **_INKLING_ATTN)),
    "inkling2": ("inkling2_text", _INKLING2),
    "flint": ("flint", dict(_MOE, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                            num_experts=4, head_dim=8, mlp_only_layers=[], sliding_window=16)),
    "kolibri1": ("kolibri1", dict(_MOE, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                  num_local_experts=4, head_dim=8, sliding_window=16)),
    "mellum": ("mellum", dict(_MOE, intermediate_size=64, moe_intermediate_size=32, num_local_experts=4, head_dim=8,
                              sliding_window=16)),
    "doge": ("doge", dict(_MOE, intermediate_size=64, is_moe=True, num_experts=16, keep_window_size=16)),
    "gemma4": ("gemma4_text", dict(_MOE, intermediate_size=64, head_dim=8, enable_moe_block=True, num_experts=4,
                                   top_k_experts=2, moe_intermediate_size=32, vocab_size_per_layer_input=128,
                                   hidden_size_per_layer_input=8, sliding_window=8)),
    "beam": ("beam", dict(_MOE, intermediate_size=64, moe_intermediate_size=32, num_experts=4, head_dim=8, n_group=2,
                          topk_group=1, sliding_window=16, mlp_layer_types=["dense", "sparse"])),
    "lara_mini": ("lara_mini", dict(_MOE, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
                                    head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                                    linear_num_value_heads=4, sliding_window=16)),
    "sarvam_mla": ("sarvam_mla", dict(_MLA, **_MOE_MLA)),
    "sarvam_moe": ("sarvam_moe", dict(_MOE, head_dim=8, **_MOE_MLA)),
    # layer 1 is run twice (a loop of one layer) between layers 0 and 2
    "inkling2_loop": ("inkling2_loop_text", dict(_INKLING2, num_hidden_layers=3, loop_layer_index_start=1,
                                                 loop_layer_index_end=2, loop_num_passes=2, loop_gate_rank=4)),
    "llama": ("llama", dict(_LLAMA_LIKE, intermediate_size=64)),
    "qwen2": ("qwen2", dict(_LLAMA_LIKE, intermediate_size=64)),
    "gpt2": ("gpt2", dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=0,
                          eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    **{family: (family, dict(_LLAMA_LIKE, intermediate_size=64)) for family in (
        "mistral", "qwen3", "gemma", "gemma2", "olmo2", "olmo3", "granite", "cohere", "stablelm", "starcoder2")},
    "helium": ("helium", dict(_LLAMA_LIKE, intermediate_size=64, head_dim=8)),
    **{family: (family, dict(_LLAMA_LIKE, intermediate_size=64, pad_token_id=0)) for family in (
        "phi3", "smollm3", "glm4")},
    "gemma3": ("gemma3_text", dict(_LLAMA_LIKE, intermediate_size=64)),
    "phi": ("phi", dict(_LLAMA_LIKE, intermediate_size=64)),
    "falcon": ("falcon", dict(_LLAMA_LIKE)),
    "gpt_neox": ("gpt_neox", dict(_LLAMA_LIKE, intermediate_size=64)),
}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "phimoe", "gpt_oss", "jetmoe",
                "dbrx", "granitemoe", "granitemoeshared", "granitemoehybrid", "qwen3_next", "qwen3_5_moe", "glm4_moe",
                "glm4_moe_lite", "dots1", "deepseek_v2", "ernie4_5_moe", "hunyuan_v1_moe", "minimax", "minimax_m2",
                "llama4", "afmoe", "cohere2_moe", "exaone_moe", "solar_open", "mimo_v2_flash", "lfm2_moe",
                "flex_olmo", "laguna", "granitemoe_swa", "hy_v3", "deepseek_v32", "glm_moe_dsa", "mistral4", "axk1",
                "axk2", "dots3_note", "hy_v4", "kimi_linear", "bailing_hybrid", "deepseek_v4", "longcat_flash",
                "qwen4_exp", "nemotron_h", "jamba", "zaya", "inkling", "inkling2", "flint", "kolibri1", "mellum",
                "doge", "gemma4", "beam", "lara_mini", "sarvam_mla", "sarvam_moe", "inkling2_loop")
DENSE_FAMILIES = ("llama", "qwen2", "gpt2", "mistral", "qwen3", "gemma", "gemma2", "gemma3", "olmo2", "olmo3",
                  "granite", "cohere", "stablelm", "starcoder2", "helium", "phi3", "smollm3", "glm4", "phi", "falcon",
                  "gpt_neox")


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ValueError("hf: models need Hugging Face transformers; pip install 'transformers>=5'") from exc
    return transformers


def hf_config(family: str, overrides: dict[str, Any]):
    """The config of ``hf:<family>``: the tiny preset (if any) with ``overrides`` applied; a layer
    count in ``overrides`` refits the preset's per-layer lists (``fit_layer_lists``)."""
    transformers = _transformers()
    model_type, preset = FAMILIES.get(family, (family, {}))
    if model_type not in transformers.CONFIG_MAPPING:
        raise ValueError(f"hf:{family}: unknown transformers model type; tiny presets: {', '.join(FAMILIES)}; "
                         f"any model type of transformers {transformers.__version__} also works")
    cls = transformers.CONFIG_MAPPING[model_type]
    unknown = sorted(k for k in overrides if k not in _config_fields(cls))
    if unknown:
        raise ValueError(f"hf:{family}: --config field(s) {unknown} are not fields of {cls.__name__}")
    overrides = fit_layer_lists(preset, overrides, cls.attribute_map)
    if family in FAMILIES:
        preset = dict(preset, **tokens_in_vocab(cls, {**preset, **overrides}))
    return validated_config(f"hf:{family}", lambda: cls(**{**preset, **overrides}))


# Token ids a tiny preset moves inside its vocabulary where its config class's defaults lie outside:
# the ids of Llama-like vocabularies.
TINY_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def tokens_in_vocab(cls, fields: dict[str, Any]) -> dict[str, Any]:
    """The token ids of ``cls``'s defaults that lie outside the vocab_size of ``fields`` (a tiny
    preset with its overrides) and that ``fields`` does not set, moved inside (``TINY_TOKEN_IDS``):
    OLMoE's eos 50279 in a 128-token vocab, which transformers warns about at every build."""
    vocab, defaults = fields.get("vocab_size"), _defaults(cls)
    if not isinstance(vocab, int):
        return {}
    moved = {}
    for name, tiny in TINY_TOKEN_IDS.items():
        value = getattr(defaults, name, None)
        ids = value if isinstance(value, (list, tuple)) else [value]
        if name not in fields and any(isinstance(i, int) and not 0 <= i < vocab for i in ids):
            moved[name] = tiny
    return moved


def _config_fields(cls) -> set[str]:
    """The names a config class takes: its fields, aliases, ``__init__`` parameters and settable
    properties (Nemotron-H's ``num_hidden_layers``, which its ``layers_block_type`` decides)."""
    settable = {name for name, attr in inspect.getmembers(cls) if isinstance(attr, property) and attr.fset}
    return set(_defaults(cls).to_dict()) | set(cls.attribute_map) | set(inspect.signature(cls.__init__).parameters) | {
        f.name for f in (dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ())} | settable


@functools.lru_cache(maxsize=None)
def _defaults(cls):
    """``cls()``, the config class's defaults, read and never built: its check of them is not shown
    (StarCoder2's default token ids lie outside its default vocab)."""
    with torch_logs_silenced("transformers.configuration_utils"):
        return cls()


# Layer count fields, fields with one entry per layer, and fields listing layer indices, as
# transformers configs name them.
LAYER_COUNT_FIELDS = ("num_hidden_layers", "num_layers", "n_layers", "n_layer")
PER_LAYER_FIELDS = ("layer_types", "mlp_layer_types", "layers_block_type", "no_rope_layers", "indexer_types",
                    "num_attention_heads_per_layer", "num_key_value_heads_per_layer", "layer_rope_theta",
                    "attn_layers")
LAYER_INDEX_FIELDS = ("mlp_only_layers", "moe_layers", "full_attn_idxs", "attn_layer_indices", "hybrid_layer_ids",
                      "cross_attention_layers")


def fit_layer_lists(base: dict[str, Any], overrides: dict[str, Any],
                    aliases: dict[str, str] | None = None) -> dict[str, Any]:
    """``overrides`` plus the per-layer lists of ``base`` (a preset or a config.json) refitted to the
    layer count that ``overrides`` sets, for each list ``overrides`` does not set itself: a per-layer
    list has its pattern repeated or cut, a list of layer indices keeps the pattern of the layers it
    marks. ``aliases`` is the config class's ``attribute_map`` (``n_layer`` is ``num_hidden_layers``).

    ``fit_layer_lists({"num_hidden_layers": 2, "layer_types": ["sliding", "full"], "mlp_only_layers": [0]},
    {"num_hidden_layers": 3})`` is ``{"num_hidden_layers": 3, "layer_types": ["sliding", "full", "sliding"],
    "mlp_only_layers": [0, 2]}``.
    """
    canonical = {aliases.get(key, key) if aliases else key: value for key, value in overrides.items()}
    count = next((canonical[k] for k in LAYER_COUNT_FIELDS if k in canonical), None)
    old = _layer_count({aliases.get(key, key) if aliases else key: value for key, value in base.items()})
    if not isinstance(count, int) or isinstance(count, bool) or count < 1 or old is None or old == count:
        return overrides
    fitted = dict(overrides)
    for key, value in base.items():
        name = aliases.get(key, key) if aliases else key
        if name in canonical or not isinstance(value, list):
            continue
        if name in PER_LAYER_FIELDS and len(value) == old:
            fitted[key] = [value[layer % old] for layer in range(count)]
        elif name in LAYER_INDEX_FIELDS and all(isinstance(index, int) for index in value):
            fitted[key] = [layer for layer in range(count) if layer % old in value]
    return fitted


def _layer_count(config: dict[str, Any]) -> int | None:
    """The layer count of a config dict: its count field, else the length of a per-layer list."""
    for key in LAYER_COUNT_FIELDS:
        if isinstance(config.get(key), int):
            return config[key]
    return next((len(config[key]) for key in PER_LAYER_FIELDS if isinstance(config.get(key), list)), None)


def validated_config(source: str, make):
    """``make()``, a transformers config, with its validation error (a strict dataclass's, or a
    ``ValueError`` of the config's own checks) as one ``ValueError`` line naming ``source`` and --config."""
    try:
        return make()
    except (ValueError, TypeError, _strict_dataclass_error()) as exc:
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        reason = " ".join(str(cause).split())
        raise ValueError(f"{source}: invalid config: {reason}; fix or add "
                         f"--config values (a per-layer list such as layer_types needs one entry per layer)") from None


def _strict_dataclass_error() -> type[Exception]:
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:                       # an older huggingface_hub: configs raise ValueError
        return ValueError
    return StrictDataclassError


def causal_lm_class(source: str, config):
    """The class that builds a causal LM from ``config``: ``AutoModelForCausalLM`` when its mapping
    lists the config, else the ``<Prefix>ForCausalLM`` the config's modeling module defines
    (Mistral 4 has one the mapping leaves out); a clear error when there is none. ``source``
    (``hf:<family>`` or a directory) starts the message."""
    transformers = _transformers()
    if type(config) in transformers.AutoModelForCausalLM._model_mapping:
        return transformers.AutoModelForCausalLM
    module = importlib.import_module(type(config).__module__.replace(".configuration_", ".modeling_"))
    names = getattr(module, "__all__", ())
    found = [getattr(module, name) for name in names if name.endswith("ForCausalLM")]
    if len(found) == 1:
        return found[0]
    heads = [name for name in names if name.endswith(("ForConditionalGeneration", "Model"))]
    raise ValueError(f"{source}: transformers {transformers.__version__} has no causal LM for "
                     f"{type(config).__name__} (it has {', '.join(heads) or 'no model class'}); models are loaded "
                     f"as causal LMs over token ids, so this one cannot be loaded that way")


def build_hf(family: str, seed: int = 0, **overrides: Any):
    """A randomly initialised causal LM of ``family`` (nothing is downloaded)."""
    config = hf_config(family, overrides)
    cls = causal_lm_class(f"hf:{family}", config)
    torch.manual_seed(seed)
    return from_config(cls, config).float()


def from_config(cls, config, **kwargs):
    """A randomly initialised ``cls`` (``causal_lm_class``) of ``config``."""
    if cls is _transformers().AutoModelForCausalLM:
        return cls.from_config(config, **kwargs)
    return cls._from_config(config, **kwargs)


def local_config(path: str, overrides: dict[str, Any]):
    """The config of a local Hugging Face directory (local files only), with ``overrides``."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path}: not a Hugging Face model directory (no config.json)")
    transformers = _transformers()
    saved, _ = transformers.PretrainedConfig.get_config_dict(path, local_files_only=True)
    cls = transformers.CONFIG_MAPPING.get(saved.get("model_type"))
    overrides = fit_layer_lists(saved, overrides, getattr(cls, "attribute_map", None))
    return validated_config(path, lambda: transformers.AutoConfig.from_pretrained(path, local_files_only=True,
                                                                                   **overrides))


def config_only(path: str, overrides: dict[str, Any]):
    """The model of a local directory built from its config alone, in the config's dtype; under
    ``empty_weights`` (``load_model(..., weights=False)``) its parameters take no memory."""
    config = local_config(path, overrides)
    dtype = getattr(config, "dtype", None)
    return from_config(causal_lm_class(path, config), config, **({"dtype": dtype} if isinstance(dtype, torch.dtype)
                                                                 else {}))


def load_local(path: str, overrides: dict[str, Any]):
    """A local Hugging Face directory: config + safetensors weights, local files only."""
    config = local_config(path, overrides)
    with _held_load_report() as report:
        model, info = causal_lm_class(path, config).from_pretrained(
            path, config=config, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True)
    # transformers initialises missing or mismatched tensors at random and only logs it: refuse them
    mismatched = sorted(info["mismatched_keys"], key=lambda entry: entry[0])
    problems = [f"'{name}' is missing" for name in sorted(info["missing_keys"])] + [
        f"'{name}' has shape {list(saved)}, not {list(wanted)}" for name, saved, wanted in mismatched]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        changed = changed_by_overrides(path, overrides)
        if changed:
            raise ValueError(f"{path}: {changed}, and the weights in {path} do not fit the result "
                             f"({type(model).__name__}): {problems[0]}{more}; the weights hold the sizes config.json "
                             f"gives: drop the override")
        raise ValueError(f"{path}: its weights do not fit its config.json ({type(model).__name__}): {problems[0]}"
                         f"{more}; save the directory again with model.save_pretrained(DIR) from the model it "
                         f"belongs to")
    report.show()
    return model


class _HeldRecords(logging.Filter):
    """Holds the records a logger would emit, to show them later (``show``) or never."""

    def __init__(self, logger: logging.Logger):
        super().__init__()
        self.logger, self.records = logger, []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False

    def show(self) -> None:
        for record in self.records:
            self.logger.handle(record)


@contextlib.contextmanager
def _held_load_report():
    """transformers' load report (a table of the missing, mismatched and unexpected tensors) held
    while a directory loads: where the weights do not fit, ``load_local``'s one-line error says it
    instead; otherwise ``show()`` lets it out as it was (unexpected tensors, say)."""
    logger = logging.getLogger("transformers.modeling_utils")
    held = _HeldRecords(logger)
    logger.addFilter(held)
    try:
        yield held
    finally:
        logger.removeFilter(held)


_UNSET = object()


def changed_by_overrides(path: str, overrides: dict[str, Any]) -> str:
    """How ``--config`` ``overrides`` change the config.json of the directory ``path`` (the likely
    cause where its weights do not fit), e.g. ``"--config num_experts=3 changes config.json's
    num_experts (6)"``; "" where they change none of it."""
    file = os.path.join(path, "config.json")
    if not overrides or not os.path.isfile(file):
        return ""
    with open(file) as f:
        saved = json.load(f)
    changed = {key: value for key, value in overrides.items() if saved.get(key, _UNSET) != value}
    if not changed:
        return ""
    given = ", ".join(f"--config {key}={value}" for key, value in changed.items())
    was = ", ".join(f"{key} ({saved[key]!r})" if key in saved else f"{key} (not set)" for key in changed)
    return f"{given} {'changes' if len(changed) == 1 else 'change'} config.json's {was}"


@contextlib.contextmanager
def overrides_blamed(path: str | None, overrides: dict[str, Any]):
    """Within, a checkpoint of the directory ``path`` that does not fit the model (a ``StorageError``
    of the ring that streams it) names the ``--config`` overrides that change its config.json as
    the likely cause."""
    from ..runtime.storage import StorageError
    try:
        yield
    except StorageError as exc:
        changed = changed_by_overrides(path, overrides) if path else ""
        if not changed:
            raise
        raise StorageError(f"{exc}; {changed}, the likely cause: drop the override") from None


def load_hf(spec: str, overrides: dict[str, Any], weights: bool = True) -> LoadedModel:
    """Resolve ``hf:<family>`` or a local directory (called by ``models.spec.load_model``);
    ``weights=False`` builds a directory's model from its config without reading its weights."""
    overrides = dict(overrides)
    if spec.startswith("hf:"):
        family = spec[3:]
        if "/" in family:
            raise ValueError(f"{spec}: hub names are not downloaded; save the model with save_pretrained and pass "
                             f"its local directory, or use hf:<family> ({', '.join(FAMILIES)})")
        seed = int(overrides.pop("seed", 0))
        model = build_hf(family, seed, **overrides)
        description = (f"{spec} ({type(model).__name__}, random init, seed {seed})" if weights else
                       f"{spec} ({type(model).__name__}, weights streamed from the checkpoint)")
    elif weights:
        model = load_local(spec, overrides)
        description = f"{spec} ({type(model).__name__}, local weights)"
    else:
        model = config_only(spec, overrides)
        description = f"{spec} ({type(model).__name__}, weights streamed from the directory)"
    return LoadedModel(model, token_inputs(model.config.vocab_size), description)
