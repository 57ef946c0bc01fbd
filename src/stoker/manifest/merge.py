"""How ``[defaults]`` merge into each ``[[vm]]``: the VM's own value always wins.

* ``quota``, ``snapshot_policy``, ``restart`` and ``labels`` merge key by key: a VM that sets
  ``quota.cpu_percent`` keeps the default ``quota.memory_mib``. An empty string for a
  snapshot-policy key turns that default off for the VM (``retention = ""``).
* ``probes`` replace: a VM's list is its whole list (``probes = []`` removes the defaults),
  because probes are checks that belong together, not entries to mix by position.
* ``warm_start`` is a plain value: the VM's, else the default's, else the agent's
  ``[warm_start] default``.

Merging works on the raw tables before validation, so an error in a VM's own key keeps its
own path and line; defaults were validated on their own first, and only their valid parts
are merged, so one bad default is reported once, not once per VM.
"""

from __future__ import annotations

from typing import Any

from stoker.manifest.model import DefaultsEntry

#: defaults merged key by key into a table of the same name
TABLE_KEYS = ("quota", "snapshot_policy", "restart", "labels")
#: defaults a VM's own value replaces whole
REPLACED_KEYS = ("probes", "warm_start")


def merge_defaults(vm: dict[str, Any], defaults: DefaultsEntry) -> dict[str, Any]:
    """A copy of the raw ``vm`` table with the defaults filled in."""
    merged = dict(vm)
    given = defaults.model_dump(mode="json", exclude_unset=True, exclude_none=True)
    for key in TABLE_KEYS:
        if key not in given:
            continue
        own = vm.get(key)
        if own is None:
            merged[key] = dict(given[key])
        elif isinstance(own, dict):
            merged[key] = {**given[key], **own}
        # anything else is the VM's own type error, reported at its own key
    for key in REPLACED_KEYS:
        if key in given and key not in vm:
            merged[key] = given[key]
    return merged
