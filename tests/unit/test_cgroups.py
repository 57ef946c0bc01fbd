"""Both cgroup backends against temp directories laid out like each hierarchy."""

from __future__ import annotations

from pathlib import Path

import pytest

from stoker.host.cgroups import (
    CgroupError,
    CgroupMode,
    ControllerUnavailable,
    CpuStats,
    MemoryEvents,
    V1Cgroups,
    V2Cgroups,
    backend_for,
    detect,
    validate_vm_id,
    write_file,
)


class Recorder:
    """Writer that records (path relative to root, value) and, like the kernel, creates files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[tuple[str, str]] = []

    def __call__(self, path: Path, value: str) -> None:
        self.calls.append((str(path.relative_to(self.root)), value))
        path.write_text(value)


@pytest.fixture
def v2root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("v2")
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    (tmp_path / "cgroup.procs").write_text("")
    parent = tmp_path / "stoker"
    parent.mkdir()
    (parent / "cgroup.controllers").write_text("cpu io memory\n")
    (parent / "cgroup.subtree_control").write_text("")
    return tmp_path


@pytest.fixture
def v1root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("v1")
    for controller in ("cpu", "cpuacct", "memory", "blkio", "pids"):
        (tmp_path / controller).mkdir()
        (tmp_path / controller / "cgroup.procs").write_text("")
    (tmp_path / "unified").mkdir()  # hybrid: an empty cgroup2 beside the v1 controllers
    (tmp_path / "unified" / "cgroup.controllers").write_text("")
    return tmp_path


def test_detect(v1root: Path, v2root: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    assert detect(v2root) is CgroupMode.V2
    assert detect(v1root) is CgroupMode.V1
    empty = tmp_path_factory.mktemp("empty")
    assert detect(empty) is CgroupMode.NONE
    with pytest.raises(CgroupError, match="no cgroup"):
        backend_for(empty)
    assert isinstance(backend_for(v1root), V1Cgroups)
    assert isinstance(backend_for(v2root), V2Cgroups)


def test_real_host_detects_v1_or_v2() -> None:
    assert detect() in (CgroupMode.V1, CgroupMode.V2)


@pytest.mark.parametrize(
    "bad", ["", "..", "../etc", "a/b", "Vm", "-x", "z" * 64, "vm\0", "vm ", "vm\n", "8:0\n"]
)
def test_vm_id_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        validate_vm_id(bad)


@pytest.mark.parametrize("good", ["vm-1", "a", "0" * 63, "DEADBEEF", "ab" * 32])
def test_vm_id_accepted(good: str) -> None:
    assert validate_vm_id(good) == good


def test_write_file_names_file_and_value(tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match=r"'50000 100000'.*cpu\.max.*No such file"):
        write_file(tmp_path / "cpu.max", "50000 100000")
    target = tmp_path / "cpu.max"
    target.write_text("max 100000")
    write_file(target, "50000 100000")
    assert target.read_text() == "50000 100000"


def test_v2_writes(v2root: Path) -> None:
    rec = Recorder(v2root)
    cg = V2Cgroups(v2root, writer=rec)
    cg.create("vm-1")
    cg.create("vm-1")  # idempotent
    assert (v2root / "stoker" / "vm-1").is_dir()
    assert ("cgroup.subtree_control", "+cpu +memory +io") in rec.calls
    assert ("stoker/cgroup.subtree_control", "+cpu +memory +io") in rec.calls
    rec.calls.clear()

    cg.add_process("vm-1", 4242)
    cg.set_cpu_percent("vm-1", 200)
    cg.set_cpu_percent("vm-1", None)
    cg.set_cpu_percent("vm-1", 50)
    cg.set_memory("vm-1", max_bytes=256 << 20, high_bytes=200 << 20)
    cg.set_memory("vm-1", None, None)
    cg.set_io("vm-1", "8:0", riops=1000, wiops=500, rbps=None, wbps=10_485_760)
    assert rec.calls == [
        ("stoker/vm-1/cgroup.procs", "4242"),
        ("stoker/vm-1/cpu.max", "200000 100000"),
        ("stoker/vm-1/cpu.max", "max 100000"),
        ("stoker/vm-1/cpu.max", "50000 100000"),
        ("stoker/vm-1/memory.high", str(200 << 20)),
        ("stoker/vm-1/memory.max", str(256 << 20)),
        ("stoker/vm-1/memory.high", "max"),
        ("stoker/vm-1/memory.max", "max"),
        ("stoker/vm-1/io.max", "8:0 riops=1000 wiops=500 rbps=max wbps=10485760"),
    ]


def test_v2_missing_controller_says_which(v2root: Path) -> None:
    (v2root / "cgroup.controllers").write_text("memory pids\n")
    with pytest.raises(ControllerUnavailable, match="cpu, io not available in cgroup v2"):
        V2Cgroups(v2root, writer=Recorder(v2root)).create("vm-1")


def test_v2_reads(v2root: Path) -> None:
    cg = V2Cgroups(v2root, writer=Recorder(v2root))
    cg.create("vm-1")
    d = v2root / "stoker" / "vm-1"
    (d / "cpu.stat").write_text(
        "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n"
        "nr_periods 10\nnr_throttled 3\nthrottled_usec 700\n"
    )
    (d / "memory.events").write_text("low 0\nhigh 4\nmax 2\noom 1\noom_kill 1\n")
    (d / "memory.current").write_text("123456\n")
    assert cg.read_cpu_stats("vm-1") == CpuStats(1500, 10, 3, 700)
    assert cg.read_memory_events("vm-1") == MemoryEvents(high=4, max=2, oom=1, oom_kill=1)
    assert cg.read_memory_current("vm-1") == 123456


def test_v2_remove_refuses_or_moves_strays(v2root: Path) -> None:
    rec = Recorder(v2root)
    cg = V2Cgroups(v2root, writer=rec)
    cg.create("vm-1")
    procs = v2root / "stoker" / "vm-1" / "cgroup.procs"
    procs.write_text("77\n78\n")
    with pytest.raises(CgroupError, match=r"processes still in it: \[77, 78\]"):
        cg.remove("vm-1")
    assert procs.exists()
    procs.unlink()  # the fake cannot empty itself; the kernel would
    cg.remove("vm-1")
    assert not cg.path("vm-1").exists()
    cg.remove("vm-1")  # idempotent


def test_v1_writes(v1root: Path) -> None:
    rec = Recorder(v1root)
    cg = V1Cgroups(v1root, writer=rec)
    cg.create("vm-1")
    cg.create("vm-1")
    for controller in ("cpu", "cpuacct", "memory", "blkio"):
        assert (v1root / controller / "stoker" / "vm-1").is_dir()
    assert not (v1root / "pids" / "stoker").exists()

    cg.add_process("vm-1", 4242)
    cg.set_cpu_percent("vm-1", 50)
    cg.set_cpu_percent("vm-1", None)
    cg.set_memory("vm-1", max_bytes=300 << 20, high_bytes=256 << 20)
    cg.set_memory("vm-1", None, None)
    cg.set_io("vm-1", "253:0", riops=1000, wiops=None, rbps=1_048_576, wbps=2_097_152)
    assert rec.calls == [
        ("cpu/stoker/vm-1/cgroup.procs", "4242"),
        ("cpuacct/stoker/vm-1/cgroup.procs", "4242"),
        ("memory/stoker/vm-1/cgroup.procs", "4242"),
        ("blkio/stoker/vm-1/cgroup.procs", "4242"),
        ("cpu/stoker/vm-1/cpu.cfs_period_us", "100000"),
        ("cpu/stoker/vm-1/cpu.cfs_quota_us", "50000"),
        ("cpu/stoker/vm-1/cpu.cfs_period_us", "100000"),
        ("cpu/stoker/vm-1/cpu.cfs_quota_us", "-1"),
        ("memory/stoker/vm-1/memory.limit_in_bytes", str(300 << 20)),
        ("memory/stoker/vm-1/memory.soft_limit_in_bytes", str(256 << 20)),
        ("memory/stoker/vm-1/memory.limit_in_bytes", "-1"),
        ("memory/stoker/vm-1/memory.soft_limit_in_bytes", "-1"),
        ("blkio/stoker/vm-1/blkio.throttle.read_iops_device", "253:0 1000"),
        ("blkio/stoker/vm-1/blkio.throttle.write_iops_device", "253:0 0"),
        ("blkio/stoker/vm-1/blkio.throttle.read_bps_device", "253:0 1048576"),
        ("blkio/stoker/vm-1/blkio.throttle.write_bps_device", "253:0 2097152"),
    ]


def test_v1_comounted_cpu_cpuacct_written_once(tmp_path: Path) -> None:
    (tmp_path / "cpu,cpuacct").mkdir()
    (tmp_path / "cpu,cpuacct" / "cgroup.procs").write_text("")
    (tmp_path / "cpu").symlink_to("cpu,cpuacct")
    (tmp_path / "cpuacct").symlink_to("cpu,cpuacct")
    for controller in ("memory", "blkio"):
        (tmp_path / controller).mkdir()
        (tmp_path / controller / "cgroup.procs").write_text("")
    rec = Recorder(tmp_path)
    cg = V1Cgroups(tmp_path, writer=rec)
    cg.create("vm-2")
    cg.add_process("vm-2", 9)
    assert [c[0] for c in rec.calls] == [
        "cpu/stoker/vm-2/cgroup.procs",
        "memory/stoker/vm-2/cgroup.procs",
        "blkio/stoker/vm-2/cgroup.procs",
    ]


def test_v1_reads(v1root: Path) -> None:
    cg = V1Cgroups(v1root, writer=Recorder(v1root))
    cg.create("vm-1")
    (v1root / "cpuacct/stoker/vm-1/cpuacct.usage").write_text("2500000\n")
    (v1root / "cpu/stoker/vm-1/cpu.stat").write_text(
        "nr_periods 20\nnr_throttled 5\nthrottled_time 9000000\nnr_bursts 0\nburst_time 0\n"
    )
    mem = v1root / "memory/stoker/vm-1"
    (mem / "memory.failcnt").write_text("12\n")
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (mem / "memory.usage_in_bytes").write_text("4096\n")
    assert cg.read_cpu_stats("vm-1") == CpuStats(2500, 20, 5, 9000)
    assert cg.read_memory_events("vm-1") == MemoryEvents(high=0, max=12, oom=2, oom_kill=2)
    assert cg.read_memory_current("vm-1") == 4096


def test_v1_remove_checks_all_before_removing_any(v1root: Path) -> None:
    rec = Recorder(v1root)
    cg = V1Cgroups(v1root, writer=rec)
    cg.create("vm-1")
    (v1root / "memory/stoker/vm-1/cgroup.procs").write_text("55\n")
    with pytest.raises(CgroupError, match="processes still in it"):
        cg.remove("vm-1")
    for controller in ("cpu", "cpuacct", "memory", "blkio"):
        assert (v1root / controller / "stoker" / "vm-1").is_dir()
    rec.calls.clear()
    # with move_strays the pid goes to the parent; the fake keeps the file, so rmdir fails loudly
    with pytest.raises(CgroupError, match=r"cannot remove cgroup .*memory/stoker/vm-1.*already"):
        cg.remove("vm-1", move_strays=True)
    assert rec.calls == [("memory/stoker/cgroup.procs", "55")]
    (v1root / "memory/stoker/vm-1/cgroup.procs").unlink()
    cg.remove("vm-1")
    assert not any((v1root / c / "stoker" / "vm-1").exists() for c in ("cpu", "memory"))


def test_v1_missing_controller(v1root: Path) -> None:
    (v1root / "blkio" / "cgroup.procs").unlink()
    with pytest.raises(ControllerUnavailable, match="blkio not mounted"):
        V1Cgroups(v1root).create("vm-1")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda cg: cg.set_cpu_percent("vm-1", 0), "positive"),
        (lambda cg: cg.set_cpu_percent("vm-1", 0.5), "1000 us"),
        (lambda cg: cg.set_memory("vm-1", 100, 200), "above max"),
        (lambda cg: cg.set_memory("vm-1", -1, None), "positive"),
        (lambda cg: cg.set_io("vm-1", "sda", riops=1), "MAJ:MIN"),
        (lambda cg: cg.set_io("vm-1", "8:0", riops=-1), "non-negative"),
        (lambda cg: cg.add_process("../x", 1), "invalid VM id"),
    ],
)
def test_argument_validation(v1root: Path, v2root: Path, call, message: str) -> None:  # type: ignore[no-untyped-def]
    for cg in (
        V2Cgroups(v2root, writer=Recorder(v2root)),
        V1Cgroups(v1root, writer=Recorder(v1root)),
    ):
        with pytest.raises(ValueError, match=message):
            call(cg)
