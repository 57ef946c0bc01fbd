"""Raw TOML documents -> a :class:`Manifest`, or every problem of every file at once.

Each part is checked by the model the API uses (``VMSpec``, ``Quota``, ``ScheduleSpec`` and
the scheduler's ``check_options``), then across parts and files: duplicate names, references
to VMs and networks the manifest does not declare, overlapping subnets, a memory quota below
the guest's RAM.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stoker.domain.quota import check_fits
from stoker.domain.spec import NetworkMode, VMSpec
from stoker.manifest.errors import Collector, did_you_mean
from stoker.manifest.merge import merge_defaults
from stoker.manifest.model import (
    BUILTIN_NETWORKS,
    SECTIONS,
    DefaultsEntry,
    DesiredSchedule,
    DesiredVM,
    Manifest,
    NetworkSpec,
    Origin,
    VMEntry,
)
from stoker.manifest.positions import KeyPath
from stoker.manifest.pydantic_errors import validate
from stoker.manifest.source import SourceDocument
from stoker.services.errors import InvalidSpec
from stoker.services.scheduler.spec import ScheduleSpec, check_options

ARRAY_SECTIONS = ("vm", "schedule", "network")
NAME_MAX = 63


@dataclass(frozen=True)
class _At:
    """Where a part was declared."""

    doc: SourceDocument
    path: KeyPath

    def origin(self) -> Origin:
        return Origin(self.doc.file, self.doc.line(self.path))


def build_manifest(docs: Sequence[SourceDocument]) -> Manifest:
    """Validate everything, then raise :class:`ManifestError` if anything is wrong."""
    c = Collector(p for doc in docs for p in doc.problems)
    for doc in docs:
        _check_sections(doc, c)
    defaults, default_at = _defaults(docs, c)
    vm_names = _declared_names(docs, "vm")
    network_names = _declared_names(docs, "network")
    vms = _vms(docs, defaults, default_at, c)
    networks = _networks(docs, c)
    for vm in vms:
        network = vm.raw.get("network_name")
        if isinstance(network, str):
            _check_network_ref(network, network_names, vm.at, c)
    schedules = _schedules(docs, vms, vm_names, c)
    c.raise_if_any()
    desired = (_desired_vm(vm.entry, vm.at) for vm in vms if vm.entry is not None)
    return Manifest(
        vms=tuple(sorted(desired, key=lambda vm: vm.name)),
        schedules=tuple(sorted(schedules, key=lambda s: s.name)),
        networks=tuple(sorted((n for n, _ in networks), key=lambda n: n.name)),
        files=tuple(doc.file for doc in docs),
        network_origins={n.name: at.origin() for n, at in networks},
    )


# --------------------------------------------------------------------------- sections


def _check_sections(doc: SourceDocument, c: Collector) -> None:
    for key, value in doc.data.items():
        if key not in SECTIONS:
            c.add(doc, (key,), f"unknown section {key!r}" + did_you_mean(key, SECTIONS))
        elif key == "defaults" and not isinstance(value, dict):
            c.add(doc, (key,), "must be a table: write [defaults] and keys under it")
        elif key in ARRAY_SECTIONS:
            if not isinstance(value, list):
                c.add(doc, (key,), f"write [[{key}]] (one per entry), not [{key}] or {key} = ...")
                continue
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    c.add(doc, (key, i), f"each {key} entry must be a table, as [[{key}]] makes")


def _entries(doc: SourceDocument, section: str) -> list[tuple[int, dict[str, Any]]]:
    value = doc.data.get(section)
    if not isinstance(value, list):
        return []
    return [(i, item) for i, item in enumerate(value) if isinstance(item, dict)]


def _declared_names(docs: Sequence[SourceDocument], section: str) -> set[str]:
    """Every name written in a section, valid entry or not, so that a reference to an entry
    with its own errors is not also reported as a reference to nothing."""
    return {
        item["name"]
        for doc in docs
        for _, item in _entries(doc, section)
        if isinstance(item.get("name"), str)
    }


def _unique(name: str, at: _At, seen: dict[str, _At], what: str, c: Collector) -> bool:
    first = seen.setdefault(name, at)
    if first is at:
        return True
    c.add(at.doc, at.path, f"{what} {name!r} is declared twice: here and at {first.origin()}")
    return False


# --------------------------------------------------------------------------- defaults


def _defaults(docs: Sequence[SourceDocument], c: Collector) -> tuple[DefaultsEntry, dict[str, _At]]:
    """The merged ``[defaults]`` of all files (each key set in one file only) and where each
    key was set. Keys are checked one by one (they are independent): a key with an error is
    reported once and left out, so that no VM is blamed for it."""
    valid: dict[str, Any] = {}
    where: dict[str, _At] = {}
    for doc in docs:
        table = doc.data.get("defaults")
        if not isinstance(table, dict):
            continue
        for key, value in table.items():
            at = _At(doc, ("defaults", key))
            if key in where:
                c.add(doc, at.path, f"also set at {where[key].origin()}: set each default once")
            elif validate(DefaultsEntry, {key: value}, c, doc, ("defaults",)) is not None:
                valid[key] = value
                where[key] = at
    entry = DefaultsEntry.model_validate_json(json.dumps(valid), strict=True)
    return entry, where


# --------------------------------------------------------------------------- VMs


@dataclass(frozen=True)
class _VM:
    """A [[vm]] table as written, and its validated entry when it has no errors."""

    at: _At
    raw: dict[str, Any]
    entry: VMEntry | None


def _vms(
    docs: Sequence[SourceDocument],
    defaults: DefaultsEntry,
    default_at: dict[str, _At],
    c: Collector,
) -> list[_VM]:
    """Every [[vm]] but the second of a duplicate name; ``entry`` None for one with errors
    (its references and inline schedules are still checked, from the raw table)."""
    out: list[_VM] = []
    seen: dict[str, _At] = {}
    for doc in docs:
        for i, raw in _entries(doc, "vm"):
            at = _At(doc, ("vm", i))
            name = raw.get("name")
            if isinstance(name, str) and not _unique(name, at, seen, "VM", c):
                continue
            joined = _join_network(merge_defaults(raw, defaults), at, c)
            entry = validate(VMEntry, joined, c, doc, at.path) if joined is not None else None
            if entry is not None and not _quota_fits(entry, raw, at, default_at, c):
                entry = None
            out.append(_VM(at, raw, entry))
    return out


def _join_network(vm: dict[str, Any], at: _At, c: Collector) -> dict[str, Any] | None:
    """``network_name = "lan"`` is short for ``network = { mode = "managed", name = "lan" }``
    (other network keys, such as port forwards, still apply); None when the two disagree."""
    name, network = vm.get("network_name"), vm.get("network")
    if not isinstance(name, str) or (network is not None and not isinstance(network, dict)):
        return vm  # wrong types are reported by validation
    network = dict(network or {})
    for key, want in (("mode", "managed"), ("name", name)):
        if network.get(key, want) != want:
            c.add(
                at.doc,
                (*at.path, "network_name"),
                f"puts the VM on managed network {name!r}, but network.{key} says "
                f"{network[key]!r}: give one of them",
            )
            return None
    return {**vm, "network": {**network, "mode": "managed", "name": name}}


def _quota_fits(
    entry: VMEntry, raw: dict[str, Any], at: _At, default_at: dict[str, _At], c: Collector
) -> bool:
    """The quota domain's own check that a quota does not already break the VM (memory below
    the guest's RAM). Drive sizes need the disk and whether a limit can bind needs the
    driver's capabilities: the quota service checks those when apply sets the quota."""
    if entry.quota is None:
        return True
    problems = check_fits(entry.quota, entry.vm_spec(), 0)
    own = raw.get("quota")
    own_keys = set(own) if isinstance(own, dict) else set()
    for problem in problems:
        message = problem.message
        if problem.field not in own_keys and "quota" in default_at:
            message += f" (the value comes from defaults.quota, {default_at['quota'].origin()})"
        c.add(at.doc, (*at.path, "quota", problem.field), message)
    return not problems


