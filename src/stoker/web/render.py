"""Rendering a page or fragment: the template, the session's cookie, and the headers every
console answer carries (no caching, no framing, nothing loaded from elsewhere)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from stoker.domain.events import EventType
from stoker.domain.units import format_duration, format_size
from stoker.web.assets import TEMPLATES, Vendor
from stoker.web.auth import set_cookie
from stoker.web.charts import Unit, show
from stoker.web.sessions import Session
from stoker.web.views import PREDICTED, age

#: everything is served by the agent itself; htmx runs without eval, uPlot styles through
#: the CSS object model, the chart data is JSON that is never run
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

#: every event that concerns one VM: its page refreshes its event list on any of them
VM_EVENT_TYPES = tuple(t.value for t in EventType)


def _when(value: datetime | str | None) -> Markup:
    """A ``<time>`` in UTC, to the second."""
    if value is None:
        return Markup("-")
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    at = value.astimezone(UTC)
    return Markup('<time datetime="{0}">{1}</time>').format(
        at.isoformat(), at.strftime("%Y-%m-%d %H:%M:%SZ")
    )


def _ago(value: datetime | None) -> str:
    if value is None:
        return "-"
    seconds = (datetime.now(UTC) - value).total_seconds()
    return f"in {age(-seconds)}" if seconds < 0 else f"{age(seconds)} ago"


def _meter(value: float, capacity: float) -> Markup:
    """A bar of value against capacity, readable without colour (the percentage is text)."""
    share = value / capacity if capacity else 0.0
    return Markup(
        '<meter min="0" max="1" low="0.7" high="0.9" optimum="0" value="{0:.3f}">{1:.0f}%</meter>'
        ' <span class="share">{1:.0f}%</span>'
    ).format(min(share, 1.0), share * 100)


def _amount(resource: str, value: float) -> str:
    """A predicted series' figure: memory as a size, the rest as numbers."""
    if resource.startswith("memory"):
        sign = "-" if value < 0 else "+"
        return sign + format_size(int(abs(value)))
    return f"{value:+.2f}"


QUOTA_LABELS = {
    "cpu_percent": "CPU (% of a core)",
    "memory_mib": "Memory (MiB)",
    "disk_gib": "Disk size (GiB)",
    "disk_iops": "Disk IOPS",
    "disk_bytes_per_s": "Disk bandwidth (B/s)",
    "network_mbps": "Network (Mbps)",
    "network_pps": "Packets per second",
}
QUOTA_VIOLATIONS = {
    "cpu_percent": ("cpu",),
    "memory_mib": ("memory", "oom"),
    "disk_iops": ("disk_iops",),
    "disk_bytes_per_s": ("disk_bytes_per_s",),
}


#: the quota usage figures a VM page shows: (key, label, unit)
USAGE_FIGURES: tuple[tuple[str, str, Unit], ...] = (
    ("cpu_percent", "CPU", "percent"),
    ("memory_bytes", "VMM memory", "bytes"),
    ("disk_bytes", "disk", "bytes"),
    ("disk_iops", "disk ops/s", "count"),
    ("disk_bytes_per_s", "disk bytes/s", "bytes"),
)


def _quota_usage(usage: dict[str, float | int | None]) -> str:
    """The quota's usage figures, each in its own unit."""
    parts = []
    for key, label, unit in USAGE_FIGURES:
        value = usage.get(key)
        if value is not None:
            parts.append(f"{label} {show(float(value), unit)}")
    return ", ".join(parts) or "none measured"


def _triggers(types: tuple[str, ...], delay_ms: int = 150) -> str:
    """An hx-trigger that fires on any of these server-sent event types."""
    return ", ".join(f"sse:{t} delay:{delay_ms}ms" for t in types)


class Renderer:
    def __init__(self, vendor: Vendor) -> None:
        self.vendor = vendor
        self.env = Environment(
            loader=FileSystemLoader(TEMPLATES),
            autoescape=select_autoescape(default=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(when=_when, ago=_ago)
        self.env.globals.update(
            triggers=_triggers,
            vm_event_types=VM_EVENT_TYPES,
            size=lambda n: format_size(int(n)),
            duration=lambda s: format_duration(max(1.0, float(s))),
            meter=_meter,
            amount=_amount,
            predicted=PREDICTED,
            quota_labels=QUOTA_LABELS,
            quota_violations=QUOTA_VIOLATIONS,
            quota_usage=_quota_usage,
        )

    def __call__(
        self,
        request: Request,
        session: Session,
        template: str,
        status: int = 200,
        headers: dict[str, str] | None = None,
        **context: Any,
    ) -> HTMLResponse:
        page = self.env.get_template(template)
        body = page.render(
            root=request.scope.get("root_path", ""),
            csrf=session.csrf,
            missing_assets=self.vendor.missing(),
            trusted=request.app.state.gate.trusted,
            **context,
        )
        response = HTMLResponse(
            body, status_code=status, headers={**SECURITY_HEADERS, **(headers or {})}
        )
        set_cookie(response, session, request)
        return response
