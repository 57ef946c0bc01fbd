"""Per-VM user and group ids, chosen from a configured range.

Each VMM runs under its own uid (and a gid of the same number) so that a VMM taken over by
its guest cannot open another VM's files: the kernel's ordinary permission checks do the
separating. That only holds if no two live VMs ever share an id and the agent's own id is
never handed out. A freed id is reused last because files a dead VM left behind (a
forgotten log, a copied disk) are still owned by it; handing the id to a new VM at once
would give that VM those files.

Pure: the allocation is a function over the ids that are taken; the record of who holds
which id lives in the store.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

#: the kernel's "no id" value ((uid_t)-1) and the 16-bit overflow ids (nobody, 65535)
RESERVED_IDS = frozenset({65534, 65535, 2**32 - 1})
MAX_ID = 2**32 - 2
_RANGE_RE = re.compile(r"^\s*(\d{1,10})\s*-\s*(\d{1,10})\s*$")


class UidRangeError(ValueError):
    """The configured ``vm_uid_range`` is not usable; the message says how to write it."""


class UidsExhausted(RuntimeError):
    """Every id of the range is held by a live VM."""


@dataclass(frozen=True)
class UidRange:
    """An inclusive range of ids, ``first``..``last``."""

    first: int
    last: int

    def __post_init__(self) -> None:
        if not 1 <= self.first <= self.last <= MAX_ID:
            raise UidRangeError(
                f"vm_uid_range {self.first}-{self.last} must satisfy 1 <= first <= last <= "
                f'{MAX_ID}, e.g. "200000-265535"'
            )
        inside = sorted(i for i in RESERVED_IDS if self.first <= i <= self.last)
        if inside:
            raise UidRangeError(
                f"vm_uid_range {self.first}-{self.last} contains the reserved id {inside[0]} "
                '(nobody/overflow id): choose a range above 65535, e.g. "200000-265535"'
            )

    @classmethod
    def parse(cls, text: str) -> UidRange:
        """Read ``"FIRST-LAST"`` (both inclusive), as written in ``[security] vm_uid_range``."""
        match = _RANGE_RE.match(text)
        if match is None:
            raise UidRangeError(
                f"vm_uid_range {text!r} must be two numbers joined by '-', e.g. \"200000-265535\""
            )
        return cls(int(match.group(1)), int(match.group(2)))

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and self.first <= uid <= self.last

    def __len__(self) -> int:
        return self.last - self.first + 1


def allocate_uid(
    id_range: UidRange,
    live: Collection[int],
    released: Sequence[int] = (),
    reserved: Collection[int] = (),
) -> int:
    """The id for a new VM: the lowest never-used one, else the longest-freed one.

    ``live`` are the ids held by VMs that exist now; ``released`` the ids of VMs that are
    gone, oldest release first; ``reserved`` ids never to hand out (the agent's uid and gid).
    The same number serves as the VM's gid.
    """
    live_set = set(live)
    unusable = live_set | set(reserved)
    released_set = set(released)
    # the lowest id in the range that is neither unusable nor ever used
    candidate = id_range.first
    blocked = sorted(i for i in unusable | released_set if i in id_range)
    for taken in blocked:
        if taken > candidate:
            break
        if taken == candidate:
            candidate += 1
    if candidate <= id_range.last:
        return candidate
    for uid in released:
        if uid in id_range and uid not in unusable:
            return uid
    raise UidsExhausted(
        f"all {len(id_range)} ids of vm_uid_range {id_range.first}-{id_range.last} are in use "
        "by live VMs: delete VMs or widen [security] vm_uid_range"
    )
