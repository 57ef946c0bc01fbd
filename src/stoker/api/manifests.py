"""/api/v1/manifest: the applied manifest, and plan and apply of a manifest's files.

The request carries the files' contents (the agent never opens a path a request names); an
invalid manifest is a 422 whose ``errors`` give each problem's file, line and key path, and
nothing is changed.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from stoker.api.deps import services
from stoker.api.problems import PROBLEM_RESPONSES
from stoker.domain.manifests import ManifestSource
from stoker.manifest import Plan
from stoker.services.container import Services
from stoker.services.manifests import AppliedManifest
from stoker.wire import (
    AppliedManifestOut,
    ApplyOut,
    ManagedObjectOut,
    ManifestFile,
    ManifestRequest,
    PlanOut,
)

router = APIRouter(prefix="/api/v1/manifest", tags=["manifest"], responses=PROBLEM_RESPONSES)

Svc = Annotated[Services, Depends(services)]


@router.get("")
async def get_manifest(svc: Svc) -> AppliedManifestOut:
    """The last applied manifest (its files and hash), an apply that did not finish, and
    every object a manifest manages with the values it set."""
    return applied_out(svc.manifests.applied())


@router.post("/plan")
async def plan_manifest(body: ManifestRequest, svc: Svc) -> PlanOut:
    """What an apply would change (create, update in place, update with restart, pending
    restart, delete, start, stop) and what was changed by hand since the last apply.
    ``exit_code`` is 2 when anything would change, else 0."""
    plan = await svc.manifests.plan(_sources(body), prune=body.prune, restart=body.restart)
    return plan_out(plan, body.width)


@router.post("/apply")
async def apply_manifest(body: ManifestRequest, svc: Svc) -> ApplyOut:
    """Carry out the plan, in dependency order, through the same services as every other
    request. A failed step stops the apply with the steps before it done; applying again
    carries on."""
    result = await svc.manifests.apply(_sources(body), prune=body.prune, restart=body.restart)
    return ApplyOut(
        plan=plan_out(result.plan, body.width), done=result.done, applied_at=result.applied_at
    )


def _sources(body: ManifestRequest) -> list[ManifestSource]:
    return [ManifestSource(f.name, f.content) for f in body.files]


def plan_out(plan: Plan, width: int = 80) -> PlanOut:
    data: dict[str, Any] = plan.to_dict()
    return PlanOut.model_validate({**data, "text": plan.render(width)})


def applied_out(applied: AppliedManifest) -> AppliedManifestOut:
    head = applied.head
    return AppliedManifestOut(
        manifest_hash=head.manifest_hash if head else None,
        applied_at=head.applied_at if head else None,
        origin=head.origin if head else None,
        summary=head.summary if head else {},
        files=[
            ManifestFile(name=s.name, content=s.content) for s in (head.sources if head else ())
        ],
        objects=[
            ManagedObjectOut(
                kind=o.kind,
                name=o.name,
                object_id=o.object_id,
                applied=o.applied,
                pending=o.pending,
                updated_at=o.updated_at,
            )
            for o in applied.objects
        ],
        applying_hash=head.applying_hash if head else None,
        applying_since=head.applying_since if head else None,
        failure=head.failure if head else None,
        watching=str(applied.watching) if applied.watching else None,
    )
