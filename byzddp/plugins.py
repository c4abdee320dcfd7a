"""Names to objects: the built-in components and a researcher's own model, dataset, rule or attack.

Wherever the config chooses a component by name (model.name, data.dataset, aggregator.name,
attack.name), a name of the form `package.module:attribute` (or, as Hydra's `_target_`,
`package.module.attribute`) is imported instead of looked up among the built-in names. The
module is found like any Python import: on sys.path, so on PYTHONPATH, and in the current
directory (appended last, as `python -m` would put it first; a built-in module is never
shadowed). Every failure is one ConfigError line naming the key: the module does not import,
the attribute is missing, or the object is the wrong kind.

This module is the one place where a name becomes an object, for every kind: each kind
(`register`) brings its table of built-in names and what a plug-in of it must be; `resolve`
looks a name up in the table or imports it, with the same lines for every kind. Keywords
(`<section>.args`) are checked here too (`check_args`): refused for a built-in, and for a
plug-in each one against the signature's default (a number where the default is a number).
Calling a plug-in goes through `call`: whatever it raises is one line naming the key, the
exception and the user's own file and line.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from byzddp.errors import ConfigError


def is_path(name: str) -> bool:
    """Whether `name` is an import path rather than a built-in name (built-in names hold
    neither ':' nor '.')."""
    return ":" in name or "." in name


def split(name: str) -> tuple:
    """`pkg.mod:attr` or `pkg.mod.attr` -> ('pkg.mod', 'attr')."""
    module, sep, attr = name.partition(":") if ":" in name else name.rpartition(".")
    return module, attr


@dataclass(frozen=True)
class Kind:
    """A kind of component the config names: its key, its built-in table, and what a plug-in
    of it must be."""
    key: str                        # the config key that names one: "model.name"
    noun: str                       # in messages: "model"
    attr: str                       # the hint's word after ':': package.module:factory
    built_in: Mapping[str, Any]     # built-in name -> its object (a class, a builder)
    expected: str                   # what a plug-in must be: "a callable that returns an nn.Module"
    accepts: Callable[[Any], bool]  # whether an imported object is of this kind
    args_fix: str                   # how to set a built-in's parameters instead of <section>.args

    @property
    def args_key(self) -> str:
        return self.key.split(".")[0] + ".args"


_KINDS: dict = {}


def register(key: str, noun: str, attr: str, built_in: Mapping[str, Any], expected: str,
             accepts: Callable[[Any], bool], args_fix: Optional[str] = None) -> Kind:
    """Make `key` resolvable: called once by the module that holds the kind's built-in table."""
    kind = Kind(key, noun, attr, built_in, expected, accepts, args_fix or f"remove {key.split('.')[0]}.args")
    _KINDS[key] = kind
    return kind


def kind(key: str) -> Kind:
    return _KINDS[key]


def resolve(key: str, name: str) -> Any:
    """The object `name` (set by config key `key`) stands for: a built-in's table entry, or
    what its import path names, checked to be of the kind. Every failure is one line."""
    k = _KINDS[key]
    if not is_path(name):
        if name in k.built_in:
            return k.built_in[name]
        raise ConfigError(f"config key {key}: '{name}' is not one of {', '.join(k.built_in)}; or name your own "
                          f"{k.noun} as package.module:{k.attr}")
    obj = load(key, name)
    if not k.accepts(obj):
        raise kind_error(key, name, k.expected, obj)
    return obj


def check_args(key: str, name: str, args: Mapping[str, Any], target: Any = None) -> None:
    """`<section>.args` of the component `name` at `key`: none for a built-in; for a plug-in
    `target` (the callable they go to), each value of the type its default has."""
    k = _KINDS[key]
    if not args:
        return
    if not is_path(name):
        raise built_in_args_error(key, k.noun, k.attr, name, k.args_fix)
    if target is None:
        return
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):     # a builtin or C callable: nothing to compare against
        return
    for arg, value in args.items():
        p = parameters.get(arg)
        if p is None or p.default is inspect.Parameter.empty or p.default is None:
            continue
        want = _type_of(p.default)
        if want is not None and not _fits(value, want):
            raise ConfigError(f"config key {k.args_key}.{arg}: {value!r} is a {type(value).__name__}, but "
                              f"'{name}' takes {_NOUNS[want]} (its default is {p.default!r}); give "
                              f"{k.args_key}.{arg} {_NOUNS[want]}")


