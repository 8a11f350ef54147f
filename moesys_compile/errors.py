"""Errors raised to users, and warnings shown to them. Each message names the place (module path,
plan field, pass) and a fix."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

# this package, as installed: moesys_compile and the passes and kernels it maps in
_OWN_PACKAGES = ("moesys_compile", "moesys_compile.passes", "moesys_compile.kernels")


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` pointing at the caller's own line: the first frame outside this package,
    however deep inside it the warning is raised."""
    roots = tuple(os.path.dirname(module.__file__) + os.sep for module in map(sys.modules.get, _OWN_PACKAGES)
                  if module is not None and getattr(module, "__file__", None))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(roots):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)


@contextlib.contextmanager
def torch_logs_silenced(*names: str):
    """Silence torch's loggers ``names`` while an attempt whose failure is handled runs (a capture
    or shape propagation that falls back; the user gets this package's error or nothing, not
    torch's dump of the graph it gave up on)."""
    logs = [logging.getLogger(name) for name in names]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


class MoesysError(Exception):
    """Base class of every error this package raises on purpose."""


class PlanError(MoesysError, ValueError):
    """A plan field is invalid, or the plan does not fit the model."""


class UntraceableModelError(MoesysError):
    """Neither torch.fx nor torch.export could capture the model."""


class PassError(MoesysError):
    """A pass raised, or left a graph that fails lint/verify."""

    def __init__(self, pass_name: str, ran_before: list[str], cause: BaseException):
        before = ", ".join(ran_before) if ran_before else "none"
        super().__init__(f"pass '{pass_name}' failed (passes run before it: {before}): "
                         f"{type(cause).__name__}: {cause}")
        self.pass_name = pass_name
        self.ran_before = list(ran_before)
        self.cause = cause


class VerifyError(MoesysError):
    """The graph breaks one of the project's invariants."""


class OpInputError(MoesysError, ValueError):
    """An MoE op or layer was given tensors it cannot take: a shape, dtype or expert id named with its sizes."""


class SecondOrderGradientError(MoesysError, RuntimeError):
    """A gradient of a gradient was asked for through an MoE op, which is differentiable once."""
