"""The Firecracker driver against the API specification, through a test double.

Firecracker cannot run here, so these tests prove the driver against the spec instead:

* the driver is pointed at a fake ``firecracker`` executable (a script written to tmp_path)
  that runs ``fc_server.main``: a test double of Firecracker's API that validates every
  body against the spec's schema and enforces the spec's pre-/post-boot rules. So the real
  spawn path (``spawn_detached``, pid and start time, pidfd exit watch, socket polling,
  SIGKILL) runs too, and a failed snapshot load really ends the process;
* API-level rules are also checked with the double served in-process on a socket.

The double is not Firecracker: it only knows what the spec (and FACTS.md) say.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

try:
    import fc_server
except ImportError:  # tests/contract became a package
    from . import fc_server  # type: ignore[no-redef]

import contextlib

from stoker.domain.spec import VMSpec
from stoker.domain.units import disk_rate_limiter, rate_limiter
from stoker.drivers.base import (
    VMM,
    BootFailed,
    BootOptions,
    Driver,
    DriverError,
    IOLimits,
    NetAttachment,
    ProcessRecord,
    Unsupported,
    VMPaths,
)
from stoker.drivers.firecracker.api import ENDPOINTS, FirecrackerAPI, FirecrackerAPIError
from stoker.drivers.firecracker.driver import (
    DISABLED_BUCKET,
    FirecrackerDriver,
    FirecrackerOptions,
    FirecrackerVMM,
    JailerConfig,
)
from stoker.drivers.firecracker.jailer import clean_jail, jail_paths


@pytest.fixture(scope="module", autouse=True)
def specification_present() -> None:
    """Fail every test here, loudly, when the specification is missing: never skip.

    The spec is part of the checkout ``make test`` runs in (``<repo>/../shared/firecracker/``),
    so its absence is a broken setup, and a skipped contract suite would look like a green one.
    """
    if not fc_server.SPEC_PATH.is_file():
        pytest.fail(
            f"Firecracker API specification not found at {fc_server.SPEC_PATH.resolve()}: "
            "the contract suite checks the driver against it. Put firecracker-v1.16.1.yaml "
            "(Firecracker's v1.16.1 API specification) in shared/firecracker/ beside the "
            "repository.",
            pytrace=False,
        )


LIMITS = IOLimits(disk_iops=500, disk_bytes_per_s=20_000_000, net_mbps=100, net_pps=10_000)


@pytest.fixture(scope="module")
def index() -> fc_server.SpecIndex:
    return fc_server.SpecIndex(fc_server.load_spec())


def _script(path: Path, entry: str) -> Path:
    path.parent.mkdir(exist_ok=True)
    path.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"sys.path.insert(0, {str(Path(fc_server.__file__).parent)!r})\n"
        f"from fc_server import {entry}\n"
        f"{entry}()\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def fake_firecracker(tmp_path: Path) -> Path:
    """An executable named firecracker that runs the API double on its --api-sock."""
    return _script(tmp_path / "bin" / "firecracker", "main")


@pytest.fixture
def fake_jailer(tmp_path: Path) -> Path:
    """An executable jailer that checks its arguments and runs the double "in" the jail."""
    return _script(tmp_path / "bin" / "jailer", "jailer_main")


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF" + bytes(60))
    rootfs = tmp_path / "rootfs.ext4"
    rootfs.write_bytes(bytes(4096))
    data = tmp_path / "data.img"
    data.write_bytes(bytes(4096))
    return {"kernel": kernel, "rootfs": rootfs, "data": data}


def make_spec(images: dict[str, Path], **overrides: Any) -> VMSpec:
    fields: dict[str, Any] = {
        "name": "web-1",
        "vcpus": 2,
        "memory_mib": 256,
        "kernel": str(images["kernel"]),
        "cmdline": "console=ttyS0 i8042.nokbd",
        "drives": [
            {"path": str(images["rootfs"])},
            {"path": str(images["data"]), "read_only": True},
        ],
        "network": {"mode": "tap", "tap": "tap-web1", "mac": "06:00:ac:10:00:02"},
        "hypervisor": "firecracker",
        "ready_marker": fc_server.READY_LINE,
    }
    fields.update(overrides)
    return VMSpec.model_validate(fields)


@pytest.fixture
async def make_driver(
    tmp_path: Path, fake_firecracker: Path
) -> AsyncIterator[Callable[..., FirecrackerDriver]]:
    kvm = tmp_path / "kvm"
    kvm.touch()
    made: list[FirecrackerDriver] = []

    def make(**overrides: Any) -> FirecrackerDriver:
        fields: dict[str, Any] = {
            "binary": str(fake_firecracker),
            "kvm_device": kvm,
            "probe_kvm": False,
            "arch": "x86_64",
            "socket_timeout_s": 20.0,
        }
        fields.update(overrides)
        driver = FirecrackerDriver(FirecrackerOptions(**fields))
        made.append(driver)
        return driver

    yield make


@pytest.fixture
async def vmms() -> AsyncIterator[list[FirecrackerVMM]]:
    """Every VMM a test starts; killed and closed afterwards."""
    started: list[FirecrackerVMM] = []
    yield started
    for vmm in started:
        await vmm.kill()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(vmm.exited), 5)
        await vmm.close()


def requests_at(socket: Path, pid: int | None = None) -> list[dict[str, Any]]:
    """What the double serving ``socket`` recorded, optionally for one process only."""
    log = Path(str(socket) + ".requests.jsonl")
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return [r for r in rows if pid is None or r["pid"] == pid]


def requests_of(paths: VMPaths, pid: int | None = None) -> list[dict[str, Any]]:
    return requests_at(paths.control_socket, pid)


def calls(rows: list[dict[str, Any]]) -> list[str]:
    return [f"{r['method']} {r['path']}" for r in rows if r["method"] != "GET"]


def put_bodies(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {r["path"]: r["body"] for r in rows if r["method"] == "PUT"}


async def ended(vmm: FirecrackerVMM) -> Any:
    """Kill the VMM and wait for its exit status."""
    await vmm.kill()
    return await asyncio.wait_for(asyncio.shield(vmm.exited), 10)


@dataclass
class Harness:
    """One test's driver factory, images, VM directory and started VMMs."""

    make_driver: Callable[..., FirecrackerDriver]
    images: dict[str, Path]
    tmp_path: Path
    vmms: list[FirecrackerVMM]

    @property
    def paths(self) -> VMPaths:
        return VMPaths(self.tmp_path / "vm")

    def spec(self, **overrides: Any) -> VMSpec:
        return make_spec(self.images, **overrides)

    async def boot(
        self,
        driver: FirecrackerDriver | None = None,
        spec: VMSpec | None = None,
        limits: IOLimits | None = LIMITS,
    ) -> FirecrackerVMM:
        """Spawn web-1 in ``paths`` with the quota's boot ``limits`` and wait until it is
        ready (killed after the test)."""
        boot = BootOptions(io_limits=limits)
        driver = driver or self.make_driver()
        vmm = await driver.spawn("web-1", spec or self.spec(), self.paths, boot)
        self.vmms.append(vmm)
        await vmm.wait_ready(20)
        return vmm

    def requests(self, pid: int | None = None) -> list[dict[str, Any]]:
        return requests_of(self.paths, pid)


