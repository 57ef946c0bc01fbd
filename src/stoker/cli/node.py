"""``stoker node ...``: the nodes of the cluster; cordon, drain, uncordon."""

from __future__ import annotations

import time

import typer

from stoker.cli.cluster import cluster_errors, nodes_table
from stoker.cli.common import JSON_OPTION, client, fail, out, print_json
from stoker.client import Client, StokerError
from stoker.wire.cluster import NodeOut

app = typer.Typer(help="Cluster nodes: list, cordon, drain, uncordon.", no_args_is_help=True)

NODE_NAME = typer.Argument(..., help="Node name (as `stoker node list` shows it).")
REASON = typer.Option("", "--reason", help="Why (shown in `stoker node show`).")


def register(root: typer.Typer) -> None:
    """Add this module's commands to the root ``stoker`` command."""
    root.add_typer(app, name="node")


@app.command("list")
@cluster_errors
def list_(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """Every node: its state, what is placed on it, its labels. * marks the scheduler.

    Example: stoker node list
    """
    with client(ctx) as api:
        nodes = api.cluster_nodes()
    if as_json:
        print_json(nodes)
    else:
        out.print(nodes_table(nodes))


@app.command("show")
@cluster_errors
def show(ctx: typer.Context, name: str = NODE_NAME, as_json: bool = JSON_OPTION) -> None:
    """One node: capacity, what its VMs reserve, its VMs.

    Example: stoker node show node-2
    """
    with client(ctx) as api:
        node = api.cluster_node(name)
    _show(node, as_json)


def _show(node: NodeOut, as_json: bool) -> None:
    if as_json:
        print_json(node)
        return
    cap, used = node.capacity, node.allocated
    out.print(f"[bold]{node.name}[/bold]  {node.state}", highlight=False)
    if node.cordon_reason:
        out.print(f"reason     {node.cordon_reason}", highlight=False)
    out.print(f"address    {node.address or '-'}", highlight=False)
    out.print(
        f"capacity   {cap.vcpu_limit} vCPUs ({cap.physical_cpus} CPUs x {cap.cpu_overcommit:g}), "
        f"{cap.memory_limit_mib} MiB for guests, {cap.max_vms} VMs",
        highlight=False,
    )
    out.print(
        f"placed     {used.vms} VMs, {used.vcpus} vCPUs, {used.memory_mib} MiB", highlight=False
    )
    out.print(f"vms        {', '.join(node.vms) or '-'}", highlight=False)


@app.command("cordon")
@cluster_errors
def cordon(
    ctx: typer.Context, name: str = NODE_NAME, reason: str = REASON, as_json: bool = JSON_OPTION
) -> None:
    """No new VMs are placed on the node; those on it stay.

    Example: stoker node cordon node-2 --reason "disk replacement"
    """
    with client(ctx) as api:
        node = api.cordon_node(name, reason)
    _show(node, as_json)


@app.command("uncordon")
@cluster_errors
def uncordon(ctx: typer.Context, name: str = NODE_NAME, as_json: bool = JSON_OPTION) -> None:
    """Place VMs on the node again (VMs moved away by a drain do not come back by themselves).

    Example: stoker node uncordon node-2
    """
    with client(ctx) as api:
        node = api.uncordon_node(name)
    _show(node, as_json)


@app.command("drain")
@cluster_errors
def drain(
    ctx: typer.Context,
    name: str = NODE_NAME,
    reason: str = REASON,
    wait: float = typer.Option(
        0, "--wait", min=0, max=3600, help="Seconds to wait until no movable VM is left on it."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Cordon the node and move every VM that may move (stopped here, started elsewhere),
    respecting anti-affinity. VMs that may not move stay and say why.

    Example: stoker node drain node-2 --wait 120
    """
    with client(ctx) as api:
        before = api.cluster_node(name).vms
        node = api.cordon_node(name, reason, drain=True)
        if wait > 0:
            node = _wait_drained(api, name, before, wait)
    _show(node, as_json)


def _wait_drained(api: Client, name: str, vms: list[str], timeout: float) -> NodeOut:
    """Until every VM that may move runs (or rests, if stopped) on another node."""
    deadline = time.monotonic() + timeout
    while True:
        moving, staying = [], []
        for vm_name in vms:
            try:
                vm = api.get_cluster_vm(vm_name)
            except StokerError:
                continue  # deleted meanwhile
            if not vm.movable:
                staying.append(vm_name)
            elif vm.node == name or (vm.desired == "running" and vm.state != "running"):
                moving.append(vm_name)
        if not moving:
            if staying:
                out.print(f"not moved (they may not): {', '.join(staying)}", highlight=False)
            return api.cluster_node(name)
        if time.monotonic() > deadline:
            raise fail(f"{', '.join(moving)} not yet running elsewhere after {timeout:g} s")
        time.sleep(0.5)
