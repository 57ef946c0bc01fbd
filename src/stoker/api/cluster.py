"""/api/v1/cluster: cluster VMs and nodes, served by any node of the cluster.

Present only on agents in cluster mode. Writes are etcd transactions: when etcd cannot be
reached they answer 503 saying that cluster writes are unavailable (the VMs keep running on
their nodes). Reads answer from this node's view of the cluster at the ``revision`` they name.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query, Response, status

from stoker.api.deps import services
from stoker.api.problems import PROBLEM_RESPONSES
from stoker.cluster.network_ops import ClusterNetworkOps
from stoker.cluster.operations import MAX_PAGE, ClusterOps
from stoker.cluster.schedule_ops import ClusterScheduleOps
from stoker.services.container import Services
from stoker.services.errors import NotFound
from stoker.wire.cluster import (
    ClusterNetworkCreate,
    ClusterNetworkOut,
    ClusterOut,
    ClusterScheduleCreate,
    ClusterScheduleOut,
    ClusterVMCreate,
    ClusterVMOut,
    ClusterVMPage,
    CordonIn,
    ExplainOut,
    NodeOut,
)

RESPONSES: dict[int | str, dict[str, Any]] = {
    **PROBLEM_RESPONSES,
    503: {
        **PROBLEM_RESPONSES[409],
        "description": "etcd cannot be reached: cluster writes (or reads) are unavailable now",
    },
}
router = APIRouter(prefix="/api/v1/cluster", tags=["cluster"], responses=RESPONSES)


def cluster_ops(svc: Annotated[Services, Depends(services)]) -> ClusterOps:
    if svc.cluster is None:
        raise NotFound("this agent is not in cluster mode (start it with --cluster URL)")
    return svc.cluster.ops


Ops = Annotated[ClusterOps, Depends(cluster_ops)]
VMName = Annotated[str, Path(max_length=63, description="cluster VM name")]
NodeName = Annotated[str, Path(max_length=63, description="node name")]
Wait = Annotated[
    float, Query(ge=0, le=60, description="seconds to wait for the scheduler to place it")
]


@router.get("")
async def cluster_status(ops: Ops) -> ClusterOut:
    """This node's standing in the cluster (its lease, the fence), the scheduler, counts."""
    return ops.summary()


@router.get("/nodes")
async def list_nodes(ops: Ops) -> list[NodeOut]:
    return ops.nodes()


@router.get("/nodes/{name}")
async def get_node(name: NodeName, ops: Ops) -> NodeOut:
    return ops.node(name)


@router.post("/nodes/{name}/cordon")
async def cordon_node(name: NodeName, ops: Ops, body: CordonIn | None = None) -> NodeOut:
    """No new placements on the node; its VMs stay."""
    return await ops.cordon(name, (body or CordonIn()).reason, drain=False)


@router.post("/nodes/{name}/drain")
async def drain_node(name: NodeName, ops: Ops, body: CordonIn | None = None) -> NodeOut:
    """Cordon the node and move every VM that may move to other nodes (stopped here, started
    there), respecting anti-affinity; VMs that may not move say why in their ``note``."""
    return await ops.cordon(name, (body or CordonIn()).reason, drain=True)


@router.post("/nodes/{name}/uncordon")
async def uncordon_node(name: NodeName, ops: Ops) -> NodeOut:
    return await ops.uncordon(name)


@router.post("/vms", status_code=status.HTTP_201_CREATED)
async def create_cluster_vm(
    ops: Ops, request: Annotated[ClusterVMCreate, Body()], wait_s: Wait = 0
) -> ClusterVMOut:
    """Create a cluster VM: exactly one of several concurrent creates of a name wins (409 for
    the others). The spec is validated here; the node it is placed on checks it against its
    host before running it (the VM's ``reason`` says so if it cannot)."""
    return await ops.create(request, wait_s)


@router.get("/vms")
async def list_cluster_vms(
    ops: Ops,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = MAX_PAGE,
    after: Annotated[str | None, Query(max_length=63, description="the last name seen")] = None,
) -> ClusterVMPage:
    """A page of cluster VMs in name order, with where each runs and its state."""
    return ops.page(limit, after)


