"""Pre-rendered JSON for VM listings.

Listing 1,000 VMs by building and validating a response model per row cost hundreds of
milliseconds. A VM's JSON only changes when its row does, so each VM's rendering is kept
and reused while the row is unchanged; the list is then a join of byte strings.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from stoker.api.schemas import VMOut
from stoker.domain.vm import VM
from stoker.store.db import dumps


def _version(vm: VM) -> tuple[Any, ...]:
    """Everything a listed VM's JSON depends on; the spec object is shared while unchanged."""
    return (
        vm.spec,  # the same object while the row is unchanged: compared by identity first
        vm.state,
        vm.state_reason,
        vm.state_since,
        dumps(vm.process) if vm.process else None,
        vm.restart_count,
        vm.last_restart_at,
        vm.next_retry_at,
    )


class RenderedVMs:
    def __init__(self) -> None:
        self._cache: dict[str, tuple[tuple[Any, ...], bytes]] = {}

    def one(self, vm: VM) -> bytes:
        version = _version(vm)
        hit = self._cache.get(vm.id)
        if hit is not None and hit[0] == version:
            return hit[1]
        body = VMOut.of(vm).model_dump_json().encode()
        self._cache[vm.id] = (version, body)
        return body

    def render(self, vms: Iterable[VM]) -> bytes:
        vms = list(vms)
        body = b"[" + b",".join(self.one(vm) for vm in vms) + b"]"
        if len(self._cache) > 2 * len(vms) + 100:  # forget deleted VMs now and then
            keep = {vm.id for vm in vms}
            self._cache = {k: v for k, v in self._cache.items() if k in keep}
        return body
