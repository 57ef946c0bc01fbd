"""Death detection and automatic recovery, against a plain QEMU boot of the same guest.

Each round SIGKILLs the VMM of a running VM with restart policy "on-failure" and measures
(a) detection: the kill to the ``vm.state`` event that records ``error`` (the event's own
timestamp, same host clock), and (b) recovery: the kill to the guest's HTTP ``/health``
answering again through the user-mode port forward. Alternating with it, the identical QEMU
argv (``qemu_argv``) is exec'd by hand, with the VM stopped so that no other guest runs beside
either boot, and timed to the same HTTP answer: that raw boot is what
recovery cannot beat, so the target is raw boot + 0.3 s. HTTP is polled with 0.25 s timeouts
(FACTS: longer ones read late). The VM's backoff starts at 0.05 s so that the figure measures
stoker, not the policy's chosen delay (the default is 1 s).

    .venv/bin/python -m bench.recovery [--rounds 10]
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from datetime import UTC, datetime

from bench.rawqemu import RawQemu
from bench.report import median, percentile, record
from stoker.domain.spec import VMSpec
from tests.helpers import AgentProcess, free_port, guest_spec, http_get

POLL_S = 0.005
BACKOFF_S = 0.05


def answering(port: int) -> bool:
    return http_get(f"http://127.0.0.1:{port}/health") is not None


def raw_boot(spec: VMSpec, port: int) -> float:
    """Plain QEMU with stoker's argv: exec -> guest HTTP answering."""
    raw = RawQemu(spec)
    try:
        began = time.perf_counter()
        raw.launch()
        while not answering(port):
            raw.check_alive()
            if time.perf_counter() - began > 120:
                raise RuntimeError("raw QEMU guest did not answer within 120 s")
            time.sleep(POLL_S)
        return time.perf_counter() - began
    finally:
        raw.cleanup()


def kill_round(agent: AgentProcess, name: str, port: int) -> tuple[float, float]:
    """SIGKILL the VMM; return (detection s, recovery s)."""
    with agent.client() as api:
        vm = api.get_vm(name)
        assert vm.state == "running" and vm.process is not None, vm
        last = max([e.id for e in api.events(vm=name, limit=1)] or [0])
        pid = vm.process.pid
        wall = datetime.now(UTC)
        began = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        time.sleep(POLL_S)
        while not answering(port):
            if time.perf_counter() - began > 120:
                raise RuntimeError(f"{name} did not come back within 120 s")
            time.sleep(POLL_S)
        recovery = time.perf_counter() - began
        error = next(
            e
            for e in api.events(vm=name, type="vm.state", after=last, limit=100)
            if e.data["to_state"] == "error"
        )
        at = error.at
        detection = (at - wall).total_seconds()
        # let it settle to running before the next round
        deadline = time.monotonic() + 60
        while api.get_vm(name).state != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
    return detection, recovery


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-record", action="store_true", help="do not write BENCHMARKS.md")
    args = parser.parse_args()

    raw_port, port = free_port(), free_port()
    raw_spec = VMSpec.model_validate(guest_spec("bench-raw", raw_port, accel="tcg"))
    spec = guest_spec(
        "phoenix",
        port,
        accel="tcg",
        restart={
            "policy": "on-failure",
            "max_retries": 1000,
            "backoff_initial_s": BACKOFF_S,
            "stable_after_s": 0,
        },
    )
    agent = AgentProcess().start()
    raw, detect, recover = [], [], []
    try:
        with agent.client() as api:
            api.create_vm(spec)
            api.start_vm("phoenix", wait=True, timeout_s=120)
        with agent.client() as api:
            api.stop_vm("phoenix", graceful=False)
        raw_boot(raw_spec, raw_port)  # warm the page cache
        with agent.client() as api:
            api.start_vm("phoenix", wait=True, timeout_s=120)
        for i in range(args.rounds):
            # the raw boot runs alone, as the recovery boot does: no idle guest beside it
            with agent.client() as api:
                api.stop_vm("phoenix", graceful=False)
            r = raw_boot(raw_spec, raw_port)
            with agent.client() as api:
                api.start_vm("phoenix", wait=True, timeout_s=120)
            d, s = kill_round(agent, "phoenix", port)
            raw.append(r)
            detect.append(d)
            recover.append(s)
            print(
                f"round {i + 1:2}: raw boot {r:.3f}s | detection {d * 1000:.1f}ms | "
                f"recovery {s:.3f}s ({s - r:+.3f}s vs raw)",
                flush=True,
            )
    finally:
        agent.cleanup()

    over_median = median(recover) - median(raw)
    over_p99 = percentile(recover, 99) - percentile(raw, 99)
    lines = [
        f"Rounds: {args.rounds}, test guest (Debian cloud kernel, busybox initramfs), 128 MiB, "
        f"1 vCPU, TCG, user-mode port forward; restart policy on-failure with "
        f"backoff_initial_s={BACKOFF_S}.",
        "",
        "| measure | median | p99 | baseline (raw QEMU exec → HTTP) | target | met |",
        "|---|---|---|---|---|---|",
        f"| SIGKILL → state error (detection) | {median(detect) * 1000:.1f} ms | "
        f"{percentile(detect, 99) * 1000:.1f} ms | - | p99 < 100 ms | "
        f"{'yes' if percentile(detect, 99) < 0.1 else 'no'} |",
        f"| SIGKILL → guest HTTP answers again (recovery) | {median(recover):.3f} s | "
        f"{percentile(recover, 99):.3f} s | median {median(raw):.3f} s, p99 "
        f"{percentile(raw, 99):.3f} s | ≤ raw + 0.3 s | "
        f"{'yes' if over_median <= 0.3 else 'no'} (median {over_median:+.3f} s, "
        f"p99 {over_p99:+.3f} s) |",
        "",
        "Recovery includes the policy's backoff delay "
        f"({BACKOFF_S * 1000:.0f} ms), the error → stopped cleanup, the pre-start hooks, "
        "spawning QEMU and the guest's own boot; detection is the pidfd wake-up, reaping the "
        "exit status and closing the QMP connection, up to the transition's timestamp "
        "(taken just before its SQLite write).",
    ]
    body = "\n".join(lines)
    print()
    print(body)
    if not args.no_record:
        record(
            "Recovery: death detection and auto-restart", ".venv/bin/python -m bench.recovery", body
        )


if __name__ == "__main__":
    main()
