"""Small modules several test files build models from."""

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLUExpert(nn.Module):
    """``w2(silu(w1 x) * w3 x)`` with three bias-free Linears: the per-expert MLP that DeepSpeed
    users and Mixtral-style user code write."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def randomize_expert_biases(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give expert biases (zero-initialised by Hugging Face, e.g. gpt-oss's ``gate_up_proj_bias``)
    seeded random values, so that a bias dropped or misplaced by a rewrite changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".experts." in name and "bias" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model
