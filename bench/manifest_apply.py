"""A plan and an apply of a 200-VM manifest through a real agent (targets: plan under 2 s,
apply under 10 s), without starting the VMs. Prints figures; records nothing.

The manifest is four files of 50 VMs each with defaults, a quota, a snapshot policy and two
inline schedules per VM (1,000 steps on an empty host). Each figure is the wall time of the
CLI command as an operator types it (``stoker plan -f DIR``: process start, reading the
files, the request, the agent's parse, validation, host read, plan and preflight, the
rendered answer), next to the same request made from Python (no process start).

    .venv/bin/python -m bench.manifest_apply [--vms 200]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import manifest_plan
from bench.report import record
from stoker.client import Client
from stoker.wire import ManifestFile
from tests.helpers import AgentProcess, guest_image


def write_manifest(directory: Path, vms: int, cpu_step: int = 10) -> None:
    """The plan benchmark's manifest, on the real test guest and without a network (the
    agent checks every file it names, and no VM here is started)."""
    image = guest_image()
    guest = {
        "kernel": str(image.kernel),
        "initrd": str(image.initrd),
        "cmdline": image.cmdline,
        "marker": image.ready_marker,
    }
    network = 'network = { mode = "none" }\n'
    manifest_plan.write_manifest(directory, vms, cpu_step=cpu_step, guest=guest, network=network)


def cli(agent: AgentProcess, *args: str) -> tuple[float, int, str]:
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "stoker.cli.main", "--socket", str(agent.socket), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    return time.perf_counter() - began, done.returncode, done.stdout + done.stderr


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    began = time.perf_counter()
    result = fn()
    return time.perf_counter() - began, result


def read(directory: Path) -> list[ManifestFile]:
    return [
        ManifestFile(name=str(p), content=p.read_text()) for p in sorted(directory.glob("*.toml"))
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vms", type=int, default=200)
    parser.add_argument("--no-record", action="store_true", help="do not write BENCHMARKS.md")
    args = parser.parse_args()
    agent = AgentProcess().start()
    rows: list[tuple[str, float, str]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            write_manifest(directory, args.vms)
            d = str(directory)
            api = Client(socket=agent.socket)
            seconds, code, _ = cli(agent, "plan", "-f", d)
            rows.append(("stoker plan, empty host (CLI)", seconds, f"exit {code}"))
            seconds, planned = timed(lambda: api.plan_manifest(read(directory)))
            rows.append(("  the same plan request", seconds, f"{len(planned.steps)} steps"))
            seconds, code, output = cli(agent, "apply", "-f", d)
            rows.append(("stoker apply, empty host (CLI)", seconds, f"exit {code}"))
            if code != 0:
                print(output)
            vms = len(api.list_vms())
            seconds, code, _ = cli(agent, "plan", "-f", d)
            rows.append((f"stoker plan, {vms} VMs, no changes (CLI)", seconds, f"exit {code}"))
            seconds, same = timed(lambda: api.plan_manifest(read(directory)))
            rows.append(("  the same plan request", seconds, f"{len(same.steps)} steps"))
            write_manifest(directory, args.vms, cpu_step=11)  # most VMs' quotas change
            seconds, code, _ = cli(agent, "plan", "-f", d)
            rows.append(("stoker plan, quotas changed (CLI)", seconds, f"exit {code}"))
            seconds, code, _ = cli(agent, "apply", "-f", d)
            rows.append(("stoker apply, quotas changed (CLI)", seconds, f"exit {code}"))
            api.close()
    finally:
        agent.cleanup()
    lines = [
        f"A manifest of {args.vms} VMs in 4 files (a quota, a snapshot policy and 2 schedules "
        "each) against a real agent; the VMs are not started. CLI figures are wall time of "
        "the `stoker` process; the request figures are the API call alone.",
        "",
        "| figure | seconds | note |",
        "|---|---|---|",
        *(f"| {name.strip()} | {seconds:.2f} | {note} |" for name, seconds, note in rows),
        "",
        "Targets: plan < 2 s, apply < 10 s.",
    ]
    print("\n".join(lines))
    if not args.no_record:
        record(
            "Manifests: plan and apply through the agent",
            ".venv/bin/python -m bench.manifest_apply",
            "\n".join(lines),
        )


if __name__ == "__main__":
    main()
