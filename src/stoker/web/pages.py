"""The console's pages and the fragments htmx swaps into them (all GET)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from stoker.api.quota_view import quota_out
from stoker.services.container import Services
from stoker.web.auth import ConsoleSession
from stoker.web.charts import RANGES
from stoker.web.render import Renderer
from stoker.web.views import (
    CONSOLE_TAIL_BYTES,
    host_view,
    vm_charts,
    vm_row,
    vm_rows,
    vm_view,
    vmm_memory_limit,
)

router = APIRouter()

Range = Annotated[str, Query(pattern="^(" + "|".join(RANGES) + ")$")]


def services_of(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


def renderer_of(request: Request) -> Renderer:
    return request.app.state.render  # type: ignore[no-any-return]


@router.get("/", response_class=HTMLResponse)
async def vm_list(request: Request, session: ConsoleSession) -> HTMLResponse:
    rows = vm_rows(services_of(request))
    return renderer_of(request)(request, session, "vms.html", rows=rows, page="vms")


@router.get("/vms/rows", response_class=HTMLResponse)
async def vm_list_rows(request: Request, session: ConsoleSession) -> HTMLResponse:
    rows = vm_rows(services_of(request))
    return renderer_of(request)(request, session, "_vm_rows.html", rows=rows)


@router.get("/host", response_class=HTMLResponse)
async def host(request: Request, session: ConsoleSession, range: Range = "1h") -> HTMLResponse:
    view = host_view(services_of(request), range)
    return renderer_of(request)(
        request, session, "host.html", view=view, ranges=list(RANGES), page="host"
    )


@router.get("/vms/{ref}", response_class=HTMLResponse)
async def vm_page(
    request: Request, session: ConsoleSession, ref: str, range: Range = "1h"
) -> HTMLResponse:
    svc = services_of(request)
    view = await vm_view(svc, ref)
    vm = svc.directory.get(view.vm.id, 0)
    charts = vm_charts(svc, vm, range, vmm_memory_limit(view.quota))
    return renderer_of(request)(
        request,
        session,
        "vm.html",
        view=view,
        charts=charts,
        range_name=range,
        ranges=list(RANGES),
        console_bytes=CONSOLE_TAIL_BYTES,
        page="vm",
    )


@router.get("/vms/{ref}/header", response_class=HTMLResponse)
async def vm_header(request: Request, session: ConsoleSession, ref: str) -> HTMLResponse:
    return header_fragment(request, session, ref)


def header_fragment(
    request: Request, session: ConsoleSession, ref: str, error: str | None = None
) -> HTMLResponse:
    svc = services_of(request)
    vm = svc.directory.get(ref, 0)
    row = vm_row(svc, vm, datetime.now(UTC))
    return renderer_of(request)(request, session, "_vm_header.html", row=row, error=error)


@router.get("/vms/{ref}/charts", response_class=HTMLResponse)
async def vm_chart_section(
    request: Request, session: ConsoleSession, ref: str, range: Range = "1h"
) -> HTMLResponse:
    svc = services_of(request)
    vm = svc.directory.get(ref, 0)
    charts = vm_charts(svc, vm, range, vmm_memory_limit(quota_out(svc.quotas.report(vm))))
    return renderer_of(request)(
        request, session, "_vm_charts.html", vm_id=vm.id, charts=charts, range_name=range,
        ranges=list(RANGES),
    )  # fmt: skip


@router.get("/vms/{ref}/live", response_class=HTMLResponse)
async def vm_live(request: Request, session: ConsoleSession, ref: str) -> HTMLResponse:
    """The parts of a VM's page that events change: timeline, health, snapshots, events."""
    return await live_fragment(request, session, ref)


async def live_fragment(
    request: Request, session: ConsoleSession, ref: str, error: str | None = None
) -> HTMLResponse:
    view = await vm_view(services_of(request), ref)
    return renderer_of(request)(
        request, session, "_vm_live.html", view=view, console_bytes=CONSOLE_TAIL_BYTES,
        error=error,
    )  # fmt: skip