@pytest.fixture
def fc(
    make_driver: Callable[..., FirecrackerDriver],
    images: dict[str, Path],
    tmp_path: Path,
    vmms: list[FirecrackerVMM],
) -> Harness:
    return Harness(make_driver, images, tmp_path, vmms)


# ---------------------------------------------------------------------------- spec coverage


def test_every_endpoint_the_client_uses_is_in_the_spec(index: fc_server.SpecIndex) -> None:
    missing = [(m, p) for m, p in sorted(ENDPOINTS) if not index.has(m, p)]
    assert missing == []


def test_driver_and_handle_satisfy_the_protocols(make_driver: Callable[..., Any]) -> None:
    assert isinstance(make_driver(), Driver)
    assert FirecrackerDriver.name == "firecracker"


# ---------------------------------------------------------------------------- boot


async def test_boot_sequence_order_bodies_and_rate_limiters(
    fc: Harness, index: fc_server.SpecIndex
) -> None:
    vmm = await fc.boot()
    assert isinstance(vmm, VMM)
    rows = fc.requests(vmm.record.pid)
    assert calls(rows) == [
        "PUT /machine-config",
        "PUT /boot-source",
        "PUT /drives/rootfs",
        "PUT /drives/data1",
        "PUT /network-interfaces/eth0",
        "PUT /logger",
        "PUT /metrics",
        "PUT /actions",
    ]
    # every request was valid against the spec and accepted
    assert [r for r in rows if r["status"] >= 400] == []
    assert all(index.has(r["method"], r["template"]) for r in rows)
    bodies = put_bodies(rows)
    assert bodies["/machine-config"]["vcpu_count"] == 2
    assert bodies["/machine-config"]["mem_size_mib"] == 256
    assert bodies["/actions"] == {"action_type": "InstanceStart"}
    args = bodies["/boot-source"]["boot_args"].split()
    assert "reboot=k" in args and "i8042.nokbd" not in args
    root, data = bodies["/drives/rootfs"], bodies["/drives/data1"]
    assert root["is_root_device"] and not data["is_root_device"]
    assert data["is_read_only"] is True
    disk = disk_rate_limiter(20_000_000, 500)
    assert root["rate_limiter"] == disk == data["rate_limiter"]
    assert disk == {
        "bandwidth": {"size": 2_000_000, "refill_time": 100},
        "ops": {"size": 500, "refill_time": 1000},
    }
    nic = bodies["/network-interfaces/eth0"]
    assert nic["host_dev_name"] == "tap-web1" and nic["guest_mac"] == "06:00:ac:10:00:02"
    net = rate_limiter(100, 10_000)
    assert nic["rx_rate_limiter"] == net == nic["tx_rate_limiter"]
    assert net == {
        "bandwidth": {"size": 1_250_000, "refill_time": 100},
        "ops": {"size": 10_000, "refill_time": 1000},
    }
    status = await vmm.status(5)
    assert status.running and status.status == "Running"
    info = await vmm.api.describe_instance()
    assert index.definition_errors("InstanceInfo", info) == []
    assert vmm.record.start_time > 0
    assert fc.paths.pidfile.read_text().strip() == str(vmm.record.pid)


