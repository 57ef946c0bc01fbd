"""Cluster placement and the cluster-wide VM list, at the scale issue 18 names.

1. Place 10,000 VMs over 100 simulated nodes (capacity records only, no guests, no etcd):
   total time (target <= 10 s) and the p99 of one decision (target <= 20 ms). The VMs mix
   sizes, a third carry a zone selector, a tenth are in one of 500 anti-affinity groups, half
   ask to spread; the nodes (32-96 CPUs, 4x overcommit, 200 VMs at most, 2 cordoned) hold
   all of them, so every decision scans every node.
2. Write 10,000 VM records to a real 3-member etcd cluster on loopback, then read pages of
   500 through the facade: p99 of one page (target <= 50 ms).

    .venv/bin/python -m bench.cluster_placement [--vms 10000] [--nodes 100] [--pages 200]

It prints its figures; it does not write BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections.abc import Callable

from bench.report import median, percentile
from stoker.cluster import Etcd, keys
from stoker.domain.capacity import NodeCapacity
from stoker.domain.placement import NodeRecord, VMRequest, assign, place
from stoker.domain.units import GiB, MiB
from tests.etcd_cluster import EtcdCluster

TARGETS = {"placement_total_s": 10.0, "decision_p99_ms": 20.0, "page_p99_ms": 50.0}
COMMAND = "python -m bench.cluster_placement"


def simulated_nodes(count: int, rng: random.Random) -> dict[str, NodeRecord]:
    nodes = {}
    for i in range(count):
        cpus = rng.choice([32, 64, 96])
        nodes[f"node-{i:03d}"] = NodeRecord(
            name=f"node-{i:03d}",
            capacity=NodeCapacity(
                physical_cpus=cpus, memory_bytes=cpus * 8 * GiB, max_vms=200, cpu_overcommit=4
            ),
            labels={"zone": "abc"[i % 3], "disk": rng.choice(["ssd", "hdd"])},
            cordoned=i % 50 == 7,
        )
    return nodes


def vm_requests(count: int, rng: random.Random) -> list[VMRequest]:
    out = []
    for i in range(count):
        vcpus, mib = rng.choice([(1, 128), (1, 256), (1, 512), (2, 512), (2, 1024), (4, 2048)])
        out.append(
            VMRequest(
                name=f"vm-{i:05d}",
                vcpus=vcpus,
                memory_bytes=mib * MiB,
                selector={"zone": "abc"[i // 3 % 3]} if i % 3 == 0 else {},
                anti_affinity=f"group-{i % 500}" if i % 10 == 0 else None,
                policy="spread" if i % 2 else "binpack",
            )
        )
    return out


def bench_placement(vm_count: int, node_count: int) -> dict[str, float]:
    rng = random.Random(18)
    nodes = simulated_nodes(node_count, rng)
    requests = vm_requests(vm_count, rng)
    times, placed = [], 0
    began = time.perf_counter()
    for request in requests:
        start = time.perf_counter()
        decision = place(request, nodes.values())
        if decision.node is not None:
            nodes[decision.node] = assign(nodes[decision.node], request)
            placed += 1
        times.append((time.perf_counter() - start) * 1000)
    total = time.perf_counter() - began
    explain_ms = _time_ms(lambda: decision.explain())
    return {
        "vms": vm_count,
        "nodes": node_count,
        "placed": placed,
        "placement_total_s": total,
        "decision_p50_ms": median(times),
        "decision_p99_ms": percentile(times, 99),
        "decision_max_ms": max(times),
        "explain_one_ms": explain_ms,
    }


def _time_ms(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return (time.perf_counter() - start) * 1000


def vm_record(i: int) -> bytes:
    """About what a cluster VM record will hold: spec, desired state, placement."""
    return json.dumps(
        {
            "spec": {
                "name": f"vm-{i:05d}",
                "kernel": "/var/lib/stoker/images/vmlinuz-6.1",
                "initrd": "/var/lib/stoker/images/initrd.img",
                "cmdline": "console=ttyS0 quiet",
                "vcpus": 1,
                "memory_mib": 256,
                "labels": {"app": "web", "tier": "frontend"},
                "network": {"mode": "bridge", "network": "lan"},
            },
            "desired": "running",
            "placement": {"node": f"node-{i % 100:03d}", "policy": "binpack"},
        }
    ).encode()


async def bench_list(vm_count: int, pages: int, page_size: int = 500) -> dict[str, float]:
    with EtcdCluster(size=3) as cluster:
        async with Etcd(cluster.client_urls, timeout=10) as etcd:
            began = time.perf_counter()
            limit = asyncio.Semaphore(64)

            async def write(i: int) -> None:
                async with limit:
                    await etcd.put(keys.vm(f"vm-{i:05d}"), vm_record(i))

            await asyncio.gather(*(write(i) for i in range(vm_count)))
            write_s = time.perf_counter() - began

            rng = random.Random(18)
            times = []
            for _ in range(pages):
                first = rng.randrange(0, vm_count - page_size)
                start = time.perf_counter()
                page = await etcd.range(keys.VMS, limit=page_size, start=keys.vm(f"vm-{first:05d}"))
                times.append((time.perf_counter() - start) * 1000)
                assert len(page.items) == page_size
            walk_start = time.perf_counter()
            walked, cursor = 0, None
            while True:
                page = await etcd.range(keys.VMS, limit=page_size, start=cursor)
                walked += len(page.items)
                if (cursor := page.next_start) is None:
                    break
            walk_s = time.perf_counter() - walk_start
            assert walked == vm_count
    return {
        "records": vm_count,
        "record_bytes": len(vm_record(0)),
        "write_all_s": write_s,
        "page_p50_ms": median(times),
        "page_p99_ms": percentile(times, 99),
        "full_walk_ms": walk_s * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vms", type=int, default=10_000)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--pages", type=int, default=200)
    args = parser.parse_args()

    placement = bench_placement(args.vms, args.nodes)
    listing = asyncio.run(bench_list(args.vms, args.pages))
    print(f"command: {COMMAND} --vms {args.vms} --nodes {args.nodes} --pages {args.pages}")
    print(
        f"placement: {placement['placed']:.0f} of {args.vms} VMs on {args.nodes} nodes in "
        f"{placement['placement_total_s']:.2f} s (target <= {TARGETS['placement_total_s']:g} s); "
        f"one decision p50 {placement['decision_p50_ms']:.2f} ms, "
        f"p99 {placement['decision_p99_ms']:.2f} ms (target <= "
        f"{TARGETS['decision_p99_ms']:g} ms), max {placement['decision_max_ms']:.2f} ms; "
        f"explain() of one decision {placement['explain_one_ms']:.2f} ms"
    )
    print(
        f"list: {listing['records']:.0f} VM records of {listing['record_bytes']:.0f} bytes in a "
        f"3-member etcd (written in {listing['write_all_s']:.1f} s); a page of 500: "
        f"p50 {listing['page_p50_ms']:.1f} ms, p99 {listing['page_p99_ms']:.1f} ms (target <= "
        f"{TARGETS['page_p99_ms']:g} ms) over {args.pages} pages; "
        f"all {listing['records']:.0f} in pages of 500: {listing['full_walk_ms']:.0f} ms"
    )
    met = (
        placement["placement_total_s"] <= TARGETS["placement_total_s"]
        and placement["decision_p99_ms"] <= TARGETS["decision_p99_ms"]
        and listing["page_p99_ms"] <= TARGETS["page_p99_ms"]
    )
    print("targets met" if met else "TARGETS MISSED")


if __name__ == "__main__":
    main()
