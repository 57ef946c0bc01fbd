"""Which cgroup a VMM lives in, and getting it there in time.

Memory is charged to the cgroup a page is first touched in and is not moved with the process
(v1 here refuses move_charge_at_immigrate, v2 never moves it), so the VMM is moved into its
VM's cgroup right after spawn, before the guest touches its RAM: the quota service is a
spawn observer of the lifecycle for that. The cgroup backend is opened on first use, so an agent on
a host without usable cgroups still runs and says why CPU and memory limits fail.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from stoker.host.cgroups import CgroupBackend, CgroupError, backend_for


class VMCgroups:
    """The per-VM cgroups under ``root/parent``."""

    def __init__(self, root: Path, parent: str) -> None:
        self.root = root
        self.parent = parent
        #: None until first used (tests put a backend on a fake tree here)
        self.backend: CgroupBackend | None = None

    def open(self) -> CgroupBackend:
        if self.backend is None:
            try:
                self.backend = backend_for(self.root, self.parent)
            except (CgroupError, ValueError) as exc:
                raise CgroupError(f"cgroups unusable: {exc}") from exc
        return self.backend

    def place(self, vm_id: str, pid: int) -> str:
        """Create the VM's cgroup and move ``pid`` into it; returns the cgroup's path."""
        cg = self.open()
        cg.create(vm_id)
        cg.add_process(vm_id, pid)
        return str(cg.path(vm_id))

    def path(self, vm_id: str) -> str | None:
        return None if self.backend is None else str(self.backend.path(vm_id))

    def remove(self, vm_id: str) -> None:
        """Best effort: a cgroup that is already gone or still busy is left to the next stop."""
        if self.backend is not None:
            with contextlib.suppress(CgroupError, ValueError, OSError):
                self.backend.remove(vm_id, move_strays=False)
