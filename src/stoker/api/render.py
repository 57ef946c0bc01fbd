"""Pre-rendered JSON for VM listings.

Listing 1,000 VMs by building and validating a response model per row cost hundreds of
milliseconds. A VM's JSON only changes when its row does, and the store hands out the same
``VM`` object while the row is unchanged, so each VM's rendering is kept for that object;
the list is then a join of byte strings.
"""

from __future__ import annotations

from collections.abc import Iterable

from stoker.api.shapes import vm_out
from stoker.domain.vm import VM


class RenderedVMs:
    def __init__(self) -> None:
        self._cache: dict[str, tuple[VM, bytes]] = {}

    def one(self, vm: VM) -> bytes:
        hit = self._cache.get(vm.id)
        if hit is not None and (hit[0] is vm or hit[0] == vm):
            return hit[1]
        body = vm_out(vm).model_dump_json().encode()
        self._cache[vm.id] = (vm, body)
        return body

    def render(self, vms: Iterable[VM]) -> bytes:
        vms = list(vms)
        body = b"[" + b",".join(self.one(vm) for vm in vms) + b"]"
        if len(self._cache) > 2 * len(vms) + 100:  # forget deleted VMs now and then
            keep = {vm.id for vm in vms}
            self._cache = {k: v for k, v in self._cache.items() if k in keep}
        return body
