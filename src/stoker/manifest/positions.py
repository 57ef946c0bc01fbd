"""Where each key of a TOML document sits: key path -> line, for error messages.

``tomllib`` gives values but no positions, and tomlkit keeps the source text but no line
numbers. tree-sitter's TOML grammar gives every node its exact position, so the values come
from ``tomllib`` (the standard's reference behaviour) and only the lines from tree-sitter.
A path the grammar missed falls back to its nearest ancestor, so a line is never invented.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass

import tree_sitter_toml
from tree_sitter import Language, Node, Parser

#: a key path as ``tomllib`` data is indexed: table keys and array positions
KeyPath = tuple[str | int, ...]

_LANGUAGE = Language(tree_sitter_toml.language())
_KEY_TYPES = frozenset({"bare_key", "quoted_key", "dotted_key"})


@dataclass(frozen=True)
class PositionMap:
    """1-based line of every key, table header and array element of one document."""

    lines: Mapping[KeyPath, int]

    def line(self, path: KeyPath) -> int:
        """The line of ``path``, else of its nearest ancestor; 0 when nothing is known."""
        while path:
            found = self.lines.get(path)
            if found is not None:
                return found
            path = path[:-1]
        return 0


def map_positions(text: str) -> PositionMap:
    """Map every key path of ``text`` (already accepted by ``tomllib``) to its line."""
    tree = Parser(_LANGUAGE).parse(text.encode("utf-8"))
    walker = _Walker()
    for node in tree.root_node.named_children:
        walker.top_level(node)
    return PositionMap(walker.lines)


class _Walker:
    def __init__(self) -> None:
        self.lines: dict[KeyPath, int] = {}
        self.aot_counts: dict[KeyPath, int] = {}  # array-of-tables path -> elements so far

    def top_level(self, node: Node) -> None:
        if node.type == "pair":
            self.pair(node, ())
        elif node.type in ("table", "table_array_element"):
            keys = _keys(_header_key(node))
            if node.type == "table":
                path = self._resolve(keys)
            else:
                parent = (*self._resolve(keys[:-1]), keys[-1])
                index = self.aot_counts.get(parent, 0)
                self.aot_counts[parent] = index + 1
                path = (*parent, index)
            for depth in range(1, len(path) + 1):
                self.lines.setdefault(path[:depth], _line(node))
            for child in node.named_children:
                if child.type == "pair":
                    self.pair(child, path)

    def _resolve(self, keys: list[str]) -> KeyPath:
        """A header's keys as a data path: ``[vm.drives]`` means the newest ``[[vm]]``."""
        path: KeyPath = ()
        for key in keys:
            path = (*path, key)
            count = self.aot_counts.get(path)
            if count:
                path = (*path, count - 1)
        return path

    def pair(self, node: Node, base: KeyPath) -> None:
        children = node.named_children
        key_node = next((c for c in children if c.type in _KEY_TYPES), None)
        if key_node is None:
            return
        path = base
        for key in _keys(key_node):
            path = (*path, key)
            self.lines.setdefault(path, _line(key_node))
        self.value(children[-1], path)

    def value(self, node: Node, path: KeyPath) -> None:
        if node.type == "inline_table":
            for child in node.named_children:
                if child.type == "pair":
                    self.pair(child, path)
        elif node.type == "array":
            index = 0
            for child in node.named_children:
                if child.type == "comment":
                    continue
                self.lines.setdefault((*path, index), _line(child))
                self.value(child, (*path, index))
                index += 1


def _line(node: Node) -> int:
    return node.start_point.row + 1


def _header_key(node: Node) -> Node | None:
    return next((c for c in node.named_children if c.type in _KEY_TYPES), None)


def _keys(node: Node | None) -> list[str]:
    """The key names of a bare, quoted or dotted key, escapes decoded by ``tomllib``."""
    if node is None:
        return []
    if node.type == "dotted_key":
        return [key for child in node.named_children for key in _keys(child)]
    text = (node.text or b"").decode("utf-8")
    if node.type == "quoted_key":
        return [str(tomllib.loads(f"k = {text}")["k"])]
    return [text]
