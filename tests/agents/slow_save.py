"""``stoker agent`` whose QEMU VMMs wait after saving memory: ``python -m tests.agents.slow_save``.

A live snapshot pauses the guest, saves its memory, copies its disks and resumes it. The
wait after the memory is saved holds the snapshot at its most fragile point (guest paused,
memory file complete, disks not copied yet) long enough for a test to kill the agent there.
The wait is ``SLOW_SAVE_DELAY_S`` seconds (required); everything else is the agent as
``stoker agent`` builds it from its config file (``STOKER_CONFIG``) and ``STOKER_*``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from stoker import logs
from stoker.agent import Agent, build_drivers
from stoker.config import ConfigError, load_config
from stoker.domain.process import ProcessRecord
from stoker.domain.spec import VMSpec
from stoker.drivers.base import VMPaths
from stoker.drivers.qemu import QemuDriver, QemuVMM

DELAY_ENV = "SLOW_SAVE_DELAY_S"


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
        await asyncio.sleep(self.delay_s)


class SlowSaveQemuDriver(QemuDriver):
    """The QEMU driver, handing out :class:`SlowSaveVMM` for launched and adopted VMMs."""

    def __init__(self, delay_s: float, binary: str) -> None:
        super().__init__(binary=binary)
        self.delay_s = delay_s

    async def _launch(self, spec: VMSpec, paths: VMPaths, argv: Sequence[str]) -> QemuVMM:
        launched = await super()._launch(spec, paths, argv)
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
    drivers = {**build_drivers(cfg), "qemu": SlowSaveQemuDriver(delay_s, cfg.qemu.binary)}
    try:
        asyncio.run(Agent(cfg, drivers=drivers).run())
    except (ConfigError, OSError) as exc:
        print(f"error: the agent could not start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
