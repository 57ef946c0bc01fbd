"""Sizes and sha256 of a snapshot's files, for its manifest and for verify.

Hashing is the slow part of a snapshot, so it runs in parallel threads (hashlib drops the
GIL) and, for the memory file, while the VMM is still writing it.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from stoker.domain.units import MiB
from stoker.services.snapshots.layout import MANIFEST

#: ``{"size": bytes, "sha256": hex}`` per file, keyed by its path inside the snapshot
FileInfo = dict[str, Any]


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def list_files(root: Path) -> list[str]:
    """Every regular file under ``root`` except the manifest, as sorted relative paths."""
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel != MANIFEST:
                found.append(rel)
    return sorted(found)


def hash_tree(root: Path, known: dict[str, FileInfo] | None = None) -> dict[str, FileInfo]:
    """Size and sha256 of every file under ``root`` (hashlib drops the GIL, so threads help);
    ``known`` holds files already hashed while they were written."""
    known = known or {}
    names = [n for n in list_files(root) if n not in known]
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        digests = list(pool.map(lambda n: sha256_file(root / n), names))
    result = {
        n: {"size": (root / n).stat().st_size, "sha256": d}
        for n, d in zip(names, digests, strict=True)
    }
    for name, info in known.items():
        if (root / name).stat().st_size != info["size"]:
            raise OSError(f"{name} changed after it was hashed")
        result[name] = info
    return dict(sorted(result.items()))


class GrowingFileHasher:
    """Hashes a file while the VMM writes it, so the checksum costs (almost) no extra time;
    it also flushes what it has read to disk as it goes, so the final fsync is short."""

    SYNC_EVERY = 32 * MiB

    def __init__(self, path: Path) -> None:
        self.path = path
        self._done = threading.Event()
        self._result: FileInfo | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="snapshot-hash", daemon=True)

    def start(self) -> GrowingFileHasher:
        self._thread.start()
        return self

    def finish(self) -> FileInfo:
        """The writer is done: hash the rest and return ``{"size", "sha256"}``."""
        self._done.set()
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._result is None:
            raise OSError(f"{self.path} was never written")
        return self._result

    def _run(self) -> None:
        try:
            while not self.path.exists():
                if self._done.is_set():
                    return
                time.sleep(0.002)
            digest = hashlib.sha256()
            size = synced = 0
            with open(self.path, "rb") as f:
                while True:
                    done = self._done.is_set()
                    chunk = f.read(4 * MiB)
                    if chunk:
                        digest.update(chunk)
                        size += len(chunk)
                        if size - synced >= self.SYNC_EVERY:
                            os.fdatasync(f.fileno())
                            synced = size
                    elif done:
                        break
                    else:
                        time.sleep(0.002)
            self._result = {"size": size, "sha256": digest.hexdigest()}
        except BaseException as exc:
            self._error = exc
