"""/api/v1/quotas and /api/v1/vms/{id}/quota: per-VM limits, how they bind, and usage."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from stoker.api.deps import services
from stoker.api.problems import PROBLEM_RESPONSES
from stoker.domain.quota import Quota
from stoker.services.container import Services
from stoker.services.errors import ServiceError
from stoker.services.quotas import QuotaService

router = APIRouter(tags=["quotas"], responses=PROBLEM_RESPONSES)

Svc = Annotated[Services, Depends(services)]


class QuotasUnavailable(ServiceError):
    """404: this agent was built without the quota capability."""

    status = 404
    title = "Quotas not enabled"


def _quotas(svc: Services) -> QuotaService:
    service = svc.extra.get("quotas")
    if service is None:
        raise QuotasUnavailable("the quota capability is not installed in this agent")
    return service  # type: ignore[no-any-return]


@router.get("/api/v1/quotas")
async def list_quotas(svc: Svc) -> list[dict[str, Any]]:
    """Every VM's effective quota, how each limit binds, usage and violation counts."""
    return _quotas(svc).all()


@router.get("/api/v1/vms/{ref}/quota")
async def get_quota(ref: str, svc: Svc) -> dict[str, Any]:
    """The VM's quota (defaults, override, effective), each limit's status, usage, violations."""
    return await _quotas(svc).get(ref)


@router.put("/api/v1/vms/{ref}/quota")
async def put_quota(ref: str, quota: Quota, svc: Svc) -> dict[str, Any]:
    """Replace the VM's override; a running VM gets it at once, or the answer says why not."""
    return await _quotas(svc).set(ref, quota)


@router.delete("/api/v1/vms/{ref}/quota")
async def delete_quota(ref: str, svc: Svc) -> dict[str, Any]:
    """Remove the override; the configured defaults apply again."""
    return await _quotas(svc).remove(ref)
