"""Build the stoker test guest (kernel + initramfs) into a cache directory.

Why a home-made guest: tests need something that boots in ~2 s under TCG,
serves HTTP, obeys ACPI power-button events and can be told to burn CPU,
grow memory or write to a disk. A Debian cloud kernel (virtio as modules)
plus a static busybox initramfs does all that in about 1 MiB of initrd.

The build is idempotent and atomic: everything is assembled in a temporary
directory beside the cache directory and renamed into place, guarded by a
lock file, so concurrent callers either build once or find a complete cache.
A ``guest.json`` manifest is written last and records a hash of the recipe
(init script, CGI scripts, module list, cmdline); when the recipe changes the
cache counts as absent and is rebuilt.

Launching it (QEMU 7.2, microvm, TCG; measured on Debian bookworm)::

    qemu-system-x86_64 -M microvm -nodefaults -no-user-config -no-reboot \\
        -accel tcg -cpu qemu64 -m 128 -smp 1 \\
        -kernel K -initrd I -append "<cmdline> tsc_early_khz=<stoker.host.tsc.host_tsc_khz()>" \\
        -chardev file,id=con0,path=console.log -serial chardev:con0 \\
        -netdev user,id=n0,hostfwd=tcp:127.0.0.1:PORT-:80 \\
        -device virtio-net-device,netdev=n0 \\
        -drive file=disk.img,format=raw,if=none,id=vd0 \\
        -device virtio-blk-device,drive=vd0 \\
        -qmp unix:qmp.sock,server=on,wait=off -display none

``-serial chardev:con0`` works on microvm: its built-in ISA serial port
(``isa-serial=on``, the default) is wired to the first ``-serial``. Always
append ``tsc_early_khz``: without it ~3% of TCG boots hang calibrating the
TSC. ``panic=-1`` plus ``-no-reboot`` makes a crashed guest end QEMU.
``-serial file:PATH`` is not used: it showed nothing in an earlier try. Even
with ``quiet`` the console shows one kernel error line before the marker,
``PCI: Fatal: No config space access function found`` (microvm has no PCI);
match the marker line, not the whole log.

Guest behaviour (see :data:`INIT_SCRIPT` and :data:`CGI_SCRIPTS`): prints
:data:`READY_MARKER` on the console once httpd listens on port 80; serves
``/health`` and ``/cgi-bin/{stop-http,burn,alloc,write-marker,read-marker,
dd,poweroff,meminfo,net,fetch,send,connect,ping}``; takes its address by DHCP
(busybox ``udhcpc``, hook :data:`UDHCPC_SCRIPT`); mounts ``/dev/vda`` at
``/data`` (formats a blank disk when the cmdline has ``stoker.mkfs=1``; busybox
mke2fs makes ext2, mounted by the ext4 driver); ``stoker.fail=1`` crashes before
ready (QEMU exits by itself),
``stoker.nohttp=1`` skips httpd. QMP ``system_powerdown`` powers it off via
busybox acpid. ``alloc?mb=N`` fills ``/dev/shm`` (tmpfs, 90% of RAM; 507 when
MemAvailable is short, ``mb=0`` frees). Host RSS barely grows with it: QEMU's RSS
already covers most guest RAM after boot, so check ``meminfo`` in the guest.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BASE_CMDLINE",
    "READY_MARKER",
    "GuestBuildError",
    "GuestImage",
    "build_guest",
    "default_cache_dir",
    "find_guest",
    "module_load_order",
    "parse_modules_dep",
]

READY_MARKER = "STOKER-GUEST-READY"
"""Line the guest prints on its console once httpd listens (or is skipped)."""

BASE_CMDLINE = "console=ttyS0 quiet panic=-1 8250.nr_uarts=1"
"""Kernel cmdline without ``tsc_early_khz``, which is host specific."""

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PATH = Path("/bin/busybox")

# Loaded in dependency order; a missing one is an error unless built in.
REQUIRED_MODULES: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
    # ACPI power button -> input event -> busybox acpid -> poweroff.
    "button",
    "evdev",
    # the guest agent channel (virtio-serial port org.qemu.guest_agent.0)
    "virtio_console",
)
# Needed to mount an ext4 /data only if the kernel builds them as modules.
OPTIONAL_MODULES: tuple[str, ...] = (
    "crc16",
    "crc32c_generic",
    "mbcache",
    "jbd2",
    "ext4",
)

_FORMAT_VERSION = 1
_MANIFEST = "guest.json"
_KERNEL_FILE = "vmlinuz"
_INITRD_FILE = "initrd.img"
_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


class GuestBuildError(RuntimeError):
    """The guest could not be built; the message says what to install or fix."""


@dataclass(frozen=True)
class GuestImage:
    """A built guest: what a driver needs to boot it and to know it is up."""

    kernel: Path
    initrd: Path
    cmdline: str
    ready_marker: str


# --------------------------------------------------------------------------
# Guest userspace (busybox sh). Kept here so the recipe hash covers it.
# --------------------------------------------------------------------------

INIT_SCRIPT = r"""#!/bin/sh
# PID 1 of the stoker test guest (generated by stoker.guest.build).
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The initramfs has no /dev/console node (so it can be built unprivileged):
# attach stdio to the console by hand.
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
# alloc fills /dev/shm: allow most of RAM (the tmpfs default is half).
mount -t tmpfs -o mode=1777,size=90% tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run