async def test_a_managed_network_nic_is_the_attachment_the_network_service_made(
    fc: Harness, index: fc_server.SpecIndex
) -> None:
    """Firecracker has no user-mode networking: on a managed network its one NIC is the TAP
    and MAC the network service attached (the guest then gets the lease by DHCP)."""
    spec = fc.spec(network={"mode": "managed", "name": "default"})
    attached = NetAttachment(
        tap="stk-0a1b2c3d", mac="06:00:0a:0b:0c:0d", address="10.199.0.7",
        gateway="10.199.0.1", network="default",
    )  # fmt: skip
    boot = BootOptions(io_limits=LIMITS, network=attached)
    vmm = await fc.make_driver().spawn("web-1", spec, fc.paths, boot)
    fc.vmms.append(vmm)
    await vmm.wait_ready(20)
    rows = fc.requests(vmm.record.pid)
    assert [r for r in rows if r["status"] >= 400] == []
    nic = put_bodies(rows)["/network-interfaces/eth0"]
    assert index.definition_errors("NetworkInterface", nic) == []
    assert nic["host_dev_name"] == "stk-0a1b2c3d" and nic["guest_mac"] == "06:00:0a:0b:0c:0d"
    assert nic["rx_rate_limiter"] == rate_limiter(100, 10_000) == nic["tx_rate_limiter"]


async def test_a_managed_network_without_an_attachment_is_refused(fc: Harness) -> None:
    spec = fc.spec(network={"mode": "managed", "name": "default"})
    with pytest.raises(DriverError, match="network"):
        await fc.make_driver().spawn("web-1", spec, fc.paths, BootOptions())


async def test_ready_without_marker_is_api_state_running(fc: Harness) -> None:
    spec = fc.spec(ready_marker=None, network={"mode": "none"}, drives=[])
    vmm = await fc.boot(fc.make_driver(), spec, limits=None)
    rows = fc.requests(vmm.record.pid)
    assert calls(rows) == [
        "PUT /machine-config",
        "PUT /boot-source",
        "PUT /logger",
        "PUT /metrics",
        "PUT /actions",
    ]
    assert any(r["method"] == "GET" and r["path"] == "/" for r in rows)


