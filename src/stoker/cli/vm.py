"""``stoker vm ...``: create and drive VMs."""

from __future__ import annotations

import json
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.table import Table

from stoker.cli.common import (
    JSON_OPTION,
    ago,
    client,
    fail,
    handle_errors,
    iso,
    out,
    print_json,
    styled_state,
)
from stoker.wire import VMOut

app = typer.Typer(help="Create, list and drive VMs.", no_args_is_help=True)


def _spec_from_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc}") from None
    try:
        if path.suffix == ".json":
            return dict(json.loads(text))
        return tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise fail(
            f"{path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}"
        ) from None


def _parse_forward(text: str) -> dict[str, Any]:
    host, sep, guest = text.partition(":")
    if not sep or not host.isdigit() or not guest.isdigit():
        raise fail(f"--forward {text!r}: expected HOST_PORT:GUEST_PORT, for example 8080:80")
    return {"host_port": int(host), "guest_port": int(guest)}


def _parse_drive(text: str) -> dict[str, Any]:
    path, *opts = text.split(",")
    drive: dict[str, Any] = {"path": str(Path(path).absolute())}
    for opt in opts:
        if opt in ("raw", "qcow2"):
            drive["format"] = opt
        elif opt in ("ro", "readonly"):
            drive["read_only"] = True
        else:
            raise fail(f"--drive {text!r}: unknown option {opt!r} (use raw, qcow2 or ro)")
    return drive