CMDLINE=" $(cat /proc/cmdline) "
has() { case "$CMDLINE" in *" $1 "*) return 0 ;; esac; return 1; }

if has stoker.fail=1; then
    echo "STOKER-GUEST-FAIL: crashing on request (stoker.fail=1)"
    echo c >/proc/sysrq-trigger
    exit 1
fi

# Modules: the list is in dependency order; retry a few rounds anyway.
pending=$(cat /lib/modules/load-order)
round=0
while [ -n "$pending" ] && [ "$round" -lt 3 ]; do
    left=
    for m in $pending; do
        insmod "/lib/modules/$m" 2>/dev/null || left="$left $m"
    done
    pending=$left
    round=$((round + 1))
done
[ -n "$pending" ] && echo "stoker-init: modules not loaded:$pending"

ip link set lo up
n=0
while [ ! -e /sys/class/net/eth0 ] && [ "$n" -lt 100 ]; do
    usleep 20000
    n=$((n + 1))
done
# The address comes by DHCP: from the dnsmasq of a stoker network on a TAP,
# or from QEMU's user-mode network (10.0.2.15/24 via 10.0.2.2). udhcpc runs
# in the background (and renews) while the rest boots; the ready marker waits
# up to ~3 s for the first lease, so a TAP without DHCP costs 3 s, not a hang.
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    udhcpc -f -i eth0 -s /etc/udhcpc.script -t 3 -T 1 -A 2 >/run/udhcpc.log 2>&1 &
else
    echo "stoker-init: no eth0"
fi

# Optional data disk; best effort, never blocks boot.
is_blank() { [ -z "$(dd if="$1" bs=65536 count=1 2>/dev/null | tr -d '\000')" ]; }
mount_data() {
    [ -b /dev/vda ] || return 0
    mkdir -p /data
    mount -t ext4 /dev/vda /data 2>/dev/null && return 0
    mount /dev/vda /data 2>/dev/null && return 0
    if has stoker.mkfs=1 && is_blank /dev/vda; then
        mke2fs -q /dev/vda >/dev/null 2>&1 || mke2fs /dev/vda >/dev/null 2>&1
        mount -t ext4 /dev/vda /data 2>/dev/null && return 0
    fi
    echo "stoker-init: /dev/vda present but not mounted"
    return 0
}
mount_data

# ACPI power button (QMP system_powerdown) -> /etc/acpi/PWRF/00000080.
acpid -c /etc/acpi -l /run/acpid.log

# This boot's id, read now (the kernel makes it on first read): a guest resumed from a
# boot snapshot shows the id of the boot the snapshot was taken in.
cat /proc/sys/kernel/random/boot_id >/run/boot-id

# A tiny guest agent on the host's channel: guest-set-time after a restore (then the
# resume hooks in /etc/stoker/resume.d), guest-ping; see /sbin/stoker-ga.
/sbin/stoker-ga >/run/stoker-ga.log 2>&1 &

if ! has stoker.nohttp=1; then
    httpd -p 80 -h /www
    n=0
    while ! grep -qs ':0050 [0-9A-F]*:0000 0A' /proc/net/tcp /proc/net/tcp6 \
            && [ "$n" -lt 250 ]; do
        usleep 20000
        n=$((n + 1))
    done