async def test_stale_socket_is_unlinked_before_spawn(fc: Harness) -> None:
    fc.paths.root.mkdir()
    fc.paths.control_socket.write_text("left over by a dead VMM")
    vmm = await fc.boot()
    assert (await vmm.status(5)).running


async def test_refused_configuration_is_boot_failed_with_fault_message(fc: Harness) -> None:
    spec = fc.spec(kernel=str(fc.tmp_path / "no-such-vmlinux"))
    with pytest.raises(BootFailed, match="kernel file cannot be opened") as caught:
        await fc.make_driver().spawn("web-1", spec, fc.paths, BootOptions())
    cause = caught.value.__cause__
    assert isinstance(cause, FirecrackerAPIError)
    assert cause.status == 400 and cause.method == "PUT" and cause.path == "/boot-source"
    assert "no-such-vmlinux" in cause.fault_message
    pid = fc.requests()[0]["pid"]
    await asyncio.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    assert "PUT /actions" not in calls(fc.requests())


# ---------------------------------------------------------------------------- stop


async def test_send_ctrl_alt_del_ends_a_reboot_k_guest(fc: Harness) -> None:
    vmm = await fc.boot()
    await vmm.request_shutdown()
    status = await asyncio.wait_for(asyncio.shield(vmm.exited), 10)
    assert status.code == 0
    assert "clean exit" in (vmm.exit_reason() or "")
    assert calls(fc.requests(vmm.record.pid))[-1] == "PUT /actions"
    assert fc.requests(vmm.record.pid)[-1]["body"] == {"action_type": "SendCtrlAltDel"}


async def test_graceful_stop_is_not_supported_off_x86(fc: Harness) -> None:
    vmm = await fc.boot(fc.make_driver(arch="aarch64"))
    with pytest.raises(Unsupported, match="kill"):
        await vmm.request_shutdown()
    assert "SendCtrlAltDel" not in json.dumps(fc.requests())


async def test_kill_is_sigkill(fc: Harness) -> None:
    vmm = await fc.boot()
    status = await ended(vmm)
    assert status.signal == 9
    assert vmm.exit_reason() == "Firecracker killed by SIGKILL"


# ---------------------------------------------------------------------------- live changes


async def test_live_patch_limits_then_remove_them(fc: Harness) -> None:
    vmm = await fc.boot(fc.make_driver(), limits=None)
    await vmm.apply_io_limits(IOLimits(disk_iops=200, net_mbps=1))
    await vmm.apply_io_limits(IOLimits())
    rows = fc.requests(vmm.record.pid)
    patches = [r for r in rows if r["method"] == "PATCH"]
    assert [r["status"] for r in patches] == [204] * 6
    assert [r["path"] for r in patches] == [
        "/drives/rootfs",
        "/drives/data1",
        "/network-interfaces/eth0",
    ] * 2
    assert patches[0]["body"] == {
        "drive_id": "rootfs",
        "rate_limiter": {"bandwidth": DISABLED_BUCKET, "ops": {"size": 200, "refill_time": 1000}},
    }
    # at least one frame (65,562 bytes); the refill time grows so the rate stays 1 Mbps
    one_mbps = {"size": 65_625, "refill_time": 525}
    assert patches[2]["body"]["rx_rate_limiter"] == {"bandwidth": one_mbps, "ops": DISABLED_BUCKET}
    assert patches[2]["body"]["tx_rate_limiter"] == patches[2]["body"]["rx_rate_limiter"]
    off = {"bandwidth": DISABLED_BUCKET, "ops": DISABLED_BUCKET}
    assert patches[3]["body"]["rate_limiter"] == off
    assert patches[5]["body"]["rx_rate_limiter"] == off


async def test_stats_accumulate_flushed_deltas(fc: Harness) -> None:
    vmm = await fc.boot()
    await vmm.stats()
    stats = await vmm.stats()
    assert [d.device for d in stats.disks] == ["data1", "rootfs"]
    for d in stats.disks:
        assert (d.read_bytes, d.write_bytes, d.read_ops, d.write_ops) == (8192, 2048, 4, 2)
    assert (stats.net_rx_bytes, stats.net_tx_bytes) == (3000, 1400)


