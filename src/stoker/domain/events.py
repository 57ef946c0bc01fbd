"""What happened to a VM or the node: the event vocabulary and the record of one event.

Every event type is a member of :class:`EventType`, so a publisher and a listener cannot
disagree on a spelling; the value is what the API, the event log and hooks show.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any


class EventType(StrEnum):
    # lifecycle
    VM_CREATED = "vm.created"
    VM_DELETED = "vm.deleted"
    VM_STATE = "vm.state"
    VM_ADOPTED = "vm.adopted"
    VM_START_VETOED = "vm.start_vetoed"
    VM_SETUP_FAILED = "vm.setup_failed"
    VM_UPDATED = "vm.updated"
    # warm start
    VM_WARM_START = "vm.warm_start"
    VM_BOOT_SNAPSHOT_SAVED = "vm.boot_snapshot_saved"
    VM_BOOT_SNAPSHOT_DISCARDED = "vm.boot_snapshot_discarded"
    VM_GUEST_CLOCK = "vm.guest_clock"
    # health and recovery
    VM_HEALTH = "vm.health"
    VM_WATCHDOG = "vm.watchdog"
    VM_AUTO_RESTART = "vm.auto_restart"
    VM_RESTART_SCHEDULED = "vm.restart_scheduled"
    VM_RESTART_REARMED = "vm.restart_rearmed"
    VM_RESTART_CANCELLED = "vm.restart_cancelled"
    VM_RESTART_FAILED = "vm.restart_failed"
    VM_RESTART_LIMIT_REACHED = "vm.restart_limit_reached"
    HOOK_RESULT = "hook.result"
    # resources
    ALERT_RAISED = "alert.raised"
    ALERT_CLEARED = "alert.cleared"
    # quotas
    QUOTA_APPLIED = "quota.applied"
    QUOTA_APPLY_FAILED = "quota.apply_failed"
    QUOTA_CHANGED = "quota.changed"
    QUOTA_REMOVED = "quota.removed"
    QUOTA_VIOLATION = "quota.violation"
    # snapshots
    SNAPSHOT_CREATED = "snapshot.created"
    SNAPSHOT_FAILED = "snapshot.failed"
    SNAPSHOT_DELETED = "snapshot.deleted"
    SNAPSHOT_RESTORED = "snapshot.restored"
    SNAPSHOT_RESTORE_FAILED = "snapshot.restore_failed"
    SNAPSHOT_VERIFIED = "snapshot.verified"
    SNAPSHOT_VERIFY_FAILED = "snapshot.verify_failed"
    SNAPSHOT_PRUNED = "snapshot.pruned"
    SNAPSHOT_POLICY = "snapshot.policy"
    SNAPSHOT_PROTECTED = "snapshot.protected"
    SNAPSHOT_UNPROTECTED = "snapshot.unprotected"
    SNAPSHOT_AUTO_FAILED = "snapshot.auto_failed"
    SNAPSHOT_RESUMED = "snapshot.resumed"
    SNAPSHOT_RESUME_FAILED = "snapshot.resume_failed"
    SNAPSHOT_CLEANED = "snapshot.cleaned"
    SNAPSHOT_LOST = "snapshot.lost"
    SNAPSHOT_KEPT = "snapshot.kept"
    # schedules
    SCHEDULE_RAN = "schedule.ran"
    SCHEDULE_FAILED = "schedule.failed"
    SCHEDULE_MISSED = "schedule.missed"
    SCHEDULE_SKIPPED = "schedule.skipped"
    # the agent's own database
    DATABASE_BACKED_UP = "database.backed_up"
    DATABASE_BACKUP_FAILED = "database.backup_failed"
    # managed networks
    NETWORK_CREATED = "network.created"
    NETWORK_DELETED = "network.deleted"
    NETWORK_DNSMASQ_RESTARTED = "network.dnsmasq_restarted"
    # declarative manifests
    MANIFEST_APPLIED = "manifest.applied"
    MANIFEST_APPLY_FAILED = "manifest.apply_failed"
    MANIFEST_REFUSED = "manifest.refused"


@dataclass(frozen=True)
class Event:
    """One entry of the event log; ``data`` holds the type's own fields."""

    id: int
    at: datetime
    vm_id: str | None
    type: str
    message: str
    data: dict[str, Any]
