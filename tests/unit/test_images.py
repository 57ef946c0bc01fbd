"""Image pools: only regular files inside a pool, opened by the agent, swaps not followed."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from stoker.host.images import (
    CheckedImage,
    ImagePolicy,
    ImageRejected,
    agent_private_paths,
    check_image,
    open_image,
    open_pool_image,
)


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[dict[str, Path]]:
    data = tmp_path / "data"
    pool = data / "images"
    other_pool = tmp_path / "other-pool"
    outside = tmp_path / "outside"
    for d in (pool, other_pool, outside, data / "vms" / "0123456789abcdef"):
        d.mkdir(parents=True)
    (pool / "disk.img").write_bytes(b"disk")
    (outside / "secret").write_bytes(b"secret")
    (data / "stoker.db").write_bytes(b"db")
    (data / "vms" / "0123456789abcdef" / "vd0.img").write_bytes(b"other vm")
    yield {"data": data, "pool": pool, "other": other_pool, "outside": outside}


def policy_for(layout: dict[str, Path], *extra_pools: Path) -> ImagePolicy:
    return ImagePolicy.create(
        [layout["pool"], layout["other"], *extra_pools], agent_private_paths(layout["data"])
    )


def test_a_pool_file_is_accepted_and_opened_as_itself(layout: dict[str, Path]) -> None:
    policy = policy_for(layout)
    path = str(layout["pool"] / "disk.img")
    checked = check_image(policy, "drives.0.path", path)
    assert checked.real == layout["pool"] / "disk.img" and checked.pool == layout["pool"]
    for writable, mode in ((False, os.O_RDONLY), (True, os.O_RDWR)):
        fd = open_image(policy, checked, writable=writable)
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            assert flags & os.O_ACCMODE == mode
            assert not flags & os.O_NONBLOCK
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            assert os.fstat(fd).st_ino == checked.inode
            assert os.read(fd, 10) == b"disk"
        finally:
            os.close(fd)


def test_symlinked_directories_on_the_way_are_resolved(layout: dict[str, Path]) -> None:
    link = layout["data"].parent / "pool-link"
    link.symlink_to(layout["pool"])
    policy = ImagePolicy.create([link], agent_private_paths(layout["data"]))
    fd = open_pool_image(policy, "kernel", str(link / "disk.img"), writable=False)
    os.close(fd)


def rejected(policy: ImagePolicy, path: str, field: str = "kernel") -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        check_image(policy, field, path)
    return info.value


def test_outside_every_pool(layout: dict[str, Path]) -> None:
    policy = policy_for(layout)
    error = rejected(policy, "/etc/shadow", "initrd")
    assert error.field == "initrd" and error.path == "/etc/shadow"
    message = str(error)
    assert "initrd" in message and "/etc/shadow" in message and str(layout["pool"]) in message
    assert "outside every image pool" in message


def test_dot_dot_out_of_the_pool(layout: dict[str, Path]) -> None:
    error = rejected(policy_for(layout), f"{layout['pool']}/../../outside/secret")
    assert "outside every image pool" in str(error)


def test_a_symlink_is_refused_even_to_a_pool_file(layout: dict[str, Path]) -> None:
    pool = layout["pool"]
    (pool / "to-shadow").symlink_to("/etc/shadow")
    (pool / "to-disk").symlink_to(pool / "disk.img")
    policy = policy_for(layout)
    assert "symbolic link" in str(rejected(policy, str(pool / "to-shadow")))
    assert "symbolic link" in str(rejected(policy, str(pool / "to-disk")))


def test_agent_files_are_forbidden_even_inside_a_pool(layout: dict[str, Path]) -> None:
    policy = policy_for(layout, layout["data"])  # an operator made the whole data dir a pool
    for path in (layout["data"] / "stoker.db", layout["data"] / "vms/0123456789abcdef/vd0.img"):
        assert "keeps for itself or another VM" in str(rejected(policy, str(path)))


def test_not_regular_files(layout: dict[str, Path]) -> None:
    pool = layout["pool"]
    os.mkfifo(pool / "fifo")
    (pool / "dir").mkdir()
    policy = policy_for(layout)
    assert "not a regular file" in str(rejected(policy, str(pool / "fifo")))
    assert "not a regular file" in str(rejected(policy, str(pool / "dir")))
    assert "outside every image pool" in str(rejected(policy, str(pool)))
    assert "does not exist (no such file)" in str(rejected(policy, str(pool / "missing")))
    assert "not an absolute path" in str(rejected(policy, "disk.img"))
    assert "NUL" in str(rejected(policy, "/a\x00b"))


def test_no_pools_configured_is_said_clearly(layout: dict[str, Path]) -> None:
    error = rejected(ImagePolicy.create([]), str(layout["pool"] / "disk.img"))
    assert "no pools configured" in str(error)


# ----------------------------------------------------------------------------- swaps


def checked_disk(layout: dict[str, Path]) -> tuple[ImagePolicy, CheckedImage]:
    policy = policy_for(layout)
    return policy, check_image(policy, "drives.0.path", str(layout["pool"] / "disk.img"))


def test_symlink_swapped_in_after_the_check_is_not_followed(layout: dict[str, Path]) -> None:
    policy, checked = checked_disk(layout)
    disk = layout["pool"] / "disk.img"
    disk.unlink()
    disk.symlink_to(layout["outside"] / "secret")
    with pytest.raises(ImageRejected, match="could not be opened"):
        open_image(policy, checked, writable=True)
    assert (layout["outside"] / "secret").read_bytes() == b"secret"


def test_another_file_swapped_in_is_refused(layout: dict[str, Path]) -> None:
    policy, checked = checked_disk(layout)
    replacement = layout["pool"] / "new.img"
    replacement.write_bytes(b"new")
    replacement.replace(layout["pool"] / "disk.img")
    with pytest.raises(ImageRejected, match="replaced by another file"):
        open_image(policy, checked, writable=False)


def test_a_fifo_swapped_in_neither_blocks_nor_passes(layout: dict[str, Path]) -> None:
    policy, checked = checked_disk(layout)
    (layout["pool"] / "disk.img").unlink()
    os.mkfifo(layout["pool"] / "disk.img")
    with pytest.raises(ImageRejected, match="not a regular file"):
        open_image(policy, checked, writable=False)


def test_a_directory_on_the_way_swapped_for_a_symlink_is_caught(layout: dict[str, Path]) -> None:
    pool, outside = layout["pool"], layout["outside"]
    (pool / "sub").mkdir()
    (pool / "sub" / "disk.img").write_bytes(b"sub")
    policy = policy_for(layout)
    checked = check_image(policy, "kernel", str(pool / "sub" / "disk.img"))
    # the very same file (same inode) now lies outside the pool, reached through a symlink
    (pool / "sub").rename(outside / "sub")
    (pool / "sub").symlink_to(outside / "sub")
    with pytest.raises(ImageRejected, match="outside every image pool"):
        open_image(policy, checked, writable=False)
