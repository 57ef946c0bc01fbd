"""The Firecracker driver: one Firecracker process per microVM, driven over its API socket.

Firecracker cannot run on the machines this project is built on, so this package is proved
against Firecracker's published API specification (see tests/contract) rather than a binary.
"""

from stoker.drivers.firecracker.api import FirecrackerAPI, FirecrackerAPIError
from stoker.drivers.firecracker.driver import (
    FirecrackerDriver,
    FirecrackerOptions,
    FirecrackerVMM,
    JailerConfig,
)
from stoker.drivers.firecracker.exitcodes import exit_reason

__all__ = [
    "FirecrackerAPI",
    "FirecrackerAPIError",
    "FirecrackerDriver",
    "FirecrackerOptions",
    "FirecrackerVMM",
    "JailerConfig",
    "exit_reason",
]
