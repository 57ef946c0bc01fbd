"""Image pools: the only places a VM's kernel, initrd and disks may come from.

Anyone who can call the API chooses these paths, and the VMM gets read (often write) access
to whatever they name. So a path is accepted only when, after resolving every symlink, it is
a regular file inside a configured pool, is not itself a symlink, and is not one of the
agent's own files (another VM's directory, the database). Checking a path and later letting
the VMM open it by name would leave a window in which the file can be swapped; instead the
agent opens the checked file itself (``O_NOFOLLOW``), proves the open descriptor is the file
it checked (same inode, still a regular file, still under the pool by its ``/proc/self/fd``
name) and hands that descriptor to the VMM.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


class ImageRejected(ValueError):
    """A path the VM spec names is not an acceptable image; the API answers 422."""

    def __init__(self, field: str, path: str, pools: Iterable[Path], reason: str) -> None:
        self.field = field
        self.path = path
        self.pools = tuple(pools)
        self.reason = reason
        where = ", ".join(str(p) for p in self.pools) or "(no pools configured)"
        super().__init__(
            f"{field}: {path!r} {reason}; images must be regular files inside an image pool "
            f"([images] pools): {where}"
        )


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from (``pools``) and what they may never be (``forbidden``).

    ``forbidden`` holds the agent's private places: the data dir's ``vms/`` tree (every VM's
    own disks, sockets and logs) and the database file. A forbidden directory forbids
    everything below it, even inside a pool.
    """

    pools: tuple[Path, ...]
    forbidden: tuple[Path, ...] = ()
    #: the pools as configured (before resolving links), for the check that names no file
    named_pools: tuple[Path, ...] = ()

    @classmethod
    def create(
        cls, pools: Iterable[Path | str], forbidden: Iterable[Path | str] = ()
    ) -> ImagePolicy:
        """Resolve every pool and forbidden path once, so later checks compare real paths."""
        given = tuple(Path(os.path.normpath(p)) for p in pools)
        return cls(
            pools=tuple(Path(os.path.realpath(p)) for p in given),
            forbidden=tuple(Path(os.path.realpath(p)) for p in forbidden),
            named_pools=given,
        )

    def names_a_pool_file(self, path: str) -> bool:
        """Whether ``path`` as written (no link resolved, nothing touched) lies in a pool."""
        lexical = Path(os.path.normpath(path))
        return any(_within(lexical, p) and lexical != p for p in (*self.pools, *self.named_pools))

    def pool_of(self, real: Path) -> Path | None:
        """The pool ``real`` (an already resolved path) lies in, or None."""
        if any(_within(real, f) for f in self.forbidden):
            return None
        return next((p for p in self.pools if _within(real, p) and real != p), None)


@dataclass(frozen=True)
class CheckedImage:
    """A path that passed the policy, and the identity of the file it named then."""

    field: str
    given: str
    real: Path
    pool: Path
    device: int
    inode: int


def agent_private_paths(data_dir: Path, db_path: Path | None = None) -> tuple[Path, ...]:
    """What no VM may be given, even if a pool covers it: every VM's directory, the database
    (with its journal files), the reports and the API socket."""
    db = db_path or data_dir / "stoker.db"
    return (
        data_dir / "vms",
        db,
        *(db.with_name(db.name + suffix) for suffix in ("-wal", "-shm", "-journal")),
        data_dir / "reports",
        data_dir / "stoker.sock",
    )


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_image(policy: ImagePolicy, field: str, path: str) -> CheckedImage:
    """Accept ``path`` for ``field`` (``kernel``, ``drives.0.path``...) or raise ImageRejected."""

    def reject(reason: str) -> ImageRejected:
        return ImageRejected(field, path, policy.pools, reason)

    if not path.startswith("/"):
        raise reject("is not an absolute path")
    if "\x00" in path:
        raise reject("contains a NUL byte")
    # decided before touching the file system: the answer must not tell whether a file
    # exists outside the pools (an API caller could otherwise probe the host's files)
    if not policy.names_a_pool_file(path):
        raise reject("is outside every image pool")
    try:
        given = os.lstat(path)
    except FileNotFoundError:
        raise reject("does not exist (no such file)") from None
    except OSError as exc:
        raise reject(f"cannot be read ({exc.strerror})") from None
    if stat.S_ISLNK(given.st_mode):
        raise reject("is a symbolic link; name the file itself")
    real = Path(os.path.realpath(path))
    if any(_within(real, f) for f in policy.forbidden):
        raise reject(f"resolves to {real}, a file the agent keeps for itself or another VM")
    pool = policy.pool_of(real)
    if pool is None:
        raise reject(f"resolves to {real}, outside every image pool")
    try:
        st = os.stat(real, follow_symlinks=False)
    except OSError as exc:
        raise reject(f"cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise reject("is not a regular file")
    return CheckedImage(field, path, real, pool, st.st_dev, st.st_ino)


def open_image(policy: ImagePolicy, checked: CheckedImage, *, writable: bool) -> int:
    """Open the checked file and prove it is still the same file; return the descriptor.

    ``O_NOFOLLOW`` refuses a symlink swapped in for the file; ``O_NONBLOCK`` keeps a FIFO
    swapped in from blocking the agent (it fails the regular-file check instead). The
    descriptor is close-on-exec: only the VMM it is passed to inherits it.
    """
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_NONBLOCK | os.O_NOCTTY

    def reject(reason: str) -> ImageRejected:
        return ImageRejected(checked.field, checked.given, policy.pools, reason)

    try:
        fd = os.open(checked.real, flags)
    except OSError as exc:
        raise reject(f"could not be opened ({exc.strerror}); was it replaced?") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise reject("was replaced by something that is not a regular file")
        if (st.st_dev, st.st_ino) != (checked.device, checked.inode):
            raise reject("was replaced by another file between the check and the open")
        opened = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if policy.pool_of(opened) is None:
            raise reject(f"was moved to {opened}, outside every image pool")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_pool_image(policy: ImagePolicy, field: str, path: str, *, writable: bool) -> int:
    """Check ``path`` and open it: the descriptor to hand to the VMM (caller closes it)."""
    return open_image(policy, check_image(policy, field, path), writable=writable)


def close_all(fds: Iterable[int]) -> None:
    """Close descriptors once the VMM holds its copies (or the launch failed)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
