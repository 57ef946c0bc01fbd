"""The agent process: builds every service from the config, re-adopts running VMs, serves the API.

Stopping the agent (SIGTERM, SIGINT) lets go of the VMs without touching them; a SIGKILL
cannot touch them either, since each VMM lives in its own session with its output in files.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from stoker.api.app import create_app
from stoker.config import AgentConfig
from stoker.drivers.base import Driver
from stoker.drivers.qemu import QemuDriver
from stoker.host.proc import set_child_subreaper
from stoker.services import health, quotas, resources, scheduler, snapshots
from stoker.services.container import Services
from stoker.services.events import EventBus
from stoker.services.lifecycle import Lifecycle
from stoker.store.db import Database
from stoker.store.events import EventStore
from stoker.store.vms import VMStore

log = logging.getLogger("stoker.agent")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the agent owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def, override]
        yield


def build_drivers(config: AgentConfig) -> dict[str, Driver]:
    from stoker.drivers.firecracker.driver import FirecrackerConfig, FirecrackerDriver

    firecracker = FirecrackerDriver(FirecrackerConfig(binary=config.firecracker.binary))
    return {"qemu": QemuDriver(binary=config.qemu.binary), "firecracker": firecracker}


@dataclass
class Agent:
    config: AgentConfig
    db: Database = field(init=False)
    services: Services = field(init=False)
    _servers: list[_Server] = field(default_factory=list)
    _background: list[Any] = field(default_factory=list)

    def build(self) -> Services:
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        (self.config.data_dir / "vms").mkdir(exist_ok=True)
        self.db = Database(self.config.db_path)
        events = EventBus(EventStore(self.db))
        lifecycle = Lifecycle(
            VMStore(self.db), events, build_drivers(self.config), self.config.data_dir
        )
        self.services = Services(lifecycle=lifecycle, events=events)
        # resources first: it installs the capacity gate the others rely on
        for capability in (resources, health, quotas, snapshots, scheduler):
            capability.install(self.services, self.config, self.db)
        return self.services

    def _listen_unix(self, path: Path) -> socket.socket:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        os.chmod(path, self.config.api.socket_mode)
        sock.listen(128)
        return sock

    def _listen_tcp(self, host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        return sock

    async def run(self, ready: asyncio.Event | None = None) -> None:
        set_child_subreaper()
        services = self.build()
        await services.lifecycle.recover()
        # Everything built so far lives as long as the agent: keep it out of the cyclic
        # collector's full passes, which otherwise stall requests once thousands of VMs are
        # registered.
        gc.freeze()
        for loop_service in services.background:
            await loop_service.start()
        listeners: list[tuple[socket.socket, str | None]] = [
            (self._listen_unix(self.config.socket_path), None)
        ]
        if self.config.api.tcp_port is not None:
            listeners.append(
                (
                    self._listen_tcp(self.config.api.tcp_host, self.config.api.tcp_port),
                    self.config.api.resolved_token(),
                )
            )
        for sock, token in listeners:
            app = create_app(services, token=token)
            server = _Server(uvicorn.Config(app, lifespan="off", log_config=None, access_log=False))
            self._servers.append(server)
            self._background.append(asyncio.create_task(server.serve(sockets=[sock])))
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info(
            "agent ready",
            extra={"socket": str(self.config.socket_path), "tcp_port": self.config.api.tcp_port},
        )
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("agent stopping; VMs keep running")
        await self.close()

    async def close(self) -> None:
        for server in self._servers:
            server.should_exit = True
        await asyncio.gather(*self._background, return_exceptions=True)
        for loop_service in reversed(self.services.background):
            try:
                await loop_service.stop()
            except Exception:
                log.exception("stopping a background service failed")
        await self.services.lifecycle.shutdown()
        await self.services.events.drain()
        self.db.close()
        with contextlib.suppress(FileNotFoundError):
            self.config.socket_path.unlink()
