"""Issue 13, findings 1, 5 (counts), 7 (validation before side effects) and 8 (config):
every number in every request and config is finite and bounded, every list and string has a
limit, nothing is written before a request is validated, and a stored record that cannot be
decoded never stops a listing or the agent's start.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from stoker.agent import build_services
from stoker.api.app import create_app, document
from stoker.config import AgentConfig, APIConfig, ConfigError, load_config, section
from stoker.services.backups import DatabaseConfig
from stoker.services.container import Services
from stoker.services.health import HealthConfig
from stoker.services.history import HistoryConfig
from stoker.services.hooks import HooksConfig
from stoker.services.quotas import QuotasConfig
from stoker.services.resources import ResourcesConfig
from stoker.services.scheduler import SchedulerConfig
from stoker.services.snapshots import SnapshotsConfig
from stoker.store.db import Database
from stoker.store.vms import UNREADABLE
from tests.fakes import FakeDriver

# --------------------------------------------------------------------------- the config

CONFIG_MODELS: list[type[BaseModel]] = [
    AgentConfig,
    APIConfig,
    DatabaseConfig,
    HealthConfig,
    HistoryConfig,
    HooksConfig,
    QuotasConfig,
    ResourcesConfig,
    SchedulerConfig,
    SnapshotsConfig,
]


def _numbers(schema: dict[str, Any], defs: dict[str, Any], where: str = "") -> Iterator[tuple]:
    """(path, schema) of every number or integer in a JSON schema."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        if name in defs and name not in where.split("/"):
            yield from _numbers(defs[name], defs, f"{where}/{name}")
        return
    if schema.get("type") in ("number", "integer"):
        yield where, schema
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        for index, sub in enumerate(schema.get(key, [])):
            yield from _numbers(sub, defs, f"{where}[{index}]")
    for name, sub in schema.get("properties", {}).items():
        yield from _numbers(sub, defs, f"{where}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from _numbers(schema[key], defs, f"{where}{key}")


def _unbounded(schema: dict[str, Any], defs: dict[str, Any]) -> list[str]:
    return [
        path
        for path, s in _numbers(schema, defs)
        if not ({"maximum", "exclusiveMaximum"} & set(s))
        or not ({"minimum", "exclusiveMinimum"} & set(s))
    ]


@pytest.mark.parametrize("model", CONFIG_MODELS, ids=lambda m: m.__name__)
def test_every_config_number_is_bounded_and_finite(model: type[BaseModel]) -> None:
    schema = model.model_json_schema()
    assert _unbounded(schema, schema.get("$defs", {})) == []
    assert model.model_config.get("allow_inf_nan") is False


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400"])
def test_config_refuses_nan_and_infinity(value: str) -> None:
    config = load_config(None, environ={"STOKER_SNAPSHOTS__TICK_S": value})
    with pytest.raises(ConfigError, match=r"snapshots\.tick_s"):
        section(config, "snapshots", SnapshotsConfig)
    config = load_config(None, environ={"STOKER_HISTORY__LOG_CHECK_INTERVAL_S": value})
    with pytest.raises(ConfigError, match=r"history\.log_check_interval_s"):
        section(config, "history", HistoryConfig)


def test_a_nested_variable_on_a_value_is_a_clear_error() -> None:
    # was: a raw TypeError that crashed the agent
    with pytest.raises(ConfigError, match="STOKER_DATA_DIR__X: data_dir is a value"):
        load_config(None, environ={"STOKER_DATA_DIR__X": "1"})
    with pytest.raises(ConfigError, match="STOKER_API__TCP_PORT__X: tcp_port is a value"):
        load_config(None, environ={"STOKER_API__TCP_PORT": "1", "STOKER_API__TCP_PORT__X": "1"})


def test_command_line_data_dir_gets_the_same_length_check() -> None:
    # was: `stoker agent --data-dir` skipped the socket-path length check
    with pytest.raises(ConfigError, match="longer than"):
        load_config(None, environ={}, overrides={"data_dir": "/" + "d" * 120})


def test_non_utf8_config_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(b"data_dir = '\xff'\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path, environ={})


GOOD_TOKEN = "x" * 32


@pytest.mark.parametrize(
    ("token", "message"),
    [("", "empty"), ("   \n", "empty"), ("s3cret", "6 bytes; use at least 32")],
)
def test_tcp_token_must_not_be_guessable(token: str, message: str) -> None:
    api = APIConfig(tcp_port=8080, token=token or " ")
    with pytest.raises(ConfigError, match=message):
        api.resolved_token()


def test_token_file_empty_short_or_world_readable_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "token"
    for content, mode, message in [
        ("  \n", 0o600, "empty"),
        ("x", 0o600, "1 bytes"),
        (GOOD_TOKEN, 0o644, "readable by every user"),
    ]:
        path.write_text(content)
        path.chmod(mode)
        with pytest.raises(ConfigError, match=message):
            APIConfig(tcp_port=8080, token_file=path).resolved_token()
    path.chmod(0o600)
    assert APIConfig(tcp_port=8080, token_file=path).resolved_token() == GOOD_TOKEN


def test_a_non_loopback_listener_needs_tls(tmp_path: Path) -> None:
    env = {"STOKER_API__TCP_PORT": "8080", "STOKER_API__TOKEN": GOOD_TOKEN}
    with pytest.raises(ConfigError, match="tls_cert"):
        load_config(None, environ={**env, "STOKER_API__TCP_HOST": "0.0.0.0"})
    with pytest.raises(ConfigError, match="go together"):
        load_config(None, environ={**env, "STOKER_API__TLS_CERT": "/c.pem"})
    for loopback in ("127.0.0.1", "::1", "localhost"):
        load_config(None, environ={**env, "STOKER_API__TCP_HOST": loopback})
    tls = {"STOKER_API__TLS_CERT": "/c.pem", "STOKER_API__TLS_KEY": "/k.pem"}
    assert load_config(None, environ={**env, **tls, "STOKER_API__TCP_HOST": "0.0.0.0"})


# --------------------------------------------------------------------------- the API


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    db = Database(tmp_path / "stoker.db")
    yield build_services(AgentConfig(data_dir=tmp_path), db, drivers={"qemu": FakeDriver()})
    db.close()


@pytest.fixture
async def api(services: Services) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(services), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://stoker") as client:
        yield client


SPEC = {"name": "web", "kernel": "/boot/vmlinuz"}


def _raw(body: dict[str, Any], field: str, literal: str) -> str:
    """``body`` as JSON with ``field`` (a.b) set to a literal no JSON encoder writes."""
    text = json.dumps({**body, "__marker__": 0})
    path = field.split(".")
    nested = literal
    for part in reversed(path[1:]):
        nested = f'{{"{part}": {nested}}}'
    return text.replace('"__marker__": 0', f'"{path[0]}": {nested}')


def test_every_request_number_is_bounded() -> None:
    doc = document(cluster=True)
    defs = doc["components"]["schemas"]
    problems = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            schemas = [("body", body.get("schema", {}))]
            schemas += [(p["name"], p["schema"]) for p in op.get("parameters", [])]
            for name, schema in schemas:
                problems += [f"{method} {path} {name}{w}" for w in _unbounded(schema, defs)]
    assert problems == []


@pytest.mark.parametrize("literal", ["1e400", "-1e400", "NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize(
    "field", ["restart.stable_after_s", "boot_timeout_s", "vcpus", "memory_mib"]
)
async def test_non_finite_numbers_are_422_and_store_nothing(
    api: httpx.AsyncClient, services: Services, field: str, literal: str
) -> None:
    # was: 500, the row stored, every later GET /api/v1/vms 500, the agent unable to start
    answer = await api.post(
        "/api/v1/vms",
        content=_raw(SPEC, field, literal),
        headers={"content-type": "application/json"},
    )
    assert answer.status_code == 422, answer.text
    assert services.directory.all() == []
    assert (await api.get("/api/v1/vms")).status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (
            "/api/v1/vms/web/snapshot-policy",
            {"retention": "within:99999999999999999999999d"},
            "retention",
        ),
        ("/api/v1/vms/web/snapshot-policy", {"interval": "99999999999999999999999d"}, "interval"),
        ("/api/v1/vms/web/snapshot-policy", {"interval": "9" * 60}, "interval"),
    ],
)
async def test_huge_durations_are_422(
    api: httpx.AsyncClient, path: str, body: dict[str, Any], field: str
) -> None:
    # was: 500 (OverflowError)
    assert (await api.post("/api/v1/vms", json=SPEC)).status_code == 201
    answer = await api.put(path, json=body)
    assert answer.status_code == 422, answer.text
    assert field in answer.json()["detail"] and "century" in answer.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {"selector": {f"k{i}": "v" for i in range(17)}},  # too many keys
        {"selector": {"app": "x" * 1_000_000}},  # a 1 MB selector
        {"selector": {"app\n": "web"}},  # a key with a trailing newline
        {"selector": {"app": "a\nb"}},
        {"vm": "v" * 65},
        {"vm": "web", "cron": "* " * 200},
        {"vm": "web", "options": {f"o{i}": 1 for i in range(10)}},
    ],
)
async def test_schedule_bodies_are_bounded(api: httpx.AsyncClient, body: dict[str, Any]) -> None:
    answer = await api.post("/api/v1/schedules", json={"action": "start", "cron": "@daily", **body})
    assert answer.status_code == 422, answer.text


