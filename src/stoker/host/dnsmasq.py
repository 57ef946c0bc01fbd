"""One dnsmasq (Debian ``dnsmasq-base``) per managed network: DHCP with static leases only.

Why static only: the address manager owns every address, so dnsmasq's range is ``static``
and it answers only the MACs in its hosts file (``MAC,address[,hostname]``), which stoker
writes atomically and dnsmasq re-reads on SIGHUP without a restart. Unknown MACs get nothing.

dnsmasq reads no configuration of the host (``--conf-file=/dev/null``), serves only the
bridge (``--interface`` + ``--bind-dynamic``: the DHCP socket is bound to that device, so
one dnsmasq per network coexists with others), and by default does no DNS at all
(``--port=0``). With ``dns=True`` it answers for the network's own domain from its leases
and refuses everything else: it has no upstream servers, so no query leaves the host.

It runs in the foreground in its own session, output to a log file, so the caller's pid is
dnsmasq's (a pidfd on it sees its death) and it survives an agent restart. Identity is the
pid plus the start time from /proc plus the pid-file path on its command line; a zombie
counts as dead. Supervision and restart policy belong to the caller.

Two details measured here: a second dnsmasq on the same bridge starts happily and both
answer, so :func:`start` refuses while :func:`list_running` finds one for that bridge in
that namespace; and a lease outlives its VM by up to ``lease_time`` in the lease file, which
is harmless because the address manager hands a released address out again only after its
pool wrapped.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from pathlib import Path

from stoker.host.netns import NETNS_DIR, NetnsError, netns_argv
from stoker.host.proc import (
    is_same_live_process,
    read_cmdline,
    read_start_time,
    read_stat,
    spawn_detached,
)

__all__ = [
    "DhcpHost",
    "DnsmasqConfig",
    "DnsmasqError",
    "DnsmasqPaths",
    "DnsmasqProcess",
    "dnsmasq_argv",
    "find_running",
    "hosts_file_text",
    "is_running",
    "list_running",
    "reload",
    "start",
    "stop",
    "write_hosts_file",
]

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class DnsmasqError(RuntimeError):
    """dnsmasq could not be configured, started or stopped; the message says why."""


@dataclass(frozen=True)
class DhcpHost:
    """One static lease: this MAC always gets this address (and, with DNS, this name)."""

    mac: str
    address: str
    hostname: str | None = None


@dataclass(frozen=True)
class DnsmasqPaths:
    """Files of one instance, all in the caller's state directory."""

    state_dir: Path

    @property
    def hosts(self) -> Path:
        return self.state_dir / "dhcp-hosts"

    @property
    def leases(self) -> Path:
        return self.state_dir / "dnsmasq.leases"

    @property
    def pid(self) -> Path:
        return self.state_dir / "dnsmasq.pid"

    @property
    def log(self) -> Path:
        return self.state_dir / "dnsmasq.log"


@dataclass(frozen=True)
class DnsmasqConfig:
    """What one network's dnsmasq serves."""

    bridge: str
    subnet: IPv4Network
    gateway: IPv4Address
    state_dir: Path
    lease_time: str = "1h"  # a lease outlives its VM this long at most
    dns: bool = False
    domain: str | None = None  # with dns: names of guests resolve as NAME.DOMAIN
    ipv6_subnet: IPv6Network | None = None  # router advertisements for SLAAC
    user: str | None = None  # None: dnsmasq's default (nobody)
    binary: str = "dnsmasq"

    @property
    def paths(self) -> DnsmasqPaths:
        return DnsmasqPaths(self.state_dir)


@dataclass(frozen=True)
class DnsmasqProcess:
    """A running dnsmasq as the caller records it: pid + start time identify it."""

    pid: int
    start_time: int
    pid_file: Path
    bridge: str
    child: subprocess.Popen[bytes] | None = field(default=None, compare=False, repr=False)


# --- pure parts ------------------------------------------------------------------------------


def _check_host(host: DhcpHost, subnet: IPv4Network) -> None:
    if not _MAC_RE.fullmatch(host.mac):
        raise DnsmasqError(f"MAC {host.mac!r} must be six lower-case hex pairs joined by ':'")
    if IPv4Address(host.address) not in subnet:
        raise DnsmasqError(f"address {host.address} for {host.mac} is outside {subnet}")
    if host.hostname is not None and not _LABEL_RE.fullmatch(host.hostname):
        raise DnsmasqError(
            f"hostname {host.hostname!r} for {host.mac} must be a DNS label: "
            "a-z 0-9 and '-', at most 63 characters"
        )