def _desired_vm(entry: VMEntry, at: _At) -> DesiredVM:
    quota = entry.quota if entry.quota is not None and not entry.quota.is_empty() else None
    policy = entry.snapshot_policy
    spec = entry.vm_spec()
    return DesiredVM(
        spec=spec,
        quota=quota,
        snapshot_policy=policy if policy is not None and not policy.is_empty() else None,
        warm_start=bool(entry.warm_start),
        network_name=managed_network(spec),
        running=entry.running,
        origin=at.origin(),
    )


def managed_network(spec: VMSpec) -> str | None:
    """The managed network a VM is on (however the manifest said it), else None."""
    return spec.network.name if spec.network.mode == NetworkMode.MANAGED else None


# --------------------------------------------------------------------------- networks


def _networks(docs: Sequence[SourceDocument], c: Collector) -> list[tuple[NetworkSpec, _At]]:
    out: list[tuple[NetworkSpec, _At]] = []
    seen: dict[str, _At] = {}
    for doc in docs:
        for i, raw in _entries(doc, "network"):
            at = _At(doc, ("network", i))
            name = raw.get("name")
            if isinstance(name, str) and not _unique(name, at, seen, "network", c):
                continue
            spec = validate(NetworkSpec, raw, c, doc, at.path)
            if spec is None:
                continue
            subnet = ipaddress.ip_network(spec.subnet)
            clash = next(
                (
                    (other, where)
                    for other, where in out
                    if subnet.overlaps(ipaddress.ip_network(other.subnet))
                ),
                None,
            )
            if clash is not None:
                other, where = clash
                c.add(
                    doc,
                    (*at.path, "subnet"),
                    f"{spec.subnet} overlaps network {other.name!r} ({other.subnet}) at "
                    f"{where.origin()}",
                )
                continue
            out.append((spec, at))
    return out