async def test_label_keys_and_values_are_checked_to_their_end(api: httpx.AsyncClient) -> None:
    for labels in ({"app\n": "web"}, {"app": "web\n"}, {f"k{i}": "v" for i in range(65)}):
        answer = await api.post("/api/v1/vms", json={**SPEC, "labels": labels})
        assert answer.status_code == 422, labels


@pytest.mark.parametrize(
    ("day", "message"),
    [("0001-01-01", "before 1970-01-01"), ("9999-12-31", "in the future")],
)
async def test_a_report_for_an_impossible_day_writes_nothing(
    api: httpx.AsyncClient, tmp_path: Path, day: str, message: str
) -> None:
    # was: 422 after writing weekly-1-W01.json and .txt
    for period in ("daily", "weekly", "monthly"):
        answer = await api.post(f"/api/v1/reports/{period}", params={"date": day})
        assert answer.status_code == 422 and message in answer.json()["detail"], answer.text
    assert not (tmp_path / "reports").exists() or list((tmp_path / "reports").iterdir()) == []


# ------------------------------------------------------------------ unreadable records


def _corrupt(db: Database, name: str, column: str, value: Any) -> None:
    with db.write() as conn:
        conn.execute(f"UPDATE vms SET {column} = ? WHERE name = ?", (value, name))


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("spec", '{"name": "web", "kernel": "/k", "restart": {"stable_after_s": Infinity}}'),
        ("spec", "not json"),
        ("state", "exploded"),
        ("state_since", "yesterday"),
        ("process", "{"),
    ],
)
async def test_an_unreadable_record_is_shown_in_error_and_stops_nothing(
    api: httpx.AsyncClient,
    services: Services,
    caplog: pytest.LogCaptureFixture,
    column: str,
    value: str,
) -> None:
    assert (await api.post("/api/v1/vms", json=SPEC)).status_code == 201
    assert (await api.post("/api/v1/vms", json={**SPEC, "name": "ok"})).status_code == 201
    store = services.directory.store
    _corrupt(store.db, "web", column, value)
    store._rows.clear()
    with caplog.at_level(logging.ERROR, logger="stoker.store"):
        listed = (await api.get("/api/v1/vms")).json()
        (await api.get("/api/v1/vms")).json()
        one = (await api.get("/api/v1/vms/web")).json()
    by_name = {vm["name"]: vm for vm in listed}
    assert by_name["ok"]["state"] == "pending"
    assert by_name["web"]["state"] == "error" and by_name["web"]["state_reason"] == UNREADABLE
    assert one["allowed_actions"] == ["delete"]
    assert len([r for r in caplog.records if "unreadable" in r.getMessage()]) == 1  # once
    await services.lifecycle.recover()  # the agent's start goes on
    refused = await api.post("/api/v1/vms/web/start")
    assert refused.status_code == 409 and "unreadable" in refused.json()["detail"]
    assert (await api.delete("/api/v1/vms/web")).status_code == 204
    assert [vm["name"] for vm in (await api.get("/api/v1/vms")).json()] == ["ok"]


def test_file_modes_of_new_reports(services: Services, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        services.reports._generate(services.reports.period("daily"))
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "reports").iterdir()}
    assert modes and set(modes.values()) == {0o600}, modes
