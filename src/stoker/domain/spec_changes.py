"""Which changes of a VM's spec reach a running VM live and which need a restart.

The VMM is started with everything that makes the machine (CPUs, RAM, boot files, devices,
NICs), and stoker does no hotplug, so those need a restart. What stoker itself reads later
(labels, timeouts, policies, probes) applies to a running VM at once. A field missing from
this table (one added to VMSpec later) counts as needing a restart: the safe guess until
someone decides. The lifecycle refuses to store a restart field's change on a VM whose VMM
runs (its re-adoption and capacity reservation read the stored spec); a manifest plan uses
the same table to say "update in place" or "update with restart".
"""

from __future__ import annotations

from typing import Final

from stoker.domain.spec import VMSpec

RESTART: Final = "restart"
LIVE: Final = "live"

#: VM field -> (how a change reaches a running VM, why)
VM_FIELDS: Final[dict[str, tuple[str, str]]] = {
    "vcpus": (RESTART, "vCPUs are fixed when the VMM starts (no CPU hotplug)"),
    "memory_mib": (RESTART, "guest RAM is fixed when the VMM starts (no balloon, no hotplug)"),
    "kernel": (RESTART, "loaded at boot"),
    "initrd": (RESTART, "loaded at boot"),
    "cmdline": (RESTART, "read by the guest kernel at boot"),
    "drives": (RESTART, "disks are on the VMM's command line (no disk hotplug)"),
    "network": (RESTART, "the NIC, its mode and port forwards are set when the VMM starts"),
    "network_name": (RESTART, "the VM's TAP joins its network's bridge when the VM starts"),
    "hypervisor": (RESTART, "another VMM process altogether"),
    "accel": (RESTART, "chosen when the VMM starts"),
    "labels": (LIVE, "stoker's own metadata; selectors see new labels at once"),
    "ready_marker": (LIVE, "read at the next boot"),
    "boot_timeout_s": (LIVE, "used at the next start"),
    "stop_timeout_s": (LIVE, "used at the next stop"),
    "restart": (LIVE, "the supervisor reads the policy at the VMM's next exit"),
    "probes": (LIVE, "the health service restarts the VM's probes with the new ones at once"),
    "warm_start": (LIVE, "decides how the next start boots"),
}


def head(field: str) -> str:
    """``drives[0].path`` -> ``drives``; ``restart.policy`` -> ``restart``."""
    return field.split(".", 1)[0].split("[", 1)[0]


def needs_restart(field: str) -> bool:
    """True when a change of this VM field reaches a running VM only through a restart."""
    return VM_FIELDS.get(head(field), (RESTART, ""))[0] == RESTART


def changed_fields(old: VMSpec, new: VMSpec) -> list[str]:
    """The top-level spec fields whose values differ, in the spec's order."""
    return [name for name in VMSpec.model_fields if getattr(old, name) != getattr(new, name)]


def restart_fields(old: VMSpec, new: VMSpec) -> list[str]:
    """The changed fields a running VM can only take through a restart."""
    return [name for name in changed_fields(old, new) if needs_restart(name)]
