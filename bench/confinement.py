"""What confinement costs at start: the test guest launched straight from the argv builder.

For each mode (``none``: no sandbox, no uid change; ``runas``: ``-runas``/``-chroot``;
``namespace``: exec'd unprivileged in the mount-namespace jail) and each run, in turn:
exec to QMP answering ``query-status``, and exec to the guest's HTTP health endpoint through
a user-mode port forward (probed every 10 ms with a 0.25 s timeout, see FACTS.md). Then the
/proc/<pid>/status lines of one confined QEMU per mode.

    .venv/bin/python -m bench.confinement [--runs 10]

It prints its figures; it does not write BENCHMARKS.md. Needs root (per-VM uids, mounts).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.report import median, record
from stoker.drivers.qemu_argv import (
    Confinement,
    PortForward,
    QemuLaunch,
    UserNetwork,
    build_qemu_command,
)
from stoker.host import confine
from stoker.host.tsc import host_tsc_khz
from tests.helpers import free_port, guest_image, http_get, short_tmpdir

MODES = ("none", "runas", "namespace")
BENCH_UID = 200900
STATUS_KEYS = ("Uid", "Gid", "Groups", "CapPrm", "CapEff", "CapBnd", "NoNewPrivs", "Seccomp")


@dataclass
class Started:
    proc: subprocess.Popen[bytes]
    qmp: Path
    port: int
    began: float


def start(mode: str, work: Path) -> Started:
    image = guest_image()
    runtime = confine.prepare_runtime(work / mode, BENCH_UID, BENCH_UID)
    khz = host_tsc_khz()
    fds = [
        os.open(image.kernel, os.O_RDONLY | os.O_CLOEXEC),
        os.open(image.initrd, os.O_RDONLY | os.O_CLOEXEC),
        confine.open_output(runtime.console, BENCH_UID, BENCH_UID),
    ]
    qmp = confine.listen_qmp(runtime.qmp_socket)
    port = free_port()
    launch = QemuLaunch(
        name="bench",
        instance="0123456789abcdef",
        accel="tcg",
        memory_mib=128,
        vcpus=1,
        kernel_fd=fds[0],
        initrd_fd=fds[1],
        cmdline=f"{image.cmdline} tsc_early_khz={khz}" if khz else image.cmdline,
        qmp_fd=qmp.fileno(),
        console_fd=fds[2],
        network=UserNetwork((PortForward(port, 80),)),
        confinement=None
        if mode == "none"
        else Confinement(BENCH_UID, BENCH_UID, runtime.jail, mode),  # type: ignore[arg-type]
        sandbox=mode != "none",
    )
    command = build_qemu_command(launch)
    began = time.monotonic()
    proc = subprocess.Popen(
        command.argv,
        pass_fds=command.pass_fds,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=confine.minimal_env(),
        start_new_session=True,
    )
    for fd in fds:
        os.close(fd)
    qmp.close()
    return Started(proc, runtime.qmp_socket, port, began)


def qmp_ready(started: Started) -> float:
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(started.qmp))
        stream = client.makefile("rw")
        stream.readline()
        for command in ("qmp_capabilities", "query-status"):
            stream.write(f'{{"execute": "{command}"}}')
            stream.flush()
            stream.readline()
    return time.monotonic() - started.began


def http_ready(started: Started, timeout: float = 60.0) -> float:
    while http_get(f"http://127.0.0.1:{started.port}/health") is None:
        if started.proc.poll() is not None or time.monotonic() - started.began > timeout:
            raise RuntimeError("the guest did not answer")
        time.sleep(0.01)
    return time.monotonic() - started.began


def status_lines(pid: int) -> str:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return "; ".join(" ".join(ln.split()) for ln in lines if ln.split(":")[0] in STATUS_KEYS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--no-record", action="store_true", help="do not write BENCHMARKS.md")
    args = parser.parse_args()
    work = short_tmpdir("stkb-")
    os.chmod(work, 0o711)
    qmp: dict[str, list[float]] = {m: [] for m in MODES}
    http: dict[str, list[float]] = {m: [] for m in MODES}
    status: dict[str, str] = {}
    try:
        for _ in range(args.runs):
            for mode in MODES:
                started = start(mode, work)
                try:
                    qmp[mode].append(qmp_ready(started))
                    http[mode].append(http_ready(started))
                    status.setdefault(mode, status_lines(started.proc.pid))
                finally:
                    started.proc.kill()
                    started.proc.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = MODES[0]
    lines = [
        f"The test guest launched by the QEMU driver's own argv in each confinement mode, "
        f"alternating; medians of {args.runs} runs.",
        "",
        f"| mode | exec → QMP | exec → guest HTTP | vs {base} |",
        "|---|---|---|---|",
        *(
            f"| {mode} | {median(qmp[mode]):.3f} s | {median(http[mode]):.3f} s | "
            f"{median(http[mode]) / median(http[base]):.3f}x |"
            for mode in MODES
        ),
        "",
        *(f"- {mode}: {status[mode]}" for mode in MODES),
    ]
    print("\n".join(lines))
    if not args.no_record:
        record(
            "Confinement: the cost of each mode",
            ".venv/bin/python -m bench.confinement",
            "\n".join(lines),
        )


if __name__ == "__main__":
    main()
