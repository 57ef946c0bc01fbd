"""The Python client for the stoker API; the CLI uses nothing else.

Like httpx itself, it hides the network behind a transport: a Unix socket by default
(``STOKER_SOCKET`` or the agent's default path), or a URL with a bearer token for TCP.
Every method returns the wire models of :mod:`stoker.wire`, the same ones the API answers
with: ``api.get_vm("web").state``, ``api.get_vm("web").process.pid``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from stoker.domain.spec import VMSpec
from stoker.wire import (
    AppliedManifestOut,
    ApplyOut,
    AutoSnapshotOut,
    ConsoleOut,
    EventOut,
    HealthOut,
    ManifestFile,
    ManifestProblemOut,
    ManifestRequest,
    NetworkingOut,
    NetworkOut,
    PlanOut,
    PolicyIn,
    PolicyOut,
    PruneOut,
    QuotaOut,
    ReportOut,
    ReportSummary,
    ResourcesOut,
    RestartRequest,
    RestoreOut,
    RestoreRequest,
    RunOut,
    ScheduleOut,
    SnapshotOut,
    StopRequest,
    VersionOut,
    VMMetricsList,
    VMMetricsOut,
    VMOut,
)
from stoker.wire.cluster import (
    ClusterNetworkOut,
    ClusterOut,
    ClusterScheduleOut,
    ClusterVMOut,
    ClusterVMPage,
    ClusterVMSummary,
    CordonIn,
    ExplainOut,
    NodeOut,
    PlacementRules,
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

    def delete_vm(self, ref: str, force: bool = False, snapshots: str | None = None) -> None:
        """``snapshots``: "keep" or "delete", required when the VM has snapshots."""
        params: dict[str, Any] = {"force": force}
        if snapshots is not None:
            params["snapshots"] = snapshots
        self.request("DELETE", f"/api/v1/vms/{ref}", params=params)

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

    # -------------------------------------------------------------------------- networks

    def networking(self) -> NetworkingOut:
        """Whether the agent makes managed networks, and what a VM without a network gets."""
        return NetworkingOut.model_validate(self.request("GET", "/api/v1/networking"))

    def list_networks(self) -> list[NetworkOut]:
        return _list(NetworkOut, self.request("GET", "/api/v1/networks"))

    def create_network(
        self,
        name: str,
        subnet: str,
        isolation: str = "isolated",
        ipv6: bool = False,
        bridge: str | None = None,
        uplink: str | None = None,
    ) -> NetworkOut:
        """A bridge with NAT, DHCP and isolation (``isolated`` or ``open``) on ``subnet``."""
        # sent as given: the agent checks it and names the field to fix
        fields = {"bridge": bridge, "uplink": uplink}
        body = {"name": name, "subnet": subnet, "isolation": isolation, "ipv6": ipv6}
        body.update({k: v for k, v in fields.items() if v is not None})
        return NetworkOut.model_validate(self.request("POST", "/api/v1/networks", json=body))

    def get_network(self, ref: str) -> NetworkOut:
        return NetworkOut.model_validate(self.request("GET", f"/api/v1/networks/{ref}"))

    def delete_network(self, ref: str) -> None:
        self.request("DELETE", f"/api/v1/networks/{ref}")

    # ------------------------------------------------------------------------- manifests

    def get_manifest(self) -> AppliedManifestOut:
        """The last applied manifest, its hash, and every object a manifest manages."""
        return AppliedManifestOut.model_validate(self.request("GET", "/api/v1/manifest"))

    def plan_manifest(
        self,
        files: Sequence[ManifestFile],
        prune: bool = False,
        restart: bool = False,
        width: int = 80,
    ) -> PlanOut:
        """What applying ``files`` would change; StokerError 422 with every problem (see
        :func:`manifest_problems`)."""
        body = ManifestRequest(files=list(files), prune=prune, restart=restart, width=width)
        answer = self.request("POST", "/api/v1/manifest/plan", json=body.model_dump())
        return PlanOut.model_validate(answer)

    def apply_manifest(
        self,
        files: Sequence[ManifestFile],
        prune: bool = False,
        restart: bool = False,
        width: int = 80,
    ) -> ApplyOut:
        body = ManifestRequest(files=list(files), prune=prune, restart=restart, width=width)
        answer = self.request("POST", "/api/v1/manifest/apply", json=body.model_dump())
        return ApplyOut.model_validate(answer)

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

    def restore_snapshot(self, snapshot_id: str, as_name: str | None = None) -> RestoreOut:
        """The snapshot and the VM, once the VM runs again; with ``as_name``, a new VM of
        that name made from the snapshot."""
        body = (
            RestoreRequest.model_validate({"as": as_name}).model_dump(by_alias=True)
            if as_name
            else None
        )
        answer = self.request("POST", f"/api/v1/snapshots/{snapshot_id}/restore", json=body)
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

    # --------------------------------------------------------------- cluster (any node)

    def cluster(self) -> ClusterOut:
        """This node's standing in the cluster; 404 when the agent is not in cluster mode."""
        return ClusterOut.model_validate(self.request("GET", "/api/v1/cluster"))

    def cluster_nodes(self) -> list[NodeOut]:
        return _list(NodeOut, self.request("GET", "/api/v1/cluster/nodes"))

    def cluster_node(self, name: str) -> NodeOut:
        return NodeOut.model_validate(self.request("GET", f"/api/v1/cluster/nodes/{name}"))

    def cordon_node(self, name: str, reason: str = "", drain: bool = False) -> NodeOut:
        """No new placements on ``name``; with ``drain`` its VMs also move away."""
        action = "drain" if drain else "cordon"
        body = CordonIn(reason=reason).model_dump()
        answer = self.request("POST", f"/api/v1/cluster/nodes/{name}/{action}", json=body)
        return NodeOut.model_validate(answer)

    def uncordon_node(self, name: str) -> NodeOut:
        return NodeOut.model_validate(
            self.request("POST", f"/api/v1/cluster/nodes/{name}/uncordon")
        )

    def create_cluster_vm(
        self,
        spec: VMSpec | dict[str, Any],
        placement: PlacementRules | dict[str, Any] | None = None,
        stateless: bool | None = None,
        start: bool = True,
        wait_s: float = 0,
    ) -> ClusterVMOut:
        """Create a VM the cluster places; ``wait_s``: wait up to that long for a placement."""
        body: dict[str, Any] = {
            "spec": (
                spec.model_dump(mode="json", exclude_unset=True)
                if isinstance(spec, VMSpec)
                else spec
            ),
            "start": start,
        }
        if placement is not None:
            body["placement"] = (
                placement.model_dump(mode="json", exclude_none=True)
                if isinstance(placement, PlacementRules)
                else placement
            )
        if stateless is not None:
            body["stateless"] = stateless
        answer = self.request("POST", "/api/v1/cluster/vms", json=body, params={"wait_s": wait_s})
        return ClusterVMOut.model_validate(answer)

    def list_cluster_vms(self, limit: int = 500, after: str | None = None) -> ClusterVMPage:
        params: dict[str, Any] = {"limit": limit}
        if after is not None:
            params["after"] = after
        return ClusterVMPage.model_validate(
            self.request("GET", "/api/v1/cluster/vms", params=params)
        )

    def all_cluster_vms(self) -> Iterator[ClusterVMSummary]:
        """Every cluster VM, page after page."""
        after: str | None = None
        while True:
            page = self.list_cluster_vms(after=after)
            yield from page.items
            if page.next_after is None:
                return
            after = page.next_after

    def get_cluster_vm(self, name: str) -> ClusterVMOut:
        return ClusterVMOut.model_validate(self.request("GET", f"/api/v1/cluster/vms/{name}"))

    def start_cluster_vm(self, name: str) -> ClusterVMOut:
        return ClusterVMOut.model_validate(
            self.request("POST", f"/api/v1/cluster/vms/{name}/start")
        )

    def stop_cluster_vm(self, name: str) -> ClusterVMOut:
        return ClusterVMOut.model_validate(self.request("POST", f"/api/v1/cluster/vms/{name}/stop"))

    def delete_cluster_vm(self, name: str) -> None:
        self.request("DELETE", f"/api/v1/cluster/vms/{name}")

    def explain_cluster_vm(self, name: str) -> ExplainOut:
        return ExplainOut.model_validate(self.request("GET", f"/api/v1/cluster/vms/{name}/explain"))

    # ---------------------------------------------------------------- cluster schedules

    def create_cluster_schedule(
        self,
        name: str,
        cron: str,
        action: str,
        *,
        vm: str | None = None,
        selector: dict[str, str] | None = None,
        tz: str | None = None,
        grace_s: float | None = None,
    ) -> ClusterScheduleOut:
        """A cron schedule of ``action`` (start, stop, restart) on one cluster VM or a selector;
        ``tz`` default: the answering node's zone."""
        body: dict[str, Any] = {"name": name, "cron": cron, "action": action}
        optional = {"vm": vm, "selector": selector, "tz": tz, "grace_s": grace_s}
        body.update({k: v for k, v in optional.items() if v is not None})
        return ClusterScheduleOut.model_validate(
            self.request("POST", "/api/v1/cluster/schedules", json=body)
        )

    def cluster_schedules(self) -> list[ClusterScheduleOut]:
        return _list(ClusterScheduleOut, self.request("GET", "/api/v1/cluster/schedules"))

    def cluster_schedule(self, name: str) -> ClusterScheduleOut:
        return ClusterScheduleOut.model_validate(
            self.request("GET", f"/api/v1/cluster/schedules/{name}")
        )

    def delete_cluster_schedule(self, name: str) -> None:
        self.request("DELETE", f"/api/v1/cluster/schedules/{name}")

    # ----------------------------------------------------------------- cluster networks

    def create_cluster_network(
        self,
        name: str,
        subnet: str,
        isolation: str | None = None,
        ipv6: bool | None = None,
        bridge: str | None = None,
        uplink: str | None = None,
    ) -> ClusterNetworkOut:
        """A network every node of the cluster makes locally (its own bridge, DHCP and NAT:
        addresses are per node); same fields as ``create_network``."""
        body: dict[str, Any] = {"name": name, "subnet": subnet}
        optional = {"isolation": isolation, "ipv6": ipv6, "bridge": bridge, "uplink": uplink}
        body.update({k: v for k, v in optional.items() if v is not None})
        return ClusterNetworkOut.model_validate(
            self.request("POST", "/api/v1/cluster/networks", json=body)
        )

    def cluster_networks(self) -> list[ClusterNetworkOut]:
        return _list(ClusterNetworkOut, self.request("GET", "/api/v1/cluster/networks"))

    def cluster_network(self, name: str) -> ClusterNetworkOut:
        return ClusterNetworkOut.model_validate(
            self.request("GET", f"/api/v1/cluster/networks/{name}")
        )

    def delete_cluster_network(self, name: str) -> None:
        """409 while a cluster VM's spec names the network."""
        self.request("DELETE", f"/api/v1/cluster/networks/{name}")


_Model = TypeVar("_Model", bound=BaseModel)


def _list(model: type[_Model], answer: Any) -> list[_Model]:
    return [model.model_validate(item) for item in answer]


def manifest_problems(error: StokerError) -> list[ManifestProblemOut]:
    """An invalid manifest's problems (file, line, key path, message) from a 422 answer."""
    return [
        ManifestProblemOut.model_validate(item)
        for item in error.body.get("errors") or []
        if isinstance(item, dict) and "file" in item
    ]


def dumps(value: Any) -> str:
    """JSON for people: models (and lists of them) as the API wrote them, sorted keys."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, list | tuple) and value and isinstance(value[0], BaseModel):
        value = [v.model_dump(mode="json") for v in value]
    return json.dumps(value, indent=2, sort_keys=True, default=str)
