"""``stoker network ...``: managed networks (bridge, NAT, DHCP, isolation) and their VMs'
addresses."""

from __future__ import annotations

import typer
from rich import box
from rich.table import Table

from stoker.cli.common import JSON_OPTION, ago, client, handle_errors, iso, out, print_json
from stoker.cli.tables import WIDE_OPTION, Column, print_listing
from stoker.wire import NetworkingOut, NetworkOut

app = typer.Typer(
    help="Managed networks: a bridge with NAT, DHCP and isolation; VMs keep their address.",
    no_args_is_help=True,
)


def register(root: typer.Typer) -> None:
    """Add this module's commands to the root ``stoker`` command."""
    root.add_typer(app, name="network")


def describe_default(status: NetworkingOut) -> str:
    """One line: what a VM created without a network gets here, and why."""
    if status.available:
        return (
            f"new VMs join the managed network {status.default_network!r} "
            f"({status.default_subnet}, made on first use)"
        )
    return f"new VMs get user-mode networking: {status.reason}"


#: the definition's options, shared with ``stoker cluster network create``
NAME_ARGUMENT = typer.Argument(..., help="Network name: a-z, 0-9 and '-'.")
SUBNET_OPTION = typer.Option(..., help="Private IPv4 subnet, CIDR: 10.90.0.0/24.")
ISOLATION_OPTION = typer.Option(
    "isolated", help="isolated: guests never reach each other; open: they do."
)
IPV6_OPTION = typer.Option(False, "--ipv6", help="Also a unique-local IPv6 /64 (SLAAC).")
UPLINK_OPTION = typer.Option(None, help="Masquerade only out of this interface.")


@app.command("create")
@handle_errors
def create(
    ctx: typer.Context,
    name: str = NAME_ARGUMENT,
    subnet: str = SUBNET_OPTION,
    isolation: str = ISOLATION_OPTION,
    ipv6: bool = IPV6_OPTION,
    bridge: str | None = typer.Option(None, help="Bridge name (default: derived, stkb...)."),
    uplink: str | None = UPLINK_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Create a network: a bridge with the gateway, outbound NAT, DHCP, isolation.

    Example: stoker network create backend --subnet 10.90.0.0/24 --isolation open
    """
    with client(ctx) as api:
        net = api.create_network(
            name, subnet, isolation=isolation, ipv6=ipv6, bridge=bridge, uplink=uplink
        )
    if as_json:
        print_json(net)
    else:
        out.print(
            f"{net.name}: {net.subnet} gateway {net.gateway} on bridge {net.bridge} "
            f"({net.isolation}, {net.pool_size} addresses)",
            highlight=False,
        )


@app.command("list")
@handle_errors
def list_(ctx: typer.Context, wide: bool = WIDE_OPTION, as_json: bool = JSON_OPTION) -> None:
    """List networks and how many addresses each has in use.

    Example: stoker network list
    """
    with client(ctx) as api:
        networks = api.list_networks()
        status = api.networking()
    if as_json:
        print_json(networks)
        return
    rows = [
        (
            net.name,
            net.subnet,
            net.gateway,
            net.isolation,
            net.bridge,
            f"{net.addresses_used}/{net.pool_size}",
            f"pid {net.dnsmasq_pid}" if net.dnsmasq_pid else "-",
        )
        for net in networks
    ]
    print_listing(LIST_COLUMNS, rows, wide)
    out.print(describe_default(status), highlight=False)


#: names and the bridge (an interface name people type) are never cut
LIST_COLUMNS = (
    Column("NAME", key=True),
    Column("SUBNET"),
    Column("GATEWAY", wide=True),
    Column("ISOLATION"),
    Column("BRIDGE", key=True),
    Column("ADDRESSES", justify="right"),
    Column("DHCP", wide=True),
)


@app.command("show")
@handle_errors
def show(ctx: typer.Context, name: str, as_json: bool = JSON_OPTION) -> None:
    """Show a network and the address each of its VMs holds.

    Example: stoker network show default
    """
    with client(ctx) as api:
        net = api.get_network(name)
    if as_json:
        print_json(net)
        return
    _print_network(net)


def _print_network(net: NetworkOut) -> None:
    out.print(f"[bold]{net.name}[/bold]  id {net.id}")
    out.print(f"subnet     {net.subnet} (gateway {net.gateway})", highlight=False)
    if net.ipv6_subnet:
        out.print(f"ipv6       {net.ipv6_subnet}", highlight=False)
    out.print(f"isolation  {net.isolation}")
    uplink = f", NAT out of {net.uplink}" if net.uplink else ""
    out.print(f"bridge     {net.bridge}{uplink}", highlight=False)
    dhcp = f"dnsmasq pid {net.dnsmasq_pid}" if net.dnsmasq_pid else "not running (no VM yet)"
    if net.dnsmasq_restarts:
        dhcp += f", restarted {net.dnsmasq_restarts} times"
    out.print(f"dhcp       {dhcp}", highlight=False)
    out.print(f"addresses  {net.addresses_used} of {net.pool_size} in use")
    out.print(f"created    {iso(net.created_at)} ({ago(net.created_at)}) by {net.managed_by}")
    for warning in net.warnings:
        out.print(f"[yellow]warning[/]    {warning}", highlight=False)
    if net.leases:
        table = Table("VM", "STATE", "ADDRESS", "MAC", "SINCE", box=box.SIMPLE_HEAD)
        for lease in net.leases:
            table.add_row(
                lease.vm_name or lease.vm_id,
                lease.vm_state or "-",
                lease.address,
                lease.mac,
                ago(lease.since),
            )
        out.print(table)


@app.command("delete")
@handle_errors
def delete(ctx: typer.Context, name: str) -> None:
    """Delete a network no VM is on: its bridge, rules and DHCP server go.

    Example: stoker network delete backend
    """
    with client(ctx) as api:
        api.delete_network(name)
    out.print(f"deleted network {name}")
