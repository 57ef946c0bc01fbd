"""What a quota request answers when it cannot be honoured.

Each answer lists every field at fault with its reason, so one reply says all there is to fix:
422 for a quota that is wrong for the VM, 409 for one that did not bind on the running VM.
"""

from __future__ import annotations

from collections.abc import Iterable

from stoker.domain.quota import QuotaProblem
from stoker.services.errors import Conflict, ServiceError

FieldMessages = Iterable[tuple[str, str]]


def joined(pairs: FieldMessages) -> str:
    """``field: message; field: message`` for one-line answers and events."""
    return "; ".join(f"{name}: {message}" for name, message in pairs)


def listed(pairs: FieldMessages) -> list[dict[str, str]]:
    """The machine-readable ``errors`` list of a problem+json answer."""
    return [{"field": name, "message": message} for name, message in pairs]


def problem_pairs(problems: list[QuotaProblem]) -> list[tuple[str, str]]:
    return [(p.field, p.message) for p in problems]


class QuotaInvalid(ServiceError):
    """422: the quota does not fit the VM or asks for limits its setup cannot enforce."""

    status = 422
    title = "Invalid quota"

    def __init__(self, problems: list[QuotaProblem]) -> None:
        pairs = problem_pairs(problems)
        super().__init__(joined(pairs), errors=listed(pairs))


class QuotaApplyError(Exception):
    """Limits that did not take effect on the running VMM, each with the reason."""

    def __init__(self, failures: dict[str, str]) -> None:
        super().__init__(joined(failures.items()))
        self.failures = failures


class QuotaNotApplied(Conflict):
    """409: a limit did not take effect on the running VM; the previous quota is kept."""

    def __init__(self, name: str, exc: QuotaApplyError) -> None:
        super().__init__(
            f"quota for {name} NOT changed: it could not be applied to the running VM: {exc}",
            errors=listed(exc.failures.items()),
        )