fi

# Keep the daemons tests rely on out of the OOM killer's reach (alloc can
# fill RAM); CGI scripts reset their own score to 0.
for p in $(pidof acpid httpd udhcpc stoker-ga); do
    echo -1000 >"/proc/$p/oom_score_adj"
done

n=0
while [ -e /sys/class/net/eth0 ] && [ ! -e /run/dhcp-bound ] && [ "$n" -lt 150 ]; do
    usleep 20000
    n=$((n + 1))
done

echo "STOKER-GUEST-READY" >/dev/console

# Stay PID 1; ash reaps adopted orphans while it waits for sleep.
while :; do
    sleep 3600
done
"""

UDHCPC_SCRIPT = r"""#!/bin/sh
# udhcpc event hook: apply the lease to $interface. A renewal that keeps the
# address changes nothing, so open connections survive it.
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound | renew)
    want="$ip/${mask:-24}"
    have=$(ip -o -4 addr show dev "$interface" | sed -n 's/.* inet \([^ ]*\).*/\1/p')
    if [ "$have" != "$want" ]; then
        ip -4 addr flush dev "$interface"
        ip addr add "$want" broadcast "${broadcast:-+}" dev "$interface"
    fi
    if [ -n "$router" ]; then
        ip route replace default via "${router%% *}" dev "$interface"
    fi
    : >/etc/resolv.conf
    for d in $dns; do
        echo "nameserver $d" >>/etc/resolv.conf
    done
    echo "stoker-dhcp: $1 $want via ${router:-none}" >/dev/console
    : >/run/dhcp-bound
    ;;
esac
exit 0
"""

GUEST_AGENT_SCRIPT = r"""#!/bin/sh
# The test guest's guest agent: the part of QEMU's qemu-ga protocol stoker uses, one JSON
# command per line on the virtio-serial port org.qemu.guest_agent.0.
#   guest-set-time {"time": NS}: answer at once, then step the clock to the host's time
#     (at the next whole second, so it is right to the millisecond, not just the second)
#     and run the resume hooks; a restored guest's clock stopped when its state was saved.
#   guest-ping, guest-sync: answered.
port=
for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/${p##*/}
done
[ -n "$port" ] || { echo "stoker-ga: no guest agent port"; exit 0; }
exec 3<>"$port"
set_time() {
    secs=$(($1 / 1000000000))
    frac=$(($1 % 1000000000))
    usleep $(((1000000000 - frac) / 1000))
    date -s "@$((secs + 1))" >/dev/null
    for hook in /etc/stoker/resume.d/*; do
        [ -x "$hook" ] && "$hook"
    done
}
# A read while the host end is not connected returns end-of-file at once (that is how
# virtio-serial says "nobody there"): wait a moment and read again.
while :; do
while read -r line <&3; do
    case "$line" in
    *'"guest-set-time"'*)
        ns=$(printf '%s\n' "$line" | sed -n 's/.*"time": *\([0-9][0-9]*\).*/\1/p')
        if [ -n "$ns" ]; then
            printf '{"return": {}}\n' >&3
            set_time "$ns" &
        else
            printf '{"error": {"class": "GenericError", "desc": "no time"}}\n' >&3
        fi
        ;;
    *'"guest-ping"'* | *'"guest-sync'*) printf '{"return": {}}\n' >&3 ;;
    *) printf '{"error": {"class": "CommandNotFound", "desc": "not supported"}}\n' >&3 ;;
    esac