def _check_network_ref(name: str, declared: set[str], at: _At, c: Collector) -> None:
    if name in declared or name in BUILTIN_NETWORKS:
        return
    known = sorted(declared | BUILTIN_NETWORKS)
    c.add(
        at.doc,
        (*at.path, "network_name"),
        f"no [[network]] named {name!r} in the manifest" + did_you_mean(name, known),
    )


# --------------------------------------------------------------------------- schedules


def _schedules(
    docs: Sequence[SourceDocument],
    vms: list[_VM],
    vm_names: set[str],
    c: Collector,
) -> list[DesiredSchedule]:
    found: list[tuple[DesiredSchedule, _At]] = []
    for doc in docs:
        for i, raw in _entries(doc, "schedule"):
            at = _At(doc, ("schedule", i))
            target = raw.get("vm")
            if isinstance(target, str) and target not in vm_names:
                c.add(
                    doc,
                    (*at.path, "vm"),
                    f"no [[vm]] named {target!r} in the manifest (a manifest's schedules act "
                    "on its own VMs; use a selector for others)"
                    + did_you_mean(target, sorted(vm_names)),
                )
            if "name" not in raw:
                c.add(doc, at.path, "needs a name: plan and prune track a [[schedule]] by it")
            spec = _schedule(raw, None, at, c)
            if spec is not None and spec.name is not None and target in (None, *vm_names):
                found.append((DesiredSchedule(spec.name, spec, at.origin()), at))
    for vm in vms:
        name, inline = vm.raw.get("name"), vm.raw.get("schedules")
        if not isinstance(name, str) or not isinstance(inline, list):
            continue
        counts: dict[str, int] = {}
        for j, raw in enumerate(inline):
            at = _At(vm.at.doc, (*vm.at.path, "schedules", j))
            spec = _schedule(raw, name, at, c) if isinstance(raw, dict) else None
            if spec is None:
                continue
            counts[spec.action] = counts.get(spec.action, 0) + 1
            found.append(
                (
                    DesiredSchedule(
                        spec.name or inline_name(name, spec.action, counts[spec.action]),
                        spec,
                        at.origin(),
                    ),
                    at,
                )
            )
    order = {doc.file: i for i, doc in enumerate(docs)}
    found.sort(key=lambda pair: (order[pair[1].doc.file], pair[1].doc.line(pair[1].path)))
    seen: dict[str, _At] = {}
    return [s for s, at in found if _unique(s.name, at, seen, "schedule", c)]


def _schedule(
    raw: dict[str, Any], own_vm: str | None, at: _At, c: Collector
) -> ScheduleSpec | None:
    """One schedule checked as the scheduler checks it; ``own_vm`` for one inside a [[vm]]."""
    data = dict(raw)
    if own_vm is not None:
        for key in ("vm", "selector"):
            if key in data:
                c.add(
                    at.doc,
                    (*at.path, key),
                    "a schedule inside a [[vm]] acts on that VM; to target others, declare "
                    "it as a [[schedule]]",
                )
                return None
        if data.get("action") == "report":
            c.add(
                at.doc,
                (*at.path, "action"),
                "a report covers the whole node: declare it as a [[schedule]], not in a [[vm]]",
            )
            return None
        data["vm"] = own_vm
    spec: ScheduleSpec | None = validate(ScheduleSpec, data, c, at.doc, at.path)
    if spec is None:
        return None
    if spec.action == "report":
        for key in ("vm", "selector"):
            if getattr(spec, key) is not None:
                c.add(at.doc, (*at.path, key), "a report covers the whole node: give no " + key)
                return None
    elif (spec.vm is None) == (spec.selector is None):
        c.add(
            at.doc,
            at.path,
            f"a {spec.action} schedule needs exactly one of vm (a [[vm]] of this manifest) or "
            "selector (labels)",
        )
        return None
    try:
        options = check_options(spec.action, spec.options)
    except InvalidSpec as exc:
        field = str(exc.members["errors"][0]["field"])
        c.add(at.doc, (*at.path, *field.split(".")), str(exc.members["errors"][0]["message"]))
        return None
    return spec.model_copy(update={"options": options})


def inline_name(vm: str, action: str, nth: int) -> str:
    """The name of an unnamed schedule inside a [[vm]]: ``web-start``, ``web-start-2``...;
    shortened with a digest when the VM's name is long, to stay a valid schedule name."""
    suffix = f"-{action}" + (f"-{nth}" if nth > 1 else "")
    if len(vm) + len(suffix) <= NAME_MAX:
        return vm + suffix
    digest = hashlib.sha256(vm.encode()).hexdigest()[:6]
    keep = NAME_MAX - len(suffix) - len(digest) - 1
    return f"{vm[:keep].rstrip('-')}-{digest}{suffix}"
