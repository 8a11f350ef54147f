import os

import pytest
import torch

# Triton kernels run under the interpreter on a machine without a GPU; this must be set before
# anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Natively on a GPU the kernels run one untuned config per test (autotuning compiles every config
# for every shape); tests that exercise the autotuner turn it back on.
os.environ.setdefault("MOESYS_TRITON_AUTOTUNE", "0")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
