"""Pure parts of the Firecracker driver: buckets, jailer command lines, exit codes, metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from stoker.domain.spec import VMSpec
from stoker.domain.units import mbps_to_bucket, pps_to_bucket, rate_limiter
from stoker.drivers.base import DriverUnavailable, Unsupported
from stoker.drivers.firecracker import exitcodes
from stoker.drivers.firecracker.driver import (
    DISABLED_BUCKET,
    MISSING_BINARY,
    FirecrackerDriver,
    FirecrackerOptions,
    MetricsAccumulator,
    boot_args,
    drive_layout,
    full_limiter,
)
from stoker.drivers.firecracker.jailer import (
    cgroup_args,
    cgroup_dirs,
    clean_jail,
    jail_paths,
    jailer_argv,
    link_into_jail,
    prepare_jail,
)

# ---------------------------------------------------------------------------- rate limiters


def test_one_mbps_bucket_holds_a_frame_and_keeps_the_rate() -> None:
    bucket = mbps_to_bucket(1)
    assert bucket.size >= 65_562  # one full frame, or Firecracker cannot send it
    assert bucket.rate_per_s == pytest.approx(125_000, rel=0.01)


def test_hundred_mbps_at_100_ms_is_1_25_million_bytes() -> None:
    assert mbps_to_bucket(100).to_api() == {"size": 1_250_000, "refill_time": 100}


def test_ten_thousand_pps_at_one_second_is_ten_thousand_ops() -> None:
    assert pps_to_bucket(10_000).to_api() == {"size": 10_000, "refill_time": 1000}


def test_rate_limiter_body_and_live_patch_form() -> None:
    assert rate_limiter(None, None) is None
    body = rate_limiter(100, None)
    assert body == {"bandwidth": {"size": 1_250_000, "refill_time": 100}}
    # a PATCH without "ops" would leave an old ops limit in place: send it disabled
    assert full_limiter(body) == {
        "bandwidth": {"size": 1_250_000, "refill_time": 100},
        "ops": DISABLED_BUCKET,
    }
    assert full_limiter(None) == {"bandwidth": DISABLED_BUCKET, "ops": DISABLED_BUCKET}


# ---------------------------------------------------------------------------- jailer


def test_jailer_argv_cgroup_v1() -> None:
    argv = jailer_argv(
        jailer="/usr/bin/jailer",
        exec_file="/usr/bin/firecracker",
        vm_id="web-1",
        uid=1000,
        gid=1000,
        firecracker_args=["--api-sock", "/run/firecracker.socket"],
        cpu_percent=150,
        memory_bytes=400 * 1024 * 1024,
        parent_cgroup="stoker",
        netns="/var/run/netns/web-1",
        new_pid_ns=True,
    )
    assert argv == [
        "/usr/bin/jailer",
        "--id", "web-1",
        "--exec-file", "/usr/bin/firecracker",
        "--uid", "1000",
        "--gid", "1000",
        "--chroot-base-dir", "/srv/jailer",
        "--cgroup", "cpu.cfs_period_us=100000",
        "--cgroup", "cpu.cfs_quota_us=150000",
        "--cgroup", "memory.limit_in_bytes=419430400",
        "--parent-cgroup", "stoker",
        "--netns", "/var/run/netns/web-1",
        "--new-pid-ns",
        "--",
        "--api-sock", "/run/firecracker.socket",
    ]  # fmt: skip


def test_jailer_argv_cgroup_v2() -> None:
    argv = jailer_argv(
        jailer="jailer",
        exec_file="/opt/fc/firecracker-v1.16.1",
        vm_id="db",
        uid=123,
        gid=456,
        firecracker_args=["--api-sock", "/run/firecracker.socket"],
        chroot_base=Path("/var/lib/jail"),
        cgroup_version=2,
        cpu_percent=200,
        memory_bytes=300 * 1024 * 1024,
        cgroups={"cpuset.cpus": "0-1"},
        daemonize=True,
    )
    assert argv == [
        "jailer",
        "--id", "db",
        "--exec-file", "/opt/fc/firecracker-v1.16.1",
        "--uid", "123",
        "--gid", "456",
        "--chroot-base-dir", "/var/lib/jail",
        "--cgroup-version", "2",
        "--cgroup", "cpu.max=200000 100000",
        "--cgroup", "memory.max=314572800",
        "--cgroup", "cpuset.cpus=0-1",
        "--daemonize",
        "--",
        "--api-sock", "/run/firecracker.socket",
    ]  # fmt: skip


def test_jailer_refuses_what_the_jailer_would() -> None:
    with pytest.raises(ValueError, match="firecracker"):
        jailer_argv(jailer="j", exec_file="/bin/qemu", vm_id="a", uid=1, gid=1, firecracker_args=[])
    with pytest.raises(ValueError, match="--id"):
        jailer_argv(
            jailer="j",
            exec_file="/bin/firecracker",
            vm_id="a",
            uid=1,
            gid=1,
            firecracker_args=["--id", "a"],
        )
    with pytest.raises(ValueError, match="1 or 2"):
        cgroup_args(3)
    with pytest.raises(ValueError, match="controller"):
        cgroup_args(2, extra={"weight": "5"})


def test_jail_layout_copy_and_clean(tmp_path: Path) -> None:
    jail = jail_paths(tmp_path / "jailer", "/usr/bin/firecracker", "web-1")
    assert jail.root == tmp_path / "jailer" / "firecracker" / "web-1" / "root"
    assert jail.api_socket == jail.root / "run" / "firecracker.socket"
    assert jail.pidfile == jail.root / "firecracker.pid"
    prepare_jail(jail, 0, 0)
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"kernel")
    assert link_into_jail(kernel, jail, "vmlinux", 0, 0) == "/vmlinux"
    # a copy, never the original inode: the jail's owner change must not reach the original
    assert (jail.root / "vmlinux").stat().st_ino != kernel.stat().st_ino
    assert (jail.root / "vmlinux").read_bytes() == b"kernel"
    with pytest.raises(ValueError):
        link_into_jail(kernel, jail, "../escape", 0, 0)
    clean_jail(jail)
    assert not jail.base.exists()
    assert kernel.read_bytes() == b"kernel"  # the original survives


def test_cgroup_dirs_per_version() -> None:
    root = Path("/sys/fs/cgroup")
    assert cgroup_dirs(2, "a", "fc") == [root / "fc" / "a"]
    assert cgroup_dirs(1, "a", "fc") == [root / "cpu" / "fc" / "a", root / "memory" / "fc" / "a"]


# ---------------------------------------------------------------------------- exit codes


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (0, "clean exit"),
        (1, "generic error"),
        (148, "seccomp"),
        (149, "SIGBUS"),
        (150, "SIGSEGV"),
        (151, "SIGXFSZ"),
        (152, "bad configuration"),
        (153, "bad command-line arguments"),
        (154, "SIGXCPU"),
        (155, "SIGPIPE"),
        (156, "SIGHUP"),
        (157, "SIGILL"),
        (42, "not a documented"),
    ],
)
def test_exit_code_reasons(code: int, words: str) -> None:
    reason = exitcodes.exit_reason(code)
    assert f"code {code}" in reason and words in reason


def test_exit_by_signal_and_unknown() -> None:
    assert exitcodes.exit_reason(None, 9) == "Firecracker killed by SIGKILL"
    assert "unknown" in exitcodes.exit_reason(None)
    assert exitcodes.is_clean(0) and not exitcodes.is_clean(152) and not exitcodes.is_clean(None)


# ---------------------------------------------------------------------------- metrics


def _line(read: int, written: int, rx: int, tx: int) -> str:
    return json.dumps(
        {
            "utc_timestamp_ms": 1,
            "block_rootfs": {"read_bytes": read, "write_bytes": written, "read_count": 1,
                             "write_count": 2, "read_agg": {"min_us": 3}},
            "block": {"read_bytes": read, "write_bytes": written, "read_count": 1,
                      "write_count": 2},
            "net_eth0": {"rx_bytes_count": rx, "tx_bytes_count": tx},
            "net": {"rx_bytes_count": rx, "tx_bytes_count": tx},
        }
    )  # fmt: skip


def test_metrics_deltas_are_summed_not_taken_as_totals() -> None:
    acc = MetricsAccumulator()
    for line in (_line(100, 10, 5, 6), _line(50, 0, 1, 1), "", "not json"):
        acc.feed_line(line)
    stats = acc.stats()
    (disk,) = stats.disks  # per-device sections win over the aggregate: no double count
    assert (disk.device, disk.read_bytes, disk.write_bytes) == ("rootfs", 150, 10)
    assert (disk.read_ops, disk.write_ops) == (2, 4)
    assert (stats.net_rx_bytes, stats.net_tx_bytes) == (6, 7)


def test_metrics_aggregate_only_and_no_network() -> None:
    acc = MetricsAccumulator()
    acc.feed_line(json.dumps({"block": {"read_bytes": 7, "write_count": 1}}))
    stats = acc.stats(has_network=False)
    assert [(d.device, d.read_bytes, d.write_ops) for d in stats.disks] == [("block", 7, 1)]
    assert stats.net_rx_bytes is None


def test_metrics_file_is_read_by_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    acc = MetricsAccumulator()
    acc.read_new(path)  # not there yet
    first = _line(1, 1, 1, 1) + "\n"
    half = _line(2, 2, 2, 2)
    path.write_text(first + half[:20])
    acc.read_new(path)
    assert acc.lines == 1 and acc.offset == len(first)
    path.write_text(first + half + "\n")
    acc.read_new(path)
    assert acc.lines == 2 and acc.stats().disks[0].read_bytes == 3


# ---------------------------------------------------------------------------- spec mapping


def _spec(**fields: Any) -> VMSpec:
    return VMSpec.model_validate({"name": "a", "kernel": "/k", **fields})


def test_boot_args_make_ctrl_alt_del_work_on_x86() -> None:
    assert boot_args("console=ttyS0 i8042.nokbd", "x86_64") == "console=ttyS0 reboot=k panic=1"
    assert boot_args("console=ttyS0 reboot=t panic=5", "x86_64") == "console=ttyS0 reboot=t panic=5"
    assert boot_args("console=ttyS0", "aarch64") == "console=ttyS0 panic=1"


def test_drive_layout_root_unless_initramfs() -> None:
    drives = [{"path": "/a"}, {"path": "/b"}]
    assert drive_layout(_spec(drives=drives)) == [("rootfs", 0, True), ("data1", 1, False)]
    assert drive_layout(_spec(drives=drives, initrd="/i")) == [
        ("data0", 0, False),
        ("data1", 1, False),
    ]


@pytest.fixture
def ready_host(tmp_path: Path) -> dict[str, Any]:
    binary = tmp_path / "firecracker"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    kvm = tmp_path / "kvm"
    kvm.touch()
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF....")
    return {"binary": str(binary), "kvm_device": kvm, "probe_kvm": False, "arch": "x86_64",
            "kernel": str(kernel)}  # fmt: skip


def _driver(host: dict[str, Any], **overrides: Any) -> FirecrackerDriver:
    fields = {k: v for k, v in host.items() if k != "kernel"}
    return FirecrackerDriver(FirecrackerOptions(**{**fields, **overrides}))


def test_check_accepts_a_plain_spec(ready_host: dict[str, Any]) -> None:
    _driver(ready_host).check(_spec(kernel=ready_host["kernel"], initrd="/i"))


def test_check_names_the_missing_binary(
    ready_host: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("STOKER_FIRECRACKER_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(DriverUnavailable) as caught:
        _driver(ready_host, binary=None).check(_spec(kernel=ready_host["kernel"]))
    assert str(caught.value) == MISSING_BINARY
    assert MISSING_BINARY == (
        "firecracker binary not found: set STOKER_FIRECRACKER_BIN or install Firecracker"
    )


def test_check_needs_kvm(ready_host: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(DriverUnavailable, match="/dev/null/kvm is missing"):
        _driver(ready_host, kvm_device=Path("/dev/null/kvm")).check(
            _spec(kernel=ready_host["kernel"])
        )


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"network": {"mode": "user", "port_forwards": [{"host_port": 8080, "guest_port": 80}]}},
         "port forwards"),
        ({"network": {"mode": "user"}}, "user-mode"),
        ({"drives": [{"path": "/d.qcow2", "format": "qcow2"}]}, "raw images only"),
        ({"accel": "tcg"}, "KVM only"),
        ({"vcpus": 33}, "1 to 32"),
    ],
)  # fmt: skip
def test_check_refuses_what_firecracker_lacks(
    ready_host: dict[str, Any], fields: dict[str, Any], words: str
) -> None:
    with pytest.raises(Unsupported, match=words):
        _driver(ready_host).check(_spec(kernel=ready_host["kernel"], **fields))


def test_check_refuses_a_bzimage_on_x86(ready_host: dict[str, Any], tmp_path: Path) -> None:
    bz = tmp_path / "vmlinuz"
    bz.write_bytes(b"MZ\x00\x00 bzImage")
    with pytest.raises(Unsupported, match="vmlinux"):
        _driver(ready_host).check(_spec(kernel=str(bz)))
