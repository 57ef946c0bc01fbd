"""What decides what a boot produces: the key a boot snapshot is valid for.

A boot snapshot is the memory and device state of a VM taken when it became ready after a
cold boot; starting from it instead of booting is only honest while a cold boot would produce
the same thing. So the key holds every input of a boot: the kernel, initrd and drive
contents (by content id), the command line, vCPUs, memory, devices, the network identity the
guest sees (its NIC's MAC), the hypervisor and its version. Pure: the content ids and the
hypervisor's version are given.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stoker.domain.spec import VMSpec


@dataclass(frozen=True)
class BootInputs:
    """Everything a boot depends on, as plain values."""

    fields: Mapping[str, Any]

    @property
    def key(self) -> str:
        text = json.dumps(dict(self.fields), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:32]


def boot_inputs(
    spec: VMSpec,
    *,
    contents: Mapping[str, str],
    mac: str | None,
    hypervisor_version: str,
) -> BootInputs:
    """``contents`` maps each file path of the spec to a content id (a checksum)."""
    return BootInputs(
        {
            "hypervisor": f"{spec.hypervisor.value} {hypervisor_version}",
            "accel": spec.accel.value,
            "vcpus": spec.vcpus,
            "memory_mib": spec.memory_mib,
            "kernel": contents[spec.kernel],
            "initrd": contents[spec.initrd] if spec.initrd else None,
            "cmdline": spec.cmdline,
            "drives": [[contents[d.path], d.format.value, d.read_only] for d in spec.drives],
            "network": [spec.network.mode.value, spec.network.name, mac],
        }
    )


def changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The names of the inputs that differ, in a stable order, for the event saying why a
    boot snapshot no longer applies."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
