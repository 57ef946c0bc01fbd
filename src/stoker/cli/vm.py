"""``stoker vm ...``: create and drive VMs."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import typer
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
from stoker.cli.complete import VM_ARGUMENT
from stoker.cli.progress import run as with_progress
from stoker.cli.specs import add_test_guest, parse_drive, parse_forward, spec_from_file
from stoker.cli.tables import WIDE_OPTION, Column, print_listing
from stoker.client import Client, StokerError
from stoker.domain.units import format_size
from stoker.wire import VMOut

app = typer.Typer(help="Create, list and drive VMs.", no_args_is_help=True)


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
    forward: list[str] = typer.Option(
        [], help="Port forward HOST:GUEST (user-mode or managed network); repeatable."
    ),
    net: str | None = typer.Option(
        None, help="Network mode: managed, user, none or tap (default: the agent's default)."
    ),
    network_name: str | None = typer.Option(
        None, "--network", help="Managed network to join (default: 'default')."
    ),
    tap: str | None = typer.Option(None, help="TAP device for --net tap."),
    hypervisor: str | None = typer.Option(None, help="qemu or firecracker."),
    accel: str | None = typer.Option(None, help="auto, kvm or tcg."),
    label: list[str] = typer.Option([], help="Label key=value; repeatable."),
    ready_marker: str | None = typer.Option(None, help="Console line that means ready."),
    boot_timeout: float | None = typer.Option(None, help="Seconds to become ready."),
    stop_timeout: float | None = typer.Option(None, help="Seconds for a graceful stop."),
    restart_policy: str | None = typer.Option(None, help="never, on-failure or always."),
    warm_start: bool | None = typer.Option(
        None,
        "--warm-start/--no-warm-start",
        help="Resume a boot snapshot on every start after the first (default: the agent's).",
    ),
    start: bool = typer.Option(False, "--start", help="Start it right away and wait until ready."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Register a VM (state pending).

    Example: stoker vm create web --guest --forward 8080:80 --memory 128 --start
    """
    spec: dict[str, Any] = spec_from_file(file) if file else {}
    spec["name"] = name
    if guest:
        add_test_guest(spec)
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
        "warm_start": warm_start,
    }
    spec.update({k: v for k, v in flags.items() if v is not None})
    if drive:
        spec["drives"] = [parse_drive(d) for d in drive]
    if forward or net or tap or network_name:
        network = dict(spec.get("network", {}))
        if forward:
            network["port_forwards"] = [parse_forward(f) for f in forward]
        if net:
            network["mode"] = net
        if tap:
            network["tap"] = tap
        if network_name:
            network["name"] = network_name
            network.setdefault("mode", "managed")
        if network.get("port_forwards") and "mode" not in network:
            network["mode"] = _default_mode(ctx, spec.get("hypervisor", "qemu"))
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
        address = None if as_json else _address(api, vm)
    if as_json:
        print_json(vm)
    else:
        out.print(f"{vm.name} ({vm.id}) {styled_state(vm.state)}: {vm.state_reason}")
        out.print(f"network    {_network_text(vm, address)}", highlight=False)


def _default_mode(ctx: typer.Context, hypervisor: str) -> str:
    """The network mode the agent gives a VM that names none (forwards need one)."""
    with client(ctx) as api:
        status = api.networking()
    mode = status.default_modes.get(hypervisor, "none")
    if mode == "none":
        raise fail(
            f"--forward needs a network, and {hypervisor} VMs get none on this agent "
            f"({status.reason}): use --net tap with --tap"
        )
    return mode


def _address(api: Client, vm: VMOut) -> str | None:
    """The VM's address on its managed network (it holds one from its creation)."""
    network = vm.spec.network
    if network.mode != "managed" or network.name is None:
        return None
    try:
        net = api.get_network(network.name)
    except StokerError:
        return None
    return next((lease.address for lease in net.leases if lease.vm_id == vm.id), None)


def _network_text(vm: VMOut, address: str | None) -> str:
    network = vm.spec.network
    forwards = ", ".join(
        f"{f.host_addr}:{f.host_port}->{f.guest_port}/{f.protocol}" for f in network.port_forwards
    )
    text = str(network.mode)
    if network.mode == "managed":
        text += f" {network.name!r}, address {address or 'not assigned yet'}"
    elif network.mode == "tap":
        text += f" {network.tap}"
    return text + (f"; forwards {forwards}" if forwards else "")


