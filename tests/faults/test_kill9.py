"""The agent SIGKILLed at random points of start, stop, restart, snapshot create, snapshot
restore, delete and prune; after each restart the invariants of ``tests/faults/chaos.py``
hold. One round per operation here (CI); ``bench/chaos.py`` runs hundreds."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from tests.faults.chaos import OPERATIONS, Chaos
from tests.helpers import AgentProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def chaos() -> Iterator[Chaos]:
    agent = AgentProcess().start()
    try:
        yield Chaos(agent, random.Random(13))
    finally:
        agent.cleanup()


@pytest.mark.parametrize("operation", OPERATIONS)
def test_sigkill_during(chaos: Chaos, operation: str) -> None:
    result = chaos.round(0, operation)
    assert result.problems == [], result
