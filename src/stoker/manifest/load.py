"""Read a manifest: one TOML file, or every ``*.toml`` file of a directory in name order.

Values come from ``tomllib``; lines from :mod:`stoker.manifest.positions`. Anything a file
cannot mean is reported with its file, key path and line, never as a traceback: bytes that
are not UTF-8, TOML syntax errors, and values no manifest key takes (TOML dates and times,
``nan`` and ``inf``).
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Sequence
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

from stoker.manifest.errors import Collector, ManifestError, ManifestProblem
from stoker.manifest.model import Manifest
from stoker.manifest.positions import KeyPath, map_positions
from stoker.manifest.source import SourceDocument
from stoker.manifest.validate import build_manifest

_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def load_manifest(path: Path) -> Manifest:
    """Read and validate; :class:`ManifestError` with every problem found."""
    return build_manifest(read_documents(path))


def manifest_files(path: Path) -> list[Path]:
    """The files a manifest path stands for: the file itself, or a directory's ``*.toml``
    files sorted by name (hidden ones, such as editors' lock files, skipped)."""
    if path.is_dir():
        files = sorted(
            p for p in path.iterdir() if p.suffix == ".toml" and p.is_file() and p.name[0] != "."
        )
        if not files:
            raise ManifestError(
                [ManifestProblem(str(path), 0, "", "the directory has no *.toml files")]
            )
        return files
    if not path.exists():
        raise ManifestError([ManifestProblem(str(path), 0, "", "no such file or directory")])
    return [path]


def read_documents(path: Path) -> list[SourceDocument]:
    sources: list[tuple[str, bytes]] = []
    problems: list[ManifestProblem] = []
    for file in manifest_files(path):
        try:
            sources.append((str(file), file.read_bytes()))
        except OSError as exc:
            problems.append(ManifestProblem(str(file), 0, "", f"cannot read it: {exc.strerror}"))
    if problems:
        raise ManifestError(problems)
    return parse_sources(sources)


def parse_sources(sources: Sequence[tuple[str, bytes]]) -> list[SourceDocument]:
    """Parse ``(label, content)`` pairs, e.g. files sent to the API. Syntax problems of all
    files are reported together, and validation waits until every file parses (checks across
    files would otherwise report references into a broken file as missing). Unusable values
    travel with their document and are reported with the validation problems."""
    docs: list[SourceDocument] = []
    problems: list[ManifestProblem] = []
    for label, content in sources:
        doc = parse_document(label, content, problems)
        if doc is not None:
            docs.append(doc)
    if problems:
        raise ManifestError([*problems, *(p for doc in docs for p in doc.problems)])
    return docs


def parse_document(
    label: str, content: bytes, problems: list[ManifestProblem]
) -> SourceDocument | None:
    """The document, or None with a problem added when it is not UTF-8 or not TOML."""
    try:
        text = content.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = content.count(b"\n", 0, exc.start) + 1
        column = exc.start - (content.rfind(b"\n", 0, exc.start) + 1) + 1
        problems.append(
            ManifestProblem(
                label,
                line,
                "",
                f"not UTF-8: byte 0x{content[exc.start]:02x} at column {column}; "
                "TOML files must be UTF-8 (re-save the file as UTF-8)",
            )
        )
        return None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        problems.append(_syntax_problem(label, str(exc)))
        return None
    doc = SourceDocument(label, data, map_positions(text))
    bad = _unusable_values(doc.data, ())
    if not bad:
        return doc
    collector = Collector()
    for path, why in bad:
        collector.add(doc, path, why)
    paths = {path for path, _ in bad}
    return SourceDocument(
        label,
        _blank(doc.data, paths, ()),
        doc.positions,
        frozenset(paths),
        tuple(collector.problems),
    )


def _syntax_problem(label: str, text: str) -> ManifestProblem:
    found = _TOML_POSITION.search(text)
    if found is None:
        return ManifestProblem(label, 0, "", f"not valid TOML: {text}")
    what = text[: found.start()]
    return ManifestProblem(
        label, int(found.group(1)), "", f"not valid TOML: {what} (column {found.group(2)})"
    )


def _unusable_values(value: Any, path: KeyPath) -> list[tuple[KeyPath, str]]:
    """TOML values no manifest key takes, with what to write instead."""
    if isinstance(value, dict):
        return [bad for key, item in value.items() for bad in _unusable_values(item, (*path, key))]
    if isinstance(value, list):
        return [bad for i, item in enumerate(value) for bad in _unusable_values(item, (*path, i))]
    if isinstance(value, datetime | date | time):
        return [
            (
                path,
                f"is a TOML {type(value).__name__} ({value.isoformat()}); no manifest key takes "
                "one: quote it if you meant text (cron and durations are strings, e.g. "
                '"0 8 * * 1-5", "1d")',
            )
        ]
    if isinstance(value, float) and not math.isfinite(value):
        return [(path, f"{value} is not allowed: give a finite number")]
    return []


def _blank(value: Any, bad: set[KeyPath], path: KeyPath) -> Any:
    if path in bad:
        return None
    if isinstance(value, dict):
        return {k: _blank(v, bad, (*path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_blank(v, bad, (*path, i)) for i, v in enumerate(value)]
    return value
