"""Where cluster state lives in etcd: every key stoker reads or writes is built here.

One module so that the layout drawn in docs/cluster.md is the layout in the code, and so that
a name can never smuggle a ``/`` into a key and land in another object's subtree.

    /stoker/nodes/<node>         node record: capacity, labels, address (durable)
    /stoker/alive/<node>         bound to the node's lease: absent = the node is lost
    /stoker/cordoned/<node>      present = no new placements (written by operators only)
    /stoker/vms/<vm>             spec + desired state (durable, created once per name)
    /stoker/placements/<vm>      the scheduler's decision: node + why (durable)
    /stoker/owners/<vm>          bound to the running node's lease: who may run the VM now
    /stoker/status/<vm>          observed state, written by the owner (durable)
    /stoker/networks/<name>      cluster networks
    /stoker/schedules/<name>     cluster schedules
    /stoker/schedule-runs/<name> the latest fire handled and its result (the leader only)
    /stoker/election/scheduler/  candidates for the one active scheduler (lease-bound)
"""

from __future__ import annotations

import re

ROOT = "/stoker/"

NODES = ROOT + "nodes/"
ALIVE = ROOT + "alive/"
CORDONED = ROOT + "cordoned/"
VMS = ROOT + "vms/"
PLACEMENTS = ROOT + "placements/"
OWNERS = ROOT + "owners/"
STATUS = ROOT + "status/"
NETWORKS = ROOT + "networks/"
SCHEDULES = ROOT + "schedules/"
SCHEDULE_RUNS = ROOT + "schedule-runs/"
ELECTIONS = ROOT + "election/"
SCHEDULER_ELECTION = ELECTIONS + "scheduler/"

# Object names follow the VM spec's rule; node names are host names (dots and upper case).
_OBJECT_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def _checked(name: str, pattern: re.Pattern[str], what: str) -> str:
    if not pattern.match(name):
        raise ValueError(
            f"{what} name {name!r} is not usable in a cluster key: it must match "
            f"{pattern.pattern} (no '/', at most 63 characters)"
        )
    return name


def node_name(name: str) -> str:
    """The name itself, or ValueError saying what a node name may contain."""
    return _checked(name, _NODE_NAME, "node")


def object_name(name: str, what: str = "object") -> str:
    return _checked(name, _OBJECT_NAME, what)


def node(name: str) -> str:
    return NODES + node_name(name)


def alive(name: str) -> str:
    return ALIVE + node_name(name)


def cordoned(name: str) -> str:
    return CORDONED + node_name(name)


def vm(name: str) -> str:
    return VMS + object_name(name, "VM")


def placement(vm_name: str) -> str:
    return PLACEMENTS + object_name(vm_name, "VM")


def owner(vm_name: str) -> str:
    return OWNERS + object_name(vm_name, "VM")


def status(vm_name: str) -> str:
    return STATUS + object_name(vm_name, "VM")


def network(name: str) -> str:
    return NETWORKS + object_name(name, "network")


def schedule(name: str) -> str:
    return SCHEDULES + object_name(name, "schedule")


def schedule_run(name: str) -> str:
    """The latest fire of cluster schedule ``name`` already handled, and its outcome."""
    return SCHEDULE_RUNS + object_name(name, "schedule")


def election(name: str) -> str:
    """The prefix under which candidates for election ``name`` put their lease-bound keys."""
    return ELECTIONS + object_name(name, "election") + "/"


def name_in(prefix: str, key: str) -> str:
    """The last segment of ``key`` under ``prefix``: ``name_in(VMS, "/stoker/vms/web")`` is
    ``"web"``. Refuses keys outside the prefix or nested below it."""
    if not key.startswith(prefix) or "/" in key[len(prefix) :] or key == prefix:
        raise ValueError(f"key {key!r} is not directly under {prefix!r}")
    return key[len(prefix) :]
