"""What the host would refuse, found before anything changes.

A manifest can be valid on its own and still not work here: a kernel outside every image
pool, a quota its VM's network mode cannot enforce, a network while managed networking is
off, a port another VM forwards. Plan and apply run the checks the services themselves run
for each object a plan would create or change (the lifecycle's create validation, the quota
service's fit and enforceability rules, the network rules) and report every refusal with the
file, key path and line it comes from, so that a manifest with any error changes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from stoker.domain import ipam
from stoker.domain.networks import Isolation, NetworkSpec
from stoker.domain.quota import Quota, QuotaProblem, check_fits, merge
from stoker.domain.quota import plan as quota_plan
from stoker.domain.spec import VMSpec
from stoker.manifest import (
    HostState,
    Kind,
    ManifestError,
    ManifestProblem,
    NetworkRecord,
    Op,
    Plan,
    VMRecord,
)
from stoker.manifest.errors import format_path
from stoker.manifest.positions import KeyPath
from stoker.manifest.source import SourceDocument
from stoker.services.errors import Conflict, InvalidSpec
from stoker.services.lifecycle import Lifecycle
from stoker.services.networks import NetworkService
from stoker.services.quotas import QuotaService
from stoker.services.quotas.drives import drive_sizes

_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")
_CHANGING = (Op.CREATE, Op.UPDATE, Op.RESTART, Op.PENDING, Op.REPLACE)


class Locator:
    """Where each named [[vm]], [[network]] and [[schedule]] was declared."""

    def __init__(self, docs: Sequence[SourceDocument]) -> None:
        self.docs = docs
        self.entries: dict[tuple[str, str], tuple[SourceDocument, KeyPath]] = {}
        for doc in docs:
            for section in ("vm", "network", "schedule"):
                items = doc.data.get(section)
                for i, item in enumerate(items if isinstance(items, list) else []):
                    if isinstance(item, dict) and isinstance(item.get("name"), str):
                        self.entries.setdefault((section, item["name"]), (doc, (section, i)))

    def problem(self, section: str, name: str, field: str, message: str) -> ManifestProblem:
        """A problem at ``field`` (as services name fields: ``drives[0].path``) of an entry."""
        found = self.entries.get((section, name))
        if found is None:  # an inline schedule, say: no table of its own to point at
            file = self.docs[0].file if self.docs else ""
            return ManifestProblem(file, 0, f"{section}[{name}].{field}".rstrip("."), message)
        doc, base = found
        table = _table(doc, base)
        path = _key_path(field)
        if path[:1] == ("network",) and "network_name" in table and "network" not in table:
            path = ("network_name",)  # what the manifest wrote for the network
        full = (*base, *path)
        return ManifestProblem(doc.file, doc.line(full), format_path(doc.data, full), message)


def check(
    plan: Plan,
    docs: Sequence[SourceDocument],
    lifecycle: Lifecycle,
    quotas: QuotaService,
    networks: NetworkService,
) -> None:
    """Raise :class:`ManifestError` with every refusal the plan's steps would meet."""
    where = Locator(docs)
    problems: list[ManifestProblem] = []
    made = {s.name for s in plan.steps if s.kind == Kind.NETWORK and s.op in _CHANGING}
    specs = {vm.name: vm.spec for vm in plan.current.vms}
    for step in plan.steps:
        target = step.target
        if step.op not in _CHANGING:
            continue
        if isinstance(target, VMRecord):
            specs[step.name] = target.spec
            problems += _vm(target, made, where, lifecycle, networks)
        elif isinstance(target, NetworkRecord):
            problems += _network(target, plan.current, where, networks)
        elif step.kind == Kind.QUOTA and isinstance(target, Quota):
            problems += _quota(step.name, target, specs[step.name], where, quotas)
    if problems:
        raise ManifestError(problems)


def _vm(
    vm: VMRecord,
    made: set[str],
    where: Locator,
    lifecycle: Lifecycle,
    networks: NetworkService,
) -> list[ManifestProblem]:
    problems = []
    if vm.warm_start and "warm_start" not in VMSpec.model_fields:
        problems.append(
            where.problem("vm", vm.name, "warm_start", "warm start is not available on this agent")
        )
    try:
        lifecycle.check_spec(vm.spec)
    except InvalidSpec as exc:
        for error in exc.members.get("errors", []):
            field, message = str(error["field"]), str(error["message"])
            if field == "network.name" and vm.network_name in made and networks.available:
                continue  # the plan makes that network before this VM
            problems.append(where.problem("vm", vm.name, field, message))
    except Conflict as exc:
        problems.append(where.problem("vm", vm.name, "", exc.detail))
    return problems


def _quota(
    name: str, quota: Quota, spec: VMSpec, where: Locator, quotas: QuotaService
) -> list[ManifestProblem]:
    """The quota service's own rules for ``set``: the merged quota fits the VM, and the
    VM's setup can enforce every limit given."""
    found = check_fits(merge(quotas.defaults, quota), spec, drive_sizes(spec)[0])
    refused = quota_plan(quota, spec, quotas.capabilities_of(spec)).unenforceable
    found += [QuotaProblem(field, why) for field, why in refused.items()]
    return [where.problem("vm", name, f"quota.{p.field}", p.message) for p in found]


def _network(
    net: NetworkRecord, current: HostState, where: Locator, networks: NetworkService
) -> list[ManifestProblem]:
    if not networks.available:
        return [
            where.problem(
                "network",
                net.name,
                "",
                f"managed networking is not available on this agent: {networks.status().reason}",
            )
        ]
    try:
        NetworkSpec(name=net.name, subnet=net.subnet, isolation=Isolation(net.isolation))
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        return [where.problem("network", net.name, field, first["msg"])]
    others = {f"network {n.name!r}": n.subnet for n in current.networks if n.name != net.name}
    try:
        ipam.validate_subnet(net.subnet, others)
    except ipam.IpamError as exc:
        return [where.problem("network", net.name, "subnet", str(exc))]
    return []


def _table(doc: SourceDocument, path: KeyPath) -> dict[str, Any]:
    node: Any = doc.data
    for part in path:  # the Locator found every part there
        node = node[part]
    return node if isinstance(node, dict) else {}


def _key_path(field: str) -> KeyPath:
    """``drives[0].path`` -> ``("drives", 0, "path")``."""
    return tuple(
        int(index) if index else key for key, index in _PART.findall(field) if key or index
    )