def hosts_file_text(hosts: Iterable[DhcpHost], subnet: IPv4Network) -> str:
    """The ``--dhcp-hostsfile`` contents; refuses two hosts with one MAC or one address."""
    lines = []
    macs: set[str] = set()
    addresses: set[str] = set()
    for host in sorted(hosts, key=lambda h: IPv4Address(h.address)):
        _check_host(host, subnet)
        if host.mac in macs:
            raise DnsmasqError(f"MAC {host.mac} appears twice in the static leases")
        if host.address in addresses:
            raise DnsmasqError(f"address {host.address} appears twice in the static leases")
        macs.add(host.mac)
        addresses.add(host.address)
        parts = [host.mac, host.address] + ([host.hostname] if host.hostname else [])
        lines.append(",".join(parts))
    return "".join(line + "\n" for line in lines)


def dnsmasq_argv(config: DnsmasqConfig) -> list[str]:
    """The dnsmasq command line (an argv, never a shell string)."""
    paths = config.paths
    net = config.subnet
    argv = [
        config.binary,
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--log-facility=-",  # stderr, which goes to the log file
        f"--pid-file={paths.pid}",
        f"--interface={config.bridge}",
        "--except-interface=lo",
        "--bind-dynamic",
        f"--dhcp-range={net.network_address},static,{net.netmask},{config.lease_time}",
        f"--dhcp-hostsfile={paths.hosts}",
        f"--dhcp-leasefile={paths.leases}",
        "--dhcp-authoritative",
        f"--dhcp-option=option:router,{config.gateway}",
    ]
    if config.user is not None:
        argv.append(f"--user={config.user}")
    if config.dns:
        argv += ["--no-resolv", "--no-hosts", "--no-poll", "--local-service"]
        if config.domain:
            argv += [f"--domain={config.domain}", f"--local=/{config.domain}/"]
        argv.append(f"--dhcp-option=option:dns-server,{config.gateway}")
    else:
        argv += ["--port=0", "--dhcp-option=option:dns-server"]  # empty: advertise none
    if config.ipv6_subnet is not None:
        argv += [
            "--enable-ra",
            f"--dhcp-range=::,constructor:{config.bridge},ra-only,64,{config.lease_time}",
        ]
    return argv


# --- files -----------------------------------------------------------------------------------


def write_hosts_file(config: DnsmasqConfig, hosts: Iterable[DhcpHost]) -> Path:
    """Write the static leases atomically (temp file, fsync, rename), readable by dnsmasq."""
    text = hosts_file_text(hosts, config.subnet)
    target = config.paths.hosts
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".dhcp-hosts.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # dnsmasq re-reads it after dropping to an unprivileged user
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return target


def _check_reachable(config: DnsmasqConfig) -> None:
    """dnsmasq re-reads the hosts file as ``nobody`` (or ``user``): every directory above
    it must be searchable by others, or a SIGHUP silently keeps the old leases."""
    if config.user == "root":
        return
    for directory in (config.state_dir, *config.state_dir.parents):
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            raise DnsmasqError(
                f"dnsmasq runs as {config.user or 'nobody'} and cannot reach "
                f"{config.paths.hosts}: make {directory} searchable by others (chmod o+x) "
                "or put the state directory elsewhere"
            )


# --- processes -------------------------------------------------------------------------------


def _log_tail(paths: DnsmasqPaths, limit: int = 800) -> str:
    try:
        return paths.log.read_text(errors="replace")[-limit:].strip()
    except OSError:
        return ""


