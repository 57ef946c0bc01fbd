"""Plain QEMU with stoker's own command line: the baseline the benchmarks measure against.

The argv and its descriptors come from the QEMU driver's own ``prepare`` (confined the way the
agent confines by default: the VM's own uid, a mount-namespace jail, seccomp), so the only
difference from a VM run by stoker is stoker itself: its API, its state writes, its events.
With ``cgroup=True`` the process is also moved into a cgroup of its own right after spawn,
through the agent's own cgroup code, as the agent places every VMM: what that costs is the
kernel's (memory accounting of the guest's RAM), and a benchmark can show it apart.
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
from stoker.host.cgroups import DEFAULT_ROOT
from stoker.host.confine import minimal_env
from stoker.host.images import ImagePolicy
from stoker.host.proc import spawn_detached
from stoker.services.quotas.placement import VMCgroups
from tests.helpers import short_tmpdir

#: a uid from the default range that no agent on a benchmark host hands out first
BENCH_UID = 265_000
#: the parent of the raw baseline's cgroups, beside the agent's own ``stoker``
BENCH_CGROUP_PARENT = "stoker-bench"
#: the id the raw baseline's files and cgroup are named by
RAW_VM_ID = "0123456789abcdef"


class RawQemu:
    """One scratch directory; launch, kill and relaunch QEMU in it; remove it at the end."""

    def __init__(
        self, spec: VMSpec, prefix: str = "raw-", confined: bool = True, cgroup: bool = False
    ) -> None:
        self.spec = spec
        self.cgroups = VMCgroups(DEFAULT_ROOT, BENCH_CGROUP_PARENT) if cgroup else None
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
        prepared = self.driver.prepare(RAW_VM_ID, self.spec, self.paths, self.boot, incoming)
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
        if self.cgroups is not None:
            self.cgroups.place(RAW_VM_ID, self.proc.pid)
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
        if self.cgroups is not None:
            self.cgroups.remove(RAW_VM_ID)
        shutil.rmtree(self.paths.root, ignore_errors=True)
