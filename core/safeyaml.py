"""YAML for run configs, bounded: small inputs cannot hang or exhaust memory.

:func:`load` reads with PyYAML's safe loader (no Python tags) and refuses, with a one-line
:class:`~polyrl.types.ConfigError`:

* files over ``MAX_BYTES``, binary files and text that is not UTF-8;
* syntax errors (with line and column);
* nesting deeper than ``MAX_DEPTH``, more than ``MAX_ALIASES`` aliases, or a document that
  expands to more than ``MAX_NODES`` nodes (an "alias bomb": a few lines whose anchors multiply);
* duplicate and unhashable mapping keys (PyYAML silently keeps the last duplicate).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .config import _short
from .types import ConfigError

MAX_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_ALIASES = 256
MAX_NODES = 100_000


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts aliases and checks the expanded size before constructing."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:  # type: ignore[override]
        if self._depth >= MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise ConfigError(f"{_where(self, mark)}nesting deeper than {MAX_DEPTH} levels")
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise ConfigError(f"{_where(self, mark)}more than {MAX_ALIASES} YAML aliases; refusing to expand them")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node: Node) -> Any:
        _check_size(node, self.name)
        return super().construct_document(node)

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:  # type: ignore[override]
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, ScalarNode):
                key = self.construct_object(key_node, deep=deep)
                try:
                    if key in seen:
                        raise ConfigError(
                            f"{_where(self, key_node.start_mark)}duplicate key {_short(key)} "
                            f"(first at line {seen[key].line + 1}); each key may appear once"
                        )
                except TypeError:
                    pass
                else:
                    seen[key] = key_node.start_mark
        try:
            return super().construct_mapping(node, deep=deep)
        except yaml.constructor.ConstructorError as e:
            if "unhashable" in str(e):
                raise ConfigError(f"{_where(self, e.problem_mark)}a mapping key must be a plain value, not a list or mapping") from None
            raise


def _where(loader: Any, mark: Any) -> str:
    if mark is None:
        return ""
    name = getattr(loader, "name", None)
    name = "" if not name or name.startswith("<") else f"{name}: "
    return f"{name}line {mark.line + 1}, column {mark.column + 1}: "


def _check_size(root: Node, name: str | None) -> None:
    """Reject a composed graph deeper than MAX_DEPTH or expanding to more than MAX_NODES nodes."""
    sizes: dict[int, int] = {}

    def size(node: Node, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise ConfigError(f"{name + ': ' if name and not name.startswith('<') else ''}nesting deeper than {MAX_DEPTH} levels")
        key = id(node)
        if key in sizes:
            return sizes[key]
        sizes[key] = 1  # a cycle counts once (the safe loader builds no cycles from plain YAML)
        total = 1
        if isinstance(node, SequenceNode):
            for child in node.value:
                total += size(child, depth + 1)
        elif isinstance(node, MappingNode):
            for k, v in node.value:
                total += size(k, depth + 1) + size(v, depth + 1)
        if total > MAX_NODES:
            raise ConfigError(
                f"{name + ': ' if name and not name.startswith('<') else ''}the document expands to more than "
                f"{MAX_NODES} values (anchors and aliases multiply); refusing to read it"
            )
        sizes[key] = total
        return total

    size(root, 0)


def loads(text: str, name: str = "<string>") -> Any:
    """Parse YAML text with the bounds above."""
    if len(text) > MAX_BYTES:
        raise ConfigError(f"{name}: {len(text)} characters; a config is at most {MAX_BYTES} characters")
    loader = _BoundedLoader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = (e.problem or e.context or "cannot be read").strip()
        raise ConfigError(f"{_where(loader, mark) or name + ': '}YAML syntax error: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: YAML error: {str(e).splitlines()[0][:200]}") from None
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError(f"{name}: nesting too deep to read") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"{name}: a value is too long to read ({str(e)[:80]})") from None
    finally:
        loader.dispose()


def read_text_file(path: str | Path, what: str, max_bytes: int = MAX_BYTES) -> str:
    """A small UTF-8 text file, or a one-line error naming ``what`` and the problem."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what}: {str(path)!r} is a folder, not a file")
    if not p.is_file():
        raise ConfigError(f"{what}: file not found: {str(path)!r}")
    size = p.stat().st_size
    if size > max_bytes:
        raise ConfigError(f"{what}: {str(path)!r} is {size} bytes; at most {max_bytes} are accepted")
    data = p.read_bytes()
    if b"\x00" in data:
        raise ConfigError(f"{what}: {str(path)!r} is a binary file, not UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{what}: {str(path)!r} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line})") from None


def load_file(path: str | Path, what: str = "config") -> Any:
    return loads(read_text_file(path, what), str(path))
