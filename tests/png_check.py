"""Is a PNG screenshot more than a blank page? Decoded with zlib alone (no imaging library)."""

from __future__ import annotations

import struct
import zlib
from collections import Counter
from pathlib import Path

_CHANNELS = {2: 3, 6: 4}  # colour type -> bytes per pixel at 8 bits


def pixels(png: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of raw pixel bytes) of an 8-bit RGB or RGBA PNG."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    width = height = bpp = 0
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", data[:10])
            assert depth == 8 and colour in _CHANNELS, f"unexpected PNG format {depth}/{colour}"
            bpp = _CHANNELS[colour]
        elif kind == b"IDAT":
            idat += data
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        line = raw[y * (stride + 1) : (y + 1) * (stride + 1)]
        kind, row = line[0], bytearray(line[1:])
        for i in range(stride):
            left = row[i - bpp] if i >= bpp else 0
            up = previous[i]
            corner = previous[i - bpp] if i >= bpp else 0
            if kind == 1:
                row[i] = (row[i] + left) & 0xFF
            elif kind == 2:
                row[i] = (row[i] + up) & 0xFF
            elif kind == 3:
                row[i] = (row[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                pred = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                row[i] = (row[i] + pred) & 0xFF
        rows.append(bytes(row))
        previous = row
    return width, height, rows


def assert_not_blank(path: Path, min_colours: int = 16, min_ink: float = 0.02) -> None:
    """At least ``min_colours`` colours, and ``min_ink`` of the pixels off the background."""
    width, _height, rows = pixels(path.read_bytes())
    bpp = len(rows[0]) // width
    counts: Counter[bytes] = Counter()
    for row in rows[::4]:  # every fourth row is plenty and keeps this fast
        counts.update(row[i : i + bpp] for i in range(0, len(row), bpp * 2))
    total = sum(counts.values())
    background = counts.most_common(1)[0][1]
    ink = 1 - background / total
    assert len(counts) >= min_colours, f"{path}: only {len(counts)} colours: blank?"
    assert ink >= min_ink, f"{path}: {ink:.1%} of pixels off the background: blank?"