# ---------------------------------------------------------------------------- snapshots


async def test_pause_snapshot_resume(fc: Harness) -> None:
    vmm = await fc.boot()
    dest = fc.paths.snapshots / "s1"
    with pytest.raises(DriverError, match="paused"):
        await vmm.save_state(dest)
    with pytest.raises(FirecrackerAPIError, match="must be paused") as caught:
        await vmm.api.snapshot_create(str(fc.tmp_path / "x"), str(fc.tmp_path / "y"))
    assert caught.value.status == 400
    await vmm.pause()
    assert (await vmm.status(5)).status == "Paused"
    await vmm.save_state(dest)
    assert (dest / "vmstate").is_file()
    assert (dest / "memory").stat().st_size == 256 * 1024 * 1024
    with pytest.raises(Unsupported, match="track_dirty_pages"):
        await vmm.save_state(dest, snapshot_type="Diff")
    await vmm.resume()
    assert (await vmm.status(5)).running
    creates = [r for r in fc.requests(vmm.record.pid) if r["path"] == "/snapshot/create"]
    assert [r["status"] for r in creates] == [400, 204]
    assert creates[1]["body"] == {
        "snapshot_path": str(dest / "vmstate"),
        "mem_file_path": str(dest / "memory"),
        "snapshot_type": "Full",
    }


async def test_diff_snapshot_with_dirty_page_tracking(fc: Harness) -> None:
    vmm = await fc.boot(fc.make_driver(track_dirty_pages=True))
    await vmm.pause()
    await vmm.save_state(fc.paths.snapshots / "d1", snapshot_type="Diff")
    rows = fc.requests(vmm.record.pid)
    assert put_bodies(rows)["/machine-config"]["track_dirty_pages"] is True
    assert [r["body"]["snapshot_type"] for r in rows if r["path"] == "/snapshot/create"] == ["Diff"]


async def test_restore_loads_the_snapshot_on_a_fresh_process(fc: Harness) -> None:
    driver, paths, spec = fc.make_driver(), fc.paths, fc.spec()
    first = await fc.boot(driver, spec)
    await first.pause()
    await first.save_state(paths.snapshots / "s1")
    await ended(first)

    restored = await driver.restore("web-1", spec, paths, paths.snapshots / "s1", BootOptions())
    fc.vmms.append(restored)
    assert restored.record.pid != first.record.pid
    await restored.wait_ready(10)  # a restored guest prints no marker: API state decides
    assert (await restored.status(5)).status == "Running"
    rows = requests_of(paths, restored.record.pid)
    assert calls(rows) == ["PUT /logger", "PUT /metrics", "PUT /snapshot/load"]
    load = next(r["body"] for r in rows if r["path"] == "/snapshot/load")
    assert load == {
        "snapshot_path": str(paths.snapshots / "s1" / "vmstate"),
        "mem_backend": {
            "backend_type": "File",
            "backend_path": str(paths.snapshots / "s1" / "memory"),
        },
        "resume_vm": True,
        "track_dirty_pages": False,
        "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap-web1"}],
        "clock_realtime": True,  # x86_64: the guest's kvmclock is advanced to now
    }
    # the restored VM keeps its drives, so live limits still work
    await restored.apply_io_limits(LIMITS)


async def test_failed_snapshot_load_ends_the_process_and_says_so(fc: Harness) -> None:
    state = fc.tmp_path / "bad-snapshot"
    state.mkdir()
    (state / "vmstate").write_text("not a snapshot")
    (state / "memory").write_bytes(bytes(16))
    with pytest.raises(BootFailed) as caught:
        await fc.make_driver().restore("web-1", fc.spec(), fc.paths, state, BootOptions())
    message = str(caught.value)
    assert "snapshot load" in message and "Load snapshot error" in message
    assert "exited with code 1" in message
    assert isinstance(caught.value.__cause__, FirecrackerAPIError)