done
usleep 50000
done
"""

RESUME_HOOK = r"""#!/bin/sh
# Runs after a restore: count it, note when, and stir the entropy pool (a restored guest
# would otherwise hand out the same random numbers as every other copy of the snapshot).
n=$(cat /run/resumed-count 2>/dev/null || echo 0)
echo $((n + 1)) >/run/resumed-count
date +%s >/run/resumed-at
head -c 64 /dev/urandom >/dev/urandom
"""

POWEROFF_SCRIPT = r"""#!/bin/sh
# Clean power-off: flush, unmount /data, then power off without init.
sync
umount /data 2>/dev/null
sync
exec poweroff -f
"""

CGI_LIB = r"""# Helpers sourced by the CGI scripts.
# httpd is OOM-protected and we inherit that; be an ordinary victim again.
echo 0 >/proc/$$/oom_score_adj 2>/dev/null
param() {
    printf '%s\n' "$QUERY_STRING" | tr '&' '\n' | sed -n "s/^$1=//p" | head -n 1
}
num() { case "$1" in '' | *[!0-9]*) echo "$2" ;; *) echo "$1" ;; esac; }
ok() { printf 'Content-Type: text/plain\r\n\r\n'; }
fail() { printf 'HTTP/1.0 %s\r\nContent-Type: text/plain\r\n\r\n%s\n' "$1" "$2"; exit 0; }
data_mounted() { grep -qs ' /data ' /proc/mounts; }
# Run a command fully detached so httpd sees EOF and answers at once.
detach() { setsid "$@" </dev/null >/dev/null 2>&1 & }
uptime_cs() { tr -d '.' </proc/uptime | cut -d' ' -f1; }
"""

CGI_SCRIPTS: Mapping[str, str] = {
    "stop-http": r"""#!/bin/sh
. /lib/stoker/cgi.sh
ok
echo "stopping httpd"
detach sh -c 'usleep 200000; killall httpd'
""",
    "burn": r"""#!/bin/sh
. /lib/stoker/cgi.sh
s=$(num "$(param seconds)" 60)
t=$(num "$(param threads)" 1)
i=0
while [ "$i" -lt "$t" ]; do
    detach timeout -s KILL "$s" sh -c 'while :; do :; done'
    i=$((i + 1))
done
ok
echo "burning ${t} thread(s) for ${s}s"
""",
    "alloc": r"""#!/bin/sh
. /lib/stoker/cgi.sh
mb=$(num "$(param mb)" 16)
if [ "$mb" -eq 0 ]; then
    rm -f /dev/shm/alloc.*
    ok
    echo "freed"
    exit 0
fi
# Refuse what would wake the OOM killer (it would take httpd or the CGI).
avail=$(sed -n 's/^MemAvailable: *\([0-9]*\) kB$/\1/p' /proc/meminfo)
[ $((mb * 1024 + 8192)) -le "$avail" ] ||
    fail "507 Insufficient Storage" "only ${avail} kB available"
f="/dev/shm/alloc.$(uptime_cs).$$"
dd if=/dev/zero of="$f" bs=1048576 count="$mb" 2>/dev/null
got=$(($(stat -c %s "$f") / 1048576))
[ "$got" -ge "$mb" ] || fail "507 Insufficient Storage" "allocated only ${got} of ${mb} MiB"
ok
echo "allocated ${got} MiB"
""",
    "meminfo": r"""#!/bin/sh
. /lib/stoker/cgi.sh
ok
cat /proc/meminfo
""",
    "write-marker": r"""#!/bin/sh
. /lib/stoker/cgi.sh
v=$(httpd -d "$(param value)")
printf '%s' "$v" >/tmp/marker
where=tmp
if data_mounted; then
    printf '%s' "$v" >/data/marker && where=data
fi
sync
ok
printf '%s\n' "$where"
""",
    "read-marker": r"""#!/bin/sh
. /lib/stoker/cgi.sh
f=/tmp/marker
if [ "$(param where)" != tmp ] && data_mounted; then
    f=/data/marker
fi
[ -f "$f" ] || fail "404 Not Found" "no marker at $f"
ok
cat "$f"
""",
    "dd": r"""#!/bin/sh
. /lib/stoker/cgi.sh
mb=$(num "$(param mb)" 16)
data_mounted || fail "409 Conflict" "/data is not mounted"
mode=fsync
if dd if=/dev/zero of=/data/.ddprobe bs=4096 count=1 oflag=direct 2>/dev/null; then
    mode=direct
fi
rm -f /data/.ddprobe
t0=$(uptime_cs)
if [ "$mode" = direct ]; then
    dd if=/dev/zero of=/data/ddtest bs=1048576 count="$mb" oflag=direct 2>/dev/null
else
    dd if=/dev/zero of=/data/ddtest bs=1048576 count="$mb" conv=fsync 2>/dev/null
fi
rc=$?
t1=$(uptime_cs)
[ "$rc" -eq 0 ] || fail "507 Insufficient Storage" "dd failed"
printf 'Content-Type: text/plain\r\nX-Stoker-Dd-Mode: %s\r\n\r\n' "$mode"
echo $(((t1 - t0) * 10))
""",
    "agent": r"""#!/bin/sh
