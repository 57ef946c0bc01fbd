"""Deep verify: run the snapshot in a throwaway VMM and see it come up, never touching the
original VM or its files.

The throwaway gets its own directory (named ``.verify-*`` so the start-up cleanup can kill
and remove one a crash left), qcow2 overlays over the snapshot's disks (so the snapshot is
only read), and user networking without port forwards or TAP (so it cannot clash with the
running VM's addresses or ports).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from pathlib import Path

from stoker.domain.snapshots import SnapshotRecord
from stoker.domain.spec import Network, NetworkMode, VMSpec
from stoker.drivers.base import VMM, BootOptions, DriverError, VMPaths
from stoker.services.snapshots import layout
from stoker.services.snapshots.context import SnapshotContext
from stoker.services.snapshots.files import run_tool


async def deep_verify(ctx: SnapshotContext, snap: SnapshotRecord) -> str:
    """Boot (or resume) the throwaway and kill it; returns what was proven, raises if not."""
    root = Path(snap.path)
    spec = layout.read_spec(root)
    driver = ctx.lifecycle.driver_for(spec)
    work = Path(tempfile.mkdtemp(prefix=layout.VERIFY_PREFIX, dir=root.parent))
    vmm: VMM | None = None
    began = time.monotonic()
    try:
        throwaway = await _throwaway_spec(spec, root, work)
        paths = VMPaths(work)
        # the throwaway boots from the snapshot's own copies (overlays over them), which lie
        # in the VM's directory, outside every image pool; it runs as the VM's own uid
        vm = ctx.lifecycle.directory.find(snap.vm_id)
        identity = (
            ctx.lifecycle.identities.identity(vm) if vm and ctx.lifecycle.identities else None
        )
        boot = BootOptions(identity=identity, private_dirs=(root, work))
        settle_s = ctx.config.deep_verify_settle_s
        timeout = ctx.config.deep_verify_timeout_s
        async with asyncio.timeout(timeout):
            if snap.with_memory:
                vmm = await driver.restore(
                    f"verify-{snap.id}", throwaway, paths, root / layout.MEMORY, boot
                )
                ready = time.monotonic() - began
                await _stays_running(vmm, settle_s)
                return (
                    f"throwaway VM resumed from memory in {ready:.2f} s and kept running "
                    f"for {settle_s:g} s"
                )
            vmm = await driver.spawn(f"verify-{snap.id}", throwaway, paths, boot)
            await vmm.wait_ready(min(throwaway.boot_timeout_s, timeout))
            took = time.monotonic() - began
            return f"throwaway VM booted from the disks to ready in {took:.2f} s"
    finally:
        if vmm is not None:
            await _dispose(vmm)
        await asyncio.to_thread(shutil.rmtree, work, True)


async def _throwaway_spec(spec: VMSpec, root: Path, work: Path) -> VMSpec:
    """The snapshot's spec with overlay drives in ``work`` and no forwards or TAP."""
    drives = []
    for index, drive in enumerate(spec.drives):
        overlay = work / f"vd{index}.qcow2"
        backing = root / layout.disk_name(index, drive.format)
        argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", drive.format.value]
        done = await asyncio.to_thread(run_tool, [*argv, "-b", str(backing), str(overlay)])
        if done.returncode != 0:
            raise OSError(f"qemu-img create overlay failed: {done.stderr.strip()}")
        drives.append(drive.model_copy(update={"path": str(overlay), "format": "qcow2"}))
    net = spec.network
    if net.mode != NetworkMode.NONE:
        net = Network(mode=NetworkMode.USER, mac=net.mac)
    return spec.model_copy(update={"drives": drives, "network": net})


async def _stays_running(vmm: VMM, settle_s: float) -> None:
    deadline = time.monotonic() + settle_s
    while True:
        status = await vmm.status(2.0)
        if not status.running:
            raise DriverError(f"the restored throwaway VM is {status.status}, not running")
        if time.monotonic() >= deadline:
            return
        await asyncio.sleep(0.1)


async def _dispose(vmm: VMM) -> None:
    """Kill the throwaway and reap its process, so nothing of it outlives the verify."""
    await vmm.kill()
    child = vmm.child
    if child is not None:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(child.wait, 10)
    await vmm.close()
