"""Confinement helpers that need no VMM: runtime dir, outputs, QMP socket, jail argv, /proc."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from stoker.host.confine import (
    JAIL_SCRIPT,
    ConfinementError,
    JailFile,
    ProcConfinement,
    check_confined,
    check_readable_by,
    confinement_problems,
    kvm_groups,
    listen_qmp,
    minimal_env,
    namespace_jail_argv,
    open_output,
    open_tap,
    prepare_runtime,
    read_confinement,
)

UID = 200501
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


def test_children_get_only_path_and_lang() -> None:
    env = minimal_env()
    assert set(env) == {"PATH", "LANG"} and env["LANG"] == "C"


@needs_root
def test_runtime_dir_is_private_and_the_jail_empty_and_read_only(tmp_path: Path) -> None:
    runtime = prepare_runtime(tmp_path / "vm", UID, UID)
    st = os.stat(runtime.dir)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (UID, UID, 0o700)
    jail = os.stat(runtime.jail)
    assert (jail.st_uid, stat.S_IMODE(jail.st_mode)) == (0, 0o555)
    assert prepare_runtime(tmp_path / "vm", UID, UID) == runtime  # idempotent


@needs_root
def test_runtime_refusals(tmp_path: Path) -> None:
    with pytest.raises(ConfinementError, match="must not run as uid 0"):
        prepare_runtime(tmp_path / "vm", 0, 0)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfinementError, match="not a symlink"):
        prepare_runtime(tmp_path / "link", UID, UID)
    runtime = prepare_runtime(tmp_path / "vm", UID, UID)
    os.chmod(runtime.jail, 0o755)
    (runtime.jail / "left").write_text("x")
    with pytest.raises(ConfinementError, match="not empty"):
        prepare_runtime(tmp_path / "vm", UID, UID)


@needs_root
def test_outputs_are_0600_owned_by_the_vm_and_never_follow_a_symlink(tmp_path: Path) -> None:
    fd = open_output(tmp_path / "console.log", UID, UID)
    try:
        os.write(fd, b"boot\n")
        st = os.fstat(fd)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (UID, 0o600)
        assert os.get_inheritable(fd) is False
    finally:
        os.close(fd)
    (tmp_path / "target").write_text("keep")
    (tmp_path / "planted.log").symlink_to(tmp_path / "target")
    with pytest.raises(OSError):
        open_output(tmp_path / "planted.log", UID, UID)
    assert (tmp_path / "target").read_text() == "keep"
    os.link(tmp_path / "target", tmp_path / "linked.log")
    with pytest.raises(ConfinementError, match="link to another file"):
        open_output(tmp_path / "linked.log", UID, UID)
    assert os.stat(tmp_path / "target").st_uid == 0


def test_qmp_socket_is_only_for_its_owner(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    path.write_text("stale")
    sock = listen_qmp(path)
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    finally:
        sock.close()


def test_jail_argv_structure_and_refusals() -> None:
    files = [JailFile("/proc/self/fd/7", "kernel"), JailFile("/dev/kvm", "dev/kvm", device=True)]
    argv = namespace_jail_argv(Path("/run/j"), UID, UID + 1, (108,), files)
    assert argv[:5] == ["unshare", "--mount", "--propagation", "private", "--"]
    assert argv[argv.index(JAIL_SCRIPT) + 1 :] == [
        "stoker-jail", "/run/j", str(UID), str(UID + 1), "--groups=108",
        "/proc/self/fd/7", "kernel", "file", "/dev/kvm", "dev/kvm", "dev", "--",
    ]  # fmt: skip
    assert "--clear-groups" in namespace_jail_argv(Path("/run/j"), UID, UID)
    with pytest.raises(ConfinementError):
        namespace_jail_argv(Path("/run/j"), 0, UID)
    with pytest.raises(ConfinementError):
        namespace_jail_argv(Path("/run/j"), UID, UID, (0,))
    for name in ("../etc", "dev/../x", "a/b", "", "Kernel", "dev/"):
        with pytest.raises(ConfinementError):
            JailFile("/x", name)
    with pytest.raises(ConfinementError):
        JailFile("relative", "kernel")


def test_jail_script_is_valid_shell() -> None:
    assert subprocess.run(["/bin/sh", "-n", "-c", JAIL_SCRIPT], check=False).returncode == 0


def confined(**changes: object) -> ProcConfinement:
    base: dict[str, object] = {
        "pid": 1, "uids": (UID,) * 4, "gids": (UID,) * 4, "groups": (), "cap_eff": 0,
        "cap_prm": 0, "cap_bnd": 0, "seccomp": 2, "no_new_privs": True,
        "root_is_host": False, "mount_ns_is_host": False,
    }  # fmt: skip
    return ProcConfinement(**{**base, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"uids": (UID, 0, UID, UID)}, "uids"),
        ({"gids": (0,) * 4}, "gids"),
        ({"groups": (0,)}, "group 0"),
        ({"cap_eff": 1 << 21}, "capabilities"),
        ({"seccomp": 0}, "Seccomp is 0"),
        ({"no_new_privs": False}, "NoNewPrivs"),
        ({"root_is_host": True}, "root directory"),
    ],
)
def test_each_shortfall_is_named(changes: dict[str, object], words: str) -> None:
    assert confinement_problems(confined(), UID, UID) == []
    problems = confinement_problems(confined(**changes), UID, UID)
    assert len(problems) == 1 and words in problems[0]


def test_this_test_process_is_not_confined() -> None:
    info = read_confinement(os.getpid())
    assert info.root_is_host and info.mount_ns_is_host
    with pytest.raises(ConfinementError, match="not confined"):
        check_confined(os.getpid(), UID, UID)


@needs_root
def test_kvm_groups(tmp_path: Path) -> None:
    device = tmp_path / "kvm"
    device.write_text("")
    os.chmod(device, 0o600)
    with pytest.raises(ConfinementError, match="chmod 0660"):
        kvm_groups(device)
    os.chown(device, 0, 108)
    os.chmod(device, 0o660)
    assert kvm_groups(device) == (108,)
    with pytest.raises(ConfinementError, match="does not exist"):
        kvm_groups(tmp_path / "missing")


def test_tap_and_netns_names_are_checked() -> None:
    with pytest.raises(ConfinementError, match="invalid TAP name"):
        open_tap("tap0,x")
    with pytest.raises(ConfinementError, match="invalid network namespace"):
        open_tap("tap0", "../../proc/1/ns/net")


@needs_root
def test_readable_by_follows_owner_group_other(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    fd = os.open(kernel, os.O_RDONLY)
    try:
        os.chmod(kernel, 0o644)
        check_readable_by(fd, UID, [UID], "kernel")
        os.chmod(kernel, 0o640)
        os.chown(kernel, 0, 108)
        check_readable_by(fd, UID, [UID, 108], "kernel")
        with pytest.raises(ConfinementError, match=r"kernel .* not readable by the VM.s uid"):
            check_readable_by(fd, UID, [UID], "kernel")
        os.chown(kernel, UID, 108)
        os.chmod(kernel, 0o400)
        check_readable_by(fd, UID, [UID], "kernel")
    finally:
        os.close(fd)