. /lib/stoker/cgi.sh
ok
echo "ports: $(ls /sys/class/virtio-ports 2>&1)"
for p in /sys/class/virtio-ports/*; do echo "$p $(cat $p/name 2>&1)"; done
echo "modules: $(cat /proc/modules | cut -d' ' -f1 | tr '\n' ' ')"
cat /run/stoker-ga.log 2>&1
""",
    "clock": r"""#!/bin/sh
. /lib/stoker/cgi.sh
ok
echo "time $(date +%s)"
echo "boot_id $(cat /run/boot-id)"
echo "resumed $(cat /run/resumed-count 2>/dev/null || echo 0)"
""",
    "poweroff": r"""#!/bin/sh
. /lib/stoker/cgi.sh
ok
echo "powering off"
detach sh -c 'usleep 200000; exec /sbin/stoker-poweroff'
""",
    # Network probes for the managed-network tests: one "key value" per line.
    "net": r"""#!/bin/sh
. /lib/stoker/cgi.sh
ok
echo "mac $(cat /sys/class/net/eth0/address 2>/dev/null)"
ip -o -4 addr show dev eth0 | sed -n 's/.* inet \([^ ]*\).*/addr4 \1/p'
ip -o -6 addr show dev eth0 scope global | sed -n 's/.* inet6 \([^ ]*\).*/addr6 \1/p'
ip -4 route show default | sed -n 's/^default via \([^ ]*\).*/gw4 \1/p'
ip -6 route show default | sed -n 's/^default via \([^ ]*\).*/gw6 \1/p'
""",
    "fetch": r"""#!/bin/sh
. /lib/stoker/cgi.sh
# GET url= into a counter (nothing stored); timing from /proc/uptime (10 ms).
url=$(httpd -d "$(param url)")
[ -n "$url" ] || fail "400 Bad Request" "url= is required"
t=$(num "$(param timeout)" 60)
set -o pipefail
t0=$(uptime_cs)
bytes=$(timeout -s KILL "$t" wget -q -O - "$url" 2>"/tmp/fetch.$$" | wc -c)
rc=$?
t1=$(uptime_cs)
[ "$rc" -eq 0 ] ||
    fail "502 Bad Gateway" "wget $url failed ($rc) after $bytes bytes: $(cat "/tmp/fetch.$$")"
ok
echo "bytes $bytes"
echo "ms $(((t1 - t0) * 10))"
""",
    "send": r"""#!/bin/sh
. /lib/stoker/cgi.sh
# Push kb= KiB of zeros to a TCP listener (host=, port=): the guest-transmit direction.
host=$(httpd -d "$(param host)")
port=$(num "$(param port)" 0)
kb=$(num "$(param kb)" 1024)
t=$(num "$(param timeout)" 60)
t0=$(uptime_cs)
dd if=/dev/zero bs=1024 count="$kb" 2>/dev/null | timeout -s KILL "$t" nc "$host" "$port"
rc=$?
t1=$(uptime_cs)
[ "$rc" -eq 0 ] || fail "502 Bad Gateway" "nc $host $port failed ($rc)"
ok
echo "bytes $((kb * 1024))"
echo "ms $(((t1 - t0) * 10))"
""",
    "connect": r"""#!/bin/sh
. /lib/stoker/cgi.sh
# Can a TCP connection to host=:port= be opened within timeout= s? Always 200.
host=$(httpd -d "$(param host)")
port=$(num "$(param port)" 80)
t=$(num "$(param timeout)" 2)
ok
if err=$(timeout -s KILL "$((t + 1))" nc -w "$t" "$host" "$port" </dev/null 2>&1); then
    echo "open"
else
    echo "closed ${err}"
fi
""",
    "ping": r"""#!/bin/sh
. /lib/stoker/cgi.sh
# ICMP echo to host= (count= probes, 1 s each at most). Always 200.
host=$(httpd -d "$(param host)")
c=$(num "$(param count)" 1)
ok
if out=$(ping -c "$c" -W 1 "$host" 2>&1); then
    echo "reachable"
else
    echo "unreachable"
