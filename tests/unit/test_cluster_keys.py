"""The etcd key layout and the --cluster URL list: names cannot escape their subtree."""

from __future__ import annotations

import pytest

from stoker.cluster import keys
from stoker.cluster.etcd import parse_urls


def test_layout() -> None:
    assert keys.node("host-1.example") == "/stoker/nodes/host-1.example"
    assert keys.alive("host-1") == "/stoker/alive/host-1"
    assert keys.cordoned("host-1") == "/stoker/cordoned/host-1"
    assert keys.vm("web") == "/stoker/vms/web"
    assert keys.placement("web") == "/stoker/placements/web"
    assert keys.owner("web") == "/stoker/owners/web"
    assert keys.status("web") == "/stoker/status/web"
    assert keys.network("lan") == "/stoker/networks/lan"
    assert keys.schedule("nightly") == "/stoker/schedules/nightly"
    assert keys.election("scheduler") == keys.SCHEDULER_ELECTION == "/stoker/election/scheduler/"
    assert keys.name_in(keys.VMS, "/stoker/vms/web") == "web"


@pytest.mark.parametrize("name", ["", "a/b", "../x", "Web", "-x", "x" * 64, "a b"])
def test_names_that_would_leave_their_subtree_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="not usable in a cluster key"):
        keys.vm(name)


def test_node_names_are_host_names_but_never_paths() -> None:
    assert keys.node("Host_1.lan") == "/stoker/nodes/Host_1.lan"
    with pytest.raises(ValueError, match="node name 'a/b'"):
        keys.node("a/b")


def test_name_in_refuses_nested_or_foreign_keys() -> None:
    for key in ("/stoker/vms/", "/stoker/vms/a/b", "/stoker/nodes/a"):
        with pytest.raises(ValueError, match="not directly under"):
            keys.name_in(keys.VMS, key)


def test_cluster_urls() -> None:
    assert parse_urls("http://10.0.0.1:2379, http://10.0.0.2:2379") == [
        "http://10.0.0.1:2379",
        "http://10.0.0.2:2379",
    ]
    for bad in ("10.0.0.1:2379", "https://a:2379", "http://a", "http://a:x", "http://a:1/v3"):
        with pytest.raises(ValueError, match="is not of the form http://HOST:PORT"):
            parse_urls(bad)
    with pytest.raises(ValueError, match="no etcd URL given"):
        parse_urls(" , ")
