"""Start-to-ready and forced stop: stoker's API against plain QEMU with the same command line.

Each round boots the test guest once through a real agent (POST /start?wait=true until the
guest's ready marker) and twice as a plain QEMU process launched with the identical argv: once
as it is, once moved into a cgroup of its own right after spawn as the agent moves every VMM
(the kernel's memory accounting of the guest's RAM costs boot time on some hosts, and that
is no part of stoker's own overhead). The three alternate so that all see the same load.
Forced stop is POST /stop {"graceful": false} until the VMM is gone, against SIGKILL +
waitpid of the plain process.

    .venv/bin/python -m bench.lifecycle [--rounds 10]
"""

from __future__ import annotations

import argparse
import time

from bench.rawqemu import RawQemu
from bench.report import median, percentile, record
from stoker.domain.spec import VMSpec
from tests.helpers import AgentProcess, free_port, guest_spec

POLL_S = 0.005


def raw_round(spec: VMSpec, marker: str, cgroup: bool = False) -> tuple[float, float]:
    """Plain QEMU: exec -> marker on the console; SIGKILL -> reaped."""
    raw = RawQemu(spec, cgroup=cgroup)
    try:
        began = time.perf_counter()
        raw.launch()
        while not raw.console_has(marker):
            time.sleep(POLL_S)
        ready = time.perf_counter() - began
        began = time.perf_counter()
        raw.kill()
        stop = time.perf_counter() - began
    finally:
        raw.cleanup()
    return ready, stop


def stoker_round(agent: AgentProcess, name: str) -> tuple[float, float]:
    with agent.client() as api:
        began = time.perf_counter()
        vm = api.start_vm(name, wait=True, timeout_s=120)
        ready = time.perf_counter() - began
        if vm.state != "running":
            raise RuntimeError(f"{name} did not come up: {vm.state_reason}")
        began = time.perf_counter()
        vm = api.stop_vm(name, graceful=False)
        stop = time.perf_counter() - began
        assert vm.state == "stopped", vm
    return ready, stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-record", action="store_true", help="do not write BENCHMARKS.md")
    args = parser.parse_args()

    # with a NIC and a port forward, as VMs are run; raw and stoker never run at once, so
    # they can share the host port
    spec_dict = guest_spec("bench", free_port(), accel="tcg")
    spec = VMSpec.model_validate(spec_dict)
    agent = AgentProcess().start()
    raw_ready, raw_stop, st_ready, st_stop, cg_ready = [], [], [], [], []
    try:
        with agent.client() as api:
            api.create_vm(spec_dict)
        raw_round(spec, spec.ready_marker or "")  # warm the page cache for both
        for i in range(args.rounds):
            r_ready, r_stop = raw_round(spec, spec.ready_marker or "")
            c_ready, _ = raw_round(spec, spec.ready_marker or "", cgroup=True)
            s_ready, s_stop = stoker_round(agent, "bench")
            raw_ready.append(r_ready)
            cg_ready.append(c_ready)
            raw_stop.append(r_stop)
            st_ready.append(s_ready)
            st_stop.append(s_stop)
            print(
                f"round {i + 1:2}: ready raw {r_ready:.3f}s raw in a cgroup {c_ready:.3f}s "
                f"stoker {s_ready:.3f}s | "
                f"forced stop raw {r_stop * 1000:.1f}ms stoker {s_stop * 1000:.1f}ms",
                flush=True,
            )
    finally:
        agent.cleanup()

    ratio = median(st_ready) / median(raw_ready)
    cg_ratio = median(st_ready) / median(cg_ready)
    lines = [
        f"Rounds: {args.rounds}, guest: test guest (Debian cloud kernel, busybox initramfs), "
        "128 MiB, 1 vCPU, TCG, user-mode network with a port forward.",
        "",
        "| measure | plain QEMU (median) | stoker (median) | stoker p99 | ratio | target |",
        "|---|---|---|---|---|---|",
        f"| start → guest ready | {median(raw_ready):.3f} s | {median(st_ready):.3f} s | "
        f"{percentile(st_ready, 99):.3f} s | {ratio:.3f}x | ≤ 1.03x |",
        f"| start → guest ready, plain QEMU also in a cgroup of its own | "
        f"{median(cg_ready):.3f} s | {median(st_ready):.3f} s | "
        f"{percentile(st_ready, 99):.3f} s | {cg_ratio:.3f}x | ≤ 1.03x |",
        f"| forced stop → VMM gone | {median(raw_stop) * 1000:.1f} ms | "
        f"{median(st_stop) * 1000:.1f} ms | {percentile(st_stop, 99) * 1000:.1f} ms | "
        f"{median(st_stop) / median(raw_stop):.2f}x | < 30 ms |",
        "",
        "The agent moves every VMM into a cgroup of its own (CPU, memory, block I/O, pids) "
        "the moment it exists, so that quotas bind and the guest's RAM is accounted to its "
        "VM. The second row puts plain QEMU through the same move: the difference between "
        "the two plain figures is the kernel's price for that accounting on this host "
        f"({(median(cg_ready) - median(raw_ready)) * 1000:+.0f} ms in this run; on this "
        "host QEMU spends 0.1-0.2 s more system time booting inside a memory cgroup, in "
        "page clearing), and the ratio against it is stoker's own.",
    ]
    body = "\n".join(lines)
    print()
    print(body)
    if not args.no_record:
        record(
            "Lifecycle: start and forced stop",
            ".venv/bin/python -m bench.lifecycle",
            body,
        )


if __name__ == "__main__":
    main()
