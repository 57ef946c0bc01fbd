"""Bounded history: the ``[history]`` section and the rotation of VM logs.

Everything the agent keeps per VM or per schedule has a bound, so neither time nor a guest
can fill the disk: state transitions per VM and runs per schedule (the stores delete the
oldest as they write), reports per period (the report generator), and each VM's console and
VMM logs, rotated here.

The VMM holds its logs open for writing (QEMU's ``-chardev file,append=on`` on a
descriptor the agent opened with ``O_APPEND``, and its stdout/stderr the same way), so a
rename would not stop it writing to the renamed file. Rotation is "copy, then truncate in
place": the current content is copied to ``<log>.1`` (replacing the previous one) and the
file is truncated to zero; with ``O_APPEND`` every later write lands at the new end, so the
file restarts at zero instead of growing a hole. Bytes written between the copy and the
truncation (microseconds) are lost; the size is checked every ``log_check_interval_s``, so a
log can exceed its cap by what the guest writes in that time.

While a VM boots, its console is where the driver looks for the ready marker, reading on
from where it stopped: a truncation then would hide the marker. So a booting VM's console is
rotated only past ``BOOT_SLACK`` times its cap (a guest flooding its console during boot is
still bounded), and once it runs, at its cap (measured: tests/integration/
test_agent_limits.py, a verbose boot truncated mid-way missed its marker).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from stoker.domain.states import VMState
from stoker.domain.units import MiB
from stoker.services.directory import VMDirectory

log = logging.getLogger("stoker.history")

#: the previous generation of a rotated log
ROTATED_SUFFIX = ".1"
#: a booting VM's console may grow to this many times its cap before it is rotated
BOOT_SLACK = 8


class HistoryConfig(BaseModel):
    """``[history]``: how much the agent keeps (env: ``STOKER_HISTORY__<KEY>``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    transitions_per_vm: int = Field(default=1000, ge=10, le=1_000_000)
    runs_per_schedule: int = Field(default=1000, ge=10, le=1_000_000)
    console_log_max_bytes: int = Field(default=16 * MiB, ge=64 * 1024, le=1024**4)
    vmm_log_max_bytes: int = Field(default=16 * MiB, ge=64 * 1024, le=1024**4)
    log_check_interval_s: float = Field(default=10.0, ge=0.1, le=3600)
    reports_keep_daily: int = Field(default=92, ge=1, le=100_000)
    reports_keep_weekly: int = Field(default=104, ge=1, le=100_000)
    reports_keep_monthly: int = Field(default=60, ge=1, le=100_000)

    def reports_keep(self) -> dict[str, int]:
        return {
            "daily": self.reports_keep_daily,
            "weekly": self.reports_keep_weekly,
            "monthly": self.reports_keep_monthly,
        }


def rotate_if_over(path: Path, max_bytes: int) -> bool:
    """Copy ``path`` to ``path.1`` and truncate it in place when it is over ``max_bytes``;
    True when it rotated. The writer may hold the file open (with ``O_APPEND``)."""
    try:
        size = os.stat(path, follow_symlinks=False).st_size
    except FileNotFoundError:
        return False
    if size <= max_bytes:
        return False
    previous = path.with_name(path.name + ROTATED_SUFFIX)
    tmp = path.with_name(f".{path.name}{ROTATED_SUFFIX}.tmp")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(path, flags), "rb") as src:
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1024 * 1024)
        os.replace(tmp, previous)
        # truncate through a descriptor of the file itself, not the path
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "wb") as f:
            f.truncate(0)
    return True


class LogRotation:
    """A Background that keeps every VM's console and VMM logs under their caps."""

    def __init__(self, directory: VMDirectory, config: HistoryConfig) -> None:
        self.directory = directory
        self.config = config
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="log rotation")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def check_once(self) -> list[Path]:
        """Rotate every log over its cap; returns the logs rotated."""
        rotated = []
        for vm in self.directory.all():
            paths = self.directory.paths(vm.id)
            console_cap = self.config.console_log_max_bytes
            if vm.state in (VMState.STARTING, VMState.RESTARTING):
                console_cap *= BOOT_SLACK
            for path, cap in (
                (paths.console, console_cap),
                (paths.vmm_log, self.config.vmm_log_max_bytes),
            ):
                try:
                    if rotate_if_over(path, cap):
                        rotated.append(path)
                except OSError as exc:
                    log.warning("could not rotate %s: %s", path, exc)
        return rotated

    async def _run(self) -> None:
        while True:
            for path in await asyncio.to_thread(self.check_once):
                log.info("rotated %s (over its size cap)", path)
            await asyncio.sleep(self.config.log_check_interval_s)
