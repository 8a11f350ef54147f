"""Errors raised to users. Each message names the place (module path, plan field, pass) and a fix."""


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
