"""Names that are import paths: a researcher's own model, dataset, rule or attack.

Wherever the config chooses a component by name (model.name, data.dataset, aggregator.name,
attack.name), a name of the form `package.module:attribute` (or, as Hydra's `_target_`,
`package.module.attribute`) is imported instead of looked up among the built-in names. The
module is found like any Python import: on sys.path, so on PYTHONPATH, and in the current
directory (appended last, as `python -m` would put it first; a built-in module is never
shadowed). Every failure is one ConfigError line naming the key: the module does not import,
the attribute is missing, or the object is the wrong kind (checked by the component's builder).
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from byzddp.errors import ConfigError


def is_path(name: str) -> bool:
    """Whether `name` is an import path rather than a built-in name (built-in names hold
    neither ':' nor '.')."""
    return ":" in name or "." in name


def split(name: str) -> tuple:
    """`pkg.mod:attr` or `pkg.mod.attr` -> ('pkg.mod', 'attr')."""
    module, sep, attr = name.partition(":") if ":" in name else name.rpartition(".")
    return module, attr


def load(key: str, name: str) -> Any:
    """The object the import path `name` (set by config key `key`) names."""
    module_name, attr = split(name)
    if not module_name or not attr or ":" in attr:
        raise ConfigError(f"config key {key}: '{name}' is not an import path; write it as "
                          f"package.module:attribute")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):   # the path itself, not one of its imports
            raise ConfigError(f"config key {key}: cannot import module '{module_name}' of '{name}' "
                              f"(no module named '{e.name}'); put its folder on PYTHONPATH or run "
                              f"from the folder that holds it") from None
        raise ConfigError(f"config key {key}: importing module '{module_name}' of '{name}' failed: "
                          f"{_first_line(e)}") from None
    except Exception as e:  # the user's module raised while importing: its message, one line
        raise ConfigError(f"config key {key}: importing module '{module_name}' of '{name}' failed: "
                          f"{_first_line(e)}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"config key {key}: module '{module_name}' has no attribute '{attr}'; "
                          f"check the name after the ':'") from None


def kind_error(key: str, name: str, expected: str, got: Any) -> ConfigError:
    """The one line for an object of the wrong kind."""
    what = got.__name__ if isinstance(got, type) else type(got).__name__
    return ConfigError(f"config key {key}: '{name}' is a {what}, not {expected}")


def built_in_args_error(name_key: str, what: str, attr: str, name: str) -> ConfigError:
    """The one line for keywords (`<section>.args`) given to a built-in `name` at `name_key`:
    only a plug-in `what` (package.module:`attr`) takes them."""
    args_key = name_key.split(".")[0] + ".args"
    return ConfigError(f"config key {args_key}: only a plug-in {what} ({name_key}=package.module:{attr}) "
                       f"takes keywords; {name} is built in (remove {args_key})")


def _first_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
