"""YAML read safely: ``yaml.SafeLoader`` (no tags that run code) with size, nesting depth and alias
expansion bounded. Used for recipes, ``--set`` values and ``--data-kwargs``."""

from __future__ import annotations

from typing import Any

import yaml

# Bounds on what a recipe's YAML may ask of the parser: a recipe is a page of settings, so these are
# far above any real one, and low enough that a hostile file is refused in milliseconds (a 5 KB
# "billion laughs" file expands to 10^9 values; `&a [*a]` refers to itself; 5000 nested brackets
# overflow a recursive walk).
MAX_YAML_BYTES = 1_000_000
MAX_YAML_DEPTH = 64
MAX_YAML_VALUES = 100_000  # values after expanding aliases (each use of an anchor counts again)


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses nesting deeper than :data:`MAX_YAML_DEPTH` while composing."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _expanded_size(root: yaml.Node) -> int:
    """How many values ``root`` holds once every alias is expanded; refuses an alias inside its own anchor.

    Memoised per node, so a billion-laughs file is measured in as many steps as it has nodes.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise yaml.composer.ComposerError(None, None, "an alias refers to the value that contains it", node.start_mark)
        active.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(size(v) for v in node.value)
        active.discard(key)
        sizes[key] = total = min(total, MAX_YAML_VALUES + 1)
        if total > MAX_YAML_VALUES:
            raise yaml.composer.ComposerError(
                None, None, f"expands to more than {MAX_YAML_VALUES:,} values (aliases used too often)", node.start_mark
            )
        return total

    return size(root)


def safe_yaml(text: str) -> tuple[Any, yaml.Node | None]:
    """``yaml.safe_load`` with bounded size, nesting depth and alias expansion; also returns the node tree.

    Raises:
        yaml.YAMLError: malformed YAML, or YAML over the bounds (the message says which).
    """
    if len(text) > MAX_YAML_BYTES:
        raise yaml.YAMLError(f"{len(text):,} characters; a recipe may have at most {MAX_YAML_BYTES:,}")
    loader = _BoundedLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None
        _expanded_size(root)
        return loader.construct_document(root), root
    finally:
        loader.dispose()
