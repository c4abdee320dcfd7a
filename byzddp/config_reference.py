"""This page lists every configuration key: its type, its default and what it means. It is
generated from the dataclasses in byzddp/config.py and the comment beside each field, by
`python -m byzddp.config_reference > docs/configuration.md`; tests/test_config_reference.py
checks that the page matches the code, so edit the comments there and regenerate.
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import re
import tokenize
import typing

import yaml

from byzddp import config


def _comments(cls) -> dict:
    """Field name -> its trailing comment, continuation comment-only lines joined."""
    source = inspect.getsource(cls)
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    names = {f.name for f in dataclasses.fields(cls)}
    found, current = {}, None
    for number, line in enumerate(source.splitlines(), 1):
        match = re.match(r"\s+(\w+)\s*:", line)
        if match and match.group(1) in names:
            current = match.group(1)
            found[current] = comments.get(number, "")
        elif current and line.strip().startswith("#"):    # a continuation line
            found[current] = f"{found[current]} {comments[number]}".strip()
        else:
            current = None
    return found


def _type(hint) -> str:
    """int, list of int, optional str, mapping, ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union and type(None) in args:
        return "optional " + _type(next(a for a in args if a is not type(None)))
    if origin is list:
        return "list of " + _type(args[0])
    if origin is dict:
        return "mapping"
    return hint.__name__


def _yaml(value) -> str:
    """A default as a YAML flow value: null, true, [200], {}, 'off'."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text.removesuffix("...").strip()


def _rows(cls, prefix: str, missing: list) -> list:
    """One table row per field; the keys of fields without a comment go to `missing`."""
    hints, comments, default = typing.get_type_hints(cls), _comments(cls), cls()
    rows = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            continue    # a section: a table of its own
        if not comments.get(f.name):
            missing.append(prefix + f.name)
        cells = (f"`{prefix}{f.name}`", _type(hints[f.name]), f"`{_yaml(getattr(default, f.name))}`",
                 comments.get(f.name, ""))
        rows.append("| " + " | ".join(cell.replace("|", r"\|") for cell in cells) + " |")
    return rows


def markdown() -> str:
    header, missing = ["| key | type | default | meaning |", "|---|---|---|---|"], []
    parts = ["# Configuration reference", " ".join(__doc__.split()), "## top level",
             "\n".join(header + _rows(config.Config, "", missing))]
    for f in dataclasses.fields(config.Config):
        section = typing.get_type_hints(config.Config)[f.name]
        if dataclasses.is_dataclass(section):
            parts += [f"## {f.name}", "\n".join(header + _rows(section, f"{f.name}.", missing))]
    if missing:
        raise ValueError(f"config fields without a comment in byzddp/config.py: {', '.join(missing)}; "
                         f"write what each means after the field")
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
