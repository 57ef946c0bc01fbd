"""What a hypervisor driver can do, declared as data, and the one error for what it cannot.

Services ask a driver's :class:`Capabilities` (never its name) before they rely on a feature,
and the quota plan reads the mechanism strings to say how a limit binds. A call a driver
cannot serve raises :class:`Unsupported`, which the API answers with a 422 naming the
alternative.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Capabilities:
    """One driver's abilities; a ``str | None`` field names the mechanism, None means none."""

    #: the guest can be asked to power off (ACPI power button, Ctrl-Alt-Del)
    graceful_stop: bool = True
    pause: bool = True
    #: device and memory state can be saved from a paused VM and a VMM started from it
    memory_snapshot: bool = True
    #: the VMM throttles disk IOPS and bytes/s itself, live
    disk_throttle: str | None = None
    #: the VMM limits network bandwidth itself (else the host shapes the VM's TAP)
    net_rate_limit: str | None = None
    #: the VMM limits network packets per second itself
    net_packet_limit: str | None = None
    #: a user-mode (NAT inside the VMM) network device exists, with port forwards
    user_networking: bool = False
    #: the VMM reports disk counters (QMP block stats, Firecracker metrics)
    disk_stats: bool = True


class Unsupported(Exception):
    """A driver, or this VM's setup, cannot do what was asked.

    ``alternative`` says what would work instead; the API shows both.
    """

    def __init__(self, reason: str, alternative: str | None = None) -> None:
        super().__init__(reason if alternative is None else f"{reason}; {alternative}")
        self.reason = reason
        self.alternative = alternative
