"""CPU caps on this machine's real cgroups: a busy loop must be held near its cap."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stoker.host.cgroups import (
    DEFAULT_ROOT,
    CgroupBackend,
    CgroupMode,
    ControllerUnavailable,
    V1Cgroups,
    V2Cgroups,
    detect,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create cgroups")
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    raw = Path(f"/proc/{pid}/stat").read_text()
    rest = raw[raw.rindex(")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / TICK  # utime + stime


def cpu_share(pid: int, seconds: float = 3.0) -> float:
    """Fraction of one core used by ``pid`` over ``seconds``."""
    before, started = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / (time.monotonic() - started)


@contextlib.contextmanager
def busy_child() -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def check_cap(cg: CgroupBackend, parent_dirs: list[Path]) -> None:
    vm = "vm-" + uuid.uuid4().hex[:8]
    try:
        cg.create(vm)
        with busy_child() as child:
            cg.add_process(vm, child.pid)
            cg.set_cpu_percent(vm, 50)
            capped = cpu_share(child.pid)
            stats = cg.read_cpu_stats(vm)
            cg.set_cpu_percent(vm, None)
            free = cpu_share(child.pid)
            print(f"{cg.mode}: capped at 50% -> {capped:.1%}, uncapped -> {free:.1%}, {stats}")
            assert capped <= 0.60, f"50% cap let the loop use {capped:.1%} of a core"
            assert free > 0.80, f"uncapped loop got only {free:.1%} of a core"
            assert stats.nr_throttled > 0 and stats.usage_usec > 0
        # the child is dead, so its cgroup is empty and removable
        cg.remove(vm)
        assert not cg.path(vm).exists()
    finally:
        with contextlib.suppress(Exception):
            cg.remove(vm, move_strays=True)
        for directory in parent_dirs:
            with contextlib.suppress(FileNotFoundError):
                directory.rmdir()


@pytest.mark.skipif(detect() is not CgroupMode.V1, reason="host cgroups are not v1")
def test_v1_cpu_cap_real() -> None:
    parent = "stoker-test-" + uuid.uuid4().hex[:8]
    cg = V1Cgroups(DEFAULT_ROOT, parent)
    check_cap(cg, [DEFAULT_ROOT / c / parent for c in cg.controllers])


def test_v2_cpu_cap_real() -> None:
    if detect() is CgroupMode.V2:
        parent = "stoker-test-" + uuid.uuid4().hex[:8]
        check_cap(V2Cgroups(DEFAULT_ROOT, parent), [DEFAULT_ROOT / parent])
        return
    mountpoint = Path(tempfile.mkdtemp(prefix="stoker-cg2-"))
    try:
        mounted = subprocess.run(
            ["mount", "-t", "cgroup2", "none", str(mountpoint)], capture_output=True, text=True
        )
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount cgroup2 on this host: {mounted.stderr.strip()}")
        try:
            available = (mountpoint / "cgroup.controllers").read_text().split()
            if "cpu" not in available:
                pytest.skip(
                    "cpu controller not available on cgroup v2 here: it is bound to the v1 "
                    f"hierarchy (v2 cgroup.controllers: {' '.join(available) or 'empty'})"
                )
            parent = "stoker-test-" + uuid.uuid4().hex[:8]
            try:
                check_cap(V2Cgroups(mountpoint, parent), [mountpoint / parent])
            except ControllerUnavailable as exc:
                pytest.skip(f"cgroup v2 controllers unavailable: {exc}")
        finally:
            subprocess.run(["umount", str(mountpoint)], check=False)
    finally:
        mountpoint.rmdir()
