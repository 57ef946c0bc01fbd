"""Pure parts of the guest builder: module ordering, TSC parsing, cache lookup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stoker.guest.build import (
    BASE_CMDLINE,
    READY_MARKER,
    GuestBuildError,
    GuestImage,
    default_cache_dir,
    find_guest,
    modinfo_depends,
    module_load_order,
    module_name,
    parse_modules_dep,
    recipe_hash,
)
from stoker.host.tsc import parse_cpuinfo_tsc_khz, parse_kernel_log_tsc_khz

_VIRTIO = "kernel/drivers/virtio"
_DEPS = {
    f"{_VIRTIO}/virtio_ring.ko": [],
    f"{_VIRTIO}/virtio.ko": [f"{_VIRTIO}/virtio_ring.ko"],
    f"{_VIRTIO}/virtio_mmio.ko": [f"{_VIRTIO}/virtio.ko", f"{_VIRTIO}/virtio_ring.ko"],
    "kernel/net/core/failover.ko": [],
    "kernel/drivers/net/net_failover.ko": ["kernel/net/core/failover.ko"],
    "kernel/drivers/net/virtio_net.ko": [
        f"{_VIRTIO}/virtio_ring.ko",
        f"{_VIRTIO}/virtio.ko",
        "kernel/drivers/net/net_failover.ko",
    ],
    "kernel/drivers/block/virtio_blk.ko": [f"{_VIRTIO}/virtio.ko", f"{_VIRTIO}/virtio_ring.ko"],
    "kernel/drivers/char/hw_random/virtio-rng.ko.xz": [f"{_VIRTIO}/virtio.ko"],
    "kernel/fs/ext4/ext4.ko": [
        "kernel/fs/jbd2/jbd2.ko",
        "kernel/fs/mbcache.ko",
        "kernel/lib/crc16.ko",
    ],
    "kernel/fs/jbd2/jbd2.ko": [],
    "kernel/fs/mbcache.ko": [],
    "kernel/lib/crc16.ko": [],
}
# The modules.dep format depmod writes: "path: dep dep ...", no deps -> "path:".
MODULES_DEP = "".join(f"{path}: {' '.join(deps)}".rstrip() + "\n" for path, deps in _DEPS.items())


def _names(paths: list[str]) -> list[str]:
    return [module_name(p) for p in paths]


def test_module_name_strips_suffix_and_normalises_dashes() -> None:
    assert module_name("kernel/drivers/char/hw_random/virtio-rng.ko.xz") == "virtio_rng"
    assert module_name("virtio_net.ko") == "virtio_net"
    assert module_name("ext4") == "ext4"


def test_parse_modules_dep() -> None:
    deps = parse_modules_dep(MODULES_DEP)
    assert deps["virtio_mmio"] == (
        "kernel/drivers/virtio/virtio_mmio.ko",
        ["virtio", "virtio_ring"],
    )
    assert deps["virtio_rng"][1] == ["virtio"]
    assert deps["failover"][1] == []


def test_load_order_puts_dependencies_first() -> None:
    order = _names(module_load_order(MODULES_DEP, ["virtio_net", "virtio_mmio", "virtio_blk"]))
    assert sorted(order) == sorted(
        [
            "virtio_ring",
            "virtio",
            "failover",
            "net_failover",
            "virtio_net",
            "virtio_mmio",
            "virtio_blk",
        ]
    )
    for module, deps in parse_modules_dep(MODULES_DEP).items():
        if module in order:
            for dep in deps[1]:
                assert order.index(dep) < order.index(module), (dep, module)


def test_load_order_lists_each_module_once_with_original_paths() -> None:
    order = module_load_order(MODULES_DEP, ["virtio", "virtio_mmio", "virtio_blk", "virtio-rng"])
    assert len(order) == len(set(order))
    assert order[0] == "kernel/drivers/virtio/virtio_ring.ko"
    assert "kernel/drivers/char/hw_random/virtio-rng.ko.xz" in order


def test_builtin_and_optional_modules() -> None:
    builtin = ["kernel/fs/ext4/ext4.ko", "kernel/drivers/input/evdev.ko"]
    without_ext4_dep = "\n".join(
        line for line in MODULES_DEP.splitlines() if not line.startswith("kernel/fs/ext4/")
    )
    order = _names(
        module_load_order(
            without_ext4_dep, ["virtio", "evdev"], ["ext4", "crc32c_generic"], builtin
        )
    )
    assert order == ["virtio_ring", "virtio"]

    as_modules = _names(module_load_order(MODULES_DEP, [], ["ext4", "crc32c_generic"]))
    assert as_modules[-1] == "ext4"
    assert set(as_modules) == {"jbd2", "mbcache", "crc16", "ext4"}


def test_missing_required_module_raises() -> None:
    with pytest.raises(GuestBuildError, match="virtio_scsi"):
        module_load_order(MODULES_DEP, ["virtio_scsi"])


def test_missing_dependency_raises_unless_builtin() -> None:
    text = "kernel/a.ko: kernel/b.ko\n"
    with pytest.raises(GuestBuildError, match="needs b"):
        module_load_order(text, ["a"])
    assert module_load_order(text, ["a"], builtin=["kernel/b.ko"]) == ["kernel/a.ko"]


def test_dependency_cycle_raises() -> None:
    with pytest.raises(GuestBuildError, match="cycle"):
        module_load_order("a.ko: b.ko\nb.ko: a.ko\n", ["a"])


def test_modinfo_depends_reads_raw_module_bytes() -> None:
    blob = b"\x7fELF...\x00license=GPL\x00depends=virtio_ring,virtio,net-failover\x00name=x\x00"
    assert modinfo_depends(blob) == ["virtio_ring", "virtio", "net_failover"]
    assert modinfo_depends(b"\x00depends=\x00name=virtio_ring\x00") == []
    assert modinfo_depends(b"no modinfo here") == []


CPUINFO = """\
processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
cpu MHz\t\t: 2596.128
cache size\t: 512 KB

