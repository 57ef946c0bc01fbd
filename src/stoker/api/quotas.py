"""/api/v1/quotas and /api/v1/vms/{id}/quota: per-VM limits, how they bind, and usage."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from stoker.api.deps import services
from stoker.api.problems import PROBLEM_RESPONSES
from stoker.api.quota_view import quota_out
from stoker.domain.quota import Quota
from stoker.services.container import Services
from stoker.wire import QuotaOut

router = APIRouter(tags=["quotas"], responses=PROBLEM_RESPONSES)

Svc = Annotated[Services, Depends(services)]


@router.get("/api/v1/quotas")
async def list_quotas(svc: Svc) -> list[QuotaOut]:
    """Every VM's effective quota, how each limit binds, usage and violation counts."""
    return [quota_out(r) for r in svc.quotas.all()]


@router.get("/api/v1/vms/{ref}/quota")
async def get_quota(ref: str, svc: Svc) -> QuotaOut:
    """The VM's quota (defaults, override, effective), each limit's status, usage, violations."""
    return quota_out(await svc.quotas.get(ref))


@router.put("/api/v1/vms/{ref}/quota")
async def put_quota(ref: str, quota: Quota, svc: Svc) -> QuotaOut:
    """Replace the VM's override; a running VM gets it at once, or the answer says why not."""
    return quota_out(await svc.quotas.set(ref, quota))


@router.delete("/api/v1/vms/{ref}/quota")
async def delete_quota(ref: str, svc: Svc) -> QuotaOut:
    """Remove the override; the configured defaults apply again."""
    return quota_out(await svc.quotas.remove(ref))
