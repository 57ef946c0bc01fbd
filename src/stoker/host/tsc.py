"""The host's TSC frequency, which a microvm guest under TCG needs on its command line.

Under TCG the guest reads the host's TSC and microvm has no other clock to calibrate
against, so without ``tsc_early_khz=`` about 3% of boots hang (see docs/host-facts.md).
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path


def parse_cpuinfo_tsc_khz(text: str) -> int | None:
    """TSC kHz from ``/proc/cpuinfo``: the first ``cpu MHz`` line x 1000."""
    match = re.search(r"^cpu MHz\s*:\s*([0-9]+(?:\.[0-9]+)?)\s*$", text, re.MULTILINE)
    if match is None:
        return None
    khz = round(float(match.group(1)) * 1000)
    return khz if khz > 0 else None


def parse_kernel_log_tsc_khz(text: str) -> int | None:
    """TSC kHz from the kernel log; a refined calibration beats the first guess."""
    for pattern in (
        r"tsc: Refined TSC clocksource calibration: ([0-9]+(?:\.[0-9]+)?) MHz",
        r"tsc: Detected ([0-9]+(?:\.[0-9]+)?) MHz",
    ):
        matches = re.findall(pattern, text)
        if matches:
            khz = round(float(matches[-1]) * 1000)
            if khz > 0:
                return khz
    return None


@functools.cache
def host_tsc_khz() -> int | None:
    """The host TSC frequency in kHz, for the guest's ``tsc_early_khz=``.

    Under TCG the guest reads the host's TSC, and microvm has no other clock
    to calibrate against, so without this about 3% of boots hang. The kernel
    log is preferred when readable (on bare metal ``cpu MHz`` can be the
    current, scaled frequency); ``/proc/cpuinfo`` is the usual source.
    """
    if shutil.which("dmesg"):
        try:
            out = subprocess.run(
                ["dmesg"], capture_output=True, text=True, timeout=5, check=False
            ).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        khz = parse_kernel_log_tsc_khz(out)
        if khz is not None:
            return khz
    try:
        return parse_cpuinfo_tsc_khz(Path("/proc/cpuinfo").read_text())
    except OSError:
        return None
