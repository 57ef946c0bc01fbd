"""``stoker doctor``'s verdicts on host facts: one finding per check, a fix for each problem,
and a non-zero exit only when something required is missing."""

from __future__ import annotations

from dataclasses import replace

from stoker.domain.doctor import (
    ClockFacts,
    DataDirFacts,
    HostFacts,
    KvmDeviceFacts,
    Level,
    examine,
    exit_code,
    parse_qemu_version,
)
from stoker.domain.units import GiB

HEALTHY = HostFacts(
    euid=0,
    qemu_binary="qemu-system-x86_64",
    qemu_version="QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)",
    qemu_error=None,
    kvm_usable=True,
    kvm_reason="usable",
    kvm_device=KvmDeviceFacts(exists=True, group="kvm", mode=0o660),
    cgroup_mode="v2",
    cgroup_controllers=frozenset({"cpu", "memory", "io", "pids"}),
    tools={t: f"/usr/sbin/{t}" for t in ("tc", "nft", "dnsmasq", "qemu-img", "unshare", "setpriv")},
    data_dir=DataDirFacts(
        "/var/lib/stoker", True, owner_uid=0, mode=0o700, free_bytes=50 * GiB, writable=True
    ),
    clock=ClockFacts(synchronized=True, max_error_us=20_000),
)


def _levels(facts: HostFacts) -> dict[str, Level]:
    return {f.check: f.level for f in examine(facts)}


def test_a_good_host_is_all_ok() -> None:
    findings = examine(HEALTHY)
    assert {f.level for f in findings} == {Level.OK}, findings
    assert exit_code(findings) == 0
    assert {f.check for f in findings} >= {
        "qemu", "kvm", "cgroups", "tc", "nft", "dnsmasq", "confinement", "data dir",
        "disk space", "clock",
    }  # fmt: skip


def test_every_problem_says_what_to_fix() -> None:
    broken = replace(
        HEALTHY,
        qemu_version=None,
        qemu_error="qemu-system-x86_64 is not on PATH",
        kvm_usable=False,
        kvm_reason="KVM_RUN did not return within 1.0 s",
        kvm_device=KvmDeviceFacts(exists=True, group="root", mode=0o600),
        cgroup_mode="none",
        cgroup_controllers=frozenset(),
        tools={},
        data_dir=DataDirFacts("/srv/x", True, owner_uid=1000, mode=0o755, free_bytes=GiB // 2),
        clock=ClockFacts(synchronized=False),
    )
    findings = examine(broken)
    for finding in findings:
        assert finding.level != Level.OK, finding
        assert finding.fix, finding
    assert exit_code(findings) == 1


def test_only_required_things_fail() -> None:
    no_kvm = replace(HEALTHY, kvm_usable=False, kvm_reason="no /dev/kvm",
                     kvm_device=KvmDeviceFacts(exists=False))  # fmt: skip
    assert _levels(no_kvm)["kvm"] == Level.WARN
    assert exit_code(examine(no_kvm)) == 0
    no_net = replace(HEALTHY, tools={"unshare": "/u", "setpriv": "/s"})
    assert _levels(no_net)["nft"] == Level.WARN and exit_code(examine(no_net)) == 0
    no_setpriv = replace(HEALTHY, tools={"unshare": "/u"})
    assert _levels(no_setpriv)["confinement"] == Level.FAIL
    old_qemu = replace(HEALTHY, qemu_version="QEMU emulator version 5.2.0")
    assert _levels(old_qemu)["qemu"] == Level.FAIL
    full = replace(HEALTHY, data_dir=replace(HEALTHY.data_dir, free_bytes=100 * 1024**2))
    assert _levels(full)["disk space"] == Level.FAIL


def test_kvm_group_matters_only_for_namespace_confinement() -> None:
    closed = replace(HEALTHY, kvm_device=KvmDeviceFacts(exists=True, group="root", mode=0o600))
    assert _levels(closed)["kvm access"] == Level.WARN
    assert "kvm access" not in _levels(replace(closed, confine_mode="runas"))


def test_data_dir_that_is_not_there_yet() -> None:
    fresh = replace(HEALTHY, data_dir=DataDirFacts("/var/lib/stoker", False, writable=True,
                                                    free_bytes=50 * GiB))  # fmt: skip
    assert _levels(fresh)["data dir"] == Level.OK
    unmakeable = replace(fresh, data_dir=replace(fresh.data_dir, writable=False))
    assert _levels(unmakeable)["data dir"] == Level.FAIL


def test_qemu_version_text() -> None:
    assert parse_qemu_version("QEMU emulator version 7.2.19 (Debian)") == (7, 2, 19)
    assert parse_qemu_version("QEMU emulator version 9.0") == (9, 0, 0)
    assert parse_qemu_version("nonsense") is None
