"""Schemathesis over the agent's own OpenAPI: no 5xx, every answer matches the schema.

The agent under test is a real process serving its TCP listener (with a bearer token);
the fuzzer talks to it over a real socket. Two runs:

- every operation alone, with hostile values mixed into what the schema generates: NaN,
  plus and minus infinity, numbers of 400 digits, 100,000-character strings, control
  characters (no JSON generator makes these by default; a body with ``1e400`` once bricked
  the agent);
- stateful: chains of operations following the document's links (create a VM, then start,
  snapshot, restore, delete it...), so operations on objects reach real objects instead of
  404. A created VM gets the test guest's kernel (the schema cannot say which files are in
  the agent's image pools).
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from stoker.api.app import document
from tests.helpers import AgentProcess, free_port, guest_image, guest_spec

TOKEN = "fuzz-token-" + "f" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: CI keeps the suite short; STOKER_FUZZ_EXAMPLES=200 for a deeper run
EXAMPLES = int(os.environ.get("STOKER_FUZZ_EXAMPLES", "15"))

HOSTILE_NUMBERS: list[Any] = [
    float("nan"),
    float("inf"),
    float("-inf"),
    10**400,
    -(10**400),
    1.7976931348623157e308,
    2**64,
    -(2**63) - 1,
]
HOSTILE_STRINGS = ["x" * 100_000, "name\n", "\x00", "\u202e" * 1000, "9" * 400, "1e400", "nan"]
HOSTILE = HOSTILE_NUMBERS + HOSTILE_STRINGS


@pytest.fixture(scope="module")
def fuzz_agent():
    port = free_port()
    proc = AgentProcess(
        env={
            "STOKER_API__TCP_PORT": str(port),
            "STOKER_API__TOKEN": TOKEN,
            # the stateful run starts real guests: keep it to a few at a time
            "STOKER_RESOURCES__MAX_VMS": "2",
        }
    ).start()
    with proc.client() as api:
        # something to find: a registered (never started) VM
        api.create_vm(guest_spec("fuzz-target"))
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        proc.cleanup()


def _document() -> dict:
    """The same OpenAPI document the agent serves (checked below), built without an agent so
    that the operations are known when pytest collects the tests."""
    return document()


schema = schemathesis.openapi.from_dict(_document())


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths to every place a hostile value can go: the document itself and each member."""
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _leaves(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _leaves(item, (*path, index))
    return found


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replace(copy[path[0]], path[1:], new)  # type: ignore[index]
    return copy


def _hostile(value: Any) -> st.SearchStrategy[Any]:
    """The value as generated, or with one member replaced by a hostile value; a mutated
    document goes out as JSON text written here, since the HTTP client would refuse to
    encode NaN and infinity (which JSON parsers, the agent's included, accept as literals)."""
    mutated = st.tuples(st.sampled_from(_leaves(value)), st.sampled_from(HOSTILE)).map(
        lambda pick: json.dumps(_replace(value, pick[0], pick[1])).encode()
    )
    return st.one_of(st.just(value), mutated)


def flatmap_body(context: Any, body: Any) -> st.SearchStrategy[Any]:
    return _hostile(body)


def flatmap_query(context: Any, query: dict[str, Any] | None) -> st.SearchStrategy[Any]:
    if not query:
        return st.just(query)
    text = [str(v) if isinstance(v, float | int) else v for v in HOSTILE if v == v] + ["nan"]
    return st.one_of(
        st.just(query),
        st.tuples(st.sampled_from(sorted(query)), st.sampled_from(text)).map(
            lambda pick: {**query, pick[0]: pick[1]}
        ),
    )


def test_served_document_is_the_one_fuzzed(fuzz_agent):
    _, url = fuzz_agent
    served = httpx.get(f"{url}/openapi.json", headers=AUTH).json()
    assert served == _document()


def test_hostile_bodies_are_sent_as_such(fuzz_agent):
    """The fuzzer's NaN and infinity reach the agent as JSON's NaN/Infinity literals and a
    400-digit number as digits: what the agent must refuse with a 4xx, never a 5xx."""
    _, url = fuzz_agent
    for literal in ("NaN", "Infinity", "-Infinity", "1e400", "9" * 400, "9" * 5000):
        body = json.dumps(guest_spec("hostile"))[:-1] + f', "boot_timeout_s": {literal}}}'
        answer = httpx.post(
            f"{url}/api/v1/vms",
            content=body,
            headers={**AUTH, "content-type": "application/json"},
        )
        assert 400 <= answer.status_code < 500, (literal[:20], answer.text)


@schema.hooks.apply(flatmap_body)
@schema.hooks.apply(flatmap_query)
@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_api_never_fails_and_matches_its_schema(case, fuzz_agent):
    # Schema-valid input may still be refused for reasons the schema cannot express (a kernel
    # path that does not exist on this host, a VM in the wrong state): those answer 4xx with a
    # problem, so "valid data must be accepted" does not hold and is not checked.
    _, url = fuzz_agent
    case.call_and_validate(base_url=url, headers=AUTH, excluded_checks=[positive_data_acceptance])


# ------------------------------------------------------------------------------ stateful


stateful_schema = schemathesis.openapi.from_dict(_document())


@stateful_schema.hook("map_body").apply_to(method="POST", path="/api/v1/vms")
def _runnable_vm(context: Any, body: Any) -> Any:
    """A created VM the agent can run: the test guest, a fresh name (the schema cannot say
    which kernels are in the agent's image pools)."""
    image = guest_image()
    spec = guest_spec(f"fz-{secrets.token_hex(4)}")
    spec["kernel"], spec["initrd"] = str(image.kernel), str(image.initrd)
    return spec


@stateful_schema.hook("map_body").apply_to(method="POST", path="/api/v1/schedules")
def _workable_schedule(context: Any, body: Any) -> Any:
    """A schedule the agent accepts (a known VM, a real cron), so its operations are reached."""
    action = body.get("action") if isinstance(body, dict) else None
    if action not in ("start", "stop", "restart", "snapshot"):
        action = "snapshot"
    return {"action": action, "vm": "fuzz-target", "cron": "@daily", "enabled": False}


@stateful_schema.hook("map_path_parameters").apply_to(
    method="POST", path="/api/v1/reports/{period}"
)
def _a_period(context: Any, parameters: dict[str, Any]) -> dict[str, Any]:
    return {**parameters, "period": "daily"}


#: operations whose generated input the hooks above replace
REPLACED = {"POST /api/v1/vms", "POST /api/v1/schedules", "POST /api/v1/reports/{period}"}


class Workflow(stateful_schema.as_state_machine()):  # type: ignore[misc]
    url: str = ""

    def get_call_kwargs(self, case: Any) -> dict[str, Any]:
        return {"base_url": self.url, "headers": AUTH}

    def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
        excluded = [positive_data_acceptance]
        if case.operation.label in REPLACED:
            # the hook above replaced the generated body, so "negative" cases are no longer
            # negative there (the single-operation run checks that operation's refusals)
            excluded.append(negative_data_rejection)
        case.validate_response(response, excluded_checks=excluded, transport_kwargs=kwargs)


def test_stateful_chains_reach_real_objects(fuzz_agent):
    _, url = fuzz_agent
    Workflow.url = url
    Workflow.run(
        settings=settings(
            max_examples=int(os.environ.get("STOKER_FUZZ_SCENARIOS", "8")),
            stateful_step_count=6,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
    )
