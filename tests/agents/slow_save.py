"""``stoker agent`` whose QEMU VMMs wait after saving memory: ``python -m tests.agents.slow_save``.

A live snapshot pauses the guest, saves its memory, copies its disks and resumes it. The
wait after the memory is saved holds the snapshot at its most fragile point (guest paused,
memory file complete, disks not copied yet) long enough for a test to kill the agent there.
The wait is ``SLOW_SAVE_DELAY_S`` seconds (required); everything else is the agent as
``stoker agent`` builds it from its config file (``STOKER_CONFIG``) and ``STOKER_*``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from stoker import logs
from stoker.agent import Agent, build_drivers
from stoker.config import ConfigError, load_config
from stoker.domain.process import ProcessRecord
from stoker.domain.spec import VMSpec
from stoker.drivers.base import BootOptions, VMPaths
from stoker.drivers.qemu import QemuDriver, QemuVMM
from stoker.drivers.qemu_launch import LaunchSettings
from stoker.services.snapshots import restore

DELAY_ENV = "SLOW_SAVE_DELAY_S"
#: created in the VM's directory once a save is complete and the hold begins
HELD_MARKER = "save-held"
#: optional: seconds a restore's disk copy waits after its first MiB (a slow disk)
COPY_DELAY_ENV = "SLOW_RESTORE_COPY_S"


def slow_copy_into_new(delay_s: float) -> Callable[[Path, int, str], None]:
    """The restore's disk copy, done in Python with a wait after the first MiB: a test can
    act while the copy is under way (fill the disk, say) instead of racing ``cp``."""

    def copy(src: Path, dir_fd: int, name: str) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
        try:
            with open(src, "rb") as source:
                waited = False
                offset = 0
                while chunk := source.read(1 << 20):
                    if chunk.count(0) < len(chunk):  # holes stay holes, as with cp --sparse
                        view = memoryview(chunk)
                        while view:
                            view = view[os.pwrite(fd, view, offset + len(chunk) - len(view)) :]
                    offset += len(chunk)
                    if not waited:
                        time.sleep(delay_s)
                        waited = True
                os.ftruncate(fd, offset)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)
            raise
        os.close(fd)

    return copy


class SlowSaveVMM(QemuVMM):
    """A QEMU VMM that sleeps once its memory state is saved."""

    def __init__(
        self,
        delay_s: float,
        spec: VMSpec,
        paths: VMPaths,
        record: ProcessRecord,
        child: subprocess.Popen[bytes] | None,
    ) -> None:
        super().__init__(spec, paths, record, child=child)
        self.delay_s = delay_s

    async def save_state(self, dest: Path) -> None:
        await super().save_state(dest)
        # say so (a test acts on it: kills the agent, fills the disk), then hold
        (self.paths.root / HELD_MARKER).touch()
        await asyncio.sleep(self.delay_s)


class SlowSaveQemuDriver(QemuDriver):
    """The QEMU driver, handing out :class:`SlowSaveVMM` for launched and adopted VMMs."""

    def __init__(self, delay_s: float, settings: LaunchSettings) -> None:
        super().__init__(settings)
        self.delay_s = delay_s

    async def _launch(
        self,
        vm_id: str,
        spec: VMSpec,
        paths: VMPaths,
        boot: BootOptions,
        incoming: Path | None = None,
    ) -> QemuVMM:
        launched = await super()._launch(vm_id, spec, paths, boot, incoming)
        # nothing has connected to or watched the new process yet: take it over as it is
        return SlowSaveVMM(self.delay_s, spec, paths, launched.record, child=launched.child)

    async def adopt(self, spec: VMSpec, paths: VMPaths, record: ProcessRecord) -> QemuVMM:
        adopted = await super().adopt(spec, paths, record)  # checks the process, connects
        await adopted.close()  # our handle only: QEMU runs on
        vmm = SlowSaveVMM(self.delay_s, spec, paths, record, child=None)
        await vmm.connect(timeout_s=2.0)
        return vmm


def delay_from_env() -> float:
    value = os.environ.get(DELAY_ENV, "")
    try:
        delay_s = float(value)
    except ValueError:
        raise ConfigError(
            f"set {DELAY_ENV} to the seconds to wait after a save (got {value!r})"
        ) from None
    if delay_s < 0:
        raise ConfigError(f"{DELAY_ENV} must not be negative (got {value!r})")
    return delay_s


def main() -> int:
    config_path = os.environ.get("STOKER_CONFIG")
    try:
        delay_s = delay_from_env()
        cfg = load_config(Path(config_path) if config_path else None)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    logs.setup(cfg.log.level, cfg.log.format)
    drivers = build_drivers(cfg)
    qemu = drivers["qemu"]
    assert isinstance(qemu, QemuDriver)
    drivers["qemu"] = SlowSaveQemuDriver(delay_s, qemu.settings)
    copy_delay = os.environ.get(COPY_DELAY_ENV)
    if copy_delay:
        restore.copy_into_new = slow_copy_into_new(float(copy_delay))  # type: ignore[attr-defined,assignment]  # a test agent stands in for a slow disk
    try:
        asyncio.run(Agent(cfg, drivers=drivers).run())
    except (ConfigError, OSError) as exc:
        print(f"error: the agent could not start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
