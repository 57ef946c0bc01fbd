"""What a Firecracker exit code means.

Only the parent learns an exit code, and a bare "exited with 152" tells an operator
nothing; these are the codes Firecracker's own ``FcExitCode`` enum documents (vmm/src/lib.rs).
"""

from __future__ import annotations

import signal as _signal

OK = 0
GENERIC_ERROR = 1
UNEXPECTED_ERROR = 2
BAD_SYSCALL = 148
SIGBUS = 149
SIGSEGV = 150
SIGXFSZ = 151
BAD_CONFIGURATION = 152
ARG_PARSING = 153
SIGXCPU = 154
SIGPIPE = 155
SIGHUP = 156
SIGILL = 157

EXIT_REASONS: dict[int, str] = {
    OK: "clean exit (the guest shut down or rebooted)",
    GENERIC_ERROR: "generic error (see the VMM log; a failed snapshot load ends this way)",
    UNEXPECTED_ERROR: "unexpected internal error (a Firecracker bug)",
    BAD_SYSCALL: "seccomp violation: Firecracker made a system call its filter forbids",
    SIGBUS: "SIGBUS (guest memory backing file truncated or unavailable?)",
    SIGSEGV: "SIGSEGV (segmentation fault)",
    SIGXFSZ: "SIGXFSZ (a file grew past the size limit, e.g. the log or metrics file)",
    BAD_CONFIGURATION: "bad configuration of the microVM's resources",
    ARG_PARSING: "bad command-line arguments",
    SIGXCPU: "SIGXCPU (CPU time limit exceeded)",
    SIGPIPE: "SIGPIPE (a log, metrics or console reader went away)",
    SIGHUP: "SIGHUP (its terminal or session went away)",
    SIGILL: "SIGILL (illegal instruction)",
}


def is_clean(code: int | None) -> bool:
    """Exit code 0 is Firecracker's normal end: the guest powered off or rebooted (reboot=k)."""
    return code == OK


def exit_reason(code: int | None, signal: int | None = None) -> str:
    """A sentence for an operator: the code (or signal) and what Firecracker means by it."""
    if signal is not None:
        try:
            name = _signal.Signals(signal).name
        except ValueError:
            name = f"signal {signal}"
        return f"Firecracker killed by {name}"
    if code is None:
        return "Firecracker exited (exit code unknown: it was not started by this agent)"
    meaning = EXIT_REASONS.get(code)
    if meaning is None:
        return f"Firecracker exited with code {code} (not a documented Firecracker exit code)"
    return f"Firecracker exited with code {code}: {meaning}"
