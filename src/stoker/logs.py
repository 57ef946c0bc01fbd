"""Structured logs: one line per event, ``key=value`` text or JSON.

Under systemd (``$JOURNAL_STREAM`` or ``$INVOCATION_ID`` set) the default is JSON lines on
stdout, which the journal keeps one record per line; elsewhere text on stderr.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TextIO

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and v is not None}


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        at = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        extras = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{at} {record.levelname.lower():7} {record.name}: {record.getMessage()}"
        if extras:
            line += f" [{extras}]"
        if record.exc_info:
            line += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        return line


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, object] = {
            "at": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str)


def under_systemd(environ: Mapping[str, str] | None = None) -> bool:
    """Started by systemd: its output goes to the journal."""
    env = os.environ if environ is None else environ
    return bool(env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID"))


def default_format(environ: Mapping[str, str] | None = None) -> str:
    """The format when the configuration names none: JSON for the journal, else text."""
    return "json" if under_systemd(environ) else "text"


def setup(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Log at ``level`` in ``fmt``; to ``stream``, by default stdout under systemd and stderr
    elsewhere."""
    if stream is None:
        stream = sys.stdout if under_systemd() else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access", "qemu.qmp", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # qemu.qmp logs every refused connect while QEMU creates its socket as an error
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
