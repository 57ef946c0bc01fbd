"""Free-space checks, so a snapshot or restore is refused up front (409 that says what to
free) instead of failing half-way with a full disk."""

from __future__ import annotations

from pathlib import Path

from stoker.domain.spec import VMSpec
from stoker.domain.units import MiB, format_size
from stoker.host.disk import free_bytes
from stoker.services.snapshots.errors import InsufficientSpace
from stoker.services.snapshots.files import allocated_bytes


def expected_bytes(spec: VMSpec, with_memory: bool) -> int:
    """What a snapshot will take: guest RAM (an upper bound of the state file) + disks."""
    disks = sum(allocated_bytes(Path(d.path)) for d in spec.drives)
    return (spec.memory_mib * MiB if with_memory else 0) + disks


def check_space(where: Path, needed: int, margin_mib: int, what: str) -> None:
    """Raise ``InsufficientSpace`` unless ``needed`` bytes plus the margin are free."""
    margin = margin_mib * MiB
    free = free_bytes(where)
    if free < needed + margin:
        raise InsufficientSpace(
            f"not enough free disk space for {what}: it needs about {format_size(needed)} plus "
            f"a margin of {format_size(margin)}, but only {format_size(free)} is free on {where}; "
            "free space (for example `stoker snapshot prune`) or lower snapshots.margin_mib",
            needed_bytes=needed,
            margin_bytes=margin,
            free_bytes=free,
        )
