"""Plain QEMU with stoker's own command line: the baseline the benchmarks measure against.

The argv and its descriptors come from the QEMU driver's own ``prepare`` (confined the way the
agent confines by default: the VM's own uid, a mount-namespace jail, seccomp), so the only
difference from a VM run by stoker is stoker itself: its API, its state writes, its events.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from stoker.domain.spec import VMSpec
from stoker.drivers.base import BootOptions, VMIdentity, VMPaths
from stoker.drivers.qemu import QemuDriver
from stoker.drivers.qemu_launch import LaunchSettings
from stoker.guest.build import default_cache_dir
from stoker.host.confine import minimal_env
from stoker.host.images import ImagePolicy
from stoker.host.proc import spawn_detached
from tests.helpers import short_tmpdir

#: a uid from the default range that no agent on a benchmark host hands out first
BENCH_UID = 265_000


class RawQemu:
    """One scratch directory; launch, kill and relaunch QEMU in it; remove it at the end."""

    def __init__(self, spec: VMSpec, prefix: str = "raw-", confined: bool = True) -> None:
        self.spec = spec
        self.paths = VMPaths(short_tmpdir(prefix))
        images = ImagePolicy.create([default_cache_dir(), self.paths.root / "images"])
        settings = LaunchSettings(
            binary="qemu-system-x86_64", images=images, confine="namespace" if confined else None
        )
        self.driver = QemuDriver(settings)
        self.boot = BootOptions(identity=VMIdentity(BENCH_UID, BENCH_UID) if confined else None)
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self, incoming: Path | None = None) -> subprocess.Popen[bytes]:
        """Spawn QEMU as the driver would: same argv, same descriptors, same environment."""
        prepared = self.driver.prepare(
            "0123456789abcdef", self.spec, self.paths, self.boot, incoming
        )
        try:
            self.proc = spawn_detached(
                prepared.command.argv,
                self.paths.vmm_log,
                cwd=self.paths.root,
                env=minimal_env(),
                pass_fds=prepared.command.pass_fds,
            )
        finally:
            prepared.close()
        return self.proc

    def console_has(self, marker: str) -> bool:
        """True once ``marker`` is on the console; raises if QEMU has exited meanwhile."""
        try:
            if marker.encode() in self.paths.console.read_bytes():
                return True
        except FileNotFoundError:
            pass
        self.check_alive()
        return False

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"raw QEMU exited: {self.paths.vmm_log.read_text()}")

    def kill(self) -> None:
        """SIGKILL and reap: we are the parent, so this is as fast as a stop can be."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.paths.root, ignore_errors=True)
