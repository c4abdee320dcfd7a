"""docs/configuration.md: generated from byzddp/config.py and checked against its dataclasses."""
import dataclasses
import re
import typing
from typing import Any, Dict, List, Optional

import pytest
import yaml

from byzddp import config, config_reference

REGENERATE = "python -m byzddp.config_reference > docs/configuration.md"


def _keys(tree: dict, cls, prefix: str = "") -> dict:
    """Dotted key -> default, walking into sections only (a mapping field such as data.args is a key)."""
    hints, keys = typing.get_type_hints(cls), {}
    for name, value in tree.items():
        if dataclasses.is_dataclass(hints[name]):
            keys.update(_keys(value, hints[name], f"{prefix}{name}."))
        else:
            keys[prefix + name] = value
    return keys


@pytest.fixture(scope="module")
def rows() -> list:
    """The page's table rows as [key, type, default, meaning], `|` unescaped."""
    table = [line for line in config_reference.markdown().splitlines()
             if line.startswith("| `")]
    cells = [re.split(r"(?<!\\)\|", line)[1:-1] for line in table]
    return [[c.strip().replace(r"\|", "|") for c in row] for row in cells]


def _unquote(cell: str) -> str:
    assert cell.startswith("`") and cell.endswith("`"), cell
    return cell[1:-1]


def test_page_is_up_to_date(root):
    page = root / "docs" / "configuration.md"
    text = page.read_text(encoding="utf-8") if page.is_file() else ""
    assert text == config_reference.markdown(), f"docs/configuration.md is stale; run {REGENERATE}"


def test_every_key_in_exactly_one_row(rows):
    keys = _keys(config.to_dict(config.Config()), config.Config)
    named = [_unquote(row[0]) for row in rows]
    assert sorted(named) == sorted(keys)    # each key once, and no key that does not exist


def test_defaults_match_the_dataclasses(rows):
    keys = _keys(config.to_dict(config.Config()), config.Config)
    for row in rows:
        key, default = _unquote(row[0]), keys[_unquote(row[0])]
        parsed = yaml.safe_load(_unquote(row[2]))
        assert parsed == default and type(parsed) is type(default), (key, row[2], default)


@pytest.mark.parametrize("key, hint, text", [
    ("seed", int, "int"), ("train.steps", int, "int"), ("train.lr", float, "float"),
    ("workers.vectorize", bool, "bool"), ("data.dataset", str, "str"),
    ("data.classes", Optional[int], "optional int"), ("attack.z", Optional[float], "optional float"),
    ("model.hidden", List[int], "list of int"), ("log.tags", List[str], "list of str"),
    ("attack.args", Dict[str, Any], "mapping")])
def test_type_column(rows, key, hint, text):
    *sections, name = key.split(".")
    cls = config.Config
    for section in sections:
        cls = typing.get_type_hints(cls)[section]
    assert typing.get_type_hints(cls)[name] == hint
    (row,) = [row for row in rows if _unquote(row[0]) == key]
    assert row[1] == text


def test_every_meaning_is_written(rows):
    assert rows and all(row[3] for row in rows), [row[0] for row in rows if not row[3]]


@dataclasses.dataclass
class _Example:
    a: int = 1          # first line
                        # | second line
    b: str = "#"
    c: bool = True      # own line


def test_comments_are_read_from_the_source():
    assert config_reference._comments(_Example) == {"a": "first line | second line", "b": "", "c": "own line"}
