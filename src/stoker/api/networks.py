"""/api/v1/networks: managed networks (a bridge, NAT, DHCP, isolation) and the addresses
their VMs hold; /api/v1/networking: what a VM created without a network gets, and why."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response, status

from stoker.api.deps import services
from stoker.api.problems import PROBLEM_RESPONSES
from stoker.api.shapes import network_out, networking_out
from stoker.services.container import Services
from stoker.wire import NetworkCreate, NetworkingOut, NetworkOut

router = APIRouter(tags=["networks"], responses=PROBLEM_RESPONSES)

Svc = Annotated[Services, Depends(services)]
Ref = Annotated[str, Path(max_length=63, description="network name or id")]


@router.get("/api/v1/networking")
async def networking(svc: Svc) -> NetworkingOut:
    """Whether this agent makes managed networks, why not, and the network mode a VM created
    without one gets (the default network, or user-mode networking)."""
    return networking_out(svc.networks.status())


@router.get("/api/v1/networks")
async def list_networks(svc: Svc) -> list[NetworkOut]:
    return [network_out(view) for view in svc.networks.all()]


@router.post("/api/v1/networks", status_code=status.HTTP_201_CREATED)
async def create_network(spec: NetworkCreate, svc: Svc) -> NetworkOut:
    """A bridge with the gateway (first address of the subnet), outbound NAT, a DHCP server
    with static leases only, and isolation between guests unless ``open``. Refused, with
    nothing left behind, for a subnet that is not private or overlaps another network or a
    subnet of the host."""
    return network_out(await svc.networks.create(spec))


@router.get("/api/v1/networks/{ref}")
async def get_network(ref: Ref, svc: Svc) -> NetworkOut:
    return network_out(svc.networks.view(ref))


@router.delete("/api/v1/networks/{ref}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_network(ref: Ref, svc: Svc) -> Response:
    """Only a network no VM is on (delete those VMs first)."""
    await svc.networks.delete(ref)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