@app.command("create")
@handle_errors
def create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="VM name: a-z, 0-9 and '-', at most 63 characters."),
    file: Path | None = typer.Option(None, "-f", "--file", help="Spec file (TOML or JSON)."),
    guest: bool = typer.Option(
        False, "--guest", help="Use the test guest built by `stoker guest build`."
    ),
    kernel: Path | None = typer.Option(None, help="Guest kernel."),
    initrd: Path | None = typer.Option(None, help="Guest initramfs."),
    cmdline: str | None = typer.Option(None, help="Kernel command line."),
    vcpus: int | None = typer.Option(None, help="Number of vCPUs."),
    memory: int | None = typer.Option(None, "--memory", help="Guest memory in MiB."),
    drive: list[str] = typer.Option([], help="Disk image: PATH[,raw|qcow2][,ro]; repeatable."),
    forward: list[str] = typer.Option([], help="User-mode port forward HOST:GUEST; repeatable."),
    net: str | None = typer.Option(None, help="Network mode: none, user or tap."),
    tap: str | None = typer.Option(None, help="TAP device for --net tap."),
    hypervisor: str | None = typer.Option(None, help="qemu or firecracker."),
    accel: str | None = typer.Option(None, help="auto, kvm or tcg."),
    label: list[str] = typer.Option([], help="Label key=value; repeatable."),
    ready_marker: str | None = typer.Option(None, help="Console line that means ready."),
    boot_timeout: float | None = typer.Option(None, help="Seconds to become ready."),
    stop_timeout: float | None = typer.Option(None, help="Seconds for a graceful stop."),
    restart_policy: str | None = typer.Option(None, help="never, on-failure or always."),
    start: bool = typer.Option(False, "--start", help="Start it right away and wait until ready."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Register a VM (state pending).

    Example: stoker vm create web --guest --forward 8080:80 --memory 128 --start
    """
    spec: dict[str, Any] = _spec_from_file(file) if file else {}
    spec["name"] = name
    if guest:
        from stoker.guest.build import find_guest

        image = find_guest()
        if image is None:
            raise fail("the test guest is not built: run `stoker guest build` first")
        spec.setdefault("kernel", str(image.kernel))
        spec.setdefault("initrd", str(image.initrd))
        spec.setdefault("cmdline", image.cmdline)
        spec.setdefault("ready_marker", image.ready_marker)
    flags = {
        "kernel": str(kernel.absolute()) if kernel else None,
        "initrd": str(initrd.absolute()) if initrd else None,
        "cmdline": cmdline,
        "vcpus": vcpus,
        "memory_mib": memory,
        "hypervisor": hypervisor,
        "accel": accel,
        "ready_marker": ready_marker,
        "boot_timeout_s": boot_timeout,
        "stop_timeout_s": stop_timeout,
    }
    spec.update({k: v for k, v in flags.items() if v is not None})
    if drive:
        spec["drives"] = [_parse_drive(d) for d in drive]
    if forward or net or tap:
        network = dict(spec.get("network", {}))
        if forward:
            network["port_forwards"] = [_parse_forward(f) for f in forward]
            network.setdefault("mode", "user")
        if net:
            network["mode"] = net
        if tap:
            network["tap"] = tap
        spec["network"] = network
    if label:
        labels = dict(spec.get("labels", {}))
        for item in label:
            key, sep, value = item.partition("=")
            if not sep:
                raise fail(f"--label {item!r}: expected key=value")
            labels[key] = value
        spec["labels"] = labels
    if restart_policy:
        spec["restart"] = {**spec.get("restart", {}), "policy": restart_policy}
    with client(ctx) as api:
        vm = api.create_vm(spec)
        if start:
            vm = api.start_vm(vm.id, wait=True, timeout_s=spec.get("boot_timeout_s", 300) + 5)
    if as_json:
        print_json(vm)
    else:
        out.print(f"{vm.name} ({vm.id}) {styled_state(vm.state)}: {vm.state_reason}")


@app.command("list")
@handle_errors
def list_(
    ctx: typer.Context,
    state: str | None = typer.Option(None, help="Only VMs in this state."),
    label: list[str] = typer.Option([], help="Only VMs with label key=value; repeatable."),
    as_json: bool = JSON_OPTION,
) -> None:
    """List VMs.

    Example: stoker vm list --state running --label tier=web
    """
    with client(ctx) as api:
        vms = api.list_vms(state=state, labels=label)
    if as_json:
        print_json(vms)
        return
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("NAME", "STATE", "SINCE"):
        table.add_column(column, no_wrap=True)
    table.add_column("REASON", overflow="fold", ratio=1)
    for column in ("CPU", "MEM", "PID", "RESTARTS", "ID"):
        table.add_column(column, no_wrap=True, justify="right" if column != "ID" else "left")
    for vm in vms:
        table.add_row(
            vm.name,
            styled_state(vm.state),
            ago(vm.state_since),
            vm.state_reason,
            str(vm.spec.vcpus),
            f"{vm.spec.memory_mib}M",
            str(vm.process.pid) if vm.process else "-",
            str(vm.restart.count),
            vm.id[:8],
        )
    out.print(table)


@app.command("show")
@handle_errors
def show(ctx: typer.Context, name: str, as_json: bool = JSON_OPTION) -> None:
    """Show a VM: state, reason, since when, recent transitions.

    Example: stoker vm show web
    """
    with client(ctx) as api:
        vm = api.get_vm(name)
    if as_json:
        print_json(vm)
        return
    spec = vm.spec
    out.print(f"[bold]{vm.name}[/bold]  id {vm.id}")
    out.print(
        f"state      {styled_state(vm.state)} since {iso(vm.state_since)} ({ago(vm.state_since)})"
    )
    out.print(f"reason     {vm.state_reason}", highlight=False)
    out.print(f"allowed    {', '.join(vm.allowed_actions) or '-'}")
    if vm.process:
        out.print(f"process    pid {vm.process.pid} accel {vm.process.accel}")
    out.print(f"resources  {spec.vcpus} vCPU, {spec.memory_mib} MiB, hypervisor {spec.hypervisor}")
    restart = vm.restart
    out.print(
        f"restarts   {restart.count} (last {_time_or_dash(restart.last_restart_at)}, "
        f"next retry {_time_or_dash(restart.next_retry_at)}; policy {spec.restart.policy})"
    )
    if spec.labels:
        out.print("labels     " + ", ".join(f"{k}={v}" for k, v in spec.labels.items()))
    table = Table("AT", "FROM", "TO", "REASON", title="recent transitions")
    for t in vm.transitions:
        table.add_row(iso(t.at), t.from_state or "-", styled_state(t.to_state), t.reason)
    out.print(table)


def _time_or_dash(when: datetime | None) -> str:
    return "-" if when is None else iso(when)


@app.command("start")
@handle_errors
def start(
    ctx: typer.Context,
    name: str,
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until ready (or error)."),
    timeout: float = typer.Option(300, help="Seconds to wait at most."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Start a pending or stopped VM.

    Example: stoker vm start web
    """
    with client(ctx) as api:
        vm = api.start_vm(name, wait=wait, timeout_s=timeout)
    _report(vm, as_json, expect="running" if wait else None)


@app.command("stop")
@handle_errors
def stop(
    ctx: typer.Context,
    name: str,
    force: bool = typer.Option(False, "--force", help="Kill at once instead of ACPI power-down."),
    timeout: float | None = typer.Option(
        None, help="Seconds to wait for a graceful stop before forcing."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Stop a VM: ACPI power-down, then force after the timeout.

    Example: stoker vm stop web --timeout 10
    """
    with client(ctx) as api:
        vm = api.stop_vm(name, graceful=not force, timeout_s=timeout)
    _report(vm, as_json)


@app.command("restart")
@handle_errors
def restart(
    ctx: typer.Context,
    name: str,
    force: bool = typer.Option(False, "--force", help="Kill instead of a graceful stop."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until ready again."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Restart a VM (a stopped VM is started).

    Example: stoker vm restart web
    """
    with client(ctx) as api:
        vm = api.restart_vm(name, graceful=not force, wait=wait)
    _report(vm, as_json, expect="running" if wait else None)


@app.command("delete")
@handle_errors
def delete(
    ctx: typer.Context,
    name: str,
    force: bool = typer.Option(False, "--force", help="Kill a running VM first."),
) -> None:
    """Delete a VM and its files.

    Example: stoker vm delete web --force
    """
    with client(ctx) as api:
        api.delete_vm(name, force=force)
    out.print(f"deleted {name}")


@app.command("console")
@handle_errors
def console(
    ctx: typer.Context,
    name: str,
    size: int = typer.Option(16384, "--bytes", help="How much of the end of the console log."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Print the tail of the guest console.

    Example: stoker vm console web --bytes 4096
    """
    with client(ctx) as api:
        answer = api.console(name, size)
    if as_json:
        print_json(answer)
    else:
        typer.echo(answer.text, nl=False)


@app.command("health")
@handle_errors
def health(ctx: typer.Context, name: str, as_json: bool = JSON_OPTION) -> None:
    """Show a VM's health: VMM liveness and probe results.

    Example: stoker vm health web
    """
    with client(ctx) as api:
        answer = api.vm_health(name)
    if as_json:
        print_json(answer)
        return
    colour = {"healthy": "green", "unhealthy": "red"}.get(answer.health, "yellow")
    since = f", since {iso(answer.since)}" if answer.since else ""
    out.print(f"{answer.vm}: [{colour}]{answer.health}[/] (state {answer.state}{since})")
    if answer.reason:
        out.print(f"  why: {answer.reason}", highlight=False)
    vmm = answer.vmm
    out.print(
        f"  vmm: process {'alive' if vmm.process_alive else 'not running'}, "
        f"control socket {vmm.control_socket or '-'}",
        highlight=False,
    )
    if answer.consecutive_failures:
        out.print(f"  consecutive failures: {answer.consecutive_failures}")
    if answer.last_error:
        out.print(f"  last error: {answer.last_error}", highlight=False)
    if answer.probes:
        table = Table("PROBE", "KIND", "STATUS", "FAILURES", "LAST RESULT")
        for probe in answer.probes:
            table.add_row(
                probe.name,
                probe.kind,
                probe.status,
                str(probe.consecutive_failures),
                probe.last_message or "-",
            )
        out.print(table)


def _report(vm: VMOut, as_json: bool, expect: str | None = None) -> None:
    if as_json:
        print_json(vm)
    else:
        out.print(f"{vm.name} {styled_state(vm.state)}: {vm.state_reason}", highlight=False)
    if expect and vm.state == "error":
        raise typer.Exit(1)
