"""How much disk a VM's drives take, for the ``disk_gib`` quota.

The limit is on the size the guest can fill (a qcow2's virtual size, read from its header),
not on what is allocated on the host so far; both are reported as usage.
"""

from __future__ import annotations

import contextlib
import os

from stoker.domain.spec import DriveFormat, VMSpec

QCOW2_MAGIC = b"QFI\xfb"


def _image_size(path: str, fmt: DriveFormat) -> tuple[int, int]:
    """(virtual size, allocated bytes) of one image; qcow2's virtual size is in its header."""
    st = os.stat(path)
    virtual = st.st_size
    if fmt == DriveFormat.QCOW2:
        with open(path, "rb") as image:
            header = image.read(32)
        if len(header) == 32 and header[:4] == QCOW2_MAGIC:
            virtual = int.from_bytes(header[24:32], "big")
    return virtual, st.st_blocks * 512


def drive_sizes(spec: VMSpec) -> tuple[int, int]:
    """Summed (virtual size, allocated bytes) of the VM's drives; missing files count 0."""
    virtual = allocated = 0
    for drive in spec.drives:
        with contextlib.suppress(OSError):
            v, a = _image_size(drive.path, drive.format)
            virtual += v
            allocated += a
    return virtual, allocated
