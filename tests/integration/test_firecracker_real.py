"""A real Firecracker guest: boot, graceful and forced stop, pause, snapshot, restore.

Runs only where Firecracker can: ``STOKER_FIRECRACKER_BIN`` names a Firecracker executable
(the only place these tests take it from: never PATH, never a config file) and KVM really
runs guests (``stoker.host.kvm.cached_probe``; /dev/kvm alone is not enough). The guest
is ``STOKER_FC_KERNEL`` (an uncompressed vmlinux on x86_64) with ``STOKER_FC_INITRD``
and/or ``STOKER_FC_ROOTFS`` (a raw image); ``STOKER_FC_READY_MARKER`` is an optional
console line meaning "ready". Elsewhere every test is skipped, the reason naming what is
missing.
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
from stoker.drivers.firecracker.driver import FirecrackerDriver, FirecrackerOptions, FirecrackerVMM

pytestmark = pytest.mark.integration

BINARY_ENV = "STOKER_FIRECRACKER_BIN"


def _binary_from_env() -> tuple[Path | None, str | None]:
    """The executable ``STOKER_FIRECRACKER_BIN`` names, or why there is none."""
    value = os.environ.get(BINARY_ENV)
    if not value:
        return None, (
            f"{BINARY_ENV} is not set: these tests run the Firecracker binary it names, and "
            "only that one"
        )
    binary = Path(value)
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        return None, f"{BINARY_ENV}={value} is not the path of an executable file"
    return binary.resolve(), None


def _skip_reason() -> str | None:
    binary, missing = _binary_from_env()
    if binary is None:
        # the KVM probe costs a second: only worth it once there is a binary to run
        return f"{missing}; they also need KVM that runs guests (not probed)"
    from stoker.host.kvm import cached_probe

    probe = cached_probe()
    if not probe.usable:
        return f"KVM cannot run guests here, so {BINARY_ENV}={binary} cannot: {probe.reason}"
    if not os.environ.get("STOKER_FC_KERNEL"):
        return "STOKER_FC_KERNEL is not set: no guest kernel (vmlinux) for Firecracker"
    if not (os.environ.get("STOKER_FC_INITRD") or os.environ.get("STOKER_FC_ROOTFS")):
        return "set STOKER_FC_INITRD or STOKER_FC_ROOTFS: no guest userspace for Firecracker"
    return None


@pytest.fixture(scope="module")
def skip_reason() -> str | None:
    return _skip_reason()


@pytest.fixture
def config(skip_reason: str | None) -> FirecrackerOptions:
    """The driver's settings, with the binary from ``STOKER_FIRECRACKER_BIN`` and nowhere else."""
    if skip_reason:
        pytest.skip(skip_reason)
    binary, _ = _binary_from_env()
    assert binary is not None
    return FirecrackerOptions(binary=str(binary))


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


async def _boot(
    config: FirecrackerOptions, spec: VMSpec, paths: VMPaths, vmms: list[FirecrackerVMM]
) -> FirecrackerVMM:
    driver = FirecrackerDriver(config)
    driver.check(spec)
    vmm = await driver.spawn("fc-real", spec, paths)
    vmms.append(vmm)
    await vmm.wait_ready(60)
    return vmm


async def test_boot_and_graceful_stop(
    config: FirecrackerOptions, spec: VMSpec, tmp_path: Path, started: list[FirecrackerVMM]
) -> None:
    vmm = await _boot(config, spec, VMPaths(tmp_path / "vm"), started)
    assert (await vmm.status(5)).running
    await vmm.request_shutdown()
    status = await asyncio.wait_for(asyncio.shield(vmm.exited), spec.stop_timeout_s)
    assert status.code == 0, vmm.exit_reason()


async def test_forced_stop(
    config: FirecrackerOptions, spec: VMSpec, tmp_path: Path, started: list[FirecrackerVMM]
) -> None:
    vmm = await _boot(config, spec, VMPaths(tmp_path / "vm"), started)
    await vmm.kill()
    status = await asyncio.wait_for(asyncio.shield(vmm.exited), 10)
    assert status.signal == 9


async def test_pause_snapshot_restore(
    config: FirecrackerOptions, spec: VMSpec, tmp_path: Path, started: list[FirecrackerVMM]
) -> None:
    paths = VMPaths(tmp_path / "vm")
    vmm = await _boot(config, spec, paths, started)
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

    restored = await FirecrackerDriver(config).restore("fc-real", spec, paths, dest)
    started.append(restored)
    await restored.wait_ready(30)
    assert (await restored.status(5)).status == "Running"
