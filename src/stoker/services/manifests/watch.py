"""``stoker agent --manifest PATH``: the agent keeps a manifest file applied.

It applies the file at start (which also finishes an apply a crash cut short) and again
whenever its content changes. Changes are noticed through inotify on the file's directory
(editors and config tools replace a file by renaming a new one over it, which a watch on the
file itself would lose), then read after a short settling pause, and compared by content, so
a touch or a rewrite with the same text does nothing. A re-read every ``poll_s`` catches what
inotify cannot see (or everything, where inotify is not available). A manifest with any
problem is refused with a ``manifest.refused`` event and the host stays as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from pathlib import Path

from asyncinotify import Inotify, Mask

from stoker.domain.manifests import ManifestSource
from stoker.manifest import ManifestError, ManifestProblem, manifest_files, parse_sources
from stoker.services.manifests.config import ManifestConfig
from stoker.services.manifests.errors import ApplyFailed, ManifestInvalid
from stoker.services.manifests.service import ManifestService

log = logging.getLogger("stoker.manifests")

_CHANGES = Mask.CLOSE_WRITE | Mask.MOVED_TO | Mask.MOVED_FROM | Mask.CREATE | Mask.DELETE
#: how often to re-read when inotify is not available
FALLBACK_POLL_S = 1.0


def read_sources(path: Path) -> list[ManifestSource]:
    """The manifest's files as text; ManifestError naming the file that cannot be read."""
    sources = []
    for file in manifest_files(path):
        try:
            raw = file.read_bytes()
        except OSError as exc:
            raise ManifestError(
                [ManifestProblem(str(file), 0, "", f"cannot read it: {exc.strerror}")]
            ) from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            parse_sources([(str(file), raw)])  # raises with the line and column
            raise
        sources.append(ManifestSource(str(file), text))
    return sources


class ManifestWatcher:
    """A background loop of the agent (started after VMs were re-adopted)."""

    def __init__(self, config: ManifestConfig, service: ManifestService) -> None:
        if config.path is None:
            raise ValueError("ManifestWatcher needs [manifest] path")
        self.path = config.path
        self.config = config
        self.service = service
        self.poll_s = config.poll_s
        self._seen: str | None = None
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._notify(), name="manifest inotify"),
            asyncio.create_task(self._run(), name="manifest apply"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _run(self) -> None:
        force = True  # at start: also finishes an apply a crash cut short
        while True:
            try:
                await self.check(force)
            except Exception:  # the agent keeps running whatever one round met
                log.exception("applying the manifest %s failed", self.path)
            force = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_s):
                    await self._changed.wait()
                    await asyncio.sleep(self.config.settle_s)  # let the writer finish
            self._changed.clear()

    async def check(self, force: bool = False) -> None:
        """Read the files; apply them when their content differs from the last look."""
        try:
            sources = read_sources(self.path)
        except ManifestError as exc:
            if self._first_look(exc.render(), force):
                self.service.refused(ManifestInvalid(exc), [str(self.path)])
            return
        digest = "\0".join(f"{s.name}\0{s.content}" for s in sources)
        if not self._first_look(digest, force):
            return
        config = self.config
        try:
            await self.service.apply(
                sources, prune=config.prune, restart=config.restart, origin="file"
            )
        except ManifestInvalid as exc:
            self.service.refused(exc, [s.name for s in sources])
        except ApplyFailed:
            pass  # published as manifest.apply_failed; the next change tries again

    def _first_look(self, content: str, force: bool) -> bool:
        digest = hashlib.sha256(content.encode("utf-8", "surrogateescape")).hexdigest()
        new = force or digest != self._seen
        self._seen = digest
        return new

    async def _notify(self) -> None:
        """Set ``_changed`` on every change inotify reports in the manifest's directory."""
        if self.path.is_dir():
            directory, name = self.path, None
        else:
            directory, name = self.path.parent, self.path.name
        try:
            with Inotify() as inotify:
                inotify.add_watch(directory, _CHANGES)
                async for event in inotify:
                    changed = event.name
                    if changed is None or (
                        changed.name == name if name else changed.suffix == ".toml"
                    ):
                        self._changed.set()
        except OSError as exc:
            self.poll_s = min(self.poll_s, FALLBACK_POLL_S)
            log.warning(
                "cannot watch %s for changes (%s): re-reading it every %g s instead",
                directory,
                exc,
                self.poll_s,
            )
