"""The Python client for the stoker API; the CLI uses nothing else.

Like httpx itself, it hides the network behind a transport: a Unix socket by default
(``STOKER_SOCKET`` or the agent's default path), or a URL with a bearer token for TCP.
Every method returns the wire models of :mod:`stoker.wire`, the same ones the API answers
with: ``api.get_vm("web").state``, ``api.get_vm("web").process.pid``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from stoker.domain.spec import VMSpec
from stoker.wire import (
    AutoSnapshotOut,
    ConsoleOut,
    EventOut,
    HealthOut,
    PolicyIn,
    PolicyOut,
    PruneOut,
    QuotaOut,
    ReportOut,
    ReportSummary,
    ResourcesOut,
    RestartRequest,
    RestoreOut,
    RunOut,
    ScheduleOut,
    SnapshotOut,
    StopRequest,
    VersionOut,
    VMMetricsList,
    VMMetricsOut,
    VMOut,
)

DEFAULT_SOCKET = Path("/var/lib/stoker/stoker.sock")


class StokerError(Exception):
    """The agent said no: ``status`` is the HTTP status and ``detail`` what to fix."""

    def __init__(self, status: int, title: str, detail: str, body: dict[str, Any] | None = None):
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.body = body or {}


class AgentUnreachable(StokerError):
    def __init__(self, where: str, cause: Exception) -> None:
        super().__init__(
            0,
            "Agent unreachable",
            f"cannot reach the stoker agent at {where}: {cause} (is `stoker agent` running? "
            "set --socket / STOKER_SOCKET or --url / STOKER_URL)",
        )


class Client:
    def __init__(
        self,
        socket: str | Path | None = None,
        url: str | None = None,
        token: str | None = None,
        timeout: float = 330.0,
    ) -> None:
        url = url or os.environ.get("STOKER_URL")
        token = token or os.environ.get("STOKER_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if url:
            self.where = url
            self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout)
        else:
            path = Path(socket or os.environ.get("STOKER_SOCKET") or DEFAULT_SOCKET)
            self.where = str(path)
            self._http = httpx.Client(
                base_url="http://stoker",
                transport=httpx.HTTPTransport(uds=str(path)),
                headers=headers,
                timeout=timeout,
            )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------------ plumbing

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request; return the decoded JSON (None for 204), raise StokerError."""
        try:
            response = self._http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.RemoteProtocolError, FileNotFoundError) as exc:
            raise AgentUnreachable(self.where, exc) from None
        except httpx.TimeoutException as exc:
            raise StokerError(0, "Timeout", f"the agent did not answer in time: {exc}") from None
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {"detail": response.text}
            raise StokerError(
                response.status_code,
                str(body.get("title", response.reason_phrase)),
                str(body.get("detail", response.text)),
                body,
            )
        if response.status_code == 204 or not response.content:
            return None
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.text

    def stream_lines(self, path: str, **params: Any) -> Iterator[str]:
        try:
            with self._http.stream("GET", path, params=params, timeout=None) as response:
                if response.status_code >= 400:
                    response.read()
                    body = response.json()
                    raise StokerError(
                        response.status_code, body.get("title", ""), body.get("detail", ""), body
                    )
                yield from response.iter_lines()
        except (httpx.ConnectError, FileNotFoundError) as exc:
            raise AgentUnreachable(self.where, exc) from None

    # ------------------------------------------------------------------------------ VMs

    def create_vm(self, spec: VMSpec | dict[str, Any]) -> VMOut:
        body = (
            spec.model_dump(mode="json", exclude_unset=True) if isinstance(spec, VMSpec) else spec
        )
        return VMOut.model_validate(self.request("POST", "/api/v1/vms", json=body))

    def list_vms(self, state: str | None = None, labels: list[str] | None = None) -> list[VMOut]:
        params: dict[str, Any] = {}
        if state:
            params["state"] = state
        if labels:
            params["label"] = labels
        return _list(VMOut, self.request("GET", "/api/v1/vms", params=params))

    def get_vm(self, ref: str) -> VMOut:
        return VMOut.model_validate(self.request("GET", f"/api/v1/vms/{ref}"))

    def delete_vm(self, ref: str, force: bool = False) -> None:
        self.request("DELETE", f"/api/v1/vms/{ref}", params={"force": force})

    def start_vm(self, ref: str, wait: bool = True, timeout_s: float = 300) -> VMOut:
        return VMOut.model_validate(
            self.request(
                "POST", f"/api/v1/vms/{ref}/start", params={"wait": wait, "timeout_s": timeout_s}
            )
        )

    def stop_vm(self, ref: str, graceful: bool = True, timeout_s: float | None = None) -> VMOut:
        body = StopRequest(graceful=graceful, timeout_s=timeout_s)
        return VMOut.model_validate(
            self.request("POST", f"/api/v1/vms/{ref}/stop", json=body.model_dump(exclude_none=True))
        )

    def restart_vm(
        self, ref: str, graceful: bool = True, wait: bool = True, timeout_s: float = 300
    ) -> VMOut:
        answer = self.request(
            "POST",
            f"/api/v1/vms/{ref}/restart",
            json=RestartRequest(graceful=graceful).model_dump(),
            params={"wait": wait, "timeout_s": timeout_s},
        )
        return VMOut.model_validate(answer)

    def vm_health(self, ref: str) -> HealthOut:
        return HealthOut.model_validate(self.request("GET", f"/api/v1/vms/{ref}/health"))

    def console(self, ref: str, size: int = 16384) -> ConsoleOut:
        answer = self.request("GET", f"/api/v1/vms/{ref}/console", params={"bytes": size})
        return ConsoleOut.model_validate(answer)

    def version(self) -> VersionOut:
        return VersionOut.model_validate(self.request("GET", "/api/v1/version"))

    # ------------------------------------------------------------------------ resources

    def resources(self, history: str | None = None) -> ResourcesOut:
        """Capacity, allocations, usage, predictions, alerts; node samples over ``history``
        (a duration such as "1h") when given."""
        params: dict[str, Any] = {}
        if history:
            params = {"history": True, "duration": history}
        return ResourcesOut.model_validate(self.request("GET", "/api/v1/resources", params=params))

    def vms_metrics(self) -> VMMetricsList:
        """The latest usage of every running VM."""
        return VMMetricsList.model_validate(self.request("GET", "/api/v1/vms/metrics"))

    def vm_metrics(self, ref: str, duration: str = "1h") -> VMMetricsOut:
        """One VM's latest usage and its history over ``duration``."""
        answer = self.request("GET", f"/api/v1/vms/{ref}/metrics", params={"duration": duration})
        return VMMetricsOut.model_validate(answer)

    def prometheus_metrics(self) -> str:
        """The Prometheus text exposition of ``/metrics``."""
        return str(self.request("GET", "/metrics"))

    # ---------------------------------------------------------------------------- quotas

    def get_quota(self, ref: str) -> QuotaOut:
        """The VM's quota, how each limit binds, its usage and violation counts."""
        return QuotaOut.model_validate(self.request("GET", f"/api/v1/vms/{ref}/quota"))

    def set_quota(self, ref: str, **limits: Any) -> QuotaOut:
        """Replace the VM's override: cpu_percent, memory_mib, disk_gib, disk_iops,
        disk_bytes_per_s, network_mbps, network_pps (unset ones follow the defaults)."""
        body = {k: v for k, v in limits.items() if v is not None}
        return QuotaOut.model_validate(self.request("PUT", f"/api/v1/vms/{ref}/quota", json=body))

    def remove_quota(self, ref: str) -> QuotaOut:
        return QuotaOut.model_validate(self.request("DELETE", f"/api/v1/vms/{ref}/quota"))

    def list_quotas(self) -> list[QuotaOut]:
        return _list(QuotaOut, self.request("GET", "/api/v1/quotas"))

    # ------------------------------------------------------------------------- snapshots

    def create_snapshot(
        self,
        ref: str,
        kind: str = "manual",
        tags: list[str] | None = None,
        protected: bool | None = None,
    ) -> SnapshotOut:
        """Snapshot a VM (kind ``manual`` or ``pre-update``); answers when it is complete."""
        body: dict[str, Any] = {"kind": kind, "tags": tags or []}
        if protected is not None:
            body["protected"] = protected
        answer = self.request("POST", f"/api/v1/vms/{ref}/snapshots", json=body)
        return SnapshotOut.model_validate(answer)

    def list_snapshots(self, ref: str | None = None) -> list[SnapshotOut]:
        path = "/api/v1/snapshots" if ref is None else f"/api/v1/vms/{ref}/snapshots"
        return _list(SnapshotOut, self.request("GET", path))

    def get_snapshot(self, snapshot_id: str) -> SnapshotOut:
        return SnapshotOut.model_validate(self.request("GET", f"/api/v1/snapshots/{snapshot_id}"))

    def delete_snapshot(self, snapshot_id: str, force: bool = False) -> None:
        self.request("DELETE", f"/api/v1/snapshots/{snapshot_id}", params={"force": force})

    def restore_snapshot(self, snapshot_id: str) -> RestoreOut:
        """The snapshot and the VM, once the VM runs again."""
        answer = self.request("POST", f"/api/v1/snapshots/{snapshot_id}/restore")
        return RestoreOut.model_validate(answer)

    def verify_snapshot(self, snapshot_id: str, deep: bool = False) -> SnapshotOut:
        answer = self.request(
            "POST", f"/api/v1/snapshots/{snapshot_id}/verify", params={"deep": deep}
        )
        return SnapshotOut.model_validate(answer)

    def protect_snapshot(self, snapshot_id: str) -> SnapshotOut:
        answer = self.request("POST", f"/api/v1/snapshots/{snapshot_id}/protect")
        return SnapshotOut.model_validate(answer)

    def unprotect_snapshot(self, snapshot_id: str) -> SnapshotOut:
        answer = self.request("POST", f"/api/v1/snapshots/{snapshot_id}/unprotect")
        return SnapshotOut.model_validate(answer)

    def set_snapshot_policy(
        self, ref: str, retention: str | None, interval: str | None = None
    ) -> PolicyOut:
        body = PolicyIn(retention=retention, interval=interval)
        answer = self.request("PUT", f"/api/v1/vms/{ref}/snapshot-policy", json=body.model_dump())
        return PolicyOut.model_validate(answer)

    def get_snapshot_policy(self, ref: str) -> PolicyOut:
        return PolicyOut.model_validate(self.request("GET", f"/api/v1/vms/{ref}/snapshot-policy"))

    def auto_snapshot(self, ref: str) -> AutoSnapshotOut:
        """An automatic snapshot now, then pruning by the VM's policy."""
        answer = self.request("POST", f"/api/v1/vms/{ref}/snapshots/auto")
        return AutoSnapshotOut.model_validate(answer)

    def prune_snapshots(self, ref: str, dry_run: bool = False) -> PruneOut:
        answer = self.request(
            "POST", f"/api/v1/vms/{ref}/snapshots/prune", params={"dry_run": dry_run}
        )
        return PruneOut.model_validate(answer)

    # ------------------------------------------------------------------------- schedules

    def create_schedule(
        self,
        action: str,
        cron: str,
        vm: str | None = None,
        selector: dict[str, str] | None = None,
        **fields: Any,
    ) -> ScheduleOut:
        """fields: name, tz, spread_s, grace_s, enabled, options."""
        body: dict[str, Any] = {"action": action, "cron": cron, **fields}
        if vm is not None:
            body["vm"] = vm
        if selector is not None:
            body["selector"] = selector
        return ScheduleOut.model_validate(self.request("POST", "/api/v1/schedules", json=body))

    def list_schedules(self) -> list[ScheduleOut]:
        return _list(ScheduleOut, self.request("GET", "/api/v1/schedules"))

    def get_schedule(self, ref: str) -> ScheduleOut:
        return ScheduleOut.model_validate(self.request("GET", f"/api/v1/schedules/{ref}"))

    def update_schedule(self, ref: str, **changes: Any) -> ScheduleOut:
        answer = self.request("PATCH", f"/api/v1/schedules/{ref}", json=changes)
        return ScheduleOut.model_validate(answer)

    def delete_schedule(self, ref: str) -> None:
        self.request("DELETE", f"/api/v1/schedules/{ref}")

    def enable_schedule(self, ref: str) -> ScheduleOut:
        return ScheduleOut.model_validate(self.request("POST", f"/api/v1/schedules/{ref}/enable"))

    def disable_schedule(self, ref: str) -> ScheduleOut:
        answer = self.request("POST", f"/api/v1/schedules/{ref}/disable")
        return ScheduleOut.model_validate(answer)

    def run_schedule(self, ref: str, wait: bool = False) -> RunOut:
        answer = self.request("POST", f"/api/v1/schedules/{ref}/run", params={"wait": wait})
        return RunOut.model_validate(answer)

    def schedule_runs(self, ref: str, limit: int = 50) -> list[RunOut]:
        answer = self.request("GET", f"/api/v1/schedules/{ref}/runs", params={"limit": limit})
        return _list(RunOut, answer)

    # --------------------------------------------------------------------------- reports

    def list_reports(self) -> list[ReportSummary]:
        return _list(ReportSummary, self.request("GET", "/api/v1/reports"))

    def get_report(self, label: str) -> ReportOut:
        return ReportOut.model_validate(self.request("GET", f"/api/v1/reports/{label}"))

    def generate_report(self, period: str, day: str | None = None) -> ReportOut:
        """period: daily, weekly or monthly; day: YYYY-MM-DD inside it (default today)."""
        params = {"date": day} if day else {}
        return ReportOut.model_validate(
            self.request("POST", f"/api/v1/reports/{period}", params=params)
        )

    # ---------------------------------------------------------------------------- events

    def events(
        self,
        vm: str | None = None,
        since: str | None = None,
        type: str | None = None,
        after: int | None = None,
        limit: int = 100,
    ) -> list[EventOut]:
        """Logged events, oldest first; ``since`` is an ISO time or a duration ('10m')."""
        params: dict[str, Any] = {"limit": limit}
        for key, value in (("vm", vm), ("since", since), ("type", type), ("after", after)):
            if value is not None:
                params[key] = value
        return _list(EventOut, self.request("GET", "/api/v1/events", params=params))

    def stream_events(
        self, vm: str | None = None, type: str | None = None, after: int | None = None
    ) -> Iterator[EventOut]:
        """Events as they happen (server-sent events), each as ``events()`` gives them."""
        params = {k: v for k, v in (("vm", vm), ("type", type), ("after", after)) if v is not None}
        for line in self.stream_lines("/api/v1/events/stream", **params):
            if line.startswith("data:"):
                yield EventOut.model_validate_json(line[5:].strip())


_Model = TypeVar("_Model", bound=BaseModel)


def _list(model: type[_Model], answer: Any) -> list[_Model]:
    return [model.model_validate(item) for item in answer]


def dumps(value: Any) -> str:
    """JSON for people: models (and lists of them) as the API wrote them, sorted keys."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, list | tuple) and value and isinstance(value[0], BaseModel):
        value = [v.model_dump(mode="json") for v in value]
    return json.dumps(value, indent=2, sort_keys=True, default=str)