def start(
    config: DnsmasqConfig,
    hosts: Iterable[DhcpHost] = (),
    *,
    netns: str | None = None,
    ready_timeout: float = 5.0,
) -> DnsmasqProcess:
    """Write the hosts file, start dnsmasq in its own session and wait until it serves.

    Ready means it wrote its pid file (it does so after binding its sockets). A dnsmasq
    that exits meanwhile raises with the end of its log (for example a missing bridge).
    """
    paths = config.paths
    for other in list_running(netns):
        if other.bridge == config.bridge:
            raise DnsmasqError(
                f"dnsmasq {other.pid} (pid file {other.pid_file}) already serves {config.bridge} "
                "in this namespace: stop it first; two DHCP servers on one bridge both answer"
            )
    config.state_dir.mkdir(parents=True, exist_ok=True)
    _check_reachable(config)
    write_hosts_file(config, hosts)
    with contextlib.suppress(FileNotFoundError):
        paths.pid.unlink()
    try:
        argv = netns_argv(netns) + dnsmasq_argv(config)
    except NetnsError as exc:
        raise DnsmasqError(str(exc)) from exc
    try:
        child = spawn_detached(argv, paths.log)
    except FileNotFoundError as exc:
        raise DnsmasqError(
            f"{config.binary} not found: install dnsmasq-base (apt-get install dnsmasq-base)"
        ) from exc
    deadline = time.monotonic() + ready_timeout
    while True:
        code = child.poll()
        if code is not None:
            raise DnsmasqError(
                f"dnsmasq for {config.bridge} exited with code {code}: {_log_tail(paths)}"
            )
        if _read_pid(paths.pid) == child.pid:
            start_time = read_start_time(child.pid)
            if start_time is not None:
                return DnsmasqProcess(child.pid, start_time, paths.pid, config.bridge, child)
        if time.monotonic() > deadline:
            _terminate(child.pid, child, 1.0)
            raise DnsmasqError(
                f"dnsmasq for {config.bridge} did not become ready within {ready_timeout} s: "
                f"{_log_tail(paths)}"
            )
        time.sleep(0.005)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def is_running(process: DnsmasqProcess) -> bool:
    """Still that very dnsmasq: same pid, same start time, not a zombie, our pid file."""
    if not is_same_live_process(process.pid, process.start_time):
        return False
    return f"--pid-file={process.pid_file}" in read_cmdline(process.pid)


def _identify(pid: int) -> DnsmasqProcess | None:
    """The pid as one of ours: a live dnsmasq with our kind of command line."""
    argv = read_cmdline(pid)
    stat_ = read_stat(pid)
    if not argv or stat_ is None or stat_.state in ("Z", "X"):
        return None
    if not argv[0].endswith("dnsmasq") or "--conf-file=/dev/null" not in argv:
        return None
    opts = dict(arg.split("=", 1) for arg in argv[1:] if arg.startswith("--") and "=" in arg)
    if "--pid-file" not in opts or "--interface" not in opts:
        return None
    return DnsmasqProcess(pid, stat_.start_time, Path(opts["--pid-file"]), opts["--interface"])


def find_running(state_dir: Path) -> DnsmasqProcess | None:
    """The dnsmasq serving ``state_dir``, from its pid file (to re-adopt after a restart)."""
    pid_file = DnsmasqPaths(state_dir).pid
    pid = _read_pid(pid_file)
    found = None if pid is None else _identify(pid)
    return found if found is not None and found.pid_file == pid_file else None


def _netns_inode(netns: str | None) -> int:
    path = Path("/proc/self/ns/net") if netns is None else NETNS_DIR / netns
    try:
        return path.stat().st_ino
    except OSError as exc:
        raise DnsmasqError(f"network namespace {netns!r} does not exist") from exc


def list_running(netns: str | None = None) -> list[DnsmasqProcess]:
    """Every dnsmasq started the way :func:`start` starts them, in ``netns`` (for
    reconciliation: those serving no known network's bridge can be stopped)."""
    inode = _netns_inode(netns)
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if Path(f"/proc/{entry.name}/ns/net").stat().st_ino != inode:
                continue
        except OSError:
            continue
        process = _identify(int(entry.name))
        if process is not None:
            found.append(process)
    return sorted(found, key=lambda p: p.pid)


def reload(process: DnsmasqProcess) -> None:
    """Make dnsmasq re-read the hosts file (SIGHUP); refuses a process that is not it."""
    if not is_running(process):
        raise DnsmasqError(f"dnsmasq {process.pid} is not running: start it again")
    os.kill(process.pid, signal.SIGHUP)


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait on a pidfd: readable once the process exits, zombie or not, child or not."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)


def _terminate(pid: int, child: subprocess.Popen[bytes] | None, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _wait_exit(pid, timeout):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_exit(pid, timeout)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=timeout)  # reap our own child so it leaves no zombie


def stop(process: DnsmasqProcess, timeout: float = 2.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; a dnsmasq that is gone already is fine."""
    if is_running(process):
        _terminate(process.pid, process.child, timeout)
    elif process.child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.child.wait(timeout=timeout)
    with contextlib.suppress(FileNotFoundError):
        if _read_pid(process.pid_file) == process.pid:
            process.pid_file.unlink()
