"""Checkpoints saved quantized (as the hub ships DeepSeek-V3, Qwen3 FP8 or gpt-oss), read back
dequantized, one tensor at a time, under the names the model holds.

    fine-grained FP8   ``W.weight`` (float8) + ``W.weight_scale_inv``: every block of the weight
                       times its scale; the scales are [ceil(rows/b0), ceil(cols/b1)] (block size
                       from config.json's ``quantization_config.weight_block_size``, 128x128 when
                       absent) or one scale for the whole tensor
    MXFP4              ``X_blocks`` [..., R, G, 16] uint8, two e2m1 values a byte (low nibble
                       first), + ``X_scales`` [..., R, G] uint8, power-of-two exponents biased by
                       127: ``X`` [..., R, 32 G]; served as [..., 32 G, R] when the model holds it
                       that way round (gpt-oss experts)

    >>> present, read = dequantizing_reader(names, read_file, (128, 128), model_shapes.get)   # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch

from .storage import span_of, with_spans

Reader = Callable[..., torch.Tensor]        # (name, rows=None): rows (lo, hi) of dim 0, as in runtime.sources

FP8_SCALE = ".weight_scale_inv"
MXFP4_BLOCKS, MXFP4_SCALES = "_blocks", "_scales"
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
DEFAULT_FP8_BLOCK = (128, 128)


def fp8_block_size(directory: Path) -> tuple[int, int]:
    """The FP8 block size that ``directory``'s config.json declares (the default when it says none)."""
    config = directory / "config.json"
    quantization = (json.loads(config.read_text()).get("quantization_config") if config.is_file() else None) or {}
    block = quantization.get("weight_block_size") or DEFAULT_FP8_BLOCK
    return int(block[0]), int(block[1])


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 ``weight * scale`` with one scale per [block] tile of the last two dims (or one in all)."""
    values, scale = weight.to(torch.float32), scale_inv.to(torch.float32)
    if scale.numel() == 1:
        return values * scale.reshape(())
    rows, cols = values.shape[-2:]
    expected = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale.shape[-2:]) != expected:
        raise ValueError(f"scales of shape {list(scale.shape)} do not tile a [{rows}, {cols}] weight in {block[0]}x"
                         f"{block[1]} blocks (expected {list(expected)}); set quantization_config.weight_block_size")
    tiles = scale.repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(block[1], dim=-1)[..., :cols]
    return values * tiles


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 [..., R, 32 G] from MXFP4 ``blocks`` [..., R, G, 16] and ``scales`` [..., R, G]."""
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} disagree: the scales "
                         f"must be the blocks' shape without its last dim")
    table = torch.tensor(FP4_E2M1, dtype=torch.float32)
    packed = blocks.to(torch.uint8)
    pairs = torch.stack([table[(packed & 0x0F).long()], table[(packed >> 4).long()]], dim=-1)   # low nibble first
    values = torch.ldexp(pairs.flatten(-2), (scales.to(torch.int32) - 127).unsqueeze(-1))
    return values.flatten(-2)


def dequantizing_reader(present: set[str], read: Reader, block: tuple[int, int],
                        shape_of: Callable[[str], Optional[torch.Size]]) -> tuple[set[str], Reader]:
    """``present`` and ``read`` (checkpoint names -> tensors) with every quantized tensor served
    dequantized under its plain name, in place of its scales and blocks.
    ``shape_of(name)``: the model's shape for a name (None when it holds no such tensor)."""
    fp8 = {name[:-len(FP8_SCALE)] + ".weight" for name in present if name.endswith(FP8_SCALE)} & present
    mxfp4 = {name[:-len(MXFP4_BLOCKS)] for name in present
             if name.endswith(MXFP4_BLOCKS) and name[:-len(MXFP4_BLOCKS)] + MXFP4_SCALES in present}
    if not fp8 and not mxfp4:
        return present, read

    def read_dequantized(name: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        if name in fp8:       # the scales are small: read whole, then cut like a stacked [E, ., .] weight
            weight, scales = read(name, rows), read(name[:-len(".weight")] + FP8_SCALE)
            if rows is not None and scales.numel() > 1 and scales.dim() == weight.dim() > 2:
                scales = scales[rows[0]:rows[1]]
            return dequantize_fp8(weight, scales, block)
        if name in mxfp4:
            values = dequantize_mxfp4(read(name + MXFP4_BLOCKS, rows), read(name + MXFP4_SCALES, rows))
            wanted = shape_of(name)
            flipped = values.transpose(-1, -2)
            if wanted is not None and flipped.shape[1:] == wanted[1:] != values.shape[1:]:
                return flipped.contiguous()
            return values
        return read(name, rows)

    def span(name: str, rows: Optional[tuple[int, int]] = None):
        return None if name in fp8 or name in mxfp4 else span_of(read, name, rows)

    consumed = {name[:-len(".weight")] + FP8_SCALE for name in fp8} | {
        name + suffix for name in mxfp4 for suffix in (MXFP4_BLOCKS, MXFP4_SCALES)}
    return (present - consumed) | mxfp4, with_spans(read_dequantized, span)