async def test_restore_without_snapshot_files_is_refused_early(fc: Harness) -> None:
    with pytest.raises(DriverError, match="vmstate is missing"):
        await fc.make_driver().restore(
            "web-1", fc.spec(), fc.paths, fc.tmp_path / "nothing", BootOptions()
        )
    assert fc.requests() == []


# ---------------------------------------------------------------------------- adopt


async def test_adopt_checks_identity(fc: Harness) -> None:
    driver, paths, spec = fc.make_driver(), fc.paths, fc.spec()
    vmm = await fc.boot(driver, spec)
    again = await driver.adopt(spec, paths, vmm.record)
    try:
        assert (await again.status(5)).running
        assert again.child is None
    finally:
        await again.close()
    wrong = ProcessRecord(**{**vmm.record.__dict__, "start_time": vmm.record.start_time + 1})
    with pytest.raises(DriverError, match="no longer"):
        await driver.adopt(spec, paths, wrong)


# ---------------------------------------------------------------------------- API rules


@pytest.fixture
async def served(
    tmp_path: Path, index: fc_server.SpecIndex
) -> AsyncIterator[tuple[fc_server.FirecrackerDouble, FirecrackerAPI]]:
    """The double in this event loop, and a client on its socket."""
    double = fc_server.FirecrackerDouble(index, vm_id="t")
    sock = tmp_path / "api.sock"
    server = await fc_server.start(double, sock)
    api = FirecrackerAPI(sock)
    try:
        await api.wait_socket()
        yield double, api
    finally:
        await api.aclose()
        server.close()
        await server.wait_closed()


async def test_schema_violation_is_400_with_fault_message(
    served: tuple[fc_server.FirecrackerDouble, FirecrackerAPI],
) -> None:
    _, api = served
    with pytest.raises(FirecrackerAPIError) as caught:
        await api.put_machine_config(vcpu_count=0, mem_size_mib=128)
    err = caught.value
    assert (err.status, err.method, err.path) == (400, "PUT", "/machine-config")
    assert "vcpu_count" in err.fault_message and "minimum" in err.fault_message


async def test_unknown_fields_are_refused_like_firecracker(
    served: tuple[fc_server.FirecrackerDouble, FirecrackerAPI], images: dict[str, Path]
) -> None:
    _, api = served
    body = {
        "drive_id": "rootfs",
        "path_on_host": str(images["rootfs"]),
        "is_root_device": True,
        "is_read_only": False,
        "rate_limiter": {"bandwidth_mbps": 100},
    }
    with pytest.raises(FirecrackerAPIError, match="bandwidth_mbps"):
        await api.request("PUT", "/drives/rootfs", body)


async def test_pre_and_post_boot_rules(
    served: tuple[fc_server.FirecrackerDouble, FirecrackerAPI], images: dict[str, Path]
) -> None:
    double, api = served
    with pytest.raises(FirecrackerAPIError, match="before starting"):
        await api.patch_drive("rootfs", rate_limiter={"ops": {"size": 1, "refill_time": 1000}})
    with pytest.raises(FirecrackerAPIError, match="before starting"):
        await api.pause()
    with pytest.raises(FirecrackerAPIError, match="without kernel"):
        await api.instance_start()
    await api.put_machine_config(1, 128)
    await api.put_boot_source(str(images["kernel"]), "console=ttyS0 reboot=k")
    await api.put_drive("rootfs", str(images["rootfs"]), is_root_device=True)
    with pytest.raises(FirecrackerAPIError, match="id from the path"):
        await api.request(
            "PUT", "/drives/a", {"drive_id": "b", "is_root_device": False, "path_on_host": "/x"}
        )
    with pytest.raises(FirecrackerAPIError, match="root block device already exists"):
        await api.put_drive("other", str(images["data"]), is_root_device=True)
    with pytest.raises(FirecrackerAPIError, match="Loading a microVM snapshot not allowed"):
        await api.snapshot_load(str(images["rootfs"]), str(images["data"]))
    await api.instance_start()
    assert (await api.describe_instance())["state"] == "Running"
    with pytest.raises(FirecrackerAPIError, match="after starting"):
        await api.instance_start()
    for late in (
        api.put_machine_config(2, 256),
        api.put_boot_source(str(images["kernel"])),
        api.put_drive("data", str(images["data"]), is_root_device=False),
        api.put_network_interface("eth0", "tap0"),
    ):
        with pytest.raises(FirecrackerAPIError, match="after starting"):
            await late
    await api.patch_drive("rootfs", rate_limiter={"ops": {"size": 100, "refill_time": 1000}})
    assert double.drives["rootfs"]["rate_limiter"]["ops"]["size"] == 100
    with pytest.raises(FirecrackerAPIError, match="Invalid block device ID"):
        await api.patch_drive("nope", rate_limiter={"ops": {"size": 1, "refill_time": 1000}})
    with pytest.raises(FirecrackerAPIError, match="not initialized"):
        await api.flush_metrics()
    assert (await api.get_machine_config())["vcpu_count"] == 1