fi
printf '%s\n' "$out" | tail -n 2
""",
}


# --------------------------------------------------------------------------
# Pure helpers (unit tested)
# --------------------------------------------------------------------------


def module_name(path: str) -> str:
    """Kernel module name of a ``.ko`` path: basename, no suffix, ``-`` -> ``_``."""
    base = path.rsplit("/", 1)[-1]
    for suffix in sorted(_MODULE_SUFFIXES, key=len, reverse=True):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """Parse ``modules.dep``: module name -> (relative path, dependency names)."""
    result: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        path, _, deps = line.partition(":")
        path = path.strip()
        result[module_name(path)] = (path, [module_name(d) for d in deps.split()])
    return result


def module_load_order(
    modules_dep: str,
    required: Iterable[str],
    optional: Iterable[str] = (),
    builtin: Iterable[str] = (),
) -> list[str]:
    """Paths (as in ``modules.dep``) to insmod, dependencies first.

    ``builtin`` holds names or paths from ``modules.builtin``: those need no
    loading. A required module that is neither a module nor built in raises
    :class:`GuestBuildError`; a missing optional one is skipped.
    """
    deps = parse_modules_dep(modules_dep)
    built_in = {module_name(b) for b in builtin}
    order: list[str] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in chain:
            raise GuestBuildError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        path, needs = deps[name]
        for dep in needs:
            if dep in deps:
                visit(dep, (*chain, name))
            elif dep not in built_in:
                raise GuestBuildError(f"module {name} needs {dep}, which is missing")
        done.add(name)
        order.append(path)

    for name in required:
        name = module_name(name)
        if name in deps:
            visit(name, ())
        elif name not in built_in:
            raise GuestBuildError(f"kernel has no module {name!r} and does not build it in")
    for name in optional:
        name = module_name(name)
        if name in deps:
            visit(name, ())
    return order


def modinfo_depends(data: bytes) -> list[str]:
    """The ``depends=`` field of a module's ``.modinfo`` section (raw .ko bytes)."""
    match = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", data)
    if match is None:
        return []
    return [module_name(d) for d in match.group(1).decode().split(",") if d]


def recipe_hash() -> str:
    """Hash of everything that shapes the guest, so edits force a rebuild."""
    h = hashlib.sha256()
    for part in (
        str(_FORMAT_VERSION),
        BASE_CMDLINE,
        READY_MARKER,
        INIT_SCRIPT,
        UDHCPC_SCRIPT,
        POWEROFF_SCRIPT,
        GUEST_AGENT_SCRIPT,
        RESUME_HOOK,
        CGI_LIB,
        json.dumps(dict(CGI_SCRIPTS), sort_keys=True),
        ",".join(REQUIRED_MODULES),
        ",".join(OPTIONAL_MODULES),
    ):
        h.update(part.encode())
        h.update(b"\x00")
    return h.hexdigest()


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$STOKER_GUEST_DIR``, else ``$XDG_CACHE_HOME/stoker/guest``, else ``~/.cache/...``."""
    explicit = os.environ.get("STOKER_GUEST_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "stoker" / "guest"


def find_guest(cache_dir: Path | None = None) -> GuestImage | None:
    """The cached guest, or None when it is absent, incomplete or built from an old recipe."""
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        manifest = json.loads((directory / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("recipe") != recipe_hash():
        return None
    kernel = directory / _KERNEL_FILE
    initrd = directory / _INITRD_FILE
    if not kernel.is_file() or not initrd.is_file():
        return None
    return GuestImage(
        kernel=kernel,
        initrd=initrd,
        cmdline=str(manifest.get("cmdline", BASE_CMDLINE)),
        ready_marker=str(manifest.get("ready_marker", READY_MARKER)),
    )


def build_guest(
    cache_dir: Path | None = None,
    *,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> GuestImage:
    """Build the guest into ``cache_dir`` unless a complete one is there already.

    Needs ``apt-get``/``apt-cache``/``dpkg-deb`` (to fetch the Debian cloud
    kernel), ``cpio`` and a static ``/bin/busybox`` (``busybox-static``).
    """
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not force:
        found = find_guest(directory)
        if found is not None:
            return found
    directory.parent.mkdir(parents=True, exist_ok=True)
    with _locked(directory.parent / f".{directory.name}.lock"):
        if not force:
            found = find_guest(directory)
            if found is not None:
                return found  # another process finished while we waited
        started = time.monotonic()
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.build-", dir=directory.parent))
        staging.chmod(0o755)  # mkdtemp makes it 0700; the cache is shared
        try:
            _build_into(staging, log)
            _replace_dir(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log(f"guest built in {time.monotonic() - started:.1f}s: {directory}")
    found = find_guest(directory)
    if found is None:
        raise GuestBuildError(f"guest build finished but {directory} is incomplete")
    return found


# --------------------------------------------------------------------------
# Build steps
# --------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an old ``target`` is moved aside, then removed."""
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, trash / "old")
        os.rename(new, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(new, target)


def _run(argv: list[str], *, cwd: Path | None = None, timeout: float = 600) -> str:
    try:
        proc = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise GuestBuildError(f"{argv[0]} not found; is it installed?") from exc
    except subprocess.TimeoutExpired as exc:
        raise GuestBuildError(f"{' '.join(argv)} timed out after {timeout:.0f}s") from exc
    if proc.returncode != 0:
        raise GuestBuildError(
            f"{' '.join(argv)} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
        )
    return proc.stdout


def _check_static_busybox(path: Path) -> None:
    """Refuse a dynamically linked busybox: the initramfs has no libc."""
    hint = "install it with: apt-get install busybox-static"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise GuestBuildError(f"{path} is missing; {hint}") from exc
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise GuestBuildError(f"{path} is not a 64-bit ELF binary; {hint}")
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP: needs a dynamic loader
            raise GuestBuildError(f"{path} is dynamically linked; {hint}")


def _resolve_kernel_package(log: Callable[[str], None]) -> str:
    def lookup() -> str | None:
        try:
            out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE], timeout=120)
        except GuestBuildError:
            return None
        match = re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)\b", out)
        return match.group(1) if match else None

    package = lookup()
    if package is None:
        log("apt-cache knows no cloud kernel; running apt-get update")
        _run(["apt-get", "update"], timeout=900)
        package = lookup()
    if package is None:
        raise GuestBuildError(f"cannot resolve {KERNEL_META_PACKAGE} to a kernel package")
    return package


