"""YAML as configs and sweep grids are read: `1e-3` is a float, a key given twice is an error,
and a document that would expand without bound (aliases of aliases, a recursive anchor, nesting
without end) is refused before it is built. A leaf: imports nothing of ours."""
from __future__ import annotations

import re

import yaml


class YAMLExpansionError(yaml.YAMLError):
    """A YAML document that would expand without bound (aliases of aliases, a recursive anchor,
    nesting without end)."""


# Values a YAML document may expand to. Anchors and aliases share a node, so nine nested
# aliases of nine (a few hundred bytes) stand for 9**9 values once copied, hashed or checked;
# a real config has hundreds.
MAX_YAML_VALUES = 100_000
# Levels of nesting: a config has 3 or 4, a sweep's grid 5. PyYAML's scanner takes time in the
# square of the depth and its composer recurses, so deeper is refused as it is read.
MAX_YAML_DEPTH = 64


class _DepthLimit:
    """A loader's composer that stops at MAX_YAML_DEPTH levels."""
    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise YAMLExpansionError(f"it is nested more than {MAX_YAML_DEPTH} levels deep; flatten it")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _Loader(_DepthLimit, yaml.SafeLoader):
    """YAML as users write it: `1e-3` is a float (YAML 1.1 reads it as a string), and a key
    given twice in one mapping is an error rather than silently the last one."""

    yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(f"key '{key}' is given twice (line {key_node.start_mark.line + 1}); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(yaml.YAMLError):
    pass


# Exponent without a dot (1e-3, 5E4): YAML 1.2 floats that YAML 1.1's resolver misses.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _expanded_size(root) -> int:
    """How many values the node graph stands for with every alias written out, counted on the
    graph itself (each node once; an alias's node was read before it, so the walk is as deep
    as the text). Raises YAMLExpansionError past MAX_YAML_VALUES, past MAX_YAML_DEPTH levels
    through aliases, or on an alias inside itself, before anything is built."""
    seen: dict = {}      # id(node) -> (values, levels)
    open_: set = set()

    def walk(node) -> tuple:
        key = id(node)
        if key in seen:
            return seen[key]
        if key in open_:
            raise YAMLExpansionError("an alias refers to a node that contains it (a recursive anchor); "
                                     "write the values out")
        open_.add(key)
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        below = [walk(child) for child in children]
        open_.discard(key)
        values, levels = 1 + sum(v for v, _ in below), 1 + max((d for _, d in below), default=0)
        if values > MAX_YAML_VALUES:
            raise YAMLExpansionError(f"its anchors and aliases expand to more than {MAX_YAML_VALUES:,} values; "
                                     f"write the values out or use fewer aliases")
        if levels > MAX_YAML_DEPTH:
            raise YAMLExpansionError(f"it is nested more than {MAX_YAML_DEPTH} levels deep through its "
                                     f"aliases; flatten it")
        seen[key] = values, levels
        return seen[key]

    return walk(root)[0]


def read_yaml(text: str, loader=None):
    """YAML text -> Python values (config files, override values, sweep grids), refusing a
    document that expands without bound (YAMLExpansionError) before it is built. `loader`:
    a yaml Loader class (default: the config's)."""
    loader = loader or _Loader
    if not issubclass(loader, _DepthLimit):
        loader = type(loader.__name__, (_DepthLimit, loader), {})
    reader = loader(text)
    try:
        node = reader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return reader.construct_document(node)
    finally:
        reader.dispose()