async def test_snapshot_load_needs_exactly_one_memory_source(
    served: tuple[fc_server.FirecrackerDouble, FirecrackerAPI],
) -> None:
    double, api = served
    with pytest.raises(FirecrackerAPIError, match="Exactly one"):
        await api.request(
            "PUT",
            "/snapshot/load",
            {
                "snapshot_path": "/s",
                "mem_file_path": "/m",
                "mem_backend": {"backend_type": "File", "backend_path": "/m"},
            },
        )
    assert double.exit_code is None  # refused before loading: the process lives on


def test_double_answers_only_spec_paths(index: fc_server.SpecIndex) -> None:
    double = fc_server.FirecrackerDouble(index)
    status, body = double.handle("PUT", "/no-such-thing", b"{}")
    assert status == 400 and "Invalid request" in body["fault_message"]
    status, body = double.handle("DELETE", "/drives/x", b"")
    assert status == 400


@pytest.mark.parametrize("env_set", [False, True])
def test_binary_from_environment(
    monkeypatch: pytest.MonkeyPatch, fake_firecracker: Path, env_set: bool, tmp_path: Path
) -> None:
    from stoker.drivers.firecracker.driver import resolve_binary

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    if env_set:
        monkeypatch.setenv("STOKER_FIRECRACKER_BIN", str(fake_firecracker))
        assert resolve_binary(None) == str(fake_firecracker)
    else:
        monkeypatch.delenv("STOKER_FIRECRACKER_BIN", raising=False)
        assert resolve_binary(None) is None
    assert os.access(fake_firecracker, os.X_OK)


# ---------------------------------------------------------------------------- jailer


async def test_jailed_vm_uses_in_jail_paths_end_to_end(
    fc: Harness, fake_jailer: Path, fake_firecracker: Path
) -> None:
    # a Unix socket path has at most 107 bytes: tmp_path is too deep for the jail's socket
    base = Path(tempfile.mkdtemp(prefix="fcj", dir="/tmp"))
    jailer = JailerConfig(
        uid=os.getuid(),
        gid=os.getgid(),
        binary=str(fake_jailer),
        chroot_base=base,
        cgroup_version=2,
        cpu_percent=100,
        memory_overhead_mib=64,
        parent_cgroup="stoker",
    )
    driver, paths, spec = fc.make_driver(jailer=jailer), fc.paths, fc.spec()
    vmm = await fc.boot(driver, spec)
    jail = jail_paths(base, fake_firecracker, "web-1")
    assert vmm.record.control_socket == str(jail.api_socket)
    argv = json.loads((jail.root / "jailer-argv.json").read_text())
    assert argv[argv.index("--cgroup-version") + 1] == "2"
    assert "cpu.max=100000 100000" in argv and f"memory.max={320 * 1024 * 1024}" in argv
    assert argv[argv.index("--") + 1 :] == ["--api-sock", "/run/firecracker.socket"]
    bodies = put_bodies(requests_at(jail.api_socket))
    assert bodies["/boot-source"]["kernel_image_path"] == "/vmlinux"
    assert bodies["/drives/rootfs"]["path_on_host"] == "/rootfs"
    assert bodies["/drives/data1"]["path_on_host"] == "/data1"
    assert bodies["/logger"]["log_path"] == "/vmm.log"
    assert bodies["/metrics"]["metrics_path"] == "/metrics.jsonl"
    assert (await vmm.stats()).disks[0].read_bytes == fc_server.FLUSH_BLOCK["read_bytes"]

    await vmm.pause()
    dest = paths.snapshots / "s1"
    await vmm.save_state(dest)
    assert (dest / "vmstate").is_file() and (dest / "memory").is_file()
    await ended(vmm)

    restored = await driver.restore("web-1", spec, paths, dest, BootOptions())
    fc.vmms.append(restored)
    assert (await restored.status(5)).running
    rows = requests_at(jail.api_socket)
    load = next(r["body"] for r in rows if r["path"] == "/snapshot/load" and r["status"] == 204)
    assert load["snapshot_path"] == "/vmstate"
    assert load["mem_backend"]["backend_path"] == "/memory"
    await ended(restored)
    clean_jail(jail)
    assert not jail.base.exists()
    shutil.rmtree(base)
    assert fc.images["rootfs"].is_file() and (dest / "vmstate").is_file()