@app.command("list")
@handle_errors
def list_(
    ctx: typer.Context,
    state: str | None = typer.Option(None, help="Only VMs in this state."),
    label: list[str] = typer.Option([], help="Only VMs with label key=value; repeatable."),
    wide: bool = WIDE_OPTION,
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
    rows = [
        [
            vm.name,
            vm.id,
            styled_state(vm.state),
            ago(vm.state_since),
            str(vm.spec.vcpus),
            f"{vm.spec.memory_mib}M",
            str(vm.restart.count),
            str(vm.process.pid) if vm.process else "-",
            vm.spec.hypervisor,
            ",".join(f"{k}={v}" for k, v in vm.spec.labels.items()),
            vm.state_reason,
        ]
        for vm in vms
    ]
    print_listing(LIST_COLUMNS, rows, wide, empty="no VMs")


LIST_COLUMNS = (
    Column("NAME", key=True),
    Column("ID", key=True),
    Column("STATE"),
    Column("SINCE"),
    Column("VCPU", justify="right"),
    Column("MEM", justify="right"),
    Column("RESTARTS", justify="right"),
    Column("PID", justify="right", wide=True),
    Column("HYPERVISOR", wide=True),
    Column("LABELS", wide=True),
    Column("REASON", wide=True),
)


@app.command("show")
@handle_errors
def show(ctx: typer.Context, name: str = VM_ARGUMENT, as_json: bool = JSON_OPTION) -> None:
    """Show a VM: state, reason, since when, recent transitions.

    Example: stoker vm show web
    """
    with client(ctx) as api:
        vm = api.get_vm(name)
        address = None if as_json else _address(api, vm)
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
    out.print(f"network    {_network_text(vm, address)}", highlight=False)
    restart = vm.restart
    out.print(
        f"restarts   {restart.count} (last {_time_or_dash(restart.last_restart_at)}, "
        f"next retry {_time_or_dash(restart.next_retry_at)}; policy {spec.restart.policy})"
    )
    if spec.labels:
        out.print("labels     " + ", ".join(f"{k}={v}" for k, v in spec.labels.items()))
    out.print(f"warm start {_warm_text(vm)}", highlight=False)
    table = Table("AT", "FROM", "TO", "REASON", title="recent transitions")
    for t in vm.transitions:
        table.add_row(iso(t.at), t.from_state or "-", styled_state(t.to_state), t.reason)
    out.print(table)


def _warm_text(vm: VMOut) -> str:
    """Whether the VM starts from a boot snapshot, and whether one is ready."""
    if vm.spec.warm_start is False:
        return "off"
    snap = vm.boot_snapshot
    wanted = "on" if vm.spec.warm_start else "agent default"
    if snap is None:
        return f"{wanted}; no boot snapshot yet (taken at the next ready point after a cold boot)"
    size, taken = format_size(snap.size_bytes), iso(snap.created_at)
    return f"{wanted}; boot snapshot ready ({size}, taken {taken})"


def _time_or_dash(when: datetime | None) -> str:
    return "-" if when is None else iso(when)


@app.command("start")
@handle_errors
def start(
    ctx: typer.Context,
    name: str = VM_ARGUMENT,
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until ready (or error)."),
    timeout: float = typer.Option(300, help="Seconds to wait at most."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Start a pending or stopped VM.

    Example: stoker vm start web
    """
    with client(ctx) as api:
        vm = with_progress(
            f"starting {name}",
            as_json or not wait,
            lambda: api.start_vm(name, wait=wait, timeout_s=timeout),
        )
    _report(vm, as_json, expect="running" if wait else None)


@app.command("stop")
@handle_errors
def stop(
    ctx: typer.Context,
    name: str = VM_ARGUMENT,
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
        vm = with_progress(
            f"stopping {name}",
            as_json,
            lambda: api.stop_vm(name, graceful=not force, timeout_s=timeout),
        )
    _report(vm, as_json)


@app.command("restart")
@handle_errors
def restart(
    ctx: typer.Context,
    name: str = VM_ARGUMENT,
    force: bool = typer.Option(False, "--force", help="Kill instead of a graceful stop."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until ready again."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Restart a VM (a stopped VM is started).

    Example: stoker vm restart web
    """
    with client(ctx) as api:
        vm = with_progress(
            f"restarting {name}",
            as_json or not wait,
            lambda: api.restart_vm(name, graceful=not force, wait=wait),
        )
    _report(vm, as_json, expect="running" if wait else None)


@app.command("delete")
@handle_errors
def delete(
    ctx: typer.Context,
    name: str = VM_ARGUMENT,
    force: bool = typer.Option(False, "--force", help="Kill a running VM first."),
    snapshots: str | None = typer.Option(
        None,
        "--snapshots",
        help="keep or delete: what to do with the VM's snapshots (required when it has "
        "any). Kept ones stay listed and restore into a new VM with "
        "`stoker snapshot restore ID --as NAME`; protected ones are never deleted this way.",
    ),
) -> None:
    """Delete a VM and its files.

    Example: stoker vm delete web --force --snapshots keep
    """
    if snapshots is not None and snapshots not in ("keep", "delete"):
        raise fail(f"--snapshots {snapshots!r}: use keep or delete")
    with client(ctx) as api:
        vm = api.get_vm(name)  # a prefix: delete, and name, the one it stands for
        api.delete_vm(vm.id, force=force, snapshots=snapshots)
    out.print(f"deleted {vm.name} ({vm.id})", highlight=False)


@app.command("console")
@handle_errors
def console(
    ctx: typer.Context,
    name: str = VM_ARGUMENT,
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
def health(ctx: typer.Context, name: str = VM_ARGUMENT, as_json: bool = JSON_OPTION) -> None:
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