def _download_kernel(package: str, workdir: Path, log: Callable[[str], None]) -> Path:
    log(f"downloading {package}")
    try:
        _run(["apt-get", "download", package], cwd=workdir, timeout=900)
    except GuestBuildError:
        log("apt-get download failed; running apt-get update and retrying")
        _run(["apt-get", "update"], timeout=900)
        _run(["apt-get", "download", package], cwd=workdir, timeout=900)
    debs = sorted(workdir.glob(f"{package}_*.deb"))
    if not debs:
        raise GuestBuildError(f"apt-get download {package} produced no .deb")
    return debs[-1]


def _read_module(path: Path) -> bytes:
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        return _run_bytes(["zstd", "-dc", str(path)])
    return path.read_bytes()


def _run_bytes(argv: list[str]) -> bytes:
    try:
        return subprocess.run(argv, capture_output=True, check=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise GuestBuildError(f"{' '.join(argv)} failed: {exc}") from exc


def _modules_dep_text(moddir: Path) -> str:
    """``modules.dep`` of the tree; generated from ``.modinfo`` when the .deb lacks it.

    Debian's kernel packages leave ``modules.dep`` to depmod at install time,
    so an extracted .deb has none.
    """
    dep_file = moddir / "modules.dep"
    if dep_file.is_file():
        return dep_file.read_text()
    paths = [p for p in moddir.rglob("*") if p.is_file() and p.name.endswith(_MODULE_SUFFIXES)]
    by_name = {module_name(p.name): p.relative_to(moddir).as_posix() for p in paths}
    lines = []
    for p in sorted(paths):
        deps = [by_name[d] for d in modinfo_depends(_read_module(p)) if d in by_name]
        lines.append(f"{p.relative_to(moddir).as_posix()}: {' '.join(deps)}".rstrip())
    return "\n".join(lines) + "\n"


def _build_into(staging: Path, log: Callable[[str], None]) -> None:
    _check_static_busybox(BUSYBOX_PATH)
    for tool in ("apt-get", "apt-cache", "dpkg-deb", "cpio"):
        if shutil.which(tool) is None:
            raise GuestBuildError(f"{tool} not found; the guest build needs it")
    work = staging / "work"
    work.mkdir()
    package = _resolve_kernel_package(log)
    deb = _download_kernel(package, work, log)
    extracted = work / "deb"
    _run(["dpkg-deb", "-x", str(deb), str(extracted)])

    vmlinuz = sorted((extracted / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise GuestBuildError(f"{deb.name} has no boot/vmlinuz-*")
    kver = vmlinuz[-1].name.removeprefix("vmlinuz-")
    moddir = next(
        (
            d
            for d in (extracted / "lib/modules" / kver, extracted / "usr/lib/modules" / kver)
            if d.is_dir()
        ),
        None,
    )
    if moddir is None:
        raise GuestBuildError(f"{deb.name} has no lib/modules/{kver}")
    builtin_file = moddir / "modules.builtin"
    builtin = builtin_file.read_text().split() if builtin_file.is_file() else []
    order = module_load_order(
        _modules_dep_text(moddir), REQUIRED_MODULES, OPTIONAL_MODULES, builtin
    )
    log(f"kernel {kver}; modules: {', '.join(module_name(p) for p in order)}")

    root = staging / "rootfs"
    _populate_rootfs(root, moddir, order)
    initrd = _pack_initramfs(root)
    (staging / _INITRD_FILE).write_bytes(initrd)
    shutil.copyfile(vmlinuz[-1], staging / _KERNEL_FILE)
    shutil.rmtree(work)
    shutil.rmtree(root)
    manifest = {
        "format": _FORMAT_VERSION,
        "recipe": recipe_hash(),
        "kernel_package": package,
        "kernel_version": kver,
        "modules": [module_name(p) for p in order],
        "cmdline": BASE_CMDLINE,
        "ready_marker": READY_MARKER,
        "initrd_bytes": len(initrd),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (staging / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _populate_rootfs(root: Path, moddir: Path, order: list[str]) -> None:
    for d in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "etc/acpi/PWRF",
        "etc/stoker/resume.d",
        "data",
        "www/cgi-bin",
        "lib/modules",
        "lib/stoker",
    ):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(BUSYBOX_PATH, root / "bin/busybox")
    (root / "bin/busybox").chmod(0o755)
    for applet in _run([str(BUSYBOX_PATH), "--list-full"]).split():
        link = root / applet.strip("/")
        if link.name in ("busybox", "linuxrc") or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")

    _write(root / "init", INIT_SCRIPT, 0o755)
    _write(root / "sbin/stoker-poweroff", POWEROFF_SCRIPT, 0o755)
    _write(root / "sbin/stoker-ga", GUEST_AGENT_SCRIPT, 0o755)
    _write(root / "etc/stoker/resume.d/10-record", RESUME_HOOK, 0o755)
    _write(root / "etc/udhcpc.script", UDHCPC_SCRIPT, 0o755)
    _write(root / "etc/acpi/PWRF/00000080", "#!/bin/sh\nexec /sbin/stoker-poweroff\n", 0o755)
    _write(root / "lib/stoker/cgi.sh", CGI_LIB)
    _write(root / "www/health", "ok\n")
    for name, script in CGI_SCRIPTS.items():
        _write(root / "www/cgi-bin" / name, script, 0o755)
    _write(root / "etc/passwd", "root:x:0:0:root:/:/bin/sh\n")
    _write(root / "etc/group", "root:x:0:\n")

    names = []
    for rel in order:
        name = module_name(rel) + ".ko"
        (root / "lib/modules" / name).write_bytes(_read_module(moddir / rel))
        names.append(name)
    _write(root / "lib/modules/load-order", "\n".join(names) + "\n")


def _pack_initramfs(root: Path) -> bytes:
    """``cpio -o -H newc`` over the tree (root-owned entries), then gzip."""
    entries = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
    listing = "\0".join([".", *entries]).encode() + b"\0"
    try:
        proc = subprocess.run(
            [
                "cpio",
                "--create",
                "--null",
                "--quiet",
                "--format=newc",
                "--owner=0:0",
                "--reproducible",
            ],
            cwd=root,
            input=listing,
            capture_output=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise GuestBuildError(f"cpio failed: {exc}") from exc
    if proc.returncode != 0:
        raise GuestBuildError(f"cpio failed: {proc.stderr.decode(errors='replace').strip()}")
    return gzip.compress(proc.stdout, compresslevel=9, mtime=0)
