"""Each VM's own uid and gid, for confinement: given at its first start, kept for its life,
released when it is deleted (and then handed out again last)."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime

from stoker.domain.events import Event, EventType
from stoker.domain.uids import UidRange, UidsExhausted
from stoker.domain.vm import VM
from stoker.drivers.base import VMIdentity
from stoker.services.errors import Conflict
from stoker.store.uids import UidStore


class VMIdentities:
    """What the lifecycle asks for each launch when confinement is on."""

    def __init__(
        self,
        store: UidStore,
        id_range: UidRange,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.store = store
        self.range = id_range
        self.clock = clock or (lambda: datetime.now(UTC))
        #: never hand out the agent's own ids
        self.reserved = {os.getuid(), os.getgid()}

    def identity(self, vm: VM) -> VMIdentity:
        try:
            uid = self.store.assign(vm.id, self.range, self.reserved, self.clock())
        except UidsExhausted as exc:
            raise Conflict(f"cannot start {vm.name}: {exc}") from None
        return VMIdentity(uid=uid, gid=uid)

    def on_event(self, event: Event) -> None:
        if event.type == EventType.VM_DELETED and event.vm_id:
            self.store.release(event.vm_id, self.clock())
