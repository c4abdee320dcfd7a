"""The pieces of a grid file, each checked as it is read: a bad one is one line naming the file
and the key (ConfigError). byzddp/sweep/grid.py assembles them into a sweep."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Sequence

from byzddp.errors import ConfigError

_SAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


def safe(text: str) -> str:
    return _SAFE.sub("-", str(text)).strip("-") or "x"


def err(path: Path, key: str, problem: str) -> ConfigError:
    return ConfigError(f"grid file {path}: {key}: {problem}")


def find_file(name: str, grid_path: Path) -> Path:
    """A path as given (working directory), else beside the grid file or in one of its parents."""
    p = Path(name)
    if p.is_absolute() or p.is_file():
        return p.resolve()
    for folder in [grid_path.parent.resolve(), *grid_path.parent.resolve().parents]:
        if (folder / p).is_file():
            return folder / p
    raise err(grid_path, "base", f"'{name}' not found from the working directory nor from the "
                                  f"grid file's folder; give a path that exists")


def mapping(path: Path, key: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise err(path, key, f"expected a mapping of dotted.key: value, got {value!r}")
    return value


def dotted(path: Path, key: str, tree: dict) -> Dict[str, Any]:
    """Accept both {a.b: 1} and {a: {b: 1}}; return flat dotted keys."""
    flat: Dict[str, Any] = {}
    for k, v in mapping(path, key, tree).items():
        if isinstance(v, dict):
            for kk, vv in dotted(path, f"{key}.{k}", v).items():
                flat[f"{k}.{kk}"] = vv
        else:
            flat[str(k)] = v
    return flat


def value_segment(key: str, value: Any) -> str:
    if isinstance(value, str):
        return safe(value)
    return safe(f"{key.split('.')[-1]}{value}")


def as_axes(path: Path, key: str, spec: Any, known: Sequence[str]) -> List[str]:
    if spec is None:
        return []
    names = [spec] if isinstance(spec, str) else spec
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise err(path, key, f"expected an axis name or a list of them, got {spec!r}")
    for n in names:
        if n not in known:
            raise err(path, key, f"'{n}' is not an axis of this sweep; axes: {', '.join(known) or 'none'}")
    return names


def condition(path: Path, key: str, cond: Any) -> Dict[str, list]:
    cond = mapping(path, key, cond)
    if not cond:
        raise err(path, key, "an empty condition matches everything; name at least one key")
    return {str(k): (v if isinstance(v, list) else [v]) for k, v in cond.items()}
