"""/api/v1/vms: create, list, inspect and drive VMs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response, status

from stoker.api.deps import services
from stoker.api.problems import PROBLEM_RESPONSES
from stoker.api.render import RenderedVMs
from stoker.api.shapes import health_out, vm_out
from stoker.domain.snapshots import SnapshotsOnDelete
from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState
from stoker.services.container import Services
from stoker.services.errors import InvalidSpec
from stoker.wire import ConsoleOut, HealthOut, RestartRequest, StopRequest, VMOut

router = APIRouter(prefix="/api/v1/vms", tags=["vms"], responses=PROBLEM_RESPONSES)
_rendered = RenderedVMs()

Svc = Annotated[Services, Depends(services)]
Wait = Annotated[
    bool, Query(description="wait until the VM has left starting/restarting (or the timeout)")
]
WaitTimeout = Annotated[float, Query(gt=0, le=3600, description="seconds to wait at most")]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=VMOut)
async def create_vm(spec: VMSpec, svc: Svc) -> VMOut:
    """Register a VM in state pending; nothing is written if the spec is rejected."""
    return vm_out(await svc.lifecycle.create(spec))


@router.get("", response_model=list[VMOut])
async def list_vms(
    svc: Svc,
    state: VMState | None = None,
    label: Annotated[
        list[Annotated[str, Query(max_length=320)]] | None,
        Query(max_length=16, description="key=value; repeat to require several"),
    ] = None,
) -> Response:
    selectors = []
    for item in label or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidSpec("label", f"{item!r} is not key=value")
        selectors.append((key, value))
    vms = [
        vm
        for vm in svc.directory.all(state)
        if all(vm.spec.labels.get(k) == v for k, v in selectors)
    ]
    # pre-rendered: building and validating 1,000 response models per request was too slow
    return Response(_rendered.render(vms), media_type="application/json")


@router.get("/{ref}", response_model=VMOut)
async def get_vm(ref: str, svc: Svc) -> VMOut:
    """A VM by id or name, with its state, why, since when, and recent transitions."""
    vm = svc.lifecycle.get(ref)
    return vm_out(vm, boot_snapshot=svc.warm.info(vm.id))


@router.delete("/{ref}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_vm(
    ref: str,
    svc: Svc,
    force: Annotated[bool, Query(description="kill a running VM first")] = False,
    snapshots: Annotated[
        SnapshotsOnDelete | None,
        Query(
            description="what to do with the VM's snapshots: 'keep' them (listed, restorable "
            "into a new VM with restore `as`) or 'delete' them; required when it has any "
            "(409 otherwise). Protected snapshots are never deleted this way."
        ),
    ] = None,
) -> Response:
    await svc.lifecycle.delete(ref, force=force, snapshots=snapshots)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{ref}/start", status_code=status.HTTP_202_ACCEPTED, response_model=VMOut)
async def start_vm(ref: str, svc: Svc, wait: Wait = False, timeout_s: WaitTimeout = 300) -> VMOut:
    vm = await svc.lifecycle.start(ref)
    if wait:
        vm = await svc.lifecycle.wait_settled(vm.id, timeout_s)
    return vm_out(vm)


@router.post("/{ref}/stop", response_model=VMOut)
async def stop_vm(ref: str, svc: Svc, body: StopRequest | None = None) -> VMOut:
    """Graceful by default: ACPI power-down, then force after the stop timeout."""
    body = body or StopRequest()
    return vm_out(await svc.lifecycle.stop(ref, graceful=body.graceful, timeout_s=body.timeout_s))


@router.post("/{ref}/restart", status_code=status.HTTP_202_ACCEPTED, response_model=VMOut)
async def restart_vm(
    ref: str,
    svc: Svc,
    body: RestartRequest | None = None,
    wait: Wait = False,
    timeout_s: WaitTimeout = 300,
) -> VMOut:
    body = body or RestartRequest()
    vm = await svc.lifecycle.restart(ref, graceful=body.graceful)
    if wait:
        vm = await svc.lifecycle.wait_settled(vm.id, timeout_s)
    return vm_out(vm)


@router.get("/{ref}/health", response_model=HealthOut)
async def vm_health(ref: str, svc: Svc) -> HealthOut:
    return health_out(await svc.health.report(svc.directory.get(ref, 0)))


@router.get("/{ref}/console", response_model=ConsoleOut)
async def vm_console(
    ref: str,
    svc: Svc,
    bytes: Annotated[int, Query(ge=1, le=1_048_576, description="tail size")] = 16384,
) -> ConsoleOut:
    vm = svc.directory.get(ref, 0)
    tail = svc.directory.console_tail(vm.id, bytes)
    return ConsoleOut(vm=vm.name, text=tail.text, truncated=tail.truncated)
