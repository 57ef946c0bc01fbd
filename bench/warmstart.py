"""Warm start: every start path resuming a boot snapshot, against a cold boot of the same VM
and raw QEMU ``-incoming`` of the same saved state, in the same run.

Rounds alternate so every variant sees the same machine load:

* raw: plain QEMU with the driver's own argv and descriptors (``bench/rawqemu.py``, confined
  like the agent's) launched with ``-incoming fd:N`` of a copy of the warm VM's boot
  snapshot; QMP polled until paused, ``cont``, polled until running; then the guest's HTTP
  answer. Then SIGKILL + waitpid: the forced-stop baseline.
* warm: ``POST /vms/{ref}/start?wait=true`` of a VM with ``warm_start`` on, until it answers
  ``running``; then the guest's HTTP answer. Then ``POST /stop {"graceful": false}`` until it
  answers ``stopped`` (the VMM is reaped before that answer).
* cold: the same through a VM with ``warm_start`` off (the guest boots).

Recovery: SIGKILL of the VMM of a VM with restart policy on-failure and a 1 ms backoff (the
policy refuses 0) until the guest's HTTP answers again, warm and cold; the same kills give
the detection figure (kill to the ``error`` transition's timestamp). A 1 GiB guest is warm
started beside the 128 MiB one. Snapshot restore against raw ``-incoming`` is
``bench/snapshots.py``'s round, run here too.

    .venv/bin/python -m bench.warmstart [--rounds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

from bench.rawqemu import RawQemu
from bench.recovery import kill_round
from bench.report import median, percentile, record
from bench.snapshots import _qmp, _query
from bench.snapshots import raw_round as raw_snapshot_round
from bench.snapshots import stoker_round as stoker_snapshot_round
from stoker.client import Client
from stoker.domain.spec import VMSpec
from tests.helpers import AgentProcess, free_port, guest_spec, http_get, wait_for

POLL_S = 0.002
BACKOFF_S = 0.001


def answering(port: int, began: float, limit_s: float = 60) -> float:
    """Seconds from ``began`` until the guest's HTTP answers."""
    while http_get(f"http://127.0.0.1:{port}/health", 0.25) is None:
        if time.perf_counter() - began > limit_s:
            raise RuntimeError(f"the guest on port {port} did not answer within {limit_s} s")
        time.sleep(POLL_S)
    return time.perf_counter() - began


def boot_snapshot(agent: AgentProcess, api: Client, name: str) -> Path:
    return agent.data_dir / "vms" / api.get_vm(name).id / "warm" / "state"


async def raw_incoming(spec: VMSpec, state: Path, port: int) -> tuple[float, float, float]:
    """Plain QEMU restoring ``state``: (to running, to HTTP, SIGKILL + waitpid)."""
    raw = RawQemu(spec, "rawwarm-")
    try:
        copy = raw.paths.root / "state"
        shutil.copyfile(state, copy)
        began = time.perf_counter()
        raw.launch(incoming=copy)
        qmp = await _qmp(raw.paths.control_socket)
        while (await _query(qmp, "query-status"))["status"] != "paused":
            raw.check_alive()
            await asyncio.sleep(POLL_S)
        await qmp.execute("cont")
        while not (await _query(qmp, "query-status"))["running"]:
            await asyncio.sleep(POLL_S)
        running = time.perf_counter() - began
        await qmp.disconnect()
        http = answering(port, began)
        began = time.perf_counter()
        raw.kill()
        return running, http, time.perf_counter() - began
    finally:
        raw.cleanup()


def stoker_start(api: Client, name: str, port: int) -> tuple[float, float, float]:
    """(start to ``running``, start to HTTP, forced stop to ``stopped``)."""
    began = time.perf_counter()
    vm = api.start_vm(name, wait=True, timeout_s=120)
    running = time.perf_counter() - began
    if vm.state != "running":
        raise RuntimeError(f"{name} did not start: {vm.state_reason}")
    http = answering(port, began)
    began = time.perf_counter()
    vm = api.stop_vm(name, graceful=False)
    stop = time.perf_counter() - began
    assert vm.state == "stopped", vm
    return running, http, stop


def warm_starts(api: Client, name: str) -> int:
    return len(api.events(vm=name, type="vm.warm_start", limit=1000))


