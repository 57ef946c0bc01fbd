"""Snapshot create and restore through stoker against raw QMP on the same guest, same run.

The guest is the 128 MiB test guest with a user-mode port forward. Each round:

* raw create: plain QEMU launched with the same argv and descriptors, confined the same way
  (the driver's ``prepare``); by hand over QMP: ``stop``, ``migrate-set-parameters
  max-bandwidth``, ``getfd`` of the state file and ``migrate fd:``, poll
  ``query-migrate`` until completed, ``cont``. No checksum, no fsync, no bookkeeping.
* stoker create: ``POST /api/v1/vms/{ref}/snapshots`` until it answers (pause, save,
  resume, sha256 of every file, manifest, fsync, rename, database row, event).
* raw restore: SIGKILL + reap the running QEMU, launch the same argv with
  ``-incoming fd:N`` of the state file, poll ``query-status`` until paused, ``cont``, until
  running.
* stoker restore: ``POST /api/v1/snapshots/{id}/restore`` until it answers with the VM
  running (forced stop, start with ``restore_from``, state recorded, event published).

Raw and stoker rounds alternate so both see the same machine load. A retention plan over
100,000 snapshots (hourly for 11 years, policy with every rule) is timed separately.

    .venv/bin/python -m bench.snapshots [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from qemu.qmp import QMPClient

from bench.rawqemu import RawQemu
from bench.report import median, record
from stoker.domain import retention
from stoker.domain.spec import VMSpec
from tests.helpers import AgentProcess, free_port, guest_spec, http_get, wait_for

POLL_S = 0.005


async def _qmp(sock: Path) -> QMPClient:
    client = QMPClient("bench")
    deadline = time.monotonic() + 10
    while True:
        try:
            await client.connect(str(sock))
            return client
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(POLL_S)


async def _query(qmp: QMPClient, command: str) -> dict[str, Any]:
    """A QMP query's answer (qemu.qmp types every answer as ``object``)."""
    answer = await qmp.execute(command)
    assert isinstance(answer, dict), answer
    return answer


async def raw_round(spec: VMSpec, marker: str, port: int) -> tuple[float, float]:
    raw = RawQemu(spec, "rawsnap-")
    state = raw.paths.root / "state.bin"
    try:
        raw.launch()
        wait_for(lambda: raw.console_has(marker), 60)
        wait_for(lambda: http_get(f"http://127.0.0.1:{port}/health"), 30)
        qmp = await _qmp(raw.paths.control_socket)
        began = time.perf_counter()
        await qmp.execute("stop")
        await qmp.execute("migrate-set-parameters", {"max-bandwidth": 64 << 30})
        # the same way stoker saves: a descriptor handed to QEMU (a sandboxed QEMU cannot
        # run "exec:cat")
        fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            qmp.send_fd_scm(fd)
            await qmp.execute("getfd", {"fdname": "state"})
        finally:
            os.close(fd)
        await qmp.execute("migrate", {"uri": "fd:state"})
        while (await _query(qmp, "query-migrate")).get("status") != "completed":
            await asyncio.sleep(POLL_S)
        await qmp.execute("cont")
        save = time.perf_counter() - began
        await qmp.disconnect()

        began = time.perf_counter()
        raw.kill()
        raw.launch(incoming=state)
        qmp = await _qmp(raw.paths.control_socket)
        while (await _query(qmp, "query-status"))["status"] != "paused":
            await asyncio.sleep(POLL_S)
        await qmp.execute("cont")
        while not (await _query(qmp, "query-status"))["running"]:
            await asyncio.sleep(POLL_S)
        restore = time.perf_counter() - began
        await qmp.disconnect()
        wait_for(lambda: http_get(f"http://127.0.0.1:{port}/health"), 30)
        return save, restore
    finally:
        raw.cleanup()


def stoker_round(agent: AgentProcess, name: str, port: int) -> tuple[float, float, float]:
    with agent.client() as api:
        began = time.perf_counter()
        snap = api.create_snapshot(name)
        save = time.perf_counter() - began
        began = time.perf_counter()
        vm = api.restore_snapshot(snap.id).vm
        restore = time.perf_counter() - began
        assert vm.state == "running", vm
        wait_for(lambda: http_get(f"http://127.0.0.1:{port}/health"), 30)
        api.delete_snapshot(snap.id)
        assert snap.pause_s is not None, snap  # a snapshot of a running VM pauses it
        return save, restore, snap.pause_s


