"""Managed networks as the API shows them, and the body that creates one."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from stoker.domain.networks import Isolation, NetworkSpec
from stoker.domain.states import VMState

__all__ = ["LeaseOut", "NetworkCreate", "NetworkOut", "NetworkingOut"]

#: the request body of POST /api/v1/networks
NetworkCreate = NetworkSpec


class LeaseOut(BaseModel):
    vm_id: str
    vm_name: str | None = Field(description="null when the VM is gone (released soon)")
    vm_state: VMState | None
    address: str
    mac: str
    since: datetime


class NetworkOut(BaseModel):
    id: str
    name: str
    subnet: str
    gateway: str
    isolation: Isolation
    ipv6_subnet: str | None
    bridge: str
    uplink: str | None
    managed_by: str = Field(description="api: made by an operator; config: the default network")
    created_at: datetime
    pool_size: int = Field(description="addresses VMs can hold")
    addresses_used: int
    dnsmasq_pid: int | None = Field(description="its DHCP server; null until its first VM runs")
    dnsmasq_restarts: int
    leases: list[LeaseOut] = Field(default_factory=list)
    warnings: list[str] = Field(
        default_factory=list, description="host settings that get in the guests' way"
    )


class NetworkingOut(BaseModel):
    """What this agent can do about networks, and what a VM created without one gets."""

    available: bool
    reason: str = Field(description="why managed networking is not available (else empty)")
    default_network: str
    default_subnet: str
    default_modes: dict[str, str] = Field(
        description="hypervisor -> the network mode a VM without one gets: managed, user, none"
    )
