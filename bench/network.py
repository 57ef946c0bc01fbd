"""Start → the guest has its address and answers through a port forward: the same test guest
on a managed network (TAP on a bridge, address by DHCP from the agent's dnsmasq, DNAT) and
with QEMU's user-mode networking (its built-in DHCP, hostfwd), in the same run.

The agent runs inside a network namespace made here (so the bridge, the nftables rules and
dnsmasq never touch the host's own namespace); rounds alternate between the two VMs so both
see the same machine load. Each round: POST /start, then GET ``/cgi-bin/net`` through the
VM's forward on 127.0.0.1 (inside the namespace) every 10 ms with a 0.25 s timeout until it
answers with the guest's IPv4 address; then a forced stop. Prints the figures; it does not
write BENCHMARKS.md.

    .venv/bin/python -m bench.network [--rounds 10]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import time
from typing import Any

from bench.report import median, percentile, record
from stoker.services.networks.config import RUN_DIR, default_state_dir
from tests import netns as tn
from tests.helpers import AgentProcess, free_port, guest_spec

POLL_S = 0.01
COMMAND = ".venv/bin/python -m bench.network"


def _spec(name: str, mode: str, port: int) -> dict[str, Any]:
    spec = guest_spec(name, accel="tcg", boot_timeout_s=120)
    forward = {"host_port": port, "guest_port": 80, "host_addr": "127.0.0.1"}
    spec["network"] = {"mode": mode, "port_forwards": [forward]}
    return spec


def _round(agent: AgentProcess, ns: tn.Netns, name: str, port: int) -> tuple[float, str]:
    """Seconds from the start request to the guest's address seen through its forward."""
    url = f"http://127.0.0.1:{port}/cgi-bin/net"
    with agent.client() as api:
        began = time.perf_counter()
        api.start_vm(name, wait=False)
        while True:
            answer = ns.http_get(url, timeout=0.25)
            if answer is not None and "addr4 " in answer[1]:
                took = time.perf_counter() - began
                break
            if time.perf_counter() - began > 120:
                raise RuntimeError(f"{name} never answered through its forward: {api.get_vm(name)}")
            time.sleep(POLL_S)
        address = answer[1].split("addr4 ", 1)[1].split()[0]
        vm = api.stop_vm(name, graceful=False)
        assert vm.state == "stopped", vm
    return took, address


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-record", action="store_true", help="do not write BENCHMARKS.md")
    args = parser.parse_args()
    ports = {"managed": free_port(), "user": free_port()}
    times: dict[str, list[float]] = {"managed": [], "user": []}
    addresses: dict[str, str] = {}
    with tn.namespaces("bench") as (ns,):
        agent = AgentProcess(wrapper=["nsenter", f"--net=/run/netns/{ns.name}"])
        try:
            agent.start()
            with agent.client() as api:
                for mode, port in ports.items():
                    api.create_vm(_spec(f"bench-{mode}", mode, port))
            for mode, port in ports.items():  # warm the page cache and the network
                _round(agent, ns, f"bench-{mode}", port)
            for i in range(args.rounds):
                line = []
                for mode, port in ports.items():
                    took, addresses[mode] = _round(agent, ns, f"bench-{mode}", port)
                    times[mode].append(took)
                    line.append(f"{mode} {took:.3f}s")
                print(f"round {i + 1:2}: " + ", ".join(line), flush=True)
        finally:
            agent.cleanup()
            shutil.rmtree(default_state_dir(agent.data_dir), ignore_errors=True)
            with contextlib.suppress(OSError):  # another agent's state is still there
                RUN_DIR.rmdir()
    managed, user = times["managed"], times["user"]
    lines = [
        f"Rounds: {args.rounds}, guest: test guest (Debian cloud kernel, busybox initramfs), "
        "128 MiB, 1 vCPU, TCG; the agent in a network namespace of its own.",
        "",
        "| start → address seen through the port forward | median | p99 | guest address |",
        "|---|---|---|---|",
        f"| managed network (TAP, dnsmasq, DNAT) | {median(managed):.3f} s | "
        f"{percentile(managed, 99):.3f} s | {addresses['managed']} |",
        f"| user-mode networking (QEMU slirp, hostfwd) | {median(user):.3f} s | "
        f"{percentile(user, 99):.3f} s | {addresses['user']} |",
        "",
        f"managed / user: {median(managed) / median(user):.3f}x",
    ]
    print()
    print("\n".join(lines))
    if not args.no_record:
        record("Managed network: start to address", COMMAND, "\n".join(lines))


if __name__ == "__main__":
    main()
