"""moesys-compile: turn a PyTorch model into a distributed Mixture-of-Experts program.

    import moesys_compile as mc
    plan = mc.Plan(mode="train", world_size=4, expert_parallel=2)
    program = mc.compile(model, plan, example_inputs=(ids,))
    out = program(ids)
"""

from . import ops  # registers torch.ops.moesys.*  (isort: skip)
from . import models, nn
from .api import check_plan_against_model, compile, lower, trace
from .frontend.empty_weights import empty_weights
from .errors import MoesysError, PassError, PlanError, SecondOrderGradientError, UntraceableModelError, VerifyError
from .plan import Plan
from .programs import Program
from .runtime.checkpoint import CheckpointError, load_into
from .runtime.storage import StorageError

__version__ = "0.1.0"

__all__ = ["compile", "lower", "trace", "check_plan_against_model", "Plan", "Program", "MoesysError",
           "PassError", "PlanError", "SecondOrderGradientError", "UntraceableModelError", "VerifyError",
           "CheckpointError", "StorageError", "models",
           "nn", "ops", "load_into", "empty_weights"]
