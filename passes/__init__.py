"""Graph passes. A pass is a plain function ``def name(gm, ctx) -> gm`` whose docstring states its
Contract and Pseudo-code. The pipeline of each mode is the explicit list below, run in order by
``moesys_compile.pipeline.run_pipeline``; ``Plan.disable_passes`` skips passes by name.
"""

from __future__ import annotations

from typing import Callable

import torch.fx as fx

from moesys_compile.passes.decompose_moe import decompose_moe
from moesys_compile.passes.expert_parallel import expert_parallel
from moesys_compile.passes.fuse_comm import fuse_comm
from moesys_compile.passes.lower_kernels import lower_kernels
from moesys_compile.passes.ring_partition import ring_partition
from moesys_compile.passes.schedule_prefetch import schedule_prefetch

Pass = Callable[[fx.GraphModule, object], fx.GraphModule]

# Explicit per-mode pipelines. With every pass disabled the program is the captured graph
# (identity), which `inspect` reports as such.
TRAIN_PIPELINE: list[Pass] = [decompose_moe, expert_parallel, fuse_comm, lower_kernels]
INFER_PIPELINE: list[Pass] = [decompose_moe, ring_partition, lower_kernels, schedule_prefetch]

PIPELINES: dict[str, list[Pass]] = {"train": TRAIN_PIPELINE, "infer": INFER_PIPELINE}


def pipeline_for(mode: str) -> list[Pass]:
    return PIPELINES[mode]


def all_pass_names() -> list[str]:
    return list(dict.fromkeys(p.__name__ for passes in PIPELINES.values() for p in passes))
