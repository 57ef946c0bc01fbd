from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import AgentProcess, guest_image


@pytest.fixture(scope="session")
def guest():
    return guest_image()


@pytest.fixture
def agent(guest) -> Iterator[AgentProcess]:
    proc = AgentProcess().start()
    try:
        yield proc
    finally:
        proc.cleanup()