def plan_timing(count: int = 100_000, repeats: int = 5) -> tuple[float, int, int]:
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Snap:
        id: str
        created: datetime
        protected: bool = False

    start = datetime(2015, 1, 1, tzinfo=UTC)
    snaps = [Snap(f"s{i:06d}", start + timedelta(hours=i), i % 997 == 0) for i in range(count)]
    policy = retention.parse_policy(
        "last:24,hourly:48,daily:14,weekly:8,monthly:12,yearly:5,within:2d"
    )
    tz = ZoneInfo("Europe/Berlin")
    times = []
    result = retention.plan(snaps, policy, tz)
    for _ in range(repeats):
        began = time.perf_counter()
        result = retention.plan(snaps, policy, tz)
        times.append(time.perf_counter() - began)
    return median(times), len(result.keep), len(result.remove)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-record", action="store_true", help="do not write BENCHMARKS.md")
    args = parser.parse_args()

    plan_s, kept, _removed = plan_timing()
    print(f"retention plan over 100,000 snapshots: {plan_s * 1000:.1f} ms ({kept} kept)")

    raw_port, stoker_port = free_port(), free_port()
    raw_spec = VMSpec.model_validate(guest_spec("rawbench", raw_port))
    marker = raw_spec.ready_marker or "STOKER-GUEST-READY"
    agent = AgentProcess().start()
    rows = []
    try:
        with agent.client() as api:
            api.create_vm(guest_spec("snapbench", stoker_port))
            assert api.start_vm("snapbench", wait=True, timeout_s=90).state == "running"
        wait_for(lambda: http_get(f"http://127.0.0.1:{stoker_port}/health"), 30)
        for index in range(args.rounds):
            raw_save, raw_restore = await raw_round(raw_spec, marker, raw_port)
            save, restore, pause = stoker_round(agent, "snapbench", stoker_port)
            rows.append((raw_save, save, pause, raw_restore, restore))
            print(
                f"round {index + 1}: create raw {raw_save:.3f} s stoker {save:.3f} s "
                f"(guest paused {pause:.3f} s); restore raw {raw_restore:.3f} s "
                f"stoker {restore:.3f} s"
            )
    finally:
        agent.cleanup()

    raw_save, save, pause, raw_restore, restore = (median(col) for col in zip(*rows, strict=True))
    lines = [
        f"128 MiB test guest, no disk, user-mode networking; medians of {args.rounds} "
        "alternating rounds.",
        "",
        "| operation | raw QMP (same argv) | stoker API | ratio | target |",
        "|---|---|---|---|---|",
        f"| snapshot create (request to answer) | {raw_save * 1000:.0f} ms | "
        f"{save * 1000:.0f} ms | {save / raw_save:.2f}x | <= 1.2x |",
        f"| guest paused during create | {raw_save * 1000:.0f} ms | {pause * 1000:.0f} ms | "
        f"{pause / raw_save:.2f}x | <= 1.2x |",
        f"| restore (to running) | {raw_restore * 1000:.0f} ms | {restore * 1000:.0f} ms | "
        f"{restore / raw_restore:.2f}x | <= 1.2x |",
        f"| retention plan, 100,000 snapshots, 7 rules | - | {plan_s * 1000:.1f} ms | - | "
        "< 200 ms |",
        "",
        "Raw create is stop + migrate to a descriptor (as stoker saves) + cont with nothing "
        "else; stoker's create also hashes every file (sha256), writes the manifest, fsyncs "
        "the snapshot and renames it into place, records a row and an event. Raw restore is "
        "SIGKILL + exec with -incoming + cont; stoker's also records the stop and start "
        "transitions and events.",
    ]
    print("\n".join(lines))
    if not args.no_record:
        record("snapshots", ".venv/bin/python -m bench.snapshots", "\n".join(lines))


if __name__ == "__main__":
    asyncio.run(main())
