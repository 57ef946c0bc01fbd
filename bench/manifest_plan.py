"""Load, validate and plan a 200-VM manifest against a 200-VM host (target for the whole
``stoker plan``: under 2 s). Prints figures; records nothing.

The manifest is four files of 50 VMs each with defaults, quotas, snapshot policies and two
inline schedules per VM. The host is that manifest applied, with a tenth of the VMs'
quotas and a tenth of their memory changed (running, so pending restarts), so the plan
has real work to show.

    .venv/bin/python -m bench.manifest_plan [--vms 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from stoker.domain.quota import Quota
from stoker.domain.states import VMState
from stoker.manifest import HostState, load_manifest, plan, read_documents
from stoker.manifest.positions import map_positions
from stoker.manifest.validate import build_manifest

DEFAULTS = """[defaults]
quota = { cpu_percent = 100, memory_mib = 2048, disk_iops = 1000 }
snapshot_policy = { retention = "daily:7,weekly:4", interval = "1d" }
restart = { policy = "on-failure", max_retries = 5 }
probes = [{ kind = "vmm", interval_s = 30 }]
"""

VM = """
[[vm]]
name = "vm-{i:04d}"
vcpus = {vcpus}
memory_mib = {memory}
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "{cmdline}"
ready_marker = "{marker}"
{network}labels = {{ tier = "{tier}", rack = "r{rack}" }}
quota = {{ cpu_percent = {cpu} }}

[[vm.schedules]]
action = "start"
cron = "0 8 * * 1-5"

[[vm.schedules]]
action = "stop"
cron = "0 18 * * *"
"""

#: the test guest where ``stoker guest build`` puts it (planning alone never opens it)
GUEST = {
    "kernel": "/root/.cache/stoker/guest/vmlinuz",
    "initrd": "/root/.cache/stoker/guest/initrd.img",
    "cmdline": "console=ttyS0 quiet panic=-1 8250.nr_uarts=1",
    "marker": "STOKER-GUEST-READY",
}


def write_manifest(
    directory: Path,
    vms: int,
    files: int = 4,
    cpu_step: int = 10,
    guest: dict[str, str] = GUEST,
    network: str = "",
) -> None:
    """``vms`` VMs over ``files`` files, the defaults in the first; ``network`` is a line
    such as ``network = { mode = "none" }\\n`` put into every VM (none: the default)."""
    per_file = -(-vms // files)
    for f in range(files):
        parts = [DEFAULTS] if f == 0 else []
        for i in range(f * per_file, min(vms, (f + 1) * per_file)):
            parts.append(
                VM.format(
                    i=i,
                    vcpus=1 + i % 2,
                    memory=128 * (1 + i % 4),
                    **guest,
                    network=network,
                    tier=("web", "db", "batch")[i % 3],
                    rack=i % 8,
                    cpu=50 + cpu_step * (i % 10),
                )
            )
        (directory / f"{f:02d}-vms.toml").write_text("".join(parts))


def drifted_host(applied: HostState) -> HostState:
    """Every VM running; every tenth with another quota, every tenth (others) more memory."""
    vms = []
    for i, vm in enumerate(applied.vms):
        vm = replace(vm, state=VMState.RUNNING)
        if i % 10 == 0:
            vm = replace(vm, quota=Quota(cpu_percent=300, memory_mib=2048, disk_iops=1000))
        elif i % 10 == 5:
            vm = replace(vm, spec=vm.spec.model_copy(update={"memory_mib": 1024}))
        vms.append(vm)
    return replace(applied, vms=tuple(vms))


def timed(fn: Callable[[], Any], rounds: int) -> tuple[list[float], Any]:
    times, result = [], None
    for _ in range(rounds):
        began = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - began)
    return times, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vms", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        write_manifest(directory, args.vms)
        manifest = load_manifest(directory)
        applied = plan(manifest, HostState()).state_after()
        host = drifted_host(applied)
        record = plan(manifest, HostState()).record()
        texts = [p.read_text() for p in sorted(directory.glob("*.toml"))]

        figures: dict[str, list[float]] = {}
        figures["read + parse (tomllib + positions)"], docs = timed(
            lambda: read_documents(directory), args.rounds
        )
        figures["  of which positions (tree-sitter)"], _ = timed(
            lambda: [map_positions(t) for t in texts], args.rounds
        )
        figures["validate (pydantic models, merge)"], _ = timed(
            lambda: build_manifest(docs), args.rounds
        )
        figures["plan, 200 VMs changed by hand"], result = timed(
            lambda: plan(manifest, host, last_applied=record), args.rounds
        )
        figures["plan, host matches"], same = timed(lambda: plan(manifest, applied), args.rounds)
        figures["render text + json"], _ = timed(
            lambda: (result.render(), result.to_json()), args.rounds
        )
        figures["total: load + validate + plan + render"], _ = timed(
            lambda: plan(load_manifest(directory), host, last_applied=record).render(),
            args.rounds,
        )

    print(
        f"manifest: {args.vms} VMs in 4 files, {len(manifest.schedules)} schedules; "
        f"host: {len(host.vms)} VMs; {args.rounds} rounds"
    )
    print(
        f"plan: {len(result.steps)} steps, {len(result.drift)} drift entries, "
        f"exit {result.exit_code()}; identical host: {len(same.steps)} steps"
    )
    print(f"{'figure':<42} {'median ms':>10} {'max ms':>10}")
    for name, times in figures.items():
        median, worst = statistics.median(times) * 1000, max(times) * 1000
        print(f"{name:<42} {median:>10.1f} {worst:>10.1f}")
    total = statistics.median(figures["total: load + validate + plan + render"])
    print(f"target for the whole `stoker plan`: < 2000 ms; this part: {total * 1000:.0f} ms")


if __name__ == "__main__":
    main()
