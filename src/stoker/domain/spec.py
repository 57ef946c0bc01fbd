"""The VM spec: what an operator asks for, validated before anything touches the disk.

Pydantic does the checking so that every error names its field; checks that need the file
system (does the kernel exist, is it in an image pool?) live in the service layer, not here.
Every number is finite and bounded, every string and list has a length limit, and nothing a
request says can reach a VMM's command line as anything but a value of the field it is in.
"""

from __future__ import annotations

import ipaddress
import re
from enum import StrEnum
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
NAME_RE = re.compile(NAME_PATTERN)
LABEL_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-/]{0,62}")
IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
#: control characters (C0, DEL) have no business in any text that reaches a VMM or a log line
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
MAX_PATH = 4096
MAX_LABELS = 64
MAX_PORT_FORWARDS = 64

Name = Annotated[
    str,
    Field(
        pattern=NAME_PATTERN,
        description="lower-case letters, digits and '-', starting with a letter or digit, "
        "at most 63 characters",
        examples=["web-server"],
    ),
]


class Strict(BaseModel):
    """Base for spec parts: unknown fields are errors, so typos are not silently ignored, and
    NaN and infinity are refused wherever a number is asked for."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _absolute_path(v: str) -> str:
    if not v.startswith("/"):
        raise ValueError("must be an absolute path")
    if CONTROL_RE.search(v):
        raise ValueError("must not contain control characters")
    return v


def unicast_mac(v: str) -> str:
    """A MAC address in the usual notation, unicast (a multicast one breaks the guest's NIC)."""
    mac = v.lower()
    if not MAC_RE.fullmatch(mac):
        raise ValueError("must be a MAC address like 52:54:00:12:34:56")
    if int(mac[:2], 16) & 1:
        raise ValueError("must be a unicast MAC address (the first octet must be even)")
    return mac


class Hypervisor(StrEnum):
    QEMU = "qemu"
    FIRECRACKER = "firecracker"


class Accel(StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class DriveFormat(StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"


class Drive(Strict):
    path: str = Field(
        max_length=MAX_PATH,
        description="absolute path of the disk image on the host, inside an image pool",
    )
    format: DriveFormat = DriveFormat.RAW
    read_only: StrictBool = False

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        return _absolute_path(v)


class PortForward(Strict):
    host_port: int = Field(ge=1, le=65535)
    guest_port: int = Field(ge=1, le=65535)
    host_addr: str = Field(
        default="127.0.0.1", max_length=15, description="an IPv4 address of the host"
    )
    protocol: Literal["tcp", "udp"] = "tcp"

    @field_validator("host_addr")
    @classmethod
    def _ipv4(cls, v: str) -> str:
        try:
            return str(ipaddress.IPv4Address(v))
        except ValueError:
            raise ValueError("must be an IPv4 address of the host, like 127.0.0.1") from None


class NetworkMode(StrEnum):
    NONE = "none"
    #: NAT inside the VMM (QEMU only); port forwards on the host's addresses
    USER = "user"
    #: a TAP device the operator made
    TAP = "tap"
    #: a TAP on a network stoker manages: a bridge, an address by DHCP, NAT, forwards
    MANAGED = "managed"


DEFAULT_NETWORK = "default"


class Network(Strict):
    mode: NetworkMode = NetworkMode.NONE
    name: str | None = Field(
        default=None,
        pattern=NAME_PATTERN,
        description="the managed network, for mode 'managed' (default: 'default')",
    )
    port_forwards: list[PortForward] = Field(default_factory=list, max_length=MAX_PORT_FORWARDS)
    tap: str | None = Field(default=None, description="TAP device name, for mode 'tap'")
    mac: str | None = Field(default=None, description="unicast MAC; default: stable per VM")

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str | None) -> str | None:
        return None if v is None else unicast_mac(v)

    @model_validator(mode="after")
    def _consistent(self) -> Network:
        if self.port_forwards and self.mode not in (NetworkMode.USER, NetworkMode.MANAGED):
            raise ValueError("port_forwards need network mode 'user' or 'managed'")
        if self.mode == NetworkMode.TAP and not self.tap:
            raise ValueError("network mode 'tap' needs a 'tap' device name")
        if self.tap is not None and not IFNAME_RE.fullmatch(self.tap):
            raise ValueError("tap must be a valid interface name (1-15 characters)")
        if self.name is not None and self.mode != NetworkMode.MANAGED:
            raise ValueError("a network name needs network mode 'managed'")
        if self.mode == NetworkMode.MANAGED and self.name is None:
            self.name = DEFAULT_NETWORK
        return self


class RestartPolicyKind(StrEnum):
    NEVER = "never"
    ON_FAILURE = "on-failure"
    ALWAYS = "always"


class RestartPolicy(Strict):
    policy: RestartPolicyKind = RestartPolicyKind.NEVER
    max_retries: int = Field(default=5, ge=0, le=10_000)
    backoff_initial_s: float = Field(default=1.0, gt=0, le=3600)
    backoff_max_s: float = Field(default=300.0, gt=0, le=86_400)
    stable_after_s: float = Field(
        default=60.0, ge=0, le=30 * 86_400, description="running this long resets the retry count"
    )


class ProbeKind(StrEnum):
    VMM = "vmm"
    HTTP = "http"
    TCP = "tcp"
    EXEC = "exec"


#: in a probe's host: the VM's own address, known once its network has given it one
VM_HOST = "vm"


class ProbeBase(Strict):
    """What every probe kind shares: its name, timing and thresholds."""

    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    interval_s: float = Field(default=30.0, gt=0, le=86_400)
    timeout_s: float = Field(default=1.0, gt=0, le=3600)
    failure_threshold: int = Field(default=3, ge=1, le=1000)
    success_threshold: int = Field(default=1, ge=1, le=1000)
    initial_delay_s: float = Field(default=0.0, ge=0, le=86_400)


class VMMProbe(ProbeBase):
    """The VMM process answers on its control socket."""

    kind: Literal[ProbeKind.VMM]


class HTTPProbe(ProbeBase):
    """A GET that must answer ``expect_status``."""

    kind: Literal[ProbeKind.HTTP]
    url: str = Field(
        max_length=2048,
        description=f"on the VM's own address (host '{VM_HOST}', managed networks) or a "
        "host address and port forwarded to it",
    )
    expect_status: int = Field(default=200, ge=100, le=599)

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return v


class TCPProbe(ProbeBase):
    """A TCP connection that must be accepted."""

    kind: Literal[ProbeKind.TCP]
    host: str = Field(
        default="127.0.0.1",
        max_length=15,
        description=f"'{VM_HOST}' (the VM's own address on its managed network), or a host "
        "address with this port forwarded to the VM",
    )
    port: int = Field(ge=1, le=65535)

    @field_validator("host")
    @classmethod
    def _ipv4(cls, v: str) -> str:
        if v == VM_HOST:
            return v
        try:
            return str(ipaddress.IPv4Address(v))
        except ValueError:
            raise ValueError(f"must be '{VM_HOST}' or an IPv4 address") from None


class ExecProbe(ProbeBase):
    """A host command that must exit 0: one the agent's config names (``[health.commands]``);
    a request can choose it, never define it."""

    kind: Literal[ProbeKind.EXEC]
    command: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
        description="the name of a command in the agent's [health.commands]",
    )


Probe = Annotated[
    VMMProbe | HTTPProbe | TCPProbe | ExecProbe,
    Field(discriminator="kind", description="a health check; `kind` says which"),
]


class VMSpec(Strict):
    """Everything needed to run one VM; stored as JSON and validated on every read of input."""

    name: Name
    vcpus: int = Field(default=1, ge=1, le=255)
    memory_mib: int = Field(default=128, ge=16, le=4 * 1024 * 1024)
    kernel: str = Field(
        max_length=MAX_PATH, description="absolute path of the guest kernel, in an image pool"
    )
    initrd: str | None = Field(
        default=None,
        max_length=MAX_PATH,
        description="absolute path of the initramfs, in an image pool",
    )
    cmdline: str = Field(default="console=ttyS0", max_length=4096)
    drives: list[Drive] = Field(default_factory=list, max_length=16)
    network: Network = Field(default_factory=Network)
    hypervisor: Hypervisor = Hypervisor.QEMU
    accel: Accel = Accel.AUTO
    labels: dict[str, str] = Field(default_factory=dict, max_length=MAX_LABELS)
    ready_marker: str | None = Field(
        default=None,
        max_length=256,
        description="a console line that means the guest is ready; "
        "without it, ready means the VMM answers its control socket",
    )
    boot_timeout_s: float = Field(default=300.0, gt=0, le=86_400)
    stop_timeout_s: float = Field(default=30.0, gt=0, le=86_400)
    restart: RestartPolicy = Field(default_factory=RestartPolicy)
    probes: list[Probe] = Field(default_factory=list, max_length=16)
    warm_start: bool | None = Field(
        default=None,
        description="start from a boot snapshot taken at the first ready point instead of "
        "booting (read-only drives only); null: the agent's [warm_start] default",
    )

    @field_validator("kernel", "initrd")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        return None if v is None else _absolute_path(v)

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not LABEL_KEY_RE.fullmatch(key):
                raise ValueError(f"label key {key!r} must match {LABEL_KEY_RE.pattern}")
            if len(value) > 256:
                raise ValueError(f"label {key!r} value is longer than 256 characters")
            if CONTROL_RE.search(value):
                raise ValueError(f"label {key!r} value must not contain control characters")
        return v

    @field_validator("cmdline", "ready_marker")
    @classmethod
    def _one_line(cls, v: str | None) -> str | None:
        if v is not None and CONTROL_RE.search(v.replace("\t", " ")):
            raise ValueError("must be one line without control characters")
        return v

    @model_validator(mode="after")
    def _ports_unique(self) -> VMSpec:
        seen = set()
        for pf in self.network.port_forwards:
            key = (pf.host_addr, pf.host_port, pf.protocol)
            if key in seen:
                raise ValueError(f"host port {pf.host_port} is forwarded twice")
            seen.add(key)
        return self


def valid_name(name: str) -> bool:
    return bool(NAME_RE.fullmatch(name))


def probe_target(probe: HTTPProbe | TCPProbe) -> tuple[str, int]:
    """The (host, port) a probe connects to."""
    if isinstance(probe, TCPProbe):
        return probe.host, probe.port
    parts = urlsplit(probe.url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = -1
    return parts.hostname or "", port


def probe_target_problems(spec: VMSpec) -> list[tuple[str, str]]:
    """(field, message) for every HTTP or TCP probe aimed anywhere but at the VM itself: its
    own address on a managed network (host 'vm'), or a host address and port forwarded to it.
    A probe runs on the host as the agent; it must not become a way to reach other hosts."""
    forwards = {(pf.host_addr, pf.host_port) for pf in spec.network.port_forwards}
    problems = []
    for index, probe in enumerate(spec.probes):
        if not isinstance(probe, HTTPProbe | TCPProbe):
            continue
        host, port = probe_target(probe)
        field = f"probes[{index}].{'url' if isinstance(probe, HTTPProbe) else 'host'}"
        if host == VM_HOST:
            if spec.network.mode != NetworkMode.MANAGED:
                problems.append((field, f"host '{VM_HOST}' needs network mode 'managed'"))
        elif (host, port) not in forwards:
            problems.append(
                (
                    field,
                    f"{host}:{port} is not the VM: use host '{VM_HOST}' on a managed network, "
                    "or a host address and port forwarded to the VM",
                )
            )
    return problems