@router.get("/vms/{name}")
async def get_cluster_vm(name: VMName, ops: Ops) -> ClusterVMOut:
    return ops.get(name)


@router.post("/vms/{name}/start")
async def start_cluster_vm(name: VMName, ops: Ops) -> ClusterVMOut:
    """Desired state running: its node starts it."""
    return await ops.set_desired(name, "running")


@router.post("/vms/{name}/stop")
async def stop_cluster_vm(name: VMName, ops: Ops) -> ClusterVMOut:
    """Desired state stopped: its node stops it (gracefully) and keeps it placed there."""
    return await ops.set_desired(name, "stopped")


@router.delete("/vms/{name}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_cluster_vm(name: VMName, ops: Ops) -> Response:
    """Its node stops it and deletes its local copy."""
    await ops.delete(name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/vms/{name}/explain")
async def explain_cluster_vm(name: VMName, ops: Ops) -> ExplainOut:
    """Every node, and why it was or was not chosen for this VM now."""
    return ops.explain(name)


# -- cluster schedules ---------------------------------------------------------------------------


def cluster_schedules(svc: Annotated[Services, Depends(services)]) -> ClusterScheduleOps:
    if svc.cluster is None:
        raise NotFound("this agent is not in cluster mode (start it with --cluster URL)")
    return svc.cluster.schedules


Schedules = Annotated[ClusterScheduleOps, Depends(cluster_schedules)]
ScheduleName = Annotated[str, Path(max_length=63, description="cluster schedule name")]


@router.post("/schedules", status_code=status.HTTP_201_CREATED)
async def create_cluster_schedule(
    schedules: Schedules, request: Annotated[ClusterScheduleCreate, Body()]
) -> ClusterScheduleOut:
    """A cron schedule of start/stop/restart on cluster VMs (one by name, or a selector), run
    once per fire by the active scheduler. One of concurrent creates of a name wins (409)."""
    return await schedules.create(request)


@router.get("/schedules")
async def list_cluster_schedules(schedules: Schedules) -> list[ClusterScheduleOut]:
    """Every cluster schedule with its next fire and its last run."""
    return schedules.all()


@router.get("/schedules/{name}")
async def get_cluster_schedule(name: ScheduleName, schedules: Schedules) -> ClusterScheduleOut:
    return schedules.get(name)


@router.delete("/schedules/{name}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_cluster_schedule(name: ScheduleName, schedules: Schedules) -> Response:
    await schedules.delete(name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# -- cluster networks ----------------------------------------------------------------------------


def cluster_networks(svc: Annotated[Services, Depends(services)]) -> ClusterNetworkOps:
    if svc.cluster is None:
        raise NotFound("this agent is not in cluster mode (start it with --cluster URL)")
    return svc.cluster.network_ops


Networks = Annotated[ClusterNetworkOps, Depends(cluster_networks)]
NetworkName = Annotated[str, Path(max_length=63, description="cluster network name")]


@router.post("/networks", status_code=status.HTTP_201_CREATED)
async def create_cluster_network(
    networks: Networks, request: Annotated[ClusterNetworkCreate, Body()]
) -> ClusterNetworkOut:
    """A network every node makes locally (bridge, NAT, DHCP), with the same body and checks
    as a local network create; one of concurrent creates of a name wins (409 for the others).
    Addresses are per node: each node's bridge is its own segment."""
    return await networks.create(request)


@router.get("/networks")
async def list_cluster_networks(networks: Networks) -> list[ClusterNetworkOut]:
    """Every cluster network, with the nodes where it is ready and why not elsewhere."""
    return networks.all()


@router.get("/networks/{name}")
async def get_cluster_network(name: NetworkName, networks: Networks) -> ClusterNetworkOut:
    return networks.get(name)


@router.delete("/networks/{name}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_cluster_network(name: NetworkName, networks: Networks) -> Response:
    """409 naming the cluster VMs whose spec names it; each node deletes its copy once no
    local VM is on it."""
    await networks.delete(name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
