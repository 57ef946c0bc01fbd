"""Hundreds of agent SIGKILLs at random points, with the invariants checked after each restart.

Each round picks one of agent start, VM start, stop, restart, snapshot create, snapshot
restore, VM delete and snapshot prune (in turn, so each gets its share), kills the agent
with SIGKILL a random time into it, starts a new agent and checks what
``tests/faults/chaos.py`` describes: no VM or snapshot lost, every running VM's pid alive
and claimed once, no VMM of a stopped VM, no orphan VMM, every snapshot verifies, no half
snapshot on disk. Prints one line per round with a problem, and a summary.

    .venv/bin/python -m bench.chaos --rounds 200 [--seed 1]
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import time

from bench.report import record
from tests.faults.chaos import OPERATIONS, Chaos
from tests.helpers import AgentProcess


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-record", action="store_true", help="do not write BENCHMARKS.md")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    agent = AgentProcess().start()
    counts: collections.Counter[str] = collections.Counter()
    failed: collections.Counter[str] = collections.Counter()
    began = time.monotonic()
    try:
        chaos = Chaos(agent, rng)
        for number in range(1, args.rounds + 1):
            operation = OPERATIONS[(number - 1) % len(OPERATIONS)]
            result = chaos.round(number, operation)
            counts[operation] += 1
            if result.problems:
                failed[operation] += 1
                print(
                    f"round {number} {operation} (kill after {result.delay_s:.3f} s): "
                    + "; ".join(result.problems),
                    flush=True,
                )
            if number % 25 == 0:
                print(f"... {number} rounds, {sum(failed.values())} with problems", flush=True)
    finally:
        agent.cleanup()
    elapsed = time.monotonic() - began
    total = sum(counts.values())
    lines = [
        f"{total} rounds in {elapsed:.0f} s ({elapsed / max(total, 1):.1f} s a round), seed "
        f"{args.seed}: {sum(failed.values())} with problems. Each round starts one operation "
        "on a real agent with real guests and SIGKILLs the agent at a random moment inside "
        "it, restarts it and checks that nothing was lost (tests/faults/chaos.py).",
        "",
        "| operation | rounds | with problems |",
        "|---|---|---|",
        *(f"| {op} | {counts[op]} | {failed[op]} |" for op in OPERATIONS),
    ]
    print("\n".join(lines))
    if not args.no_record:
        record(
            "Chaos: the agent killed inside every operation",
            f".venv/bin/python -m bench.chaos --rounds {args.rounds} --seed {args.seed}",
            "\n".join(lines),
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
