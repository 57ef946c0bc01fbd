"""disk helpers: sizes, free space, block device lookup, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stoker.host import disk


def test_free_bytes_positive(tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    assert disk.free_bytes(tmp_path) == st.f_bavail * st.f_frsize > 0


def test_dir_size_counts_allocation_and_hardlinks_once(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a").write_bytes(os.urandom(64 * 1024))
    os.link(tmp_path / "sub" / "a", tmp_path / "b")
    (tmp_path / "link").symlink_to("/usr")  # not followed
    with open(tmp_path / "sparse", "wb") as f:
        f.truncate(1 << 30)  # 1 GiB apparent, ~nothing allocated
    size = disk.dir_size(tmp_path)
    assert 64 * 1024 <= size < 1 << 20


def test_dir_size_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        disk.dir_size(tmp_path / "nope")


def test_device_of_fake_sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sys_block = tmp_path / "sys"
    (tmp_path / "devices" / "vda" / "vda1").mkdir(parents=True)
    (tmp_path / "devices" / "vda" / "dev").write_text("254:0\n")
    (tmp_path / "devices" / "vda" / "vda1" / "partition").write_text("1\n")
    sys_block.mkdir()
    (sys_block / "254:1").symlink_to(tmp_path / "devices" / "vda" / "vda1")
    (sys_block / "254:16").symlink_to(tmp_path / "devices" / "vda")  # whole disk

    class FakeStat:
        def __init__(self, dev: int) -> None:
            self.st_dev = dev

    real_stat = os.stat
    fake_dev = {"dev": 0}

    def fake_stat(p: object, **kw: object) -> object:
        return FakeStat(fake_dev["dev"]) if p == "/x" else real_stat(p, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(disk.os, "stat", fake_stat)
    fake_dev["dev"] = os.makedev(254, 1)
    assert disk.device_of("/x", sys_block) == "254:0"
    fake_dev["dev"] = os.makedev(254, 16)
    assert disk.device_of("/x", sys_block) == "254:16"
    fake_dev["dev"] = os.makedev(0, 42)
    with pytest.raises(ValueError, match="without a block device"):
        disk.device_of("/x", sys_block)


def test_device_of_real_root() -> None:
    try:
        dev = disk.device_of("/")
    except ValueError as exc:  # overlay root in a container
        pytest.skip(str(exc))
    major, minor = dev.split(":")
    assert int(major) > 0 and int(minor) >= 0


def test_atomic_write(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    disk.atomic_write_text(target, '{"a": 1}')
    assert target.read_text() == '{"a": 1}'
    disk.atomic_write_bytes(target, b"new", mode=0o600)
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_atomic_write_failure_keeps_old_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        disk.atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