processor\t: 1
cpu MHz\t\t: 1800.000
"""


def test_parse_cpuinfo_tsc_khz_takes_first_cpu() -> None:
    assert parse_cpuinfo_tsc_khz(CPUINFO) == 2596128


def test_parse_cpuinfo_integer_mhz_and_missing() -> None:
    assert parse_cpuinfo_tsc_khz("cpu MHz : 3000\n") == 3000000
    assert parse_cpuinfo_tsc_khz("processor : 0\nBogoMIPS : 50.00\n") is None
    assert parse_cpuinfo_tsc_khz("cpu MHz : 0.000\n") is None


def test_parse_kernel_log_prefers_refined_calibration() -> None:
    log = (
        "[    0.000071] tsc: Detected 2445.430 MHz processor\n"
        "[    1.200000] tsc: Refined TSC clocksource calibration: 2445.402 MHz\n"
    )
    assert parse_kernel_log_tsc_khz(log) == 2445402
    assert parse_kernel_log_tsc_khz(log.splitlines()[0]) == 2445430
    assert parse_kernel_log_tsc_khz("nothing about clocks") is None


def test_find_guest_on_empty_dir_is_none(tmp_path: Path) -> None:
    assert find_guest(tmp_path) is None
    assert find_guest(tmp_path / "missing") is None


def _fake_cache(directory: Path, recipe: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vmlinuz").write_bytes(b"k")
    (directory / "initrd.img").write_bytes(b"i")
    (directory / "guest.json").write_text(
        json.dumps({"recipe": recipe, "cmdline": BASE_CMDLINE, "ready_marker": READY_MARKER})
    )


def test_find_guest_complete_cache(tmp_path: Path) -> None:
    _fake_cache(tmp_path, recipe_hash())
    assert find_guest(tmp_path) == GuestImage(
        kernel=tmp_path / "vmlinuz",
        initrd=tmp_path / "initrd.img",
        cmdline=BASE_CMDLINE,
        ready_marker="STOKER-GUEST-READY",
    )
    assert "tsc_early_khz" not in BASE_CMDLINE


def test_find_guest_rejects_stale_or_partial_cache(tmp_path: Path) -> None:
    _fake_cache(tmp_path / "stale", "0" * 64)
    assert find_guest(tmp_path / "stale") is None
    _fake_cache(tmp_path / "partial", recipe_hash())
    (tmp_path / "partial" / "initrd.img").unlink()
    assert find_guest(tmp_path / "partial") is None
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "guest.json").write_text("{not json")
    assert find_guest(tmp_path / "broken") is None


def test_default_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STOKER_GUEST_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("STOKER_GUEST_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "stoker" / "guest"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "stoker" / "guest"
