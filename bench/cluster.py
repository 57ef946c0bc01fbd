"""Cluster mode: failover after node death, placement at scale, the cluster-wide VM list.

1. Node death: three real agents, each in its own network namespace, a real 3-member etcd in
   another (``tests/cluster_world.py``). Each round places ``--vms`` real guests on one node,
   SIGKILLs that node's agent, fence guard and VMMs, and times until every one of those VMs
   answers HTTP on another node (target: lease TTL + 5 s; Kubernetes' defaults take over five
   minutes). The victim comes back before the next round; victims rotate.
2. and 3. The placement of 10,000 VMs over 100 simulated nodes and a page of 500 of 10,000
   VM records in etcd: ``bench.cluster_placement``'s measurements.

    .venv/bin/python -m bench.cluster [--rounds 5] [--vms 2] [--ttl 5] [--no-record]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import time

from bench.cluster_placement import TARGETS, bench_list, bench_placement
from bench.report import median, percentile, record
from tests.cluster_world import NAMES, Node, World, cluster_world
from tests.helpers import guest_spec, wait_for

COMMAND = ".venv/bin/python -m bench.cluster"
PORT_BASE = 18180


def place_on(world: World, victim: str, names: list[str]) -> None:
    """Running guests on ``victim`` (the other nodes cordoned while they are placed)."""
    api = world.api(victim)
    others = [n for n in NAMES if n != victim]
    for other in others:
        api.cordon_node(other, "bench: steer placements")
    try:
        for i, name in enumerate(names):
            vm = api.create_cluster_vm(guest_spec(name, PORT_BASE + i), wait_s=20)
            assert vm.node == victim, vm
    finally:
        for other in others:
            api.uncordon_node(other)
    node = world.nodes[victim]
    for i, _ in enumerate(names):
        wait_for(functools.partial(node.answers, PORT_BASE + i), 60, 0.05)


def one_round(world: World, victim: str, count: int) -> tuple[float, float]:
    """Seconds from the SIGKILL until the first and until every VM answered elsewhere."""
    names = [f"fo-{victim}-{i}" for i in range(count)]
    place_on(world, victim, names)
    survivors: list[Node] = [world.nodes[n] for n in NAMES if n != victim]
    pending = set(range(count))
    began = time.monotonic()
    world.nodes[victim].kill_everything()
    first = 0.0
    while pending:
        for i in list(pending):
            if any(node.answers(PORT_BASE + i) for node in survivors):
                pending.discard(i)
                first = first or time.monotonic() - began
        if time.monotonic() - began > 120:
            raise TimeoutError(f"VMs {sorted(pending)} did not come back within 120 s")
        time.sleep(0.02)
    every = time.monotonic() - began
    world.nodes[victim].start_agent()
    wait_for(world.ready, 60, 0.2)
    api = world.api(victim)
    for name in names:
        api.delete_cluster_vm(name)
    wait_for(lambda: not any(n.api().list_vms() for n in world.nodes.values()), 60, 0.2)
    return first, every


def bench_failover(rounds: int, count: int, ttl: int) -> dict[str, float]:
    firsts, everys = [], []
    with cluster_world(ttl) as world:
        for r in range(rounds):
            victim = NAMES[r % len(NAMES)]
            first, every = one_round(world, victim, count)
            firsts.append(first)
            everys.append(every)
            print(
                f"round {r + 1}: {victim} killed; first VM answering elsewhere after "
                f"{first:.2f} s, all {count} after {every:.2f} s (target <= {ttl + 5} s)",
                flush=True,
            )
        if world.monitor.violations:
            raise AssertionError(f"a VM ran twice: {world.monitor.violations}")
    return {
        "first_p50": median(firsts),
        "every_p50": median(everys),
        "every_p99": percentile(everys, 99),
        "every_max": max(everys),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--vms", type=int, default=2, help="guests on the node that dies (<= 3)")
    parser.add_argument("--ttl", type=int, default=5, help="lease TTL (the default is 5 s)")
    parser.add_argument("--placement-vms", type=int, default=10_000)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--pages", type=int, default=200)
    parser.add_argument("--no-record", action="store_true", help="do not write BENCHMARKS.md")
    args = parser.parse_args()

    failover = bench_failover(args.rounds, args.vms, args.ttl)
    placement = bench_placement(args.placement_vms, args.nodes)
    listing = asyncio.run(bench_list(args.placement_vms, args.pages))

    target = args.ttl + 5.0
    rows = [
        (
            f"node death (SIGKILL of agent, guard and VMMs) → all {args.vms} VMs answering HTTP "
            f"on another node, lease TTL {args.ttl} s",
            f"p50 {failover['every_p50']:.2f} s, p99 {failover['every_p99']:.2f} s "
            f"(first VM p50 {failover['first_p50']:.2f} s)",
            f"≤ {target:g} s",
            failover["every_p99"] / target,
        ),
        (
            f"placement of {placement['vms']:.0f} VMs over {placement['nodes']:.0f} "
            "simulated nodes (pure, capacity records only)",
            f"{placement['placement_total_s']:.2f} s in all",
            f"≤ {TARGETS['placement_total_s']:g} s",
            placement["placement_total_s"] / TARGETS["placement_total_s"],
        ),
        (
            "one placement decision",
            f"p50 {placement['decision_p50_ms']:.2f} ms, p99 {placement['decision_p99_ms']:.2f} ms",
            f"p99 ≤ {TARGETS['decision_p99_ms']:g} ms",
            placement["decision_p99_ms"] / TARGETS["decision_p99_ms"],
        ),
        (
            f"cluster-wide VM list: a page of 500 of {listing['records']:.0f} records "
            "(3-member etcd on loopback)",
            f"p50 {listing['page_p50_ms']:.1f} ms, p99 {listing['page_p99_ms']:.1f} ms",
            f"p99 ≤ {TARGETS['page_p99_ms']:g} ms",
            listing["page_p99_ms"] / TARGETS["page_p99_ms"],
        ),
    ]
    lines = [
        f"Rounds: {args.rounds} node deaths, {args.vms} test guests (128 MiB, TCG, user-mode "
        "port forward) on the dying node; three agents in their own network namespaces, a "
        "3-member etcd 3.4 (500 ms elections) in another, joined by veth pairs. Victims "
        "rotate; a monitor scanned every namespace's QEMUs five times a second: no VM ran "
        "twice.",
        "",
        "| figure | measured | target | measured / target |",
        "|---|---|---|---|",
        *(f"| {what} | {value} | {goal} | {ratio:.2f} |" for what, value, goal, ratio in rows),
        "",
        f"Failover is the lease TTL ({args.ttl} s, counted by etcd from the last renewal it "
        "received) plus etcd's expiry check (every 500 ms), the scheduler's re-placement, "
        "the new node taking the owner record and booting the guest cold (about 2.3 s under "
        "TCG). For comparison, Kubernetes marks a node unreachable after 40-50 s and evicts "
        f"after 300 s. The list is read in pages of 500 ({listing['full_walk_ms']:.0f} ms for "
        f"all {listing['records']:.0f}); explain() of one decision takes "
        f"{placement['explain_one_ms']:.2f} ms.",
    ]
    body = "\n".join(lines)
    print()
    print(body)
    met = all(ratio <= 1.0 for *_, ratio in rows)
    print("targets met" if met else "TARGETS MISSED")
    if not args.no_record:
        record("Cluster: failover, placement, list", COMMAND, body)


if __name__ == "__main__":
    main()
