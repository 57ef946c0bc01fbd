"""Where every service finds a VM, its files and its live VMM handle.

The lifecycle is the only writer of the running table (``own``/``disown``); everyone else
reads. It exists apart from the lifecycle so that the services the lifecycle calls back
(quotas, health, resources, hooks) can be built before it and handed to it, instead of
finding it afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stoker.domain.refs import Candidate
from stoker.domain.states import VMState
from stoker.domain.vm import VM
from stoker.drivers.base import VMM, DriverError, ExitSignal, Unsupported, VMPaths
from stoker.host.proc import is_same_live_process
from stoker.services.errors import NotFound
from stoker.services.refs import by_prefix
from stoker.store.vms import VMStore


@dataclass(frozen=True)
class VMMLiveness:
    """Is the process there, and does its control socket answer (the ``vmm`` probe)?"""

    process_alive: bool
    control_socket: str | None  # "answering", "not answering: ...", None: no VMM
    vmm_status: str | None  # the VMM's own word for its state


@dataclass(frozen=True)
class ConsoleTail:
    text: str
    truncated: bool


@dataclass
class OwnedVMM:
    """A live VMM and the watch on its exit."""

    vmm: VMM
    watch: ExitSignal


class VMDirectory:
    def __init__(self, store: VMStore, data_dir: Path) -> None:
        self.store = store
        self.data_dir = data_dir
        self._owned: dict[str, OwnedVMM] = {}

    # ------------------------------------------------------------------------ VMs

    def find(self, ref: str, transitions: int = 0) -> VM | None:
        """A VM by id or by name, or None."""
        return self.store.get(ref, with_transitions=transitions)

    def lookup(self, ref: str, transitions: int = 0) -> VM | None:
        """A VM by id, by name, or by a unique prefix of its id; None when none fits
        (AmbiguousRef, a 409 listing them, when a prefix fits several)."""
        vm = self.store.get(ref, with_transitions=transitions)
        if vm is not None:
            return vm
        candidates = (Candidate(v.id, v.name) for v in self.store.all())
        vm_id = by_prefix("VM", ref, candidates)
        return None if vm_id is None else self.store.get(vm_id, with_transitions=transitions)

    def get(self, ref: str, transitions: int = 20) -> VM:
        vm = self.lookup(ref, transitions)
        if vm is None:
            raise NotFound(f"no VM named or with id {ref!r}")
        return vm

    def all(self, state: VMState | None = None) -> list[VM]:
        return self.store.all(state)

    def paths(self, vm_id: str) -> VMPaths:
        return VMPaths(self.data_dir / "vms" / vm_id)

    def console_tail(self, vm_id: str, size: int) -> ConsoleTail:
        """The last ``size`` bytes of the VM's console log (what the guest printed)."""
        try:
            with open(self.paths(vm_id).console, "rb") as console:
                console.seek(0, 2)
                length = console.tell()
                console.seek(max(0, length - size))
                data = console.read()
        except FileNotFoundError:
            data, length = b"", 0
        return ConsoleTail(data.decode(errors="replace"), truncated=length > size)

    # --------------------------------------------------------------- running VMMs

    def vmm(self, vm_id: str) -> VMM | None:
        owned = self._owned.get(vm_id)
        return owned.vmm if owned else None

    def owned(self, vm_id: str) -> OwnedVMM | None:
        return self._owned.get(vm_id)

    def owned_items(self) -> list[tuple[str, OwnedVMM]]:
        return list(self._owned.items())

    def own(self, vm_id: str, vmm: VMM) -> OwnedVMM:
        """The lifecycle took charge of ``vmm``."""
        owned = self._owned[vm_id] = OwnedVMM(vmm, vmm.exit_signal())
        return owned

    def disown(self, vm_id: str) -> OwnedVMM | None:
        """The lifecycle let go of the VM's VMM (ended, exited, or the agent stops)."""
        return self._owned.pop(vm_id, None)

    async def vmm_liveness(self, ref: str, timeout_s: float = 0.25) -> VMMLiveness:
        """The VMM's liveness now: is the process there, does its control socket answer?"""
        owned = self._owned.get(self.get(ref, 0).id)
        if owned is None:
            return VMMLiveness(process_alive=False, control_socket=None, vmm_status=None)
        record = owned.vmm.record
        alive = is_same_live_process(record.pid, record.start_time)
        try:
            status = await owned.vmm.status(timeout_s)
        except (DriverError, Unsupported) as exc:
            return VMMLiveness(alive, f"not answering: {exc}", None)
        return VMMLiveness(alive, "answering", status.status)
