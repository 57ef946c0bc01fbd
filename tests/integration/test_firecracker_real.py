"""A real Firecracker guest: boot, graceful and forced stop, pause, snapshot, restore.

Runs only where Firecracker can: ``STOKER_FIRECRACKER_BIN`` names a binary and KVM really
runs guests (``stoker.host.kvm.cached_probe``; /dev/kvm alone is not enough). The guest
is ``STOKER_FC_KERNEL`` (an uncompressed vmlinux on x86_64) with ``STOKER_FC_INITRD``
and/or ``STOKER_FC_ROOTFS`` (a raw image); ``STOKER_FC_READY_MARKER`` is an optional
console line meaning "ready". Elsewhere every test is skipped with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from stoker.domain.spec import VMSpec
from stoker.drivers.base import VMPaths
from stoker.drivers.firecracker.driver import FirecrackerConfig, FirecrackerDriver, FirecrackerVMM

pytestmark = pytest.mark.integration


def _skip_reason() -> str | None:
    binary = os.environ.get("STOKER_FIRECRACKER_BIN")
    if not binary:
        return "STOKER_FIRECRACKER_BIN is not set: no Firecracker binary on this machine"
    if not os.access(binary, os.X_OK):
        return f"STOKER_FIRECRACKER_BIN={binary} is not an executable file"
    from stoker.host.kvm import cached_probe

    probe = cached_probe()
    if not probe.usable:
        return f"KVM cannot run guests here: {probe.reason}"
    if not os.environ.get("STOKER_FC_KERNEL"):
        return "STOKER_FC_KERNEL is not set: no guest kernel (vmlinux) for Firecracker"
    if not (os.environ.get("STOKER_FC_INITRD") or os.environ.get("STOKER_FC_ROOTFS")):
        return "set STOKER_FC_INITRD or STOKER_FC_ROOTFS: no guest userspace for Firecracker"
    return None


@pytest.fixture(scope="module")
def skip_reason() -> str | None:
    return _skip_reason()


@pytest.fixture
def spec(skip_reason: str | None) -> VMSpec:
    if skip_reason:
        pytest.skip(skip_reason)
    fields: dict[str, Any] = {
        "name": "fc-real",
        "vcpus": 1,
        "memory_mib": 128,
        "kernel": os.environ["STOKER_FC_KERNEL"],
        "cmdline": "console=ttyS0 pci=off",
        "hypervisor": "firecracker",
        "accel": "kvm",
        "ready_marker": os.environ.get("STOKER_FC_READY_MARKER") or None,
    }
    if os.environ.get("STOKER_FC_INITRD"):
        fields["initrd"] = os.environ["STOKER_FC_INITRD"]
    if os.environ.get("STOKER_FC_ROOTFS"):
        fields["drives"] = [{"path": os.environ["STOKER_FC_ROOTFS"], "read_only": True}]
    return VMSpec.model_validate(fields)


@pytest.fixture
async def started() -> AsyncIterator[list[FirecrackerVMM]]:
    vmms: list[FirecrackerVMM] = []
    yield vmms
    for vmm in vmms:
        await vmm.kill()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(vmm.exited), 5)
        await vmm.close()


async def _boot(spec: VMSpec, paths: VMPaths, vmms: list[FirecrackerVMM]) -> FirecrackerVMM:
    driver = FirecrackerDriver(FirecrackerConfig())
    driver.check(spec)
    vmm = await driver.spawn("fc-real", spec, paths)
    vmms.append(vmm)
    await vmm.wait_ready(60)
    return vmm


async def test_boot_and_graceful_stop(
    spec: VMSpec, tmp_path: Path, started: list[FirecrackerVMM]
) -> None:
    vmm = await _boot(spec, VMPaths(tmp_path / "vm"), started)
    assert (await vmm.status(5)).running
    await vmm.request_shutdown()
    status = await asyncio.wait_for(asyncio.shield(vmm.exited), spec.stop_timeout_s)
    assert status.code == 0, vmm.exit_reason()


async def test_forced_stop(spec: VMSpec, tmp_path: Path, started: list[FirecrackerVMM]) -> None:
    vmm = await _boot(spec, VMPaths(tmp_path / "vm"), started)
    await vmm.kill()
    status = await asyncio.wait_for(asyncio.shield(vmm.exited), 10)
    assert status.signal == 9


async def test_pause_snapshot_restore(
    spec: VMSpec, tmp_path: Path, started: list[FirecrackerVMM]
) -> None:
    paths = VMPaths(tmp_path / "vm")
    vmm = await _boot(spec, paths, started)
    await vmm.pause()
    assert (await vmm.status(5)).status == "Paused"
    dest = paths.snapshots / "s1"
    await vmm.save_state(dest)
    assert (dest / "vmstate").stat().st_size > 0
    assert (dest / "memory").stat().st_size >= spec.memory_mib * 1024 * 1024
    await vmm.resume()
    assert (await vmm.status(5)).running
    await vmm.kill()
    await asyncio.wait_for(asyncio.shield(vmm.exited), 10)

    restored = await FirecrackerDriver(FirecrackerConfig()).restore("fc-real", spec, paths, dest)
    started.append(restored)
    await restored.wait_ready(30)
    assert (await restored.status(5)).status == "Running"
