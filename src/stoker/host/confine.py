"""A VMM's confinement on the host: its own uid, a private runtime dir, an empty root, handed
descriptors instead of paths, a minimal environment, and proof from /proc that it holds.

A guest that breaks out of its VMM lands in that VMM's process. What it can do then is what
the process can do: here, act as the VM's own uid (so the kernel refuses other VMs' files,
which are 0600 and owned by their uids), with no capabilities, under QEMU's seccomp filter
(no exec, no new privileges), with a root directory that holds nothing of the host's. The
VMM never needs a path to anything: the agent opens disks, console, log, TAP and the QMP
socket and passes the descriptors.

Two ways to start a confined QEMU are supported (see docs/security.md for the measurements):

- ``namespace`` (preferred): QEMU is exec'd already unprivileged, in a fresh mount namespace
  whose root is a read-only tmpfs holding only ``/usr`` (read-only) and the VM's kernel and
  initrd. QEMU is never root, so ``-sandbox ...,elevateprivileges=deny`` can be on. The
  namespace (and every mount in it) vanishes with the process: nothing to clean up.
- ``runas``: QEMU starts as root and drops to the VM's uid itself (``-runas``, ``-chroot``)
  after loading the kernel. Simpler, but QEMU parses the kernel and disk headers as root, and
  ``elevateprivileges=deny`` kills it (``-runas`` calls setuid after the filter is loaded).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import socket
import stat
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: PATH for every child the agent starts; nothing else of the agent's environment is passed
MINIMAL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
KVM_DEVICE = Path("/dev/kvm")

#: the mount-namespace jail, as a POSIX shell script run by ``unshare --mount`` as root.
#: Every value arrives as a positional argument, never inside the script text.
#: $1 jail dir, $2 uid, $3 gid, $4 setpriv group option, then SOURCE NAME KIND triples up to
#: "--", then the command. KIND is "file" (read-only, nodev) or "dev" (a device node).
JAIL_SCRIPT = r"""set -eu
jail=$1 uid=$2 gid=$3 groups=$4
shift 4
ro_bind() {
    mount --bind "$1" "$2"
    mount -o "remount,bind,ro,nosuid$3" "$2"
}
mount -t tmpfs -o mode=0755,size=64k,nr_inodes=64,nosuid,nodev tmpfs "$jail"
mkdir "$jail/usr" "$jail/etc" "$jail/dev"
ro_bind /usr "$jail/usr" ,nodev
for d in bin sbin lib lib32 lib64 libx32; do
    if [ -L "/$d" ]; then
        ln -s "$(readlink "/$d")" "$jail/$d"
    elif [ -d "/$d" ]; then
        mkdir "$jail/$d"
        ro_bind "/$d" "$jail/$d" ,nodev
    fi
done
if [ -f /etc/ld.so.cache ]; then
    : >"$jail/etc/ld.so.cache"
    ro_bind /etc/ld.so.cache "$jail/etc/ld.so.cache" ,nodev
fi
while [ "$1" != -- ]; do
    : >"$jail/$2"
    if [ "$3" = dev ]; then ro_bind "$1" "$jail/$2" ""; else ro_bind "$1" "$jail/$2" ,nodev; fi
    shift 3
done
shift
mount -o remount,ro,nosuid,nodev "$jail"
unset PWD OLDPWD
exec unshare --root="$jail" --wd=/ setpriv --reuid="$uid" --regid="$gid" "$groups" \
    --inh-caps=-all --bounding-set=-all --no-new-privs -- "$@"
"""

_JAIL_NAME_RE = re.compile(r"^(dev/)?[a-z][a-z0-9_.-]{0,31}$")


class ConfinementError(RuntimeError):
    """Preparing a VMM's confinement failed, or a VMM is not confined as it must be."""


def minimal_env() -> dict[str, str]:
    """The whole environment of a VMM or hook: no STOKER_* variables, no API token."""
    return {"PATH": MINIMAL_PATH, "LANG": "C"}


