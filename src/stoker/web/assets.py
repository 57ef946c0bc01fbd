"""The console's browser code: its own (``static/``) and the third-party libraries.

htmx, its server-sent-events extension and uPlot come from the npm registry, pinned by
``package-lock.json`` beside this file: ``make web`` runs ``npm ci`` here, which fills
``node_modules/`` (git-ignored). The agent serves only the files named in ``VENDOR``, never
the directory, and says how to install them when they are missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
TEMPLATES = HERE / "templates"
NODE_MODULES = HERE / "node_modules"

#: the URL name of each vendored file -> its path under node_modules
VENDOR: dict[str, str] = {
    "htmx.min.js": "htmx.org/dist/htmx.min.js",
    "sse.min.js": "htmx-ext-sse/dist/sse.min.js",
    "uPlot.iife.min.js": "uplot/dist/uPlot.iife.min.js",
    "uPlot.min.css": "uplot/dist/uPlot.min.css",
}

INSTALL_HINT = (
    f"the web console's libraries are not installed: run `make web` (npm ci in {HERE}) and reload"
)


@dataclass(frozen=True)
class Vendor:
    root: Path = NODE_MODULES

    def path(self, name: str) -> Path | None:
        """The file for a vendored URL name, or None (unknown name, or not installed)."""
        relative = VENDOR.get(name)
        if relative is None:
            return None
        path = self.root / relative
        return path if path.is_file() else None

    def missing(self) -> list[str]:
        return [name for name in VENDOR if self.path(name) is None]
