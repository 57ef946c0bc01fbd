"""The Firecracker jailer's command line and the files prepared for its chroot.

The jailer itself cannot run here (no Firecracker), so this checks what stoker controls: the
argv it builds and the jail it lays out. The original images must come out untouched: same
inode, owner, mode and link count, whatever the jailed Firecracker later does to its files.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from stoker.drivers.firecracker.jailer import (
    clean_jail,
    jail_paths,
    jailer_argv,
    link_into_jail,
    mounts_under,
    place_in_jail,
    prepare_jail,
)

JAIL_UID = 200321
JAIL_GID = 200322

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown and mount need root")


def test_argv_v2_with_every_setting() -> None:
    argv = jailer_argv(
        jailer="/usr/bin/jailer",
        exec_file="/usr/bin/firecracker",
        vm_id="0123456789abcdef",
        uid=JAIL_UID,
        gid=JAIL_GID,
        firecracker_args=["--api-sock", "/run/firecracker.socket"],
        chroot_base=Path("/srv/jailer"),
        cgroup_version=2,
        cpu_percent=150,
        memory_bytes=192 * 2**20,
        parent_cgroup="stoker",
        netns="/var/run/netns/vm1",
        new_pid_ns=True,
    )
    assert argv == [
        "/usr/bin/jailer",
        "--id", "0123456789abcdef",
        "--exec-file", "/usr/bin/firecracker",
        "--uid", str(JAIL_UID),
        "--gid", str(JAIL_GID),
        "--chroot-base-dir", "/srv/jailer",
        "--cgroup-version", "2",
        "--cgroup", "cpu.max=150000 100000",
        "--cgroup", f"memory.max={192 * 2**20}",
        "--parent-cgroup", "stoker",
        "--netns", "/var/run/netns/vm1",
        "--new-pid-ns",
        "--", "--api-sock", "/run/firecracker.socket",
    ]  # fmt: skip


def test_argv_v1_uses_v1_files() -> None:
    argv = jailer_argv(
        jailer="jailer",
        exec_file="/opt/firecracker",
        vm_id="a",
        uid=JAIL_UID,
        gid=JAIL_GID,
        firecracker_args=[],
        cpu_percent=50,
        memory_bytes=2**27,
    )
    assert "--cgroup-version" not in argv
    pairs = [argv[i + 1] for i, a in enumerate(argv) if a == "--cgroup"]
    assert pairs == [
        "cpu.cfs_period_us=100000",
        "cpu.cfs_quota_us=50000",
        f"memory.limit_in_bytes={2**27}",
    ]
    assert argv[-1] == "--"


def original(
    tmp_path: Path, name: str, data: bytes, mode: int = 0o644
) -> tuple[Path, os.stat_result]:
    path = tmp_path / "pool" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    return path, os.stat(path)


def assert_untouched(path: Path, before: os.stat_result, data: bytes) -> None:
    after = os.stat(path)
    assert (after.st_ino, after.st_uid, after.st_gid, after.st_nlink) == (
        before.st_ino, before.st_uid, before.st_gid, before.st_nlink,
    )  # fmt: skip
    assert stat.S_IMODE(after.st_mode) == stat.S_IMODE(before.st_mode)
    assert path.read_bytes() == data


@needs_root
def test_copies_are_private_to_the_jailed_user_and_originals_untouched(tmp_path: Path) -> None:
    jail = jail_paths(tmp_path / "jailer", "/usr/bin/firecracker", "web-1")
    prepare_jail(jail, JAIL_UID, JAIL_GID)
    assert os.stat(jail.root).st_uid == JAIL_UID and os.stat(jail.host("/run")).st_uid == JAIL_UID
    kernel, kernel_st = original(tmp_path, "vmlinux", b"kernel")
    disk, disk_st = original(tmp_path, "rootfs.ext4", b"disk" * 1000, mode=0o600)

    assert place_in_jail(kernel, jail, "vmlinux", JAIL_UID, JAIL_GID, writable=False) == "/vmlinux"
    assert link_into_jail(disk, jail, "rootfs", JAIL_UID, JAIL_GID) == "/rootfs"  # old name

    for name, src, mode in (("vmlinux", kernel, 0o400), ("rootfs", disk, 0o600)):
        placed = os.stat(jail.root / name)
        assert placed.st_ino != os.stat(src).st_ino  # a copy, never a hard link
        assert (placed.st_uid, placed.st_gid) == (JAIL_UID, JAIL_GID)
        assert stat.S_IMODE(placed.st_mode) == mode and placed.st_nlink == 1
        assert (jail.root / name).read_bytes() == src.read_bytes()
    # what the jailed Firecracker writes stays in its copy
    (jail.root / "rootfs").write_bytes(b"guest wrote this")
    assert_untouched(kernel, kernel_st, b"kernel")
    assert_untouched(disk, disk_st, b"disk" * 1000)
    assert not list((jail.base / ".staging").iterdir())

    clean_jail(jail)
    assert not jail.base.exists()
    assert_untouched(disk, disk_st, b"disk" * 1000)


@needs_root
def test_a_symlink_planted_in_the_jail_is_replaced_not_followed(tmp_path: Path) -> None:
    jail = jail_paths(tmp_path / "jailer", "/usr/bin/firecracker", "web-2")
    prepare_jail(jail, JAIL_UID, JAIL_GID)
    victim, victim_st = original(tmp_path, "victim", b"host file", mode=0o600)
    (jail.root / "vmlinux").symlink_to(victim)  # as a jailed user could between runs
    kernel, _ = original(tmp_path, "vmlinux", b"kernel")
    place_in_jail(kernel, jail, "vmlinux", JAIL_UID, JAIL_GID, writable=False)
    assert not (jail.root / "vmlinux").is_symlink()
    assert (jail.root / "vmlinux").read_bytes() == b"kernel"
    assert_untouched(victim, victim_st, b"host file")
    clean_jail(jail)


@needs_root
def test_bind_mount_keeps_the_original_owner_and_is_unmounted_by_clean(tmp_path: Path) -> None:
    jail = jail_paths(tmp_path / "jailer", "/usr/bin/firecracker", "web-3")
    prepare_jail(jail, JAIL_UID, JAIL_GID)
    disk, disk_st = original(tmp_path, "own-disk", b"vm disk", mode=0o600)
    kernel, kernel_st = original(tmp_path, "vmlinux", b"kernel")
    try:
        place_in_jail(disk, jail, "rootfs", JAIL_UID, JAIL_GID, method="bind")
        place_in_jail(kernel, jail, "vmlinux", JAIL_UID, JAIL_GID, writable=False, method="bind")
        assert os.stat(jail.root / "rootfs").st_ino == disk_st.st_ino  # the file itself...
        assert os.stat(jail.root / "rootfs").st_uid == disk_st.st_uid  # ...never re-owned
        with pytest.raises(OSError):  # read-only even for root
            (jail.root / "vmlinux").write_bytes(b"patched")
        assert sorted(mounts_under(jail.base)) == [jail.root / "rootfs", jail.root / "vmlinux"]
    finally:
        clean_jail(jail)
    assert not jail.base.exists() and not mounts_under(jail.base)
    assert_untouched(disk, disk_st, b"vm disk")
    assert_untouched(kernel, kernel_st, b"kernel")


def test_refusals(tmp_path: Path) -> None:
    jail = jail_paths(tmp_path / "jailer", "/usr/bin/firecracker", "web-4")
    kernel, _ = original(tmp_path, "vmlinux", b"kernel")
    for name in ("../escape", "", ".", "a/b"):
        with pytest.raises(ValueError):
            place_in_jail(kernel, jail, name, JAIL_UID, JAIL_GID)
    with pytest.raises(ValueError, match="method"):
        place_in_jail(kernel, jail, "k", JAIL_UID, JAIL_GID, method="link")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        place_in_jail(tmp_path / "missing", jail, "k", JAIL_UID, JAIL_GID)


def test_mountinfo_parsing_handles_escapes() -> None:
    info = (
        "36 35 98:0 / /srv/jailer/fc/a/root/rootfs rw - ext4 /dev/sda rw\n"
        "37 35 98:0 / /srv/jailer/fc/a/root/with\\040space rw - ext4 /dev/sda rw\n"
        "38 35 98:0 / /srv/jailer/fc/ab/root/x rw - ext4 /dev/sda rw\n"
    )
    assert mounts_under(Path("/srv/jailer/fc/a"), info) == [
        Path("/srv/jailer/fc/a/root/rootfs"),
        Path("/srv/jailer/fc/a/root/with space"),
    ]
