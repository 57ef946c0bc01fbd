"""Manifest errors as the API answers them."""

from __future__ import annotations

from stoker.domain.capabilities import Unsupported
from stoker.domain.states import IllegalAction
from stoker.manifest import ManifestError, Step
from stoker.services.errors import ServiceError


class ManifestInvalid(ServiceError):
    """The manifest has problems (syntax, validation, or what the host refuses): every one
    with its file, key path and line. Nothing was changed."""

    status = 422
    title = "Invalid manifest"

    def __init__(self, error: ManifestError) -> None:
        super().__init__(
            error.render(),
            errors=[
                {"field": p.path, "message": p.message, "file": p.file, "line": p.line}
                for p in error.problems
            ],
        )
        self.error = error


class ApplyFailed(ServiceError):
    """A step failed: the steps before it are done (and recorded), the rest are not. The
    status is the failed call's own (409 for a conflict, 422 for a refusal)."""

    title = "Apply stopped"

    def __init__(self, step: Step, done: int, total: int, cause: Exception) -> None:
        reason = cause.detail if isinstance(cause, ServiceError) else str(cause) or repr(cause)
        what = f"{step.kind} {step.name}: {step.op}"
        super().__init__(
            f"apply stopped at step {done + 1} of {total} ({what}): {reason}; the {done} "
            "steps before it are done. Fix the cause and apply again: it carries on from here",
            step=step.to_dict(),
            done=done,
            total=total,
        )
        if isinstance(cause, ServiceError):
            self.status = cause.status
        elif isinstance(cause, IllegalAction):
            self.status = 409
        elif isinstance(cause, Unsupported):
            self.status = 422
        else:
            self.status = 500


class ApplyRefused(ServiceError):
    """Apply requests are refused while the agent keeps a manifest file applied."""

    status = 409
    title = "Conflict"
