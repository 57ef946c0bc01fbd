"""Declarative configuration: a TOML manifest of a host's VMs, defaults, quotas, snapshot
policies, schedules and networks; its validation; and the pure plan that apply carries out.

Split by job: ``load`` (files -> documents), ``positions`` (key -> line), ``validate`` and
``merge`` (documents -> :class:`Manifest`, every problem at once, see ``errors``), ``model``
(what a manifest holds), ``state`` (the host as records), ``fields`` (live or restart, per
field), ``plan`` (desired vs current -> steps, drift), ``render`` (the plan for a person).
"""

from stoker.manifest.errors import ManifestError, ManifestProblem
from stoker.manifest.fields import LIVE_PARTS, VM_FIELDS, needs_restart
from stoker.manifest.load import load_manifest, manifest_files, parse_sources, read_documents
from stoker.manifest.model import (
    DesiredSchedule,
    DesiredVM,
    Manifest,
    NetworkSpec,
    SnapshotPolicySpec,
)
from stoker.manifest.plan import EXIT_CHANGES, EXIT_NO_CHANGES, Plan, plan, state_after
from stoker.manifest.state import (
    MANAGER,
    AppliedRecord,
    HostState,
    NetworkRecord,
    ScheduleState,
    VMRecord,
)
from stoker.manifest.steps import ABSENT, Change, Drift, Kind, Op, Step
from stoker.manifest.validate import build_manifest

__all__ = [
    "ABSENT",
    "EXIT_CHANGES",
    "EXIT_NO_CHANGES",
    "LIVE_PARTS",
    "MANAGER",
    "VM_FIELDS",
    "AppliedRecord",
    "Change",
    "DesiredSchedule",
    "DesiredVM",
    "Drift",
    "HostState",
    "Kind",
    "Manifest",
    "ManifestError",
    "ManifestProblem",
    "NetworkRecord",
    "NetworkSpec",
    "Op",
    "Plan",
    "ScheduleState",
    "SnapshotPolicySpec",
    "Step",
    "VMRecord",
    "build_manifest",
    "load_manifest",
    "manifest_files",
    "needs_restart",
    "parse_sources",
    "plan",
    "read_documents",
    "state_after",
]
