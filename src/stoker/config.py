"""Agent configuration: a TOML file, then ``STOKER_*`` environment variables on top.

Environment overrides use the field path in upper case with ``__`` between levels:
``STOKER_DATA_DIR=/srv/stoker``, ``STOKER_API__TCP_PORT=8080``.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_DATA_DIR = Path("/var/lib/stoker")
MAX_DATA_DIR_LEN = 107 - len("/vms/0123456789abcdef/control.sock")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class APIConfig(Section):
    socket: Path | None = Field(default=None, description="default: <data_dir>/stoker.sock")
    socket_mode: int = 0o660
    tcp_host: str = "127.0.0.1"
    tcp_port: int | None = Field(default=None, ge=0, le=65535)
    token: str | None = Field(default=None, description="bearer token required on TCP")
    token_file: Path | None = None

    @model_validator(mode="after")
    def _token_for_tcp(self) -> APIConfig:
        if self.tcp_port is not None and not (self.token or self.token_file):
            raise ValueError(
                "api.tcp_port needs api.token or api.token_file (TCP requires a bearer token)"
            )
        return self

    def resolved_token(self) -> str | None:
        if self.token:
            return self.token
        if self.token_file:
            return self.token_file.read_text().strip()
        return None


class QemuConfig(Section):
    binary: str = "qemu-system-x86_64"


class FirecrackerConfig(Section):
    binary: str | None = Field(default=None, description="default: $STOKER_FIRECRACKER_BIN or PATH")
    jailer: str | None = None


class LogConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class AgentConfig(Section):
    data_dir: Path = DEFAULT_DATA_DIR
    api: APIConfig = Field(default_factory=APIConfig)
    qemu: QemuConfig = Field(default_factory=QemuConfig)
    firecracker: FirecrackerConfig = Field(default_factory=FirecrackerConfig)
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


KNOWN_SECTIONS = {"api", "qemu", "firecracker", "log", "data_dir"}


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


def load_config(path: Path | None = None, environ: dict[str, str] | None = None) -> AgentConfig:
    """Read ``path`` (if given), apply ``STOKER_*`` overrides, validate everything."""
    environ = dict(os.environ if environ is None else environ)
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    for key, value in environ.items():
        if not key.startswith("STOKER_") or key in ("STOKER_SOCKET", "STOKER_URL", "STOKER_TOKEN"):
            continue
        parts = key.removeprefix("STOKER_").lower().split("__")
        if parts[0] not in KNOWN_SECTIONS and len(parts) == 1:
            continue  # not ours (STOKER_GUEST_DIR, say)
        target = raw
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
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
