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

import dataclasses
import inspect
import os
from typing import Any

import torch

from .spec import LoadedModel, token_inputs

_ATTN = dict(num_attention_heads=4, num_key_value_heads=2)
_LLAMA_LIKE = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, max_position_embeddings=128, **_ATTN)

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
    "llama": ("llama", dict(_LLAMA_LIKE, intermediate_size=64)),
    "qwen2": ("qwen2", dict(_LLAMA_LIKE, intermediate_size=64)),
    "gpt2": ("gpt2", dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=0,
                          eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "phimoe", "gpt_oss")
DENSE_FAMILIES = ("llama", "qwen2", "gpt2")


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ValueError("hf: models need Hugging Face transformers; pip install 'transformers>=5'") from exc
    return transformers


def hf_config(family: str, overrides: dict[str, Any]):
    """The config of ``hf:<family>``: the tiny preset (if any) with ``overrides`` applied."""
    transformers = _transformers()
    model_type, preset = FAMILIES.get(family, (family, {}))
    try:
        config = transformers.AutoConfig.for_model(model_type, **{**preset, **overrides})
    except ValueError as exc:
        raise ValueError(f"hf:{family}: unknown transformers model type; tiny presets: {', '.join(FAMILIES)}; "
                         f"any model type of transformers {transformers.__version__} also works ({exc})") from None
    cls = type(config)
    known = set(cls().to_dict()) | set(cls.attribute_map) | set(inspect.signature(cls.__init__).parameters) | {
        f.name for f in (dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ())}
    unknown = sorted(k for k in overrides if k not in known)
    if unknown:
        raise ValueError(f"hf:{family}: --config field(s) {unknown} are not fields of {type(config).__name__}")
    return config


def build_hf(family: str, seed: int = 0, **overrides: Any):
    """A randomly initialised causal LM of ``family`` (nothing is downloaded)."""
    config = hf_config(family, overrides)
    torch.manual_seed(seed)
    model = _transformers().AutoModelForCausalLM.from_config(config)
    return model.float()


def load_local(path: str, overrides: dict[str, Any]):
    """A local Hugging Face directory: config + safetensors weights, local files only."""
    transformers = _transformers()
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path}: not a Hugging Face model directory (no config.json)")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, **overrides)
    return transformers.AutoModelForCausalLM.from_pretrained(path, config=config, local_files_only=True)


def load_hf(spec: str, overrides: dict[str, Any]) -> LoadedModel:
    """Resolve ``hf:<family>`` or a local directory (called by ``models.spec.load_model``)."""
    overrides = dict(overrides)
    if spec.startswith("hf:"):
        family = spec[3:]
        if "/" in family:
            raise ValueError(f"{spec}: hub names are not downloaded; save the model with save_pretrained and pass "
                             f"its local directory, or use hf:<family> ({', '.join(FAMILIES)})")
        seed = int(overrides.pop("seed", 0))
        model = build_hf(family, seed, **overrides)
        description = f"{spec} ({type(model).__name__}, random init, seed {seed})"
    else:
        model = load_local(spec, overrides)
        description = f"{spec} ({type(model).__name__}, local weights)"
    return LoadedModel(model, token_inputs(model.config.vocab_size), description)
