"""The stoker test guest: a Debian cloud kernel plus a busybox initramfs.

Tests and demos need a real guest that boots in about two seconds under TCG,
answers HTTP through a user-mode port forward, reacts to ACPI power-button
events and can be driven (CPU burn, memory growth, disk writes) over HTTP.
:mod:`stoker.guest.build` builds it once into a cache directory.
"""

from stoker.guest.build import (
    READY_MARKER,
    GuestImage,
    build_guest,
    default_cache_dir,
    find_guest,
)

__all__ = [
    "READY_MARKER",
    "GuestImage",
    "build_guest",
    "default_cache_dir",
    "find_guest",
]
