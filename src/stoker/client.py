"""The Python client for the stoker API; the CLI uses nothing else.

Like httpx itself, it hides the network behind a transport: a Unix socket by default
(``STOKER_SOCKET`` or the agent's default path), or a URL with a bearer token for TCP.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

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

    def create_vm(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/api/v1/vms", json=spec)

    def list_vms(
        self, state: str | None = None, labels: list[str] | None = None
    ) -> list[dict[str, Any]]:
        params: dict[str, Any] = {}
        if state:
            params["state"] = state
        if labels:
            params["label"] = labels
        return self.request("GET", "/api/v1/vms", params=params)

    def get_vm(self, ref: str) -> dict[str, Any]:
        return self.request("GET", f"/api/v1/vms/{ref}")

    def delete_vm(self, ref: str, force: bool = False) -> None:
        self.request("DELETE", f"/api/v1/vms/{ref}", params={"force": force})

    def start_vm(self, ref: str, wait: bool = True, timeout_s: float = 300) -> dict[str, Any]:
        return self.request(
            "POST", f"/api/v1/vms/{ref}/start", params={"wait": wait, "timeout_s": timeout_s}
        )

    def stop_vm(
        self, ref: str, graceful: bool = True, timeout_s: float | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"graceful": graceful}
        if timeout_s is not None:
            body["timeout_s"] = timeout_s
        return self.request("POST", f"/api/v1/vms/{ref}/stop", json=body)

    def restart_vm(
        self, ref: str, graceful: bool = True, wait: bool = True, timeout_s: float = 300
    ) -> dict[str, Any]:
        return self.request(
            "POST",
            f"/api/v1/vms/{ref}/restart",
            json={"graceful": graceful},
            params={"wait": wait, "timeout_s": timeout_s},
        )

    def vm_health(self, ref: str) -> dict[str, Any]:
        return self.request("GET", f"/api/v1/vms/{ref}/health")

    def console(self, ref: str, size: int = 16384) -> dict[str, Any]:
        return self.request("GET", f"/api/v1/vms/{ref}/console", params={"bytes": size})

    def version(self) -> dict[str, Any]:
        return self.request("GET", "/api/v1/version")


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)
