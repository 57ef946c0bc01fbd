"""Which changes reach a running VM live and which need a restart, field by field.

The VM fields' table is the domain's (:mod:`stoker.domain.spec_changes`), shared with the
lifecycle's in-place spec update; a manifest adds the parts of a VM that are objects of
their own (quota, snapshot policy, schedules), all live.
"""

from __future__ import annotations

from typing import Final

from stoker.domain.spec_changes import LIVE, RESTART, VM_FIELDS, head, needs_restart

__all__ = ["LIVE", "LIVE_PARTS", "RESTART", "VM_FIELDS", "head", "needs_restart"]

#: the other parts of a VM a manifest sets, all live, and why
LIVE_PARTS: Final[dict[str, str]] = {
    "quota": "the quota service changes cgroup, throttle and rate limits on a running VM",
    "snapshot_policy": "snapshot automation reads the policy on its next tick",
    "schedule": "schedules are objects of their own; the scheduler re-plans at once",
}
