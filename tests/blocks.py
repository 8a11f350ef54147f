"""Small modules several test files build models from."""

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
