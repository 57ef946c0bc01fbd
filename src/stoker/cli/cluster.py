"""``stoker cluster ...``: cluster VMs and why they are where they are. Any node answers
(``stoker --url`` to any of them, or its Unix socket)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich import box
from rich.table import Table

from stoker.cli import network as network_cli
from stoker.cli.common import (
    JSON_OPTION,
    ago,
    client,
    fail,
    handle_errors,
    out,
    print_json,
    styled_state,
)
from stoker.cli.specs import add_test_guest, parse_forward, spec_from_file
from stoker.client import StokerError
from stoker.wire.cluster import (
    ClusterNetworkOut,
    ClusterOut,
    ClusterScheduleOut,
    ClusterVMOut,
    NodeOut,
)

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    help="Cluster mode: VMs placed on any node of the cluster, failover, explanations.",
    no_args_is_help=True,
)
vm_app = typer.Typer(
    help="Cluster VMs: placed, run and moved by the cluster.", no_args_is_help=True
)
app.add_typer(vm_app, name="vm")

VM_NAME = typer.Argument(..., help="Cluster VM name.")


def register(root: typer.Typer) -> None:
    """Add this module's commands to the root ``stoker`` command."""
    root.add_typer(app, name="cluster")


def cluster_errors(fn: F) -> F:
    """A 404 from a route that does not exist means the agent is not in cluster mode: say so."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except StokerError as exc:
            if exc.status == 404 and exc.detail == "Not Found":
                raise fail(
                    "this agent is not in cluster mode: start it with "
                    "`stoker agent --cluster http://ETCD:2379[,...]` (docs/cluster.md)"
                ) from None
            raise

    return handle_errors(wrapper)  # type: ignore[return-value]


# -- status --------------------------------------------------------------------------------------


@app.command("status")
@cluster_errors
def status(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """This node's standing in the cluster, the scheduler, and every node.

    Example: stoker cluster status
    """
    with client(ctx) as api:
        summary = api.cluster()
        nodes = api.cluster_nodes()
    if as_json:
        print_json(
            {
                "cluster": summary.model_dump(mode="json"),
                "nodes": [n.model_dump(mode="json") for n in nodes],
            }
        )
        return
    print_summary(summary)
    out.print(nodes_table(nodes))


def print_summary(summary: ClusterOut) -> None:
    lease = f"lease {summary.lease}" if summary.lease else "no lease"
    out.print(
        f"node {summary.node}: {summary.standing} ({lease}, fence in "
        f"{summary.fence_remaining_s:.1f} s); scheduler: {summary.leader or 'none'}; "
        f"{summary.nodes} nodes ({summary.nodes_lost} lost), {summary.vms} VMs, "
        f"revision {summary.revision}",
        highlight=False,
    )
    for problem in (summary.conflict, summary.last_error):
        if problem:
            out.print(f"[yellow]{problem}[/yellow]", highlight=False)


NODE_STYLE = {"ready": "green", "cordoned": "yellow", "draining": "yellow", "lost": "red"}


def nodes_table(nodes: list[NodeOut]) -> Table:
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("NODE", "STATE", "VMS", "VCPUS", "MEMORY MiB", "LABELS", "ADDRESS"):
        table.add_column(column, no_wrap=True)
    for node in nodes:
        style = NODE_STYLE.get(node.state, "white")
        name = node.name + (" *" if node.scheduler else "")
        table.add_row(
            name,
            f"[{style}]{node.state}[/]",
            f"{node.allocated.vms}/{node.capacity.max_vms}",
            f"{node.allocated.vcpus}/{node.capacity.vcpu_limit}",
            f"{node.allocated.memory_mib}/{node.capacity.memory_limit_mib}",
            ",".join(f"{k}={v}" for k, v in sorted(node.labels.items())) or "-",
            node.address or "-",
        )
    return table


@app.command("explain")
@cluster_errors
def explain(ctx: typer.Context, name: str = VM_NAME, as_json: bool = JSON_OPTION) -> None:
    """Every node, and why it was or was not chosen for the VM.

    Example: stoker cluster explain web-1
    """
    with client(ctx) as api:
        answer = api.explain_cluster_vm(name)
    if as_json:
        print_json(answer)
    else:
        out.print(answer.text, highlight=False, markup=False)


# -- cluster VMs ---------------------------------------------------------------------------------


def _pairs(items: list[str], option: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise fail(f"{option} {item!r}: expected key=value")
        found[key] = value
    return found


@vm_app.command("create")
@cluster_errors
def create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="VM name: a-z, 0-9 and '-', at most 63 characters."),
    file: Path | None = typer.Option(None, "-f", "--file", help="Spec file (TOML or JSON)."),
    guest: bool = typer.Option(False, "--guest", help="The test guest (`stoker guest build`)."),
    vcpus: int | None = typer.Option(None, help="Number of vCPUs."),
    memory: int | None = typer.Option(None, "--memory", help="Guest memory in MiB."),
    forward: list[str] = typer.Option(
        [], help="Port forward HOST:GUEST with user-mode networking; repeatable."
    ),
    label: list[str] = typer.Option([], help="VM label key=value; repeatable."),
    selector: list[str] = typer.Option(
        [], help="Only nodes with this label key=value; repeatable."
    ),
    anti_affinity: str | None = typer.Option(
        None, help="Group name: at most one VM of the group per node."
    ),
    policy: str | None = typer.Option(None, help="binpack or spread (default: the cluster's)."),
    stateless: bool | None = typer.Option(
        None,
        "--stateless/--stateful",
        help="May it start elsewhere when its node is lost? Default: only without writable drives.",
    ),
    start: bool = typer.Option(True, "--start/--no-start", help="Desired state running."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Create a VM the cluster places on a node, runs there, and moves when the node is lost.

    Example: stoker cluster vm create web-1 --guest --forward 8080:80 --anti-affinity web
    """
    spec: dict[str, Any] = spec_from_file(file) if file else {}
    spec["name"] = name
    if guest:
        add_test_guest(spec)
    if vcpus is not None:
        spec["vcpus"] = vcpus
    if memory is not None:
        spec["memory_mib"] = memory
    if forward:
        spec["network"] = {"mode": "user", "port_forwards": [parse_forward(f) for f in forward]}
    if label:
        spec["labels"] = {**spec.get("labels", {}), **_pairs(label, "--label")}
    placement: dict[str, Any] = {}
    if selector:
        placement["selector"] = _pairs(selector, "--selector")
    if anti_affinity:
        placement["anti_affinity"] = anti_affinity
    if policy:
        placement["policy"] = policy
    with client(ctx) as api:
        vm = api.create_cluster_vm(
            spec, placement=placement or None, stateless=stateless, start=start, wait_s=5
        )
    if as_json:
        print_json(vm)
    else:
        _print_vm(vm)