# ----------------------------------------------------------------------------- runtime dir


@dataclass(frozen=True)
class VMRuntime:
    """A VM's private runtime dir: 0700, owned by the VM's uid; ``jail`` is its empty root."""

    dir: Path
    uid: int
    gid: int

    @property
    def jail(self) -> Path:
        return self.dir / "root"

    @property
    def console(self) -> Path:
        return self.dir / "console.log"

    @property
    def vmm_log(self) -> Path:
        return self.dir / "vmm.log"

    @property
    def qmp_socket(self) -> Path:
        return self.dir / "qmp.sock"


def prepare_runtime(directory: Path, uid: int, gid: int) -> VMRuntime:
    """Create (or re-own) the runtime dir and its empty jail; refuse a symlink or a full jail.

    The jail belongs to root and is read-only (0555): the VMM's root must hold nothing, and
    the VMM must not be able to store anything in it either.
    """
    if uid <= 0 or gid <= 0:
        raise ConfinementError(f"a VM must not run as uid {uid} / gid {gid}: use its own ids")
    runtime = VMRuntime(directory, uid, gid)
    for path, owner, mode in ((directory, (uid, gid), 0o700), (runtime.jail, (0, 0), 0o555)):
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=mode)
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise ConfinementError(f"{path} must be a directory, not a symlink or a file")
        os.chown(path, *owner, follow_symlinks=False)
        os.chmod(path, mode, follow_symlinks=False)
    leftovers = os.listdir(runtime.jail)
    if leftovers:
        raise ConfinementError(f"the VM's jail {runtime.jail} is not empty: {sorted(leftovers)}")
    return runtime


