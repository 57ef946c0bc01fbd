"""Declarative manifests on a live agent: plan and apply through the services, who manages
each object, and the file the agent can keep applied.

Modules: :mod:`.host` (the host as plan records), :mod:`.preflight` (what the host would
refuse, with file and line), :mod:`.actions` (a step as a service call), :mod:`.ledger` (each
managed object recorded as it changes), :mod:`.service` (plan and apply), :mod:`.watch`
(``stoker agent --manifest``), :mod:`.config` (``[manifest]``).
"""

from stoker.services.manifests.config import ManifestConfig
from stoker.services.manifests.errors import ApplyFailed, ApplyRefused, ManifestInvalid
from stoker.services.manifests.service import (
    AppliedManifest,
    ApplyResult,
    ManifestService,
    describe,
)
from stoker.services.manifests.watch import ManifestWatcher, read_sources

__all__ = [
    "AppliedManifest",
    "ApplyFailed",
    "ApplyRefused",
    "ApplyResult",
    "ManifestConfig",
    "ManifestInvalid",
    "ManifestService",
    "ManifestWatcher",
    "describe",
    "read_sources",
]
