"""The VM spec: what an operator asks for, validated before anything touches the disk.

Pydantic does the checking so that every error names its field; checks that need the file
system (does the kernel exist?) live in the service layer, not here.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
NAME_RE = re.compile(NAME_PATTERN)
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,62}$")

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
    """Base for spec parts: unknown fields are errors, so typos are not silently ignored."""

    model_config = ConfigDict(extra="forbid")


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
    path: str = Field(description="absolute path of the disk image on the host")
    format: DriveFormat = DriveFormat.RAW
    read_only: bool = False

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must be an absolute path")
        return v


class PortForward(Strict):
    host_port: int = Field(ge=1, le=65535)
    guest_port: int = Field(ge=1, le=65535)
    host_addr: str = "127.0.0.1"
    protocol: Literal["tcp", "udp"] = "tcp"


class NetworkMode(StrEnum):
    NONE = "none"
    USER = "user"
    TAP = "tap"


class Network(Strict):
    mode: NetworkMode = NetworkMode.NONE
    port_forwards: list[PortForward] = Field(default_factory=list)
    tap: str | None = Field(default=None, description="TAP device name, for mode 'tap'")
    mac: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Network:
        if self.port_forwards and self.mode != NetworkMode.USER:
            raise ValueError("port_forwards need network mode 'user'")
        if self.mode == NetworkMode.TAP and not self.tap:
            raise ValueError("network mode 'tap' needs a 'tap' device name")
        if self.tap is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", self.tap):
            raise ValueError("tap must be a valid interface name (1-15 characters)")
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
        default=60.0, ge=0, description="running this long resets the retry count"
    )


class ProbeKind(StrEnum):
    VMM = "vmm"
    HTTP = "http"
    TCP = "tcp"
    EXEC = "exec"


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
    url: str = Field(max_length=2048)
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
    host: str = Field(default="127.0.0.1", max_length=253)
    port: int = Field(ge=1, le=65535)


class ExecProbe(ProbeBase):
    """A host command that must exit 0."""

    kind: Literal[ProbeKind.EXEC]
    argv: list[str] = Field(min_length=1, max_length=64)


Probe = Annotated[
    VMMProbe | HTTPProbe | TCPProbe | ExecProbe,
    Field(discriminator="kind", description="a health check; `kind` says which"),
]


class VMSpec(Strict):
    """Everything needed to run one VM; stored as JSON and validated on every read of input."""

    name: Name
    vcpus: int = Field(default=1, ge=1, le=255)
    memory_mib: int = Field(default=128, ge=16, le=4 * 1024 * 1024)
    kernel: str = Field(description="absolute path of the guest kernel")
    initrd: str | None = Field(default=None, description="absolute path of the initramfs")
    cmdline: str = Field(default="console=ttyS0", max_length=4096)
    drives: list[Drive] = Field(default_factory=list, max_length=16)
    network: Network = Field(default_factory=Network)
    hypervisor: Hypervisor = Hypervisor.QEMU
    accel: Accel = Accel.AUTO
    labels: dict[str, str] = Field(default_factory=dict)
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

    @field_validator("kernel", "initrd")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError("must be an absolute path")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not LABEL_KEY_RE.match(key):
                raise ValueError(f"label key {key!r} must match {LABEL_KEY_RE.pattern}")
            if len(value) > 256:
                raise ValueError(f"label {key!r} value is longer than 256 characters")
        return v

    @field_validator("cmdline")
    @classmethod
    def _cmdline(cls, v: str) -> str:
        if "\n" in v or "\x00" in v:
            raise ValueError("must be one line")
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
    return bool(NAME_RE.match(name))