def prime(api: Client, name: str) -> None:
    """Boot cold once and wait for the boot snapshot, then stop."""
    assert api.start_vm(name, wait=True, timeout_s=120).state == "running"
    wait_for(lambda: api.events(vm=name, type="vm.boot_snapshot_saved", limit=10), 60)
    api.stop_vm(name, graceful=False)


def ms(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--snapshot-rounds", type=int, default=10)
    parser.add_argument("--no-record", action="store_true", help="do not write BENCHMARKS.md")
    args = parser.parse_args()

    port, big_port, rec_port = free_port(), free_port(), free_port()
    snap_port, raw_snap_port = free_port(), free_port()
    restart = {
        "policy": "on-failure",
        "max_retries": 1000,
        "backoff_initial_s": BACKOFF_S,
        "stable_after_s": 0,
    }
    specs: dict[str, dict[str, Any]] = {
        "warm": guest_spec("warm", port, warm_start=True),
        "cold": guest_spec("cold", port),
        "big": guest_spec("big", big_port, warm_start=True, memory_mib=1024),
        "phoenix-warm": guest_spec("phoenix-warm", rec_port, warm_start=True, restart=restart),
        "phoenix-cold": guest_spec("phoenix-cold", rec_port, restart=restart),
    }
    raw_spec = VMSpec.model_validate(specs["warm"])
    raw_snap_spec = VMSpec.model_validate(guest_spec("rawsnap", raw_snap_port))
    rows: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        rows.setdefault(key, []).append(value)

    agent = AgentProcess().start()
    try:
        with agent.client() as api:
            for spec in specs.values():
                api.create_vm(spec)
            for name in ("warm", "big", "phoenix-warm"):
                prime(api, name)
            state = boot_snapshot(agent, api, "warm")
            big_state = boot_snapshot(agent, api, "big")
            sizes = (state.stat().st_size, big_state.stat().st_size)
            stoker_start(api, "cold", port)  # the page cache, for every variant
            for i in range(args.rounds):
                r_run, r_http, r_kill = await raw_incoming(raw_spec, state, port)
                w_run, w_http, w_stop = stoker_start(api, "warm", port)
                c_run, c_http, c_stop = stoker_start(api, "cold", port)
                b_run, b_http, _ = stoker_start(api, "big", big_port)
                for key, value in {
                    "raw_run": r_run, "raw_http": r_http, "raw_kill": r_kill,
                    "warm_run": w_run, "warm_http": w_http, "warm_stop": w_stop,
                    "cold_run": c_run, "cold_http": c_http, "cold_stop": c_stop,
                    "big_run": b_run, "big_http": b_http,
                }.items():  # fmt: skip
                    add(key, value)
                print(
                    f"round {i + 1:2}: to HTTP raw -incoming {ms(r_http)} | warm {ms(w_http)} | "
                    f"cold {ms(c_http)} | 1 GiB warm {ms(b_http)} | forced stop raw "
                    f"{r_kill * 1000:.1f} ms stoker {w_stop * 1000:.1f} ms",
                    flush=True,
                )
            assert warm_starts(api, "warm") == args.rounds, "every warm round resumed"
            assert warm_starts(api, "cold") == 0

            for name in ("phoenix-warm", "phoenix-cold"):
                api.start_vm(name, wait=True, timeout_s=120)
                answering(rec_port, time.perf_counter())
                before = warm_starts(api, name)
                for _ in range(args.rounds):
                    detection, recovery = kill_round(agent, name, rec_port)
                    add(f"{name}_recovery", recovery)
                    add("detection", detection)
                api.stop_vm(name, graceful=False)
                print(f"{name}: recovery median {ms(median(rows[f'{name}_recovery']))}")
                resumed = warm_starts(api, name) - before
                assert resumed == (args.rounds if name == "phoenix-warm" else 0), resumed

            api.create_vm(guest_spec("snapbench", snap_port))
            api.start_vm("snapbench", wait=True, timeout_s=120)
            answering(snap_port, time.perf_counter())
            for _ in range(args.snapshot_rounds):
                _, raw_restore = await raw_snapshot_round(
                    raw_snap_spec, raw_snap_spec.ready_marker or "", raw_snap_port
                )
                _, restore, _ = stoker_snapshot_round(agent, "snapbench", snap_port)
                add("raw_restore", raw_restore)
                add("restore", restore)
            api.stop_vm("snapbench", graceful=False)
    finally:
        agent.cleanup()

    m = {key: median(values) for key, values in rows.items()}
    warm_vs_cold = m["cold_http"] / m["warm_http"]
    stop_over = m["warm_stop"] - m["raw_kill"]
    detect_p99 = percentile(rows["detection"], 99)
    restore_ratio = m["restore"] / m["raw_restore"]
    big_ratio = m["big_http"] / m["warm_http"]

    def met(ok: bool) -> str:
        return "yes" if ok else "**no**"

    lines = [
        f"Test guest (Debian cloud kernel, busybox initramfs), 1 vCPU, TCG, user-mode port "
        f"forward; medians of {args.rounds} alternating rounds (snapshot restore: "
        f"{args.snapshot_rounds}). Boot snapshot: {sizes[0] / 2**20:.1f} MiB for 128 MiB of RAM, "
        f'{sizes[1] / 2**20:.1f} MiB for 1 GiB (QEMU skips zero pages). "Ready" is the guest\'s '
        "HTTP answering through the port forward.",
        "",
        "| figure | stoker | baseline in the same run | ratio | target | met |",
        "|---|---|---|---|---|---|",
        f"| `vm start` → guest ready, warm | {ms(m['warm_http'])} (API `running` "
        f"{ms(m['warm_run'])}) | cold start {ms(m['cold_http'])}; raw `-incoming` "
        f"{ms(m['raw_http'])} (running {ms(m['raw_run'])}) | {warm_vs_cold:.1f}x faster than "
        f"cold, {m['warm_http'] / m['raw_http']:.2f}x raw | ≤ 0.30 s and ≥ 7x | "
        f"{met(m['warm_http'] <= 0.30 and warm_vs_cold >= 7)} |",
        f"| SIGKILL of the VMM → guest answers again, warm | "
        f"{ms(m['phoenix-warm_recovery'])} | cold recovery "
        f"{ms(m['phoenix-cold_recovery'])} | "
        f"{m['phoenix-cold_recovery'] / m['phoenix-warm_recovery']:.1f}x faster | ≤ 0.50 s | "
        f"{met(m['phoenix-warm_recovery'] <= 0.50)} |",
        f"| snapshot restore → running | {ms(m['restore'])} | raw QMP `-incoming`, same argv "
        f"{ms(m['raw_restore'])} | {restore_ratio:.2f}x | ≤ 1.10x | {met(restore_ratio <= 1.10)} |",
        f"| warm start, 1 GiB guest vs 128 MiB | {ms(m['big_http'])} | 128 MiB "
        f"{ms(m['warm_http'])} | {big_ratio:.2f}x | ≤ 2x | {met(big_ratio <= 2)} |",
        f"| forced stop → VMM gone | {m['warm_stop'] * 1000:.1f} ms (p99 "
        f"{percentile(rows['warm_stop'], 99) * 1000:.1f} ms) | SIGKILL + waitpid "
        f"{m['raw_kill'] * 1000:.1f} ms | {stop_over * 1000:+.1f} ms | ≤ raw + 5 ms | "
        f"{met(stop_over <= 0.005)} |",
        f"| VMM death → detected | p99 {detect_p99 * 1000:.1f} ms (median "
        f"{median(rows['detection']) * 1000:.1f} ms, {len(rows['detection'])} kills) | "
        f"the kernel's own teardown: SIGKILL → reaped, raw, median "
        f"{m['raw_kill'] * 1000:.1f} ms, p99 {percentile(rows['raw_kill'], 99) * 1000:.1f} ms | "
        f"p99 {(detect_p99 - percentile(rows['raw_kill'], 99)) * 1000:+.1f} ms | "
        f"p99 ≤ 5 ms | {met(detect_p99 <= 0.005)} |",
        "",
        "The forced stop is the API request to its answer (the state and the cleared process "
        "record committed while the kernel tears the VMM down; the answer once it is "
        "reaped); detection is the kill to the `error` "
        "transition's timestamp. A VMM is not dead until the kernel has torn down its "
        "address space (most of it the guest's RAM), so no watcher can see the death sooner "
        "than SIGKILL + waitpid of the same process returns: that is the detection figure's "
        "floor, measured in the same run.",
    ]
    body = "\n".join(lines)
    print()
    print(body)
    if not args.no_record:
        record("Warm start", ".venv/bin/python -m bench.warmstart", body)


if __name__ == "__main__":
    asyncio.run(main())