def open_output(path: Path, uid: int, gid: int) -> int:
    """Open (create) a log the VMM writes to, 0600 and owned by the VM; close-on-exec fd.

    The agent opens it so the VMM never needs the path; ``O_NOFOLLOW`` stops a planted
    symlink from making the agent create or append to another file.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
    fd = os.open(path, flags, 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfinementError(f"{path} is not a regular file")
        # a hard link planted in the VM-owned dir must not make the agent re-own its target
        if st.st_nlink != 1 or st.st_uid not in (0, uid):
            raise ConfinementError(f"{path} is a link to another file or owned by another uid")
        os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def listen_qmp(path: Path) -> socket.socket:
    """The QMP socket, bound by the agent (root, 0600) and passed to QEMU as a descriptor.

    Only the agent can connect; QEMU needs no path (and no write access to the directory),
    and a re-adopting agent connects to the same path later.
    """
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        sock.listen(4)
    except BaseException:
        sock.close()
        raise
    return sock


# ----------------------------------------------------------------------------- devices


def kvm_groups(device: Path = KVM_DEVICE) -> tuple[int, ...]:
    """Supplementary groups a namespace-confined QEMU needs for ``-accel kvm``.

    QEMU opens /dev/kvm as the VM's uid, so the device must be open to a group (Debian's
    udev rule makes it root:kvm 0660). A ``runas`` QEMU opens it while still root.
    """
    try:
        st = os.stat(device)
    except FileNotFoundError:
        raise ConfinementError(f"{device} does not exist: use accel 'tcg'") from None
    if st.st_gid == 0 or st.st_mode & 0o060 != 0o060:
        raise ConfinementError(
            f"{device} is not open to a group (mode {stat.filemode(st.st_mode)}, gid "
            f"{st.st_gid}): run 'chgrp kvm {device} && chmod 0660 {device}' (Debian's udev "
            "rule does this) so a confined VMM can use KVM, or use accel 'tcg'"
        )
    return (st.st_gid,)


_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_CLONE_NEWNET = 0x40000000


def open_tap(name: str, netns: str | None = None) -> int:
    """Attach to TAP ``name`` (in network namespace ``netns``) and return its queue fd.

    QEMU gets the descriptor (``-netdev tap,fd=N``) and needs neither CAP_NET_ADMIN nor
    /dev/net/tun. A TAP is bound to the namespace of the thread that attaches it, so that is
    done in a short-lived thread of its own: the caller's thread never changes namespace.
    """
    encoded = name.encode()
    if not re.fullmatch(rb"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}", encoded):
        raise ConfinementError(f"invalid TAP name {name!r}: 1-15 of [A-Za-z0-9_.-]")
    result: list[int | BaseException] = []

    def attach() -> None:
        try:
            if netns is not None:
                _enter_netns(netns)
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            try:
                ifreq = struct.pack("16sH22x", encoded, _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)
                fcntl.ioctl(fd, _TUNSETIFF, ifreq)
            except BaseException:
                os.close(fd)
                raise
            result.append(fd)
        except BaseException as exc:
            result.append(exc)

    worker = threading.Thread(target=attach, name=f"tap-{name}")
    worker.start()
    worker.join()
    outcome = result[0]
    if isinstance(outcome, BaseException):
        where = f"network namespace {netns}" if netns else "the host namespace"
        raise ConfinementError(f"cannot attach to TAP {name} in {where}: {outcome}")
    return outcome


def _enter_netns(netns: str) -> None:
    if "/" in netns or netns in ("", ".", ".."):
        raise ConfinementError(f"invalid network namespace name {netns!r}")
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def check_readable_by(fd: int, uid: int, gids: Sequence[int], what: str) -> None:
    """Raise unless ``uid`` (in groups ``gids``) may read the file open at ``fd``.

    A namespace-confined QEMU opens its kernel and initrd itself, as the VM's uid, through a
    read-only bind of the agent's descriptor; the file's mode must let it. Checked up front
    so the error names the file instead of QEMU's "could not load kernel".
    """
    st = os.fstat(fd)
    if st.st_uid == uid:
        allowed = bool(st.st_mode & stat.S_IRUSR)
    elif st.st_gid in gids:
        allowed = bool(st.st_mode & stat.S_IRGRP)
    else:
        allowed = bool(st.st_mode & stat.S_IROTH)
    if not allowed:
        raise ConfinementError(
            f"{what} (mode {stat.filemode(st.st_mode)}, owner {st.st_uid}:{st.st_gid}) is not "
            f"readable by the VM's uid {uid}: make it world-readable (chmod 0644) or confine "
            "this VM in 'runas' mode, where QEMU reads it before dropping privileges"
        )


# ----------------------------------------------------------------------------- jail argv


@dataclass(frozen=True)
class JailFile:
    """A file the namespace jail shows read-only at ``/<name>``: a kernel, an initrd (by
    ``/proc/self/fd/N`` of the agent's open descriptor) or a device node such as /dev/kvm."""

    source: str
    name: str
    device: bool = False

    def __post_init__(self) -> None:
        if not _JAIL_NAME_RE.fullmatch(self.name) or ".." in self.name:
            raise ConfinementError(f"invalid name in the jail: {self.name!r}")
        if not self.source.startswith("/") or "\x00" in self.source:
            raise ConfinementError(f"jail file source must be an absolute path: {self.source!r}")


def namespace_jail_argv(
    jail: Path, uid: int, gid: int, groups: Sequence[int] = (), files: Sequence[JailFile] = ()
) -> list[str]:
    """The argv prefix that runs the command after it unprivileged in the jail (as root).

    ``unshare --mount`` gives the process a private mount namespace (no propagation to the
    host), the script builds the jail inside it, ``unshare --root`` makes it the root, and
    ``setpriv`` drops to ``uid``/``gid`` with no capabilities (bounding set empty) and
    no_new_privs. Every step execs, so the pid the agent spawned is QEMU's own.
    """
    if uid <= 0 or gid <= 0:
        raise ConfinementError(f"a VM must not run as uid {uid} / gid {gid}: use its own ids")
    if any(g <= 0 for g in groups):
        raise ConfinementError(f"a VM must not get group 0: {list(groups)}")
    group_opt = f"--groups={','.join(str(g) for g in groups)}" if groups else "--clear-groups"
    argv = [
        "unshare", "--mount", "--propagation", "private", "--",
        "/bin/sh", "-c", JAIL_SCRIPT, "stoker-jail",
        str(jail), str(uid), str(gid), group_opt,
    ]  # fmt: skip
    for f in files:
        argv += [f.source, f.name, "dev" if f.device else "file"]
    return [*argv, "--"]


# ----------------------------------------------------------------------------- proof


@dataclass(frozen=True)
class ProcConfinement:
    """What /proc/<pid> says about a process's privileges and root."""

    pid: int
    uids: tuple[int, ...]  # real, effective, saved, filesystem
    gids: tuple[int, ...]
    groups: tuple[int, ...]
    cap_eff: int
    cap_prm: int
    cap_bnd: int
    seccomp: int  # 0 none, 1 strict, 2 filter
    no_new_privs: bool
    root_is_host: bool
    mount_ns_is_host: bool  # the same mount namespace as the agent reading it


def read_confinement(pid: int) -> ProcConfinement:
    """Read ``/proc/<pid>/status``, its root and its mount namespace."""
    fields: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    root, host_root = os.stat(f"/proc/{pid}/root/"), os.stat("/")
    return ProcConfinement(
        pid=pid,
        uids=tuple(int(v) for v in fields["Uid"].split()),
        gids=tuple(int(v) for v in fields["Gid"].split()),
        groups=tuple(int(v) for v in fields.get("Groups", "").split()),
        cap_eff=int(fields["CapEff"], 16),
        cap_prm=int(fields["CapPrm"], 16),
        cap_bnd=int(fields["CapBnd"], 16),
        seccomp=int(fields.get("Seccomp", "0")),
        no_new_privs=fields.get("NoNewPrivs", "0") == "1",
        root_is_host=(root.st_dev, root.st_ino) == (host_root.st_dev, host_root.st_ino),
        mount_ns_is_host=os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"),
    )


def confinement_problems(info: ProcConfinement, uid: int, gid: int) -> list[str]:
    """Every way ``info`` falls short of a confined VMM running as ``uid``/``gid``."""
    problems = []
    if set(info.uids) != {uid}:
        problems.append(f"uids are {info.uids}, not all {uid}")
    if set(info.gids) != {gid}:
        problems.append(f"gids are {info.gids}, not all {gid}")
    if 0 in info.groups:
        problems.append("it is in group 0")
    if info.cap_eff or info.cap_prm:
        problems.append(
            f"it holds capabilities (CapEff {info.cap_eff:#x}, CapPrm {info.cap_prm:#x})"
        )
    if info.seccomp != 2:
        problems.append(f"Seccomp is {info.seccomp}, not 2 (a filter)")
    if not info.no_new_privs:
        problems.append("NoNewPrivs is not set")
    if info.root_is_host:
        problems.append("its root directory is the host's")
    return problems


def check_confined(pid: int, uid: int, gid: int) -> ProcConfinement:
    """Raise ConfinementError unless ``pid`` runs confined as ``uid``/``gid``."""
    try:
        info = read_confinement(pid)
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise ConfinementError(f"process {pid} is gone: {exc}") from None
    problems = confinement_problems(info, uid, gid)
    if problems:
        raise ConfinementError(f"process {pid} is not confined: {'; '.join(problems)}")
    return info


def try_open_as(path: Path, uid: int, gid: int, flags: int = os.O_RDONLY) -> int:
    """Try to open ``path`` as ``uid``/``gid`` (no groups); 0 if it opened, else the errno.

    For tests and diagnostics only: it forks, which is unsafe in a process with threads
    (the agent). The child changes ids and opens; the parent only reads its exit status.
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            os.close(os.open(path, flags | os.O_NOCTTY | os.O_NONBLOCK))
        except OSError as exc:
            code = exc.errno or errno.EIO
        except BaseException:
            code = errno.EIO
        os._exit(code & 0xFF)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
