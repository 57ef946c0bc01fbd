"""A plan as a person reads it at a glance: one line per object with a symbol saying what
happens, each changed field as ``old -> new`` under it, nothing wider than the terminal.

    Plan: 1 to create, 1 to update in place, 1 to update with restart.
        + vm web-server  (2 vCPU, 4096 MiB, qemu)
        ~ quota db
            cpu_percent: 100 -> 200
      -/+ vm api  (restart for memory_mib)
            memory_mib: 256 -> 512  [restart]
"""

from __future__ import annotations

import json
import textwrap
from typing import TYPE_CHECKING, Any

from stoker.manifest.steps import ABSENT, Change, Drift, Kind, Op, Step

if TYPE_CHECKING:
    from stoker.manifest.plan import Plan

SYMBOLS = {
    Op.CREATE: "+",
    Op.UPDATE: "~",
    Op.RESTART: "-/+",
    Op.PENDING: "!",
    Op.REPLACE: "-/+",
    Op.DELETE: "-",
    Op.START: ">",
    Op.STOP: "<",
}
PHRASES = {
    Op.CREATE: "to create",
    Op.UPDATE: "to update in place",
    Op.RESTART: "to update with restart",
    Op.PENDING: "pending restart",
    Op.REPLACE: "to replace",
    Op.DELETE: "to delete",
    Op.START: "to start",
    Op.STOP: "to stop",
}
LEGEND = {
    Op.CREATE: "create",
    Op.UPDATE: "update in place",
    Op.RESTART: "update with restart",
    Op.PENDING: "restart pending (--restart)",
    Op.REPLACE: "replace",
    Op.DELETE: "delete",
    Op.START: "start",
    Op.STOP: "stop",
}
INDENT = " " * 8


def render_plan(plan: Plan, width: int = 80) -> str:
    lines: list[str] = []
    if not plan.steps:
        lines.append("No changes: the host matches the manifest.")
    else:
        counts = plan.summary()
        parts = [f"{counts[str(op)]} {PHRASES[op]}" for op in Op if counts[str(op)]]
        lines += textwrap.wrap("Plan: " + ", ".join(parts) + ".", width)
        used = [op for op in Op if counts[str(op)]]
        legend = "   ".join(f"{SYMBOLS[op]} {LEGEND[op]}" for op in used)
        lines += textwrap.wrap(legend, width, subsequent_indent="  ")
        lines.append("")
        for step in plan.steps:
            lines += _step(step, width)
    if plan.drift:
        lines += ["", "Changed by hand since the last apply (as applied -> now):"]
        lines += [_fit(f"    {_drift(d)}", width) for d in plan.drift]
    if plan.kept:
        names = ", ".join(f"{_kind(k)} {n}" for k, n in plan.kept)
        lines.append("")
        lines += textwrap.wrap(
            f"No longer in the manifest, kept (apply --prune deletes them): {names}",
            width,
            subsequent_indent="  ",
        )
    return "\n".join(lines) + "\n"


def _step(step: Step, width: int) -> list[str]:
    head = f"{SYMBOLS[step.op]:>5} {_kind(step.kind)} {step.name}"
    lines = []
    if step.note and len(head) + len(step.note) + 4 <= width:
        lines.append(f"{head}  ({step.note})")
    else:
        lines.append(_fit(head, width))
        if step.note:
            lines += textwrap.wrap(
                f"({step.note})", width, initial_indent=INDENT, subsequent_indent=INDENT + " "
            )
    flag = step.op in (Op.RESTART, Op.PENDING)
    created = step.op == Op.CREATE
    lines += [_change(c, width, flag and c.restart, created) for c in step.changes]
    return lines


def _change(change: Change, width: int, mark_restart: bool, created: bool) -> str:
    """``field: old -> new`` (only ``field: new`` for what a create sets)."""
    suffix = "  [restart]" if mark_restart else ""
    prefix = f"{INDENT}{change.field}: "
    room = max(12, width - len(prefix) - len(suffix))
    if created:
        return prefix + _clip(_show(change.new), room) + suffix
    room = max(5, (room - 4) // 2)
    old, new = _show(change.old), _show(change.new)
    # give the room one side does not need to the other
    spare = max(0, room - len(old)) + max(0, room - len(new))
    old = _clip(old, room + (spare if len(new) <= room else 0))
    new = _clip(new, room + (spare if len(old) <= room else 0))
    return _fit(f"{prefix}{old} -> {new}{suffix}", width)


def _drift(d: Drift) -> str:
    if d.field is None:
        return f"{_kind(d.kind)} {d.name}: deleted"
    return f"{_kind(d.kind)} {d.name}: {d.field}: {_show(d.applied)} -> {_show(d.now)}"


def _kind(kind: Kind) -> str:
    return str(kind).replace("_", " ")


def _show(value: Any) -> str:
    if value is ABSENT or value is None:
        return "(none)"
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def _clip(text: str, room: int) -> str:
    return text if len(text) <= room else text[: max(1, room - 1)] + "…"


def _fit(line: str, width: int) -> str:
    return _clip(line, width)
