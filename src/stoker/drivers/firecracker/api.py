"""A thin async client for Firecracker's API: HTTP/1.1 over the process's Unix socket.

One method per call the driver makes, so the set of endpoints used is written down in one
place (``ENDPOINTS``) and the contract tests can check every one against the specification.
Firecracker answers 204 on success and 400 with ``{"fault_message": ...}`` on errors; any
non-2xx answer becomes a ``FirecrackerAPIError`` that keeps the message.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Literal

import httpx

from stoker.drivers.base import DriverError

#: Every (method, path template) this client can send; each must exist in the spec.
ENDPOINTS: frozenset[tuple[str, str]] = frozenset(
    {
        ("GET", "/"),
        ("GET", "/machine-config"),
        ("PUT", "/machine-config"),
        ("PUT", "/cpu-config"),
        ("PUT", "/boot-source"),
        ("PUT", "/drives/{drive_id}"),
        ("PATCH", "/drives/{drive_id}"),
        ("PUT", "/network-interfaces/{iface_id}"),
        ("PATCH", "/network-interfaces/{iface_id}"),
        ("PUT", "/balloon"),
        ("PUT", "/vsock"),
        ("PUT", "/entropy"),
        ("PUT", "/logger"),
        ("PUT", "/metrics"),
        ("PUT", "/actions"),
        ("PATCH", "/vm"),
        ("PUT", "/snapshot/create"),
        ("PUT", "/snapshot/load"),
    }
)

SnapshotType = Literal["Full", "Diff"]
LogLevel = Literal["Error", "Warning", "Info", "Debug", "Trace", "Off"]


class FirecrackerAPIError(DriverError):
    """Firecracker refused a request; ``fault_message`` is its own explanation."""

    def __init__(self, status: int, fault_message: str, method: str, path: str) -> None:
        self.status = status
        self.fault_message = fault_message
        self.method = method
        self.path = path
        super().__init__(f"Firecracker {method} {path} failed ({status}): {fault_message}")


class FirecrackerAPI:
    """Typed calls to one Firecracker process; holds one keep-alive connection."""

    def __init__(self, socket_path: str | Path, timeout_s: float = 5.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout_s = timeout_s
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=self.socket_path),
            base_url="http://localhost",
            timeout=timeout_s,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> FirecrackerAPI:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ transport

    async def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """Send one request; return the decoded JSON for 200, None for 204."""
        response = await self._client.request(
            method,
            path,
            json=body,
            timeout=timeout_s if timeout_s is not None else self.timeout_s,
        )
        if response.is_success:
            if response.status_code == 204 or not response.content:
                return None
            return response.json()
        raise FirecrackerAPIError(response.status_code, _fault(response), method, path)

    async def _put(self, path: str, body: dict[str, Any], timeout_s: float | None = None) -> None:
        await self.request("PUT", path, body, timeout_s)

    async def _patch(self, path: str, body: dict[str, Any]) -> None:
        await self.request("PATCH", path, body)

    async def wait_socket(self, timeout_s: float = 3.0, interval_s: float = 0.01) -> None:
        """Poll ``GET /machine-config`` (as the Go SDK does) until the API answers at all.

        The socket file appears before Firecracker accepts on it, so its existence proves
        nothing; any HTTP answer, even an error, means the API server is up.
        """
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while True:
            try:
                await self._client.get("/machine-config", timeout=max(interval_s, 0.25))
                return
            except (httpx.TransportError, OSError) as exc:
                last = exc
            if time.monotonic() >= deadline:
                raise DriverError(
                    f"Firecracker API socket {self.socket_path} did not answer within "
                    f"{timeout_s:g} s ({last!r})"
                )
            await asyncio.sleep(interval_s)

    # ------------------------------------------------------------------ pre-boot configuration

    async def put_machine_config(
        self,
        vcpu_count: int,
        mem_size_mib: int,
        smt: bool = False,
        track_dirty_pages: bool = False,
        huge_pages: Literal["None", "2M"] | None = None,
    ) -> None:
        body: dict[str, Any] = {
            "vcpu_count": vcpu_count,
            "mem_size_mib": mem_size_mib,
            "smt": smt,
            "track_dirty_pages": track_dirty_pages,
        }
        if huge_pages is not None:
            body["huge_pages"] = huge_pages
        await self._put("/machine-config", body)

    async def put_cpu_config(self, config: dict[str, Any]) -> None:
        """A custom CPU template (static templates in machine-config are deprecated)."""
        await self._put("/cpu-config", config)

    async def put_boot_source(
        self, kernel_image_path: str, boot_args: str | None = None, initrd_path: str | None = None
    ) -> None:
        body: dict[str, Any] = {"kernel_image_path": kernel_image_path}
        if boot_args is not None:
            body["boot_args"] = boot_args
        if initrd_path is not None:
            body["initrd_path"] = initrd_path
        await self._put("/boot-source", body)

    async def put_drive(
        self,
        drive_id: str,
        path_on_host: str,
        is_root_device: bool,
        is_read_only: bool = False,
        rate_limiter: dict[str, Any] | None = None,
        cache_type: Literal["Unsafe", "Writeback"] | None = None,
        io_engine: Literal["Sync", "Async"] | None = None,
    ) -> None:
        body: dict[str, Any] = {
            "drive_id": drive_id,
            "path_on_host": path_on_host,
            "is_root_device": is_root_device,
            "is_read_only": is_read_only,
        }
        if rate_limiter:
            body["rate_limiter"] = rate_limiter
        if cache_type is not None:
            body["cache_type"] = cache_type
        if io_engine is not None:
            body["io_engine"] = io_engine
        await self._put(f"/drives/{drive_id}", body)

    async def put_network_interface(
        self,
        iface_id: str,
        host_dev_name: str,
        guest_mac: str | None = None,
        rx_rate_limiter: dict[str, Any] | None = None,
        tx_rate_limiter: dict[str, Any] | None = None,
    ) -> None:
        body: dict[str, Any] = {"iface_id": iface_id, "host_dev_name": host_dev_name}
        if guest_mac:
            body["guest_mac"] = guest_mac
        if rx_rate_limiter:
            body["rx_rate_limiter"] = rx_rate_limiter
        if tx_rate_limiter:
            body["tx_rate_limiter"] = tx_rate_limiter
        await self._put(f"/network-interfaces/{iface_id}", body)

    async def put_balloon(
        self, amount_mib: int, deflate_on_oom: bool = True, stats_polling_interval_s: int = 0
    ) -> None:
        await self._put(
            "/balloon",
            {
                "amount_mib": amount_mib,
                "deflate_on_oom": deflate_on_oom,
                "stats_polling_interval_s": stats_polling_interval_s,
            },
        )

    async def put_vsock(self, guest_cid: int, uds_path: str) -> None:
        await self._put("/vsock", {"guest_cid": guest_cid, "uds_path": uds_path})

    async def put_entropy(self, rate_limiter: dict[str, Any] | None = None) -> None:
        await self._put("/entropy", {"rate_limiter": rate_limiter} if rate_limiter else {})

    async def put_logger(
        self,
        log_path: str,
        level: LogLevel = "Warning",
        show_level: bool = True,
        show_log_origin: bool = False,
    ) -> None:
        await self._put(
            "/logger",
            {
                "log_path": log_path,
                "level": level,
                "show_level": show_level,
                "show_log_origin": show_log_origin,
            },
        )

    async def put_metrics(self, metrics_path: str) -> None:
        await self._put("/metrics", {"metrics_path": metrics_path})

    # ------------------------------------------------------------------ actions

    async def instance_start(self) -> None:
        """Boot the guest; Firecracker accepts this once per process."""
        await self._put("/actions", {"action_type": "InstanceStart"})

    async def send_ctrl_alt_del(self) -> None:
        """x86_64 only; the guest needs i8042 and ``reboot=k`` for it to end the process."""
        await self._put("/actions", {"action_type": "SendCtrlAltDel"})

    async def flush_metrics(self) -> None:
        await self._put("/actions", {"action_type": "FlushMetrics"})

    # ------------------------------------------------------------------ post-boot changes

    async def patch_drive(
        self,
        drive_id: str,
        rate_limiter: dict[str, Any] | None = None,
        path_on_host: str | None = None,
    ) -> None:
        body: dict[str, Any] = {"drive_id": drive_id}
        if rate_limiter is not None:
            body["rate_limiter"] = rate_limiter
        if path_on_host is not None:
            body["path_on_host"] = path_on_host
        await self._patch(f"/drives/{drive_id}", body)

    async def patch_network_interface(
        self,
        iface_id: str,
        rx_rate_limiter: dict[str, Any] | None = None,
        tx_rate_limiter: dict[str, Any] | None = None,
    ) -> None:
        body: dict[str, Any] = {"iface_id": iface_id}
        if rx_rate_limiter is not None:
            body["rx_rate_limiter"] = rx_rate_limiter
        if tx_rate_limiter is not None:
            body["tx_rate_limiter"] = tx_rate_limiter
        await self._patch(f"/network-interfaces/{iface_id}", body)

    async def pause(self) -> None:
        await self._patch("/vm", {"state": "Paused"})

    async def resume(self) -> None:
        await self._patch("/vm", {"state": "Resumed"})

    async def snapshot_create(
        self,
        snapshot_path: str,
        mem_file_path: str,
        snapshot_type: SnapshotType = "Full",
        timeout_s: float = 120.0,
    ) -> None:
        """Needs a paused VM; writing guest memory can take long, hence its own timeout."""
        await self._put(
            "/snapshot/create",
            {
                "snapshot_path": snapshot_path,
                "mem_file_path": mem_file_path,
                "snapshot_type": snapshot_type,
            },
            timeout_s,
        )

    async def snapshot_load(
        self,
        snapshot_path: str,
        mem_file_path: str,
        resume_vm: bool = True,
        track_dirty_pages: bool = False,
        network_overrides: list[dict[str, str]] | None = None,
        clock_realtime: bool = False,
        timeout_s: float = 120.0,
    ) -> None:
        """Only on a fresh process; a failed load ends the process.

        Uses ``mem_backend`` (File): the spec marks ``mem_file_path`` deprecated and forbids
        sending both. ``clock_realtime`` (x86_64 only) advances the guest's kvmclock by the
        wall-clock time since the snapshot, so a restored guest's clock is right.
        """
        body: dict[str, Any] = {
            "snapshot_path": snapshot_path,
            "mem_backend": {"backend_type": "File", "backend_path": mem_file_path},
            "resume_vm": resume_vm,
            "track_dirty_pages": track_dirty_pages,
        }
        if network_overrides:
            body["network_overrides"] = network_overrides
        if clock_realtime:
            body["clock_realtime"] = True
        await self._put("/snapshot/load", body, timeout_s)

    # ------------------------------------------------------------------ queries

    async def describe_instance(self, timeout_s: float | None = None) -> dict[str, Any]:
        """``GET /``: id, state ("Not started", "Running", "Paused"), vmm_version."""
        result: dict[str, Any] = await self.request("GET", "/", timeout_s=timeout_s)
        return result

    async def get_vm_config(self) -> dict[str, Any]:
        """``GET /vm/config``: the whole configuration, rate limiters included."""
        result: dict[str, Any] = await self.request("GET", "/vm/config")
        return result

    async def get_machine_config(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", "/machine-config")
        return result


def _fault(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase
    if isinstance(body, dict) and "fault_message" in body:
        return str(body["fault_message"])
    return response.text.strip()
