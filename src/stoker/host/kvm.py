"""Is KVM usable for guests, or only present?

On nested hosts /dev/kvm opens and KVM_CREATE_VM succeeds, yet KVM_RUN spins forever, so an
``accel=auto`` that checks for the device file picks a hypervisor that hangs. The only honest
test is to run guest code: a one-byte real-mode guest (``hlt`` at 0x1000) must exit with
KVM_EXIT_HLT, and then a 64-bit guest must finish a short loop, both within a deadline. The
second stage exists because on this very host the lone ``hlt`` passes (KVM_RUN returns in
microseconds) while every instruction traps, about 1000x slower than native, which is what
makes QEMU + KVM boots look hung. The probe runs in a child process (this file run as a
script, stdlib only) so a KVM_RUN that never returns is killed with the child, not the agent.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

KVM_DEVICE = "/dev/kvm"

# --- ioctl numbers, computed as <linux/ioctl.h> does ---------------------------------------
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, typ: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (typ << 8) | nr


def _IO(typ: int, nr: int) -> int:
    return _IOC(_IOC_NONE, typ, nr, 0)


def _IOW(typ: int, nr: int, size: int) -> int:
    return _IOC(_IOC_WRITE, typ, nr, size)


def _IOR(typ: int, nr: int, size: int) -> int:
    return _IOC(_IOC_READ, typ, nr, size)


class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    ]


class KvmRegs(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            *("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp"),
            *(f"r{i}" for i in range(8, 16)),
            *("rip", "rflags"),
        )
    ]


class KvmSegment(ctypes.Structure):
    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    ]


class KvmDtable(ctypes.Structure):
    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint16),
        ("padding", ctypes.c_uint16 * 3),
    ]


class KvmSregs(ctypes.Structure):
    _fields_ = [
        *[(seg, KvmSegment) for seg in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")],
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        *[(cr, ctypes.c_uint64) for cr in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")],
        ("apic_base", ctypes.c_uint64),
        ("interrupt_bitmap", ctypes.c_uint64 * 4),
    ]


assert ctypes.sizeof(KvmUserspaceMemoryRegion) == 32
assert ctypes.sizeof(KvmRegs) == 144
assert ctypes.sizeof(KvmSregs) == 312

KVMIO = 0xAE
KVM_API_VERSION = 12
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, ctypes.sizeof(KvmUserspaceMemoryRegion))
KVM_RUN = _IO(KVMIO, 0x80)
KVM_SET_REGS = _IOW(KVMIO, 0x82, ctypes.sizeof(KvmRegs))
KVM_GET_SREGS = _IOR(KVMIO, 0x83, ctypes.sizeof(KvmSregs))
KVM_SET_SREGS = _IOW(KVMIO, 0x84, ctypes.sizeof(KvmSregs))
KVM_EXIT_HLT = 5
_KVM_RUN_EXIT_REASON_OFFSET = 8  # u8 request_interrupt_window, u8 immediate_exit, u8 pad[6]

PAGE = 0x1000
GUEST_MEM = 0x10000  # guest physical 0..64 KiB
GUEST_ADDR = 0x1000  # real-mode stage: a lone hlt
HLT = 0xF4
PML4_ADDR = 0x2000  # PML4, PDPT, PD at 0x2000, 0x3000, 0x4000
LOOP_ADDR = 0x8000
LOOP_ITERATIONS = 10_000_000
# mov ecx, N; 1: dec ecx; jnz 1b; hlt  -- about 10 ms natively. Some nested hosts accept
# KVM_RUN but trap every instruction (measured here: ~2 us per loop turn, 1000x slower than
# native), which passes a lone hlt yet makes a Linux boot "hang" at 100% system time.
LOOP_CODE = b"\xb9" + LOOP_ITERATIONS.to_bytes(4, "little") + b"\xff\xc9\x75\xfc" + bytes([HLT])

# exit codes of the child, so the parent can tell a hang from a failure
_RC_USABLE, _RC_FAILED, _RC_TIMEOUT = 0, 3, 4


def _timeout_reason(timeout_s: float) -> str:
    return (
        f"KVM_RUN did not return within {timeout_s:.1f} s "
        "(nested virtualisation without a working KVM?)"
    )


@dataclass(frozen=True)
class KvmProbe:
    usable: bool
    reason: str


class _KvmRunTimeout(Exception):
    pass


def _on_alarm(signum: int, frame: object) -> None:
    # raising makes fcntl.ioctl give up instead of retrying the EINTR (PEP 475)
    raise _KvmRunTimeout


def _enter_long_mode(sregs: KvmSregs) -> None:
    """Flat 64-bit segments, PAE paging via PML4_ADDR: the mode a Linux guest runs in."""
    sregs.cr3 = PML4_ADDR
    sregs.cr4 = 1 << 5  # PAE
    sregs.cr0 = 0x80050033  # PG, AM, WP, NE, ET, MP, PE
    sregs.efer = 0x500  # LME | LMA
    data_segments = ((s, 16, 3) for s in ("ds", "es", "fs", "gs", "ss"))
    for name, selector, typ in (("cs", 8, 11), *data_segments):
        seg = getattr(sregs, name)
        seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, selector, typ
        seg.present, seg.dpl, seg.s, seg.g, seg.avl, seg.unusable = 1, 0, 1, 1, 0, 0
        seg.l, seg.db = (1, 0) if name == "cs" else (0, 1)


def _run_guest(timeout_s: float) -> KvmProbe:
    """Run the one-instruction guest in this process (the child side of probe_kvm)."""
    import fcntl

    if not os.path.exists(KVM_DEVICE):
        return KvmProbe(False, "no /dev/kvm")
    try:
        kvm = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return KvmProbe(False, f"cannot open /dev/kvm: {exc.strerror or exc}")
    try:
        version = fcntl.ioctl(kvm, KVM_GET_API_VERSION)
        if version != KVM_API_VERSION:
            return KvmProbe(False, f"KVM API version {version}, expected {KVM_API_VERSION}")
        vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)

        mem = mmap.mmap(-1, GUEST_MEM, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mem[GUEST_ADDR] = HLT
        mem[LOOP_ADDR : LOOP_ADDR + len(LOOP_CODE)] = LOOP_CODE
        # long-mode page tables: PML4 -> PDPT -> PD with one 2 MiB identity page
        struct.pack_into("<Q", mem, PML4_ADDR, (PML4_ADDR + PAGE) | 0x3)
        struct.pack_into("<Q", mem, PML4_ADDR + PAGE, (PML4_ADDR + 2 * PAGE) | 0x3)
        struct.pack_into("<Q", mem, PML4_ADDR + 2 * PAGE, 0x83)  # present, writable, 2 MiB
        region = KvmUserspaceMemoryRegion(
            slot=0,
            flags=0,
            guest_phys_addr=0,
            memory_size=GUEST_MEM,
            userspace_addr=ctypes.addressof(ctypes.c_char.from_buffer(mem)),
        )
        fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, region)

        vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
        run_size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE)
        run = mmap.mmap(vcpu, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

        def run_until_exit(stage: str) -> KvmProbe | None:
            try:
                fcntl.ioctl(vcpu, KVM_RUN, 0)
            except _KvmRunTimeout:
                return KvmProbe(False, f"{_timeout_reason(timeout_s)} [{stage}]")
            off = _KVM_RUN_EXIT_REASON_OFFSET
            reason = int.from_bytes(run[off : off + 4], sys.byteorder)
            if reason != KVM_EXIT_HLT:
                return KvmProbe(False, f"unexpected exit reason {reason} [{stage}]")
            return None

        signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            # stage 1: real mode (CS base 0, selector 0), hlt at 0x1000
            sregs = KvmSregs()
            fcntl.ioctl(vcpu, KVM_GET_SREGS, sregs)
            sregs.cs.base = 0
            sregs.cs.selector = 0
            fcntl.ioctl(vcpu, KVM_SET_SREGS, sregs)
            fcntl.ioctl(vcpu, KVM_SET_REGS, KvmRegs(rip=GUEST_ADDR, rflags=0x2))
            failed = run_until_exit("real-mode hlt")
            if failed:
                return failed
            # stage 2: 64-bit mode with paging, a loop a working KVM finishes in milliseconds
            _enter_long_mode(sregs)
            fcntl.ioctl(vcpu, KVM_SET_SREGS, sregs)
            fcntl.ioctl(vcpu, KVM_SET_REGS, KvmRegs(rip=LOOP_ADDR, rflags=0x2))
            failed = run_until_exit(f"{LOOP_ITERATIONS:,}-iteration 64-bit loop")
            if failed:
                return failed
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        return KvmProbe(True, "usable")
    except OSError as exc:
        return KvmProbe(False, f"KVM ioctl failed: {exc}")
    finally:
        os.close(kvm)


def probe_kvm(timeout_s: float = 1.0) -> KvmProbe:
    """Run a ``hlt`` guest in a child process; usable only if it exits with KVM_EXIT_HLT in time.

    The child arms its own timer around KVM_RUN; the parent also kills it after a grace period
    in case KVM_RUN ignores signals, so this returns in about ``timeout_s`` + 1 s at worst.
    """
    if not os.path.exists(KVM_DEVICE):
        return KvmProbe(False, "no /dev/kvm")
    argv = [sys.executable, "-I", os.path.abspath(__file__), "--child", repr(float(timeout_s))]
    child = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = child.communicate(timeout=timeout_s + 1.0)
    except subprocess.TimeoutExpired:
        child.kill()
        try:
            child.communicate(timeout=2.0)
        except subprocess.TimeoutExpired:
            reason = f"{_timeout_reason(timeout_s)}; probe pid {child.pid} would not die"
            return KvmProbe(False, reason)
        return KvmProbe(False, _timeout_reason(timeout_s))
    text = out.decode(errors="replace").strip()
    if child.returncode == _RC_USABLE:
        return KvmProbe(True, "usable")
    if child.returncode in (_RC_FAILED, _RC_TIMEOUT) and text:
        return KvmProbe(False, text)
    detail = err.decode(errors="replace").strip().splitlines()
    return KvmProbe(
        False, f"probe child exited with {child.returncode}: {detail[-1] if detail else text}"
    )


@functools.cache
def cached_probe() -> KvmProbe:
    """The probe costs a process and up to a second: run it once per agent process."""
    return probe_kvm()


def choose_accel(
    requested: str, probe: Callable[[], KvmProbe] = cached_probe
) -> tuple[str, str | None]:
    """Map the operator's accel choice to "kvm" or "tcg", with a warning when auto falls back.

    An explicit "kvm" is returned as is (the caller decides whether to fail; see require_kvm).
    """
    if requested == "tcg":
        return "tcg", None
    if requested == "kvm":
        return "kvm", None
    if requested != "auto":
        raise ValueError(f"accel must be 'auto', 'kvm' or 'tcg', not {requested!r}")
    result = probe()
    if result.usable:
        return "kvm", None
    return "tcg", f"KVM not usable ({result.reason}); falling back to TCG, which is much slower"


def require_kvm(probe: Callable[[], KvmProbe] = cached_probe) -> None:
    """Fail loudly before starting a VMM that would hang on a KVM that cannot run guests."""
    result = probe()
    if not result.usable:
        raise RuntimeError(f"accel=kvm requested but KVM is not usable: {result.reason}")


def _child_main(argv: list[str]) -> int:
    timeout_s = float(argv[1]) if len(argv) > 1 else 1.0
    started = time.monotonic()
    result = _run_guest(timeout_s)
    print(result.reason, flush=True)
    if result.usable:
        return _RC_USABLE
    if time.monotonic() - started >= timeout_s and "did not return" in result.reason:
        return _RC_TIMEOUT
    return _RC_FAILED


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--child":
        sys.exit(_child_main(sys.argv[1:]))
    probe = probe_kvm()
    print(f"usable={probe.usable} reason={probe.reason}")
    sys.exit(0 if probe.usable else 1)
