"""The outage probe tells "nothing listens" from "something answers" (real sockets)."""

from __future__ import annotations

import socket

from stoker.cluster.probe import Endpoint, MemberState, etcd_down_everywhere, probe_member
from tests.helpers import free_port


async def test_a_port_nobody_listens_on_is_down() -> None:
    port = free_port()
    assert await probe_member(Endpoint("127.0.0.1", port), 0.25) == MemberState.DOWN
    down, states = await etcd_down_everywhere([[f"http://127.0.0.1:{port}"]])
    assert down and states == [MemberState.DOWN]


async def test_a_listener_that_is_not_a_leaderless_etcd_proves_nothing() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        state = await probe_member(Endpoint("127.0.0.1", port), 0.25)
        assert state == MemberState.UNKNOWN
        down, _ = await etcd_down_everywhere(
            [[f"http://127.0.0.1:{free_port()}"], [f"http://127.0.0.1:{port}"]]
        )
        assert not down  # one member might be running: no hold


async def test_no_members_known_proves_nothing() -> None:
    assert await etcd_down_everywhere([]) == (False, [])
    assert await etcd_down_everywhere([["not a url"]]) == (False, [MemberState.UNKNOWN])