@vm_app.command("list")
@cluster_errors
def list_(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """Every cluster VM: its node, its state there, and why.

    Example: stoker cluster vm list
    """
    with client(ctx) as api:
        items = list(api.all_cluster_vms())
    if as_json:
        print_json(items)
        return
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("NAME", "DESIRED", "NODE", "STATE", "VCPUS", "MEM MiB", "REASON"):
        table.add_column(column, no_wrap=column != "REASON")
    for item in items:
        reason = item.reason + (f" [yellow]({item.note})[/yellow]" if item.note else "")
        table.add_row(
            item.name,
            item.desired,
            item.node or "-",
            styled_state(item.state),
            str(item.vcpus),
            str(item.memory_mib),
            reason,
        )
    out.print(table)


@vm_app.command("show")
@cluster_errors
def show(ctx: typer.Context, name: str = VM_NAME, as_json: bool = JSON_OPTION) -> None:
    """A cluster VM: where it is, its state there and why, whether it may move, and why not.

    Example: stoker cluster vm show web-1
    """
    with client(ctx) as api:
        vm = api.get_cluster_vm(name)
    if as_json:
        print_json(vm)
    else:
        _print_vm(vm)


def show_vm(vm: ClusterVMOut, as_json: bool) -> None:
    if as_json:
        print_json(vm)
    else:
        _print_vm(vm)


def _print_vm(vm: ClusterVMOut) -> None:
    node = f"{vm.node} ({vm.node_state})" if vm.node else "not placed"
    out.print(f"[bold]{vm.name}[/bold]  incarnation {vm.incarnation}, desired {vm.desired}")
    out.print(f"node       {node}", highlight=False)
    since = f" since {ago(vm.since)}" if vm.since else ""
    out.print(f"state      {styled_state(vm.state)}{since}: {vm.reason}", highlight=False)
    if vm.note:
        out.print(f"note       [yellow]{vm.note}[/yellow]", highlight=False)
    out.print(f"moves      {'yes' if vm.movable else 'no'}: {vm.movable_reason}", highlight=False)
    rules = vm.placement
    parts = [f"policy {rules.policy or 'cluster default'}"]
    if rules.selector:
        parts.append("selector " + ",".join(f"{k}={v}" for k, v in rules.selector.items()))
    if rules.anti_affinity:
        parts.append(f"anti-affinity {rules.anti_affinity}")
    out.print(f"placement  {'; '.join(parts)}", highlight=False)
    if vm.placement_summary:
        out.print(f"decision   {vm.placement_summary}", highlight=False)
    out.print(f"owner      {vm.owner or '-'}", highlight=False)


@vm_app.command("start")
@cluster_errors
def start(ctx: typer.Context, name: str = VM_NAME, as_json: bool = JSON_OPTION) -> None:
    """Desired state running: its node starts it.

    Example: stoker cluster vm start web-1
    """
    with client(ctx) as api:
        vm = api.start_cluster_vm(name)
    show_vm(vm, as_json)


@vm_app.command("stop")
@cluster_errors
def stop(ctx: typer.Context, name: str = VM_NAME, as_json: bool = JSON_OPTION) -> None:
    """Desired state stopped: its node stops it, and it stays placed there.

    Example: stoker cluster vm stop web-1
    """
    with client(ctx) as api:
        vm = api.stop_cluster_vm(name)
    show_vm(vm, as_json)


@vm_app.command("delete")
@cluster_errors
def delete(ctx: typer.Context, name: str = VM_NAME) -> None:
    """Delete a cluster VM; its node stops it and removes its local copy.

    Example: stoker cluster vm delete web-1
    """
    with client(ctx) as api:
        api.delete_cluster_vm(name)
    out.print(f"{name}: deleted")


# -- cluster schedules ---------------------------------------------------------------------------

schedule_app = typer.Typer(
    help="Cluster schedules: cron start/stop/restart of cluster VMs, run once in the cluster.",
    no_args_is_help=True,
)
app.add_typer(schedule_app, name="schedule")

SCHEDULE_NAME = typer.Argument(..., help="Cluster schedule name.")


@schedule_app.command("create")
@cluster_errors
def schedule_create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Schedule name: a-z, 0-9 and '-'."),
    cron: str = typer.Option(..., "--cron", help="Cron expression, e.g. '0 8 * * 1-5' or @daily."),
    action: str = typer.Option(..., "--action", help="start, stop or restart."),
    vm: str | None = typer.Option(None, "--vm", help="One cluster VM."),
    selector: list[str] = typer.Option(
        [], "--selector", help="Every cluster VM with label key=value; repeatable."
    ),
    timezone: str | None = typer.Option(
        None, "--timezone", help="IANA zone of the cron times (default: the node's)."
    ),
    grace: float | None = typer.Option(
        None, "--grace", help="Seconds a fire may be late before it counts as missed."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Create a cluster schedule: the active scheduler runs each fire once in the cluster.

    Example: stoker cluster schedule create am --cron '0 8 * * 1-5' --action start --vm web-1
    """
    if (vm is None) == (not selector):
        raise fail("give exactly one target: --vm NAME or --selector key=value")
    with client(ctx) as api:
        made = api.create_cluster_schedule(
            name,
            cron,
            action,
            vm=vm,
            selector=_pairs(selector, "--selector") if selector else None,
            tz=timezone,
            grace_s=grace,
        )
    if as_json:
        print_json(made)
    else:
        _print_schedule(made)


@schedule_app.command("list")
@cluster_errors
def schedule_list(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """Every cluster schedule: its next run and its last result.

    Example: stoker cluster schedule list
    """
    with client(ctx) as api:
        items = api.cluster_schedules()
    if as_json:
        print_json(items)
        return
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("NAME", "ACTION", "TARGET", "CRON", "TZ", "NEXT", "LAST"):
        table.add_column(column, no_wrap=column != "LAST")
    for item in items:
        table.add_row(
            item.name,
            item.action,
            _target(item),
            item.cron,
            item.tz,
            ago(item.next_fire_at),
            _last(item),
        )
    out.print(table)


@schedule_app.command("show")
@cluster_errors
def schedule_show(
    ctx: typer.Context, name: str = SCHEDULE_NAME, as_json: bool = JSON_OPTION
) -> None:
    """A cluster schedule: its target, next run and last result.

    Example: stoker cluster schedule show office-hours
    """
    with client(ctx) as api:
        item = api.cluster_schedule(name)
    if as_json:
        print_json(item)
    else:
        _print_schedule(item)


@schedule_app.command("delete")
@cluster_errors
def schedule_delete(ctx: typer.Context, name: str = SCHEDULE_NAME) -> None:
    """Delete a cluster schedule (the VMs stay as they are).

    Example: stoker cluster schedule delete office-hours
    """
    with client(ctx) as api:
        api.delete_cluster_schedule(name)
    out.print(f"{name}: deleted")


def _target(item: ClusterScheduleOut) -> str:
    if item.vm is not None:
        return f"vm {item.vm}"
    return "selector " + ",".join(f"{k}={v}" for k, v in (item.selector or {}).items())


def _last(item: ClusterScheduleOut) -> str:
    run = item.last_run
    if run is None:
        return "-"
    return f"{run.outcome} {ago(run.at)} on {run.node}: {run.message}"


def _print_schedule(item: ClusterScheduleOut) -> None:
    out.print(f"[bold]{item.name}[/bold]  {item.action} {_target(item)}", highlight=False)
    out.print(f"cron       {item.cron} ({item.tz}), grace {item.grace_s:g} s", highlight=False)
    nxt = (
        f"{item.next_fire_at.isoformat()} ({ago(item.next_fire_at)})" if item.next_fire_at else "-"
    )
    out.print(f"next       {nxt}", highlight=False)
    out.print(f"last       {_last(item)}", highlight=False)
    out.print(f"created    by {item.created_by} {ago(item.created_at)}", highlight=False)


# -- cluster networks ----------------------------------------------------------------------------

network_app = typer.Typer(
    help="Cluster networks: made on every node (each node's own bridge, DHCP and NAT).",
    no_args_is_help=True,
)
app.add_typer(network_app, name="network")

NETWORK_NAME = typer.Argument(..., help="Cluster network name.")
NETWORK_STYLE = {"ready": "green", "pending": "yellow", "conflict": "red", "error": "red"}


@network_app.command("create")
@cluster_errors
def network_create(
    ctx: typer.Context,
    name: str = network_cli.NAME_ARGUMENT,
    subnet: str = network_cli.SUBNET_OPTION,
    isolation: str = network_cli.ISOLATION_OPTION,
    ipv6: bool = network_cli.IPV6_OPTION,
    bridge: str | None = typer.Option(None, help="Bridge name on every node (default: derived)."),
    uplink: str | None = network_cli.UPLINK_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Create a network every node makes locally; VMs on it go only to nodes where it is ready.

    Example: stoker cluster network create backend --subnet 10.90.0.0/24
    """
    with client(ctx) as api:
        net = api.create_cluster_network(
            name, subnet, isolation=isolation, ipv6=ipv6, bridge=bridge, uplink=uplink
        )
    _show_network(net, as_json)


@network_app.command("list")
@cluster_errors
def network_list(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """Every cluster network and on how many nodes it is ready.

    Example: stoker cluster network list
    """
    with client(ctx) as api:
        networks = api.cluster_networks()
    if as_json:
        print_json(networks)
        return
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("NAME", "SUBNET", "ISOLATION", "READY", "VMS", "NOT READY"):
        table.add_column(column, no_wrap=column != "NOT READY")
    for net in networks:
        trouble = [f"{n.node}: {n.state}" for n in net.nodes if n.state != "ready"]
        table.add_row(
            net.name,
            net.subnet,
            net.isolation.value,
            f"{net.ready_nodes}/{len(net.nodes)}",
            str(len(net.vms)),
            ", ".join(trouble) or "-",
        )
    out.print(table)


@network_app.command("show")
@cluster_errors
def network_show(ctx: typer.Context, name: str = NETWORK_NAME, as_json: bool = JSON_OPTION) -> None:
    """A cluster network: its definition, every node and why it is not ready there.

    Example: stoker cluster network show backend
    """
    with client(ctx) as api:
        net = api.cluster_network(name)
    _show_network(net, as_json)


def _show_network(net: ClusterNetworkOut, as_json: bool) -> None:
    if as_json:
        print_json(net)
        return
    extra = "".join(
        f", {label} {value}"
        for label, value in (("bridge", net.bridge), ("uplink", net.uplink))
        if value
    )
    out.print(
        f"[bold]{net.name}[/bold]  {net.subnet} ({net.isolation.value}"
        f"{', ipv6' if net.ipv6 else ''}{extra}), created by {net.created_by}",
        highlight=False,
    )
    out.print(
        "addresses are per node: each node's bridge is its own segment (own DHCP and NAT)",
        highlight=False,
    )
    for node in net.nodes:
        style = NETWORK_STYLE.get(node.state, "white")
        out.print(f"  {node.node}: [{style}]{node.state}[/] {node.reason}", highlight=False)
    out.print(f"VMs        {', '.join(net.vms) or '-'}", highlight=False)


@network_app.command("delete")
@cluster_errors
def network_delete(ctx: typer.Context, name: str = NETWORK_NAME) -> None:
    """Delete a cluster network; refused while a cluster VM's spec names it.

    Each node removes its copy once no local VM is on it.

    Example: stoker cluster network delete backend
    """
    with client(ctx) as api:
        api.delete_cluster_network(name)
    out.print(f"{name}: deleted")
