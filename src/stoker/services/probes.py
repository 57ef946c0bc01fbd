"""One health check of each kind: the VMM's control socket, HTTP, TCP, and a host command.

Each check answers (ok, message) within its timeout and never raises: a probe that cannot run
is a failed probe with a message that says why. Exec probes get an argv, never a shell string,
and the VM's identity in their environment (the same variables hooks get).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx

from stoker.domain.spec import (
    VM_HOST,
    ExecProbe,
    HTTPProbe,
    NetworkMode,
    Probe,
    TCPProbe,
    VMMProbe,
    VMSpec,
    probe_target,
)
from stoker.domain.vm import VM
from stoker.drivers.base import VMM, DriverError, Unsupported

#: Output kept from an exec probe or hook, for the message and the event log.
OUTPUT_TAIL = 400


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    message: str
    duration_s: float


def probe_name(probe: Probe, index: int) -> str:
    return probe.name or f"{probe.kind.value}-{index}"


def vm_address(spec: VMSpec) -> str:
    """Where the host reaches the guest: the forwarded address in user mode, else unknown."""
    net = spec.network
    if net.mode == NetworkMode.USER and net.port_forwards:
        return net.port_forwards[0].host_addr
    return ""


def vm_ports(spec: VMSpec) -> str:
    """'guest_port=host_addr:host_port' for each forward, comma separated."""
    return ",".join(
        f"{pf.guest_port}={pf.host_addr}:{pf.host_port}" for pf in spec.network.port_forwards
    )


def vm_environment(vm: VM, **extra: str) -> dict[str, str]:
    """A small, explicit environment: what a hook or exec probe needs, not the agent's secrets."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "STOKER_VM_ID": vm.id,
        "STOKER_VM_NAME": vm.name,
        "STOKER_VM_ADDRESS": vm_address(vm.spec),
        "STOKER_VM_PORTS": vm_ports(vm.spec),
    }
    if "HOME" in os.environ:
        env["HOME"] = os.environ["HOME"]
    env.update(extra)
    return env


async def run_argv(
    argv: list[str], env: dict[str, str], timeout_s: float, stdin: bytes | None = None
) -> tuple[int | None, str]:
    """Run argv with a timeout; return (exit code or None on timeout, output tail)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        raise FileNotFoundError(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from exc
    try:
        output, _ = await asyncio.wait_for(proc.communicate(stdin), timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 5)
        return None, ""
    return proc.returncode, output.decode(errors="replace")[-OUTPUT_TAIL:]


async def check(
    probe: Probe,
    vm: VM,
    vmm: VMM | None,
    commands: Mapping[str, list[str]],
    address: str | None = None,
) -> CheckResult:
    """Run one probe once. ``commands`` are the configured exec-probe commands by name;
    ``address`` is the VM's own address (what host 'vm' means), if it has one."""
    began = time.monotonic()
    try:
        ok, message = await _check(probe, vm, vmm, commands, address)
    except Exception as exc:  # a probe bug is a failed probe, never a dead probe loop
        ok, message = False, f"probe error: {exc}"
    return CheckResult(ok, message, time.monotonic() - began)


async def _check(
    probe: Probe,
    vm: VM,
    vmm: VMM | None,
    commands: Mapping[str, list[str]],
    address: str | None,
) -> tuple[bool, str]:
    timeout = probe.timeout_s
    if isinstance(probe, VMMProbe):
        if vmm is None:
            return False, "no VMM is running"
        try:
            status = await vmm.status(timeout)
        except (DriverError, Unsupported) as exc:
            return False, f"control socket not answering: {exc}"
        return True, f"VMM answers: {status.status}"
    aims_at_vm = isinstance(probe, HTTPProbe | TCPProbe) and probe_target(probe)[0] == VM_HOST
    if aims_at_vm and address is None:
        return False, "the VM has no address on a managed network (yet)"
    if isinstance(probe, HTTPProbe):
        url = probe.url
        if address is not None:
            url = _with_host(url, address)
        try:
            async with httpx.AsyncClient(timeout=timeout) as http:
                answer = await http.get(url)
        except httpx.TimeoutException:
            return False, f"GET {probe.url}: no answer within {timeout:g} s"
        except httpx.HTTPError as exc:
            return False, f"GET {probe.url}: {type(exc).__name__}: {exc}".rstrip(": ")
        if answer.status_code != probe.expect_status:
            return False, f"GET {probe.url}: {answer.status_code}, expected {probe.expect_status}"
        return True, f"GET {probe.url}: {answer.status_code}"
    if isinstance(probe, TCPProbe):
        host = address if probe.host == VM_HOST and address else probe.host
        where = f"{host}:{probe.port}"
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, probe.port), timeout)
        except TimeoutError:
            return False, f"tcp {where}: no connection within {timeout:g} s"
        except OSError as exc:
            return False, f"tcp {where}: {exc.strerror or exc}"
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        return True, f"tcp {where}: connected"
    assert isinstance(probe, ExecProbe)
    argv = commands.get(probe.command)
    if argv is None:
        return False, f"no command {probe.command!r} in the agent's [health.commands]"
    try:
        code, output = await run_argv(
            list(argv), vm_environment(vm, STOKER_PROBE=probe.name or probe.command), timeout
        )
    except FileNotFoundError as exc:
        return False, str(exc)
    if code is None:
        return False, f"{probe.command}: timed out after {timeout:g} s"
    tail = output.strip().splitlines()[-1] if output.strip() else ""
    verdict = f"{probe.command}: exit {code}" + (f": {tail}" if tail else "")
    return code == 0, verdict


def _with_host(url: str, address: str) -> str:
    """The URL with host 'vm' replaced by the VM's address."""
    parts = urlsplit(url)
    if parts.hostname != VM_HOST:
        return url
    netloc = address if parts.port is None else f"{address}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))
