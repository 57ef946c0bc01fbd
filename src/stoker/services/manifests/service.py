"""Plan and apply manifests against this host.

A plan reads the host through the services (:mod:`.host`), compares it with the manifest
(:func:`stoker.manifest.plan`) and checks what the host would refuse (:mod:`.preflight`), so
that a manifest with any error, in the file or on this host, changes nothing. An apply carries
out exactly the steps of that plan, in its order, through the service calls the API makes
(:mod:`.actions`), and records each object as soon as it changed (:mod:`.ledger`): applying
again after a crash or a failed step finishes the job without doing anything twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from stoker.domain.capabilities import Unsupported
from stoker.domain.events import EventType
from stoker.domain.manifests import ManagedObject, ManifestHead, ManifestSource
from stoker.domain.states import IllegalAction
from stoker.manifest import Manifest, ManifestError, Plan, Step, build_manifest, parse_sources, plan
from stoker.manifest.plan import HostObjects
from stoker.manifest.render import PHRASES
from stoker.manifest.source import SourceDocument
from stoker.manifest.validate import managed_network
from stoker.services.errors import ServiceError
from stoker.services.events import EventBus
from stoker.services.lifecycle import Lifecycle
from stoker.services.manifests import preflight
from stoker.services.manifests.actions import StepRunner
from stoker.services.manifests.errors import ApplyFailed, ApplyRefused, ManifestInvalid
from stoker.services.manifests.host import Host, HostReader, last_applied
from stoker.services.manifests.ledger import Ledger
from stoker.services.networks import NetworkService
from stoker.services.quotas import QuotaService
from stoker.services.scheduler import Scheduler
from stoker.services.snapshots import SnapshotService
from stoker.store.manifests import ManifestStore

log = logging.getLogger("stoker.manifests")


@dataclass(frozen=True)
class ApplyResult:
    plan: Plan
    #: steps carried out (all of the plan's)
    done: int
    applied_at: datetime


@dataclass(frozen=True)
class AppliedManifest:
    """What GET /api/v1/manifest shows: the last apply, and every object it manages."""

    head: ManifestHead | None
    objects: tuple[ManagedObject, ...]
    #: the file the agent keeps applied (``stoker agent --manifest``), if any
    watching: Path | None


@dataclass(frozen=True)
class _Planned:
    plan: Plan
    host: Host
    rows: dict[tuple[str, str], ManagedObject]


class ManifestService:
    def __init__(
        self,
        lifecycle: Lifecycle,
        quotas: QuotaService,
        snapshots: SnapshotService,
        scheduler: Scheduler,
        networks: NetworkService,
        store: ManifestStore,
        events: EventBus,
        *,
        watching: Path | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.lifecycle = lifecycle
        self.quotas = quotas
        self.networks = networks
        self.store = store
        self.events = events
        self.watching = watching
        self.clock = clock or (lambda: datetime.now(UTC))
        self.reader = HostReader(lifecycle, quotas, snapshots, scheduler, networks)
        self.runner = StepRunner(lifecycle, quotas, snapshots, scheduler, networks)
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------------ reading

    def applied(self) -> AppliedManifest:
        return AppliedManifest(self.store.head(), tuple(self.store.objects()), self.watching)

    async def plan(
        self, sources: Sequence[ManifestSource], *, prune: bool = False, restart: bool = False
    ) -> Plan:
        """What an apply of ``sources`` would do now; ManifestInvalid with every problem."""
        return (await self._plan(sources, prune, restart)).plan

    async def _plan(
        self, sources: Sequence[ManifestSource], prune: bool, restart: bool
    ) -> _Planned:
        try:
            # parsing and validating touch nothing of the agent's: off the event loop
            docs, manifest = await asyncio.to_thread(_load, sources)
            manifest = self._complete(manifest)
            rows = {(o.kind, o.name): o for o in self.store.objects()}
            host = self.reader.read(rows)
            head = self.store.head()
            record = last_applied(head.manifest_hash if head else None, rows, host.state)
            planned = plan(manifest, host.state, last_applied=record, prune=prune, restart=restart)
            preflight.check(planned, docs, self.lifecycle, self.quotas, self.networks)
        except ManifestError as exc:
            raise ManifestInvalid(exc) from None
        return _Planned(planned, host, rows)

    def _complete(self, manifest: Manifest) -> Manifest:
        """Each VM's spec as the agent would store it (what a request leaves out filled in
        the same way), so that an applied VM compares equal to its declaration."""
        vms = []
        for vm in manifest.vms:
            spec = self.lifecycle.complete_spec(vm.spec)
            vms.append(replace(vm, spec=spec, network_name=managed_network(spec)))
        return replace(manifest, vms=tuple(vms))

    # ------------------------------------------------------------------------ applying

    async def apply(
        self,
        sources: Sequence[ManifestSource],
        *,
        prune: bool = False,
        restart: bool = False,
        origin: str = "api",
    ) -> ApplyResult:
        """Plan, then carry out every step in order; one apply at a time."""
        if origin == "api" and self.watching is not None:
            raise ApplyRefused(
                f"this agent keeps the manifest {self.watching} applied (stoker agent "
                "--manifest): edit that file instead; plan requests are still answered"
            )
        async with self._lock:
            planned = await self._plan(sources, prune, restart)
            p = planned.plan
            self.store.begin(p.manifest_hash, self.clock())
            ledger = Ledger(self.store, planned.rows, dict(planned.host.ids), self.clock)
            objects = HostObjects.of(p.current)
            for done, step in enumerate(p.steps):
                ledger.before(step, objects)
                try:
                    object_id = await self.carry_out(step)
                except (ServiceError, IllegalAction, Unsupported, OSError) as exc:
                    raise self._failed(p, step, done, exc, origin) from exc
                objects.advance(step)
                ledger.record(step, object_id, objects)
            ledger.settle(objects)
            ledger.drop_stale()
            at = self.clock()
            self.store.finish(p.manifest_hash, tuple(sources), p.summary(), origin, at)
            self.events.publish(
                EventType.MANIFEST_APPLIED,
                f"manifest {p.manifest_hash[:12]} applied: {describe(p)}",
                manifest_hash=p.manifest_hash,
                summary=p.summary(),
                files=[s.name for s in sources],
                origin=origin,
                prune=prune,
                restart=restart,
            )
            return ApplyResult(p, len(p.steps), at)

    async def carry_out(self, step: Step) -> str | None:
        """One step, through the services; the id of the object it left (None: deleted)."""
        return await self.runner.run(step)

    def _failed(self, p: Plan, step: Step, done: int, exc: Exception, origin: str) -> ApplyFailed:
        failure = ApplyFailed(step, done, len(p.steps), exc)
        self.store.fail(failure.detail)
        log.warning("manifest apply stopped: %s", failure.detail)
        self.events.publish(
            EventType.MANIFEST_APPLY_FAILED,
            f"manifest {p.manifest_hash[:12]}: {failure.detail}",
            manifest_hash=p.manifest_hash,
            step=step.to_dict(),
            done=done,
            total=len(p.steps),
            origin=origin,
        )
        return failure

    def refused(self, error: ManifestInvalid, files: Sequence[str]) -> None:
        """Publish that a manifest was refused (the file the agent keeps applied)."""
        problems = error.error.problems
        self.events.publish(
            EventType.MANIFEST_REFUSED,
            f"manifest refused, nothing changed: {len(problems)} problem"
            f"{'s' if len(problems) != 1 else ''}; first: {problems[0] if problems else '?'}",
            files=list(files),
            problems=[p.to_dict() for p in problems],
        )


def describe(p: Plan) -> str:
    """``2 to create, 1 to update in place`` (or ``no changes``)."""
    counts = p.summary()
    parts = [f"{n} {PHRASES[op]}" for op, n in ((op, counts[str(op)]) for op in PHRASES) if n]
    return ", ".join(parts) or "no changes"


def _load(sources: Sequence[ManifestSource]) -> tuple[list[SourceDocument], Manifest]:
    docs = parse_sources([(s.name, s.content.encode()) for s in sources])
    return docs, build_manifest(docs)
