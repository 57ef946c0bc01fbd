"""Agent configuration: a TOML file, then ``STOKER_*`` environment variables on top.

Environment overrides use the field path in upper case with ``__`` between levels:
``STOKER_DATA_DIR=/srv/stoker``, ``STOKER_API__TCP_PORT=8080``.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stoker.domain.uids import UidRange

DEFAULT_DATA_DIR = Path("/var/lib/stoker")
MAX_DATA_DIR_LEN = 107 - len("/vms/0123456789abcdef/control.sock")


class Section(BaseModel):
    """A config table: unknown keys are errors, NaN and infinity are never numbers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


#: a bearer token shorter than this is refused: it could be guessed
MIN_TOKEN_BYTES = 32


class APIConfig(Section):
    socket: Path | None = Field(default=None, description="default: <data_dir>/stoker.sock")
    socket_mode: int = Field(default=0o660, ge=0, le=0o777)
    tcp_host: str = Field(default="127.0.0.1", max_length=255)
    tcp_port: int | None = Field(default=None, ge=0, le=65535)
    token: str | None = Field(default=None, description="bearer token required on TCP")
    token_file: Path | None = None
    tls_cert: Path | None = Field(default=None, description="PEM certificate for TCP (HTTPS)")
    tls_key: Path | None = Field(default=None, description="PEM private key for tls_cert")
    # the agent's own limits (docs/security.md, "Agent limits")
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024, le=1024**3)
    max_connections: int = Field(default=128, ge=1, le=65_536, description="per listener")
    max_header_bytes: int = Field(default=64 * 1024, ge=1024, le=1024 * 1024)
    header_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    keepalive_timeout_s: float = Field(default=5.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _token_for_tcp(self) -> APIConfig:
        if self.tcp_port is not None and not (self.token or self.token_file):
            raise ValueError(
                "api.tcp_port needs api.token or api.token_file (TCP requires a bearer token)"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("api.tls_cert and api.tls_key go together: give both or neither")
        if self.tcp_port is not None and not _loopback(self.tcp_host) and self.tls_cert is None:
            raise ValueError(
                f"api.tcp_host {self.tcp_host!r} is reachable from other hosts: set api.tls_cert "
                "and api.tls_key (the token must not cross a network in clear text), or listen "
                "on 127.0.0.1"
            )
        return self

    def resolved_token(self) -> str | None:
        """The TCP bearer token, refused (ConfigError) when it could be guessed or read by
        anyone: empty, shorter than 32 bytes, or in a file other users can read."""
        if self.token is not None:
            token, where = self.token.strip(), "api.token"
        elif self.token_file is not None:
            token, where = _read_token_file(self.token_file), f"api.token_file {self.token_file}"
        else:
            return None
        if not token:
            raise ConfigError(f"{where} is empty: TCP would run without authentication")
        if len(token.encode()) < MIN_TOKEN_BYTES:
            raise ConfigError(
                f"{where} is {len(token.encode())} bytes; use at least {MIN_TOKEN_BYTES} "
                "(for example `openssl rand -hex 32`)"
            )
        return token


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_token_file(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"api.token_file {path} cannot be opened: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if os.fstat(f.fileno()).st_mode & 0o004:
            raise ConfigError(
                f"api.token_file {path} is readable by every user: `chmod 600 {path}`"
            )
        try:
            return f.read(64 * 1024).decode().strip()
        except UnicodeDecodeError:
            raise ConfigError(f"api.token_file {path} is not UTF-8 text") from None


class QemuConfig(Section):
    binary: str = "qemu-system-x86_64"


class FirecrackerConfig(Section):
    binary: str | None = Field(default=None, description="default: $STOKER_FIRECRACKER_BIN or PATH")
    jailer: str | None = None


class ImagesConfig(Section):
    """Where VM kernels, initrds and disks may come from (``[images]``)."""

    pools: list[Path] | None = Field(
        default=None,
        max_length=64,
        description="directories images may come from; default: <data_dir>/images and the "
        "test guest's cache",
    )


class SecurityConfig(Section):
    """How each VMM is confined (``[security]``)."""

    confine: bool = Field(
        default=True, description="run every VMM under its own uid, jailed and sandboxed"
    )
    mode: Literal["namespace", "runas"] = Field(
        default="namespace",
        description="namespace: exec QEMU unprivileged in a private mount namespace; "
        "runas: QEMU drops privileges itself (-runas, -chroot)",
    )
    vm_uid_range: str = Field(default="200000-265535", max_length=32)
    user_net_outbound: bool = Field(
        default=False,
        description="let guests on user-mode networking open connections out (which "
        "includes the host's own loopback services); managed networks give outbound NAT",
    )

    @field_validator("vm_uid_range")
    @classmethod
    def _range(cls, v: str) -> str:
        UidRange.parse(v)
        return v


class LogConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class AgentConfig(Section):
    data_dir: Path = DEFAULT_DATA_DIR
    api: APIConfig = Field(default_factory=APIConfig)
    qemu: QemuConfig = Field(default_factory=QemuConfig)
    firecracker: FirecrackerConfig = Field(default_factory=FirecrackerConfig)
    images: ImagesConfig = Field(default_factory=ImagesConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    #: sections owned by later capabilities, validated by their own services
    sections: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _short_data_dir(self) -> AgentConfig:
        # each VM's control socket is <data_dir>/vms/<16-hex id>/control.sock, and a Unix
        # socket path must fit in 107 bytes
        if len(str(self.data_dir)) > MAX_DATA_DIR_LEN:
            raise ValueError(
                f"data_dir {str(self.data_dir)!r} is longer than {MAX_DATA_DIR_LEN} characters;"
                " VM control sockets under it would exceed the 107-byte Unix socket limit"
            )
        return self

    @property
    def socket_path(self) -> Path:
        return self.api.socket or self.data_dir / "stoker.sock"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "stoker.db"

    @property
    def image_pools(self) -> list[Path]:
        """The configured pools, or the default ones: the data dir's images/ and the test
        guest's cache (where ``stoker guest build`` puts its kernel and initrd)."""
        if self.images.pools is not None:
            return list(self.images.pools)
        from stoker.guest.build import default_cache_dir

        return [self.data_dir / "images", default_cache_dir()]


KNOWN_SECTIONS = {"api", "qemu", "firecracker", "images", "security", "log", "data_dir"}


class ConfigError(Exception):
    pass


SectionModel = TypeVar("SectionModel", bound=BaseModel)


def section(config: AgentConfig, name: str, model: type[SectionModel]) -> SectionModel:
    """A capability's ``[name]`` table validated by its own model; a bad key stops the agent
    with a message naming it (``invalid [quotas] configuration: quotas.cpu_percent: ...``)."""
    try:
        return model.model_validate(config.sections.get(name, {}))
    except ValidationError as exc:
        problems = "; ".join(
            f"{name}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid [{name}] configuration: {problems}") from None


#: top-level keys that hold a value, not a table
SCALAR_KEYS = {"data_dir"}


def load_config(
    path: Path | None = None,
    environ: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> AgentConfig:
    """Read ``path`` (if given), apply ``STOKER_*`` overrides, then ``overrides`` (command-line
    options), and validate everything together, so no source skips a check."""
    environ = dict(os.environ if environ is None else environ)
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_bytes().decode())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text ({exc.reason})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    for key, value in environ.items():
        if not key.startswith("STOKER_") or key in ("STOKER_SOCKET", "STOKER_URL", "STOKER_TOKEN"):
            continue
        parts = key.removeprefix("STOKER_").lower().split("__")
        if parts[0] not in KNOWN_SECTIONS and len(parts) == 1:
            continue  # not ours (STOKER_GUEST_DIR, say)
        if parts[0] in SCALAR_KEYS and len(parts) > 1:
            raise ConfigError(
                f"{key}: {parts[0]} is a value, not a table; use STOKER_{parts[0].upper()}"
            )
        target = raw
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{key}: {part} is a value, not a table")
        target[parts[-1]] = value
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    sections = {
        k: raw.pop(k) for k in list(raw) if k not in KNOWN_SECTIONS and isinstance(raw[k], dict)
    }
    try:
        config = AgentConfig.model_validate({**raw, "sections": sections})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None
    return config
