"""The lifecycle's ResourceGate: a VM's vCPUs and memory are reserved before its VMM spawns.

The check and the write are one critical section and one database transaction, and the rows
outlive the agent, so a re-adopted VM stays counted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime

from stoker.domain.capacity import NodeCapacity, Request, check_fit
from stoker.domain.units import MiB
from stoker.domain.vm import VM
from stoker.services.errors import Conflict
from stoker.store.resources import ResourceStore


def request_of(vm: VM) -> Request:
    return Request(vcpus=vm.spec.vcpus, memory_bytes=vm.spec.memory_mib * MiB)


class CapacityGate:
    """Check and reserve atomically, release idempotently."""

    def __init__(
        self, store: ResourceStore, capacity: NodeCapacity, clock: Callable[[], datetime]
    ) -> None:
        self.store = store
        self.capacity = capacity
        self.clock = clock
        # the DB transaction already serialises writers; the lock keeps the check and the
        # write one step for threads sharing this process's connection too
        self._lock = threading.Lock()

    def reserve(self, vm: VM) -> None:
        request = request_of(vm)
        with self._lock:
            shortfall = self.store.reserve(
                vm.id,
                request,
                self.clock(),
                lambda allocated: check_fit(self.capacity, allocated, request),
            )
        if shortfall is not None:
            raise Conflict(
                f"cannot start {vm.name}: {shortfall.message()}",
                resource=shortfall.resource,
                requested=shortfall.requested,
                available=shortfall.available,
                limit=shortfall.limit,
            )

    def release(self, vm_id: str) -> None:
        with self._lock:
            self.store.release(vm_id)