async def test_too_long_socket_path_is_refused_clearly(
    make_driver: Callable[..., FirecrackerDriver], images: dict[str, Path], tmp_path: Path
) -> None:
    paths = VMPaths(tmp_path / ("d" * 120))
    with pytest.raises(DriverError, match="longer than the 107 bytes"):
        await make_driver().spawn("web-1", make_spec(images), paths, BootOptions())


async def test_a_warm_start_loads_paused_verifies_then_resumes(fc: Harness) -> None:
    """The lifecycle's warm start on Firecracker: the first boot is cold and saved at the
    ready point (pause, /snapshot/create, resume), the next start loads that snapshot with
    ``resume_vm`` false, checks its checksum, then resumes it (PATCH /vm Resumed)."""
    from stoker.domain.events import EventType
    from stoker.services.directory import VMDirectory
    from stoker.services.events import EventBus
    from stoker.services.lifecycle import Lifecycle
    from stoker.services.warmstart import WarmStartConfig, WarmStarts
    from stoker.store.db import Database
    from stoker.store.events import EventStore
    from stoker.store.vms import VMStore

    db = Database(fc.tmp_path / "stoker.db")
    events = EventBus(EventStore(db))
    directory = VMDirectory(VMStore(db), fc.tmp_path / "data")
    driver = fc.make_driver()
    warm = WarmStarts(directory, events, WarmStartConfig(), lambda spec: "1.16.1")
    lifecycle = Lifecycle(
        directory, events, {"firecracker": driver}, ready_observers=[warm], warm=warm
    )
    spec = fc.spec(
        warm_start=True,
        drives=[{"path": str(fc.images["rootfs"]), "read_only": True}],
    )
    try:
        vm = await lifecycle.create(spec)
        await lifecycle.start(vm.id)
        assert (await lifecycle.wait_settled(vm.id, 20)).state.value == "running"
        for _ in range(200):
            if warm.current(vm.id) is not None:
                break
            await asyncio.sleep(0.05)
        saved = warm.current(vm.id)
        assert saved is not None and (saved.state / "vmstate").is_file()
        await lifecycle.stop(vm.id, graceful=False)

        await lifecycle.start(vm.id)
        vm_now = await lifecycle.wait_settled(vm.id, 20)
        assert vm_now.state.value == "running", vm_now.state_reason
        assert vm_now.process is not None
        rows = requests_at(directory.paths(vm.id).control_socket, vm_now.process.pid)
        assert calls(rows)[-2:] == ["PUT /snapshot/load", "PATCH /vm"]
        load = put_bodies(rows)["/snapshot/load"]
        assert load["resume_vm"] is False and load["clock_realtime"] is True
        assert [r["body"] for r in rows if r["method"] == "PATCH"] == [{"state": "Resumed"}]
        kinds = [e.type for e in events.store.query(vm_id=vm.id, limit=100)]
        assert EventType.VM_WARM_START in kinds
        assert EventType.VM_GUEST_CLOCK not in kinds, "kvmclock was advanced by the load"
    finally:
        await lifecycle.stop(vm.id, graceful=False)
        await lifecycle.shutdown()
        await events.drain()
        db.close()
