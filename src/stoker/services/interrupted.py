"""What an agent killed in the middle of saving a VM's state leaves: a migration possibly still
running and a guest paused for it. Shared by snapshots and boot snapshots, whose saves both
pause the guest."""

from __future__ import annotations

import contextlib

from stoker.drivers.base import VMM, DriverError, Unsupported


async def resume_interrupted(vmm: VMM) -> str | None:
    """Cancel a save still running, then resume the guest if it is not running; the status it
    was left in (for the event saying so), or None when it was running anyway."""
    with contextlib.suppress(DriverError, Unsupported):
        await vmm.cancel_state_save()
    status = await vmm.status(2.0)
    if status.running:
        return None
    await vmm.resume()
    return status.status
