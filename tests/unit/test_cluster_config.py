"""The [cluster] section: single-host mode when absent, every value checked when present."""

from __future__ import annotations

import pytest

from stoker.cluster.config import ClusterConfig, cluster_config
from stoker.config import ConfigError, load_config


def test_no_cluster_table_means_single_host_mode() -> None:
    assert cluster_config(load_config(environ={})) is None


def test_the_command_line_and_the_environment_give_strings() -> None:
    cfg = cluster_config(
        load_config(
            environ={
                "STOKER_CLUSTER__NODE_NAME": "n1",
                "STOKER_CLUSTER__LABELS": "zone=a, disk=ssd",
                "STOKER_CLUSTER__LEASE_TTL_S": "4",
            },
            overrides={"cluster": {"endpoints": "http://10.0.0.1:2379,http://10.0.0.2:2379"}},
        )
    )
    assert cfg is not None
    assert cfg.endpoints == ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
    assert cfg.labels == {"zone": "a", "disk": "ssd"}
    assert cfg.lease_ttl_s == 4
    assert cfg.fence_window_s == pytest.approx(4 * 0.6 - 0.5)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"endpoints": "etcd:2379"}, "not of the form http://HOST:PORT"),
        ({"endpoints": ""}, "no etcd URL given"),
        ({"lease_ttl_s": 1}, "greater than or equal to 2"),
        ({"lease_ttl_s": 1e400}, "lease_ttl_s"),
        ({"fence_fraction": float("nan")}, "fence_fraction"),
        ({"kill_budget_s": 2.0, "lease_ttl_s": 3}, "fence window"),
        ({"node_name": "a/b"}, "not usable in a cluster key"),
        ({"labels": "zone"}, "is not key=value"),
        ({"advertise_url": "10.0.0.1:8080"}, "http(s)://HOST:PORT"),
        ({"policy": "random"}, "binpack"),
        ({"surprise": 1}, "Extra inputs are not permitted"),
    ],
)
def test_bad_values_are_refused_naming_the_key(values: dict[str, object], message: str) -> None:
    raw = {"endpoints": "http://127.0.0.1:2379", **values}
    with pytest.raises(ConfigError, match="cluster") as info:
        cluster_config(load_config(environ={}, overrides={"cluster": raw}))
    assert message in str(info.value)


def test_defaults() -> None:
    cfg = ClusterConfig(endpoints=["http://127.0.0.1:2379"])
    assert (cfg.lease_ttl_s, cfg.policy, cfg.hold_when_etcd_down) == (5, "binpack", True)
    assert cfg.fence_window_s == pytest.approx(2.5)
