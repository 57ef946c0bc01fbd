"""disk helpers: sizes, free space, block device lookup, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from stoker.host import disk


def test_free_bytes_counts_what_an_unprivileged_writer_may_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1000 blocks available to users of 4096 B fragments: 1000 * 4096 = 4_096_000 B.
    # The other fields are the wrong answers: f_bfree also counts the root-reserved blocks
    # (2500 * 4096 = 10_240_000), and f_bsize is the preferred I/O size, not the unit the
    # counts are in (1000 * 65536 = 65_536_000).
    fake = SimpleNamespace(f_bavail=1000, f_bfree=2500, f_frsize=4096, f_bsize=65536)
    monkeypatch.setattr("stoker.host.disk.os.statvfs", lambda _path: fake)
    assert disk.free_bytes(tmp_path) == 4_096_000


def test_free_bytes_of_a_real_filesystem(tmp_path: Path) -> None:
    assert disk.free_bytes(tmp_path) > 0


def allocated(path: Path) -> int:
    """What the filesystem allocated for one name, so expected totals add up by hand."""
    return os.lstat(path).st_blocks * 512


def test_dir_size_counts_allocation_and_hardlinks_once(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a").write_bytes(os.urandom(64 * 1024))
    os.link(tmp_path / "sub" / "a", tmp_path / "b")
    (tmp_path / "link").symlink_to("/usr")  # not followed
    with open(tmp_path / "sparse", "wb") as f:
        f.truncate(1 << 30)  # 1 GiB apparent, ~nothing allocated
    size = disk.dir_size(tmp_path)
    assert allocated(tmp_path / "sub" / "a") == 64 * 1024  # random data: every block written
    assert allocated(tmp_path / "sparse") == 0  # a hole allocates nothing
    assert allocated(tmp_path / "link") == 0  # a short symlink lives in its inode
    # the two directories (4096 B each on ext4, 0 on tmpfs) + the 64 KiB file counted once
    # through its two names; nothing from the sparse file or the symlink, and nothing from
    # /usr behind it. On ext4 here: 4096 + 4096 + 65536 = 73_728 B.
    dirs = allocated(tmp_path) + allocated(tmp_path / "sub")
    assert size == dirs + 64 * 1024


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

    monkeypatch.setattr("stoker.host.disk.os.stat", fake_stat)
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
