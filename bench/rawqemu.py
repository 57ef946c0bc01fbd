"""Plain QEMU with stoker's own command line: the baseline the benchmarks measure against.

The argv comes from ``stoker.drivers.qemu.qemu_argv`` so the only difference from a VM run by
stoker is stoker itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Sequence

from stoker.domain.spec import VMSpec
from stoker.drivers.base import VMPaths
from stoker.drivers.qemu import qemu_argv
from stoker.host.tsc import host_tsc_khz
from tests.helpers import short_tmpdir


class RawQemu:
    """One scratch directory; launch, kill and relaunch QEMU in it; remove it at the end."""

    def __init__(self, spec: VMSpec, prefix: str = "raw-") -> None:
        self.paths = VMPaths(short_tmpdir(prefix))
        self.argv = qemu_argv(spec, self.paths, accel="tcg", tsc_khz=host_tsc_khz())
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self, extra: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        self.paths.control_socket.unlink(missing_ok=True)
        with open(self.paths.vmm_log, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.argv, *extra],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
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