_NOUNS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _type_of(default: Any) -> Optional[type]:
    for t in (bool, int, float, str):   # bool first: True is an int too
        if isinstance(default, t):
            return t
    return None


def _fits(value: Any, want: type) -> bool:
    if want is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if want is float:
        return isinstance(value, (int, float))
    return isinstance(value, want)


def call(key: str, name: str, fn: Callable, how: str, *args, **kwargs) -> Any:
    """fn(*args, **kwargs) for the plug-in `name` at `key`; `how` says how it is called (for a
    call its signature does not take). Anything it raises is one line: the exception, and the
    line of the user's code that raised it."""
    try:
        return fn(*args, **kwargs)
    except ConfigError:
        raise
    except Exception as e:
        tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
        if tb is None and isinstance(e, TypeError):  # the call itself: a keyword it does not take
            raise ConfigError(f"config key {key}: calling '{name}' failed ({e}); it is called with {how}") from None
        raise raised(key, name, e) from None


def raised(key: str, name: str, e: BaseException, when: str = "") -> ConfigError:
    """The one line for the plug-in `name` at `key` that raised `e`: its type, its message and
    the line of the user's code that raised it."""
    return ConfigError(f"config key {key}: '{name}' raised {_first_line(e)}{_where(e)}{when}")


def _where(e: BaseException) -> str:
    """' (at file:line)' of the innermost frame outside byzddp and the Python installation."""
    ours = os.path.dirname(os.path.abspath(__file__))
    installed = {os.path.abspath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    for frame in reversed(traceback.extract_tb(e.__traceback__)):
        path = os.path.abspath(frame.filename)
        if path.startswith(ours + os.sep) or any(path.startswith(p + os.sep) for p in installed):
            continue
        if frame.filename.startswith("<"):
            continue
        return f" (at {frame.filename}:{frame.lineno})"
    return ""


def load(key: str, name: str) -> Any:
    """The object the import path `name` (set by config key `key`) names."""
    module_name, attr = split(name)
    colon = ":" in name
    if colon and module_name and not attr:
        raise ConfigError(f"config key {key}: '{name}' names no attribute after the ':'; write it as "
                          f"{module_name}:<name of the object in it>")
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
        obj = getattr(module, attr)
    except AttributeError:
        pass
    else:
        if isinstance(obj, type(sys)):      # a module: the object in it is still to be named
            raise ConfigError(f"config key {key}: '{name}' is a module; name the object in it as "
                              f"{obj.__name__}:<attribute>")
        return obj
    if not colon:   # package.module.attribute, or maybe a module named in full
        try:
            importlib.import_module(name)
        except Exception:
            raise ConfigError(f"config key {key}: module '{module_name}' has no attribute '{attr}'; check "
                              f"the name after the last '.' (or write it as package.module:attribute)") from None
        raise ConfigError(f"config key {key}: '{name}' is a module; name the object in it as "
                          f"{name}:<attribute>") from None
    raise ConfigError(f"config key {key}: module '{module_name}' has no attribute '{attr}'; "
                      f"check the name after the ':'") from None


def kind_error(key: str, name: str, expected: str, got: Any) -> ConfigError:
    """The one line for an object of the wrong kind."""
    what = got.__name__ if isinstance(got, type) else type(got).__name__
    return ConfigError(f"config key {key}: '{name}' is a {what}, not {expected}")


def built_in_args_error(name_key: str, what: str, attr: str, name: str, fix: Optional[str] = None) -> ConfigError:
    """The one line for keywords (`<section>.args`) given to a built-in `name` at `name_key`:
    only a plug-in `what` (package.module:`attr`) takes them."""
    args_key = name_key.split(".")[0] + ".args"
    return ConfigError(f"config key {args_key}: only a plug-in {what} ({name_key}=package.module:{attr}) "
                       f"takes keywords; {name} is built in ({fix or f'remove {args_key}'})")


def _first_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
