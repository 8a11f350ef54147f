"""Decoder-only language model used by the built-in presets (dense FFN or MoE FFN per layer).

Shape legend: B batch · S sequence · D dim · Hq heads · Dh head dim · V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import MLP, MoE


# sizes and counts, each with its least value (moe_ffn_dim may also be None: ffn_dim)
COUNT_FIELDS = (("vocab_size", 1), ("dim", 1), ("n_layers", 1), ("n_heads", 1), ("ffn_dim", 1), ("max_seq_len", 1),
                ("num_experts", 0), ("top_k", 1), ("moe_ffn_dim", 1), ("num_shared_experts", 0))
# real-valued fields: (name, bound, whether the bound itself is excluded)
REAL_FIELDS = (("norm_eps", 0, True), ("rope_base", 0, True), ("aux_loss_coef", 0, False))


def _is_int(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _is_real(value, bound: float, open_: bool) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return number and (value > bound if open_ else value >= bound)


@dataclass
class ModelConfig:
    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    ffn_dim: int = 128
    max_seq_len: int = 512
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    activation: str = "swiglu"
    tie_embeddings: bool = False
    # MoE FFN (num_experts == 0 means a dense FFN)
    num_experts: int = 0
    top_k: int = 2
    moe_ffn_dim: Optional[int] = None
    capacity_factor: Optional[float] = None
    num_shared_experts: int = 0
    aux_loss_coef: float = 0.01

    def __post_init__(self) -> None:
        for name, least in COUNT_FIELDS:
            value = getattr(self, name)
            if not (name == "moe_ffn_dim" and value is None) and not _is_int(value, least):
                raise ValueError(f"ModelConfig.{name} ({value!r}) must be an integer >= {least}"
                                 + (" or None (ffn_dim)" if name == "moe_ffn_dim" else ""))
        for name, least, open_ in REAL_FIELDS:
            value = getattr(self, name)
            if not _is_real(value, least, open_):
                raise ValueError(f"ModelConfig.{name} ({value!r}) must be a finite number {'>' if open_ else '>='} "
                                 f"{least}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) is not divisible by n_heads ({self.n_heads})")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head dim ({self.dim // self.n_heads}) must be even for rotary embeddings")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


def rotary_tables(head_dim: int, max_seq_len: int, base: float) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x_BHSDh: Tensor, cos_SDh2: Tensor, sin_SDh2: Tensor) -> Tensor:
    x1, x2 = x_BHSDh.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos_SDh2 - x2 * sin_SDh2, x1 * sin_SDh2 + x2 * cos_SDh2], dim=-1)
    return rotated.to(x_BHSDh.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x_BSD: Tensor, cos: Tensor, sin: Tensor, cache: Optional[dict] = None) -> Tensor:
        batch, seq, dim = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(batch, seq, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # incremental decoding: append this step's keys/values, attend causally over all
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
            past = k.shape[2] - seq
            mask = torch.ones(seq, k.shape[2], dtype=torch.bool, device=x_BSD.device).tril(past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(batch, seq, dim))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        if cfg.is_moe:
            self.ffn = MoE(cfg.dim, cfg.moe_ffn_dim or cfg.ffn_dim, cfg.num_experts, cfg.top_k, cfg.activation,
                           cfg.capacity_factor, cfg.num_shared_experts, cfg.aux_loss_coef)
        else:
            self.ffn = MLP(cfg.dim, cfg.ffn_dim, cfg.activation)

    def forward(self, x_BSD: Tensor, cos: Tensor, sin: Tensor, cache: Optional[dict] = None) -> Tensor:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos, sin, cache)
        return x_BSD + self.ffn(self.ffn_norm(x_BSD))


class Transformer(nn.Module):
    """``model(ids_BS) -> logits_BSV``. ``model(ids, caches=[{}...], start_pos=p)`` decodes incrementally."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rotary_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, ids_BS: Tensor, caches: Optional[list] = None, start_pos: int = 0) -> Tensor:
        seq = ids_BS.shape[1]
        cos = self.rope_cos[start_pos:start_pos + seq]
        sin = self.rope_sin[start_pos:start_pos + seq]
        x_BSD = self.embed(ids_BS)
        for index, layer in enumerate(self.layers):
            x_BSD = layer(x_BSD, cos, sin, None if caches is None else caches[index])
        return self.lm_head(self.norm(x_BSD))
