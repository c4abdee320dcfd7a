"""Sweeps: expand a grid file into runs, run them, then write results.csv, results.md and plots.

    python -m byzddp.sweep GRID.yaml [dotted.key=value ...] [--jobs K] [--nproc N]
                           [--list-only | --slurm | --report-only] [--out DIR] [--name NAME]
                           [--wandb off|offline|online]

Grid file (YAML)
----------------
    name: fig3                  # sweep name: W&B group and output folder runs/sweeps/<name>
    base: configs/default.yaml  # base config (default: configs/default.yaml, as train.py):
                                # relative to the working directory, else to the grid
                                # file's folder or one of its parents
    set: {train.steps: 600}     # fixed overrides for every run
    cases:                      # named bundles of overrides; each case axis is crossed with
      rule:                     # the other axes (axis name: a word without a dot)
        krum: {aggregator.name: krum}
        rfa-T1: {aggregator.name: rfa, aggregator.T: 1}
    grid:                       # cartesian product over these dotted keys
      attack.name: [none, bitflip, mimic2]
      resampling.name: [none, s_replacement]
    seeds: [0, 1, 2]            # default [0]
    when:                       # dependent overrides, in order, after set, cases and grid
      - if: {attack.name: mimic2}            # every key must match; a list means "any of"
        set: {data.partition: two_groups}
    exclude:                    # drop the points that match any of these conditions
      - {rule: krum, resampling.name: fixed_groups}
    reference:                  # one extra run per remaining point: the f = 0 dotted lines
      label: f=0
      set: {attack.name: none, workers.n: 8, workers.byzantine: 0}
    table: {rows: rule, columns: attack.name, split: resampling.name}
    plots:
      - {kind: curves, rows: attack.name, columns: rule, hue: resampling.name}
      - {kind: selection, columns: resampling.name, where: {rule: krum}}
      - {kind: heatmap, rows: rule, columns: attack.name, split: resampling.name}

Conditions (`if`, `exclude`, `where`) name a case axis (matched against the case's name) or
a dotted config key (matched against the run's resolved value). Overrides apply in this
order: base file < set < cases and grid (in axis order: cases, then grid) < reference.set <
when < command-line overrides < seed. A command-line override may not name a swept key;
with overrides and no --name, the sweep's name gets their values appended (fig3 with
data.dataset=mnist is fig3-mnist), so the two never resume from each other's runs.

An axis is dropped from a reference run when the reference's `set` gives every key the
axis sets (above: attack.name), so there is one reference run per (rule, resampling, seed),
drawn dotted in every attack's panel and shown as an extra "f=0" column in the tables.

Run ids are the axis values in order (case names; grid strings as they are; numbers and
booleans after the key's last part, e.g. momentum0.9), then seed<k>, joined by '-';
reference ids start with 'ref-'. Each run is `train.py [--config BASE] <overrides>
log.dir=<out>/runs log.name=<id> log.wandb_group=<name> log.tags=[...]`; its console output
goes to <out>/logs/<id>.log. A run is finished when <out>/runs/<id>/summary.json holds the
config_hash of the run's resolved config; finished runs are never run again (resume). A run
folder of another config (its summary.json or config.yaml says so) is moved to <out>/stale/
before the run starts; an unfinished one of the same config is continued (train.resume=auto).

Table and plot layouts name axes; `rows`, `columns`, `split` and `hue` take one axis or a
list. Axes a layout leaves out (other than the seed) become separate tables or figure files.
"""
from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import io
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from byzddp import config as config_mod
from byzddp.config import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"   # what train.py reads without --config
GRID_KEYS = ("name", "base", "set", "cases", "grid", "seeds", "when", "exclude", "reference",
             "table", "plots")
METRICS = ("final_test_accuracy", "final_test_accuracy_last5", "best_test_accuracy",
           "final_test_loss", "steps", "wall_seconds", "byzantine_declared", "byzantine_real",
           "attack", "config_hash")
PLOT_KINDS = ("curves", "selection", "heatmap")
_SAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


# ---------------------------------------------------------------------------- the grid

@dataclass
class Value:
    label: str                       # shown in tables, plots, tags and CSV
    segment: str                     # its part of a run id
    overrides: Dict[str, Any]        # dotted key -> value


@dataclass
class Axis:
    name: str                        # case axis name, or the dotted key of a grid axis
    values: List[Value]
    is_case: bool

    @property
    def keys(self) -> set:
        return {k for v in self.values for k in v.overrides}

    def labels(self) -> List[str]:
        return [v.label for v in self.values]


@dataclass
class Run:
    id: str
    role: str                        # main | reference
    point: Dict[str, str]            # axis name -> value label (reference: dropped axes absent)
    seed: int
    overrides: Dict[str, Any]        # dotted key -> value, in application order
    hash: str = ""                   # config_hash of the resolved config

    def override_args(self) -> List[str]:
        return [f"{k}={yaml_scalar(v)}" for k, v in self.overrides.items()]

    def tags(self) -> List[str]:
        tags = [f"{a}={label}" for a, label in self.point.items()] + [f"seed={self.seed}"]
        return tags + (["reference"] if self.role == "reference" else [])


@dataclass
class Sweep:
    name: str
    path: Path                       # the grid file
    base: Optional[Path]
    axes: List[Axis]
    seeds: List[int]
    reference_label: str
    table: Dict[str, Any]
    plots: List[Dict[str, Any]]
    out: Path
    runs: List[Run] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)   # axes reference runs leave out
    notes: List[str] = field(default_factory=list)     # config warnings, one per run

    @property
    def runs_dir(self) -> Path:
        return self.out / "runs"

    def axis(self, name: str) -> Axis:
        return next(a for a in self.axes if a.name == name)


def yaml_scalar(value: Any) -> str:
    """A value as train.py's override parser (YAML) reads it back."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10 ** 9).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")].strip()
    return text


def _safe(text: str) -> str:
    return _SAFE.sub("-", str(text)).strip("-") or "x"


def _err(path: Path, key: str, problem: str) -> ConfigError:
    return ConfigError(f"grid file {path}: {key}: {problem}")


def _find_file(name: str, grid_path: Path) -> Path:
    """A path as given (working directory), else beside the grid file or in one of its parents."""
    p = Path(name)
    if p.is_absolute() or p.is_file():
        return p.resolve()
    for folder in [grid_path.parent.resolve(), *grid_path.parent.resolve().parents]:
        if (folder / p).is_file():
            return folder / p
    raise _err(grid_path, "base", f"'{name}' not found from the working directory nor from the "
                                  f"grid file's folder; give a path that exists")


def _mapping(path: Path, key: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _err(path, key, f"expected a mapping of dotted.key: value, got {value!r}")
    return value


def _dotted(path: Path, key: str, tree: dict) -> Dict[str, Any]:
    """Accept both {a.b: 1} and {a: {b: 1}}; return flat dotted keys."""
    flat: Dict[str, Any] = {}
    for k, v in _mapping(path, key, tree).items():
        if isinstance(v, dict):
            for kk, vv in _dotted(path, f"{key}.{k}", v).items():
                flat[f"{k}.{kk}"] = vv
        else:
            flat[str(k)] = v
    return flat


def _value_segment(key: str, value: Any) -> str:
    if isinstance(value, str):
        return _safe(value)
    return _safe(f"{key.split('.')[-1]}{value}")


def _as_axes(path: Path, key: str, spec: Any, known: Sequence[str]) -> List[str]:
    if spec is None:
        return []
    names = [spec] if isinstance(spec, str) else spec
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _err(path, key, f"expected an axis name or a list of them, got {spec!r}")
    for n in names:
        if n not in known:
            raise _err(path, key, f"'{n}' is not an axis of this sweep; axes: {', '.join(known) or 'none'}")
    return names


def _parse_condition(path: Path, key: str, cond: Any) -> Dict[str, list]:
    cond = _mapping(path, key, cond)
    if not cond:
        raise _err(path, key, "an empty condition matches everything; name at least one key")
    return {str(k): (v if isinstance(v, list) else [v]) for k, v in cond.items()}


def _deep_merge(into: dict, tree: dict) -> dict:
    for k, v in tree.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _deep_merge(into[k], v)
        else:
            into[k] = copy.deepcopy(v)
    return into


class _Resolver:
    """Values of dotted keys before validation: defaults < base file < overrides."""

    def __init__(self, base: Optional[Path]):
        self.tree = config_mod.to_dict(config_mod.Config())
        if base is not None:
            try:
                _deep_merge(self.tree, yaml.safe_load(base.read_text()) or {})
            except yaml.YAMLError:
                raise ConfigError(f"config file {base} is not valid YAML; fix its syntax") from None

    def value(self, key: str, overrides: Dict[str, Any]) -> Any:
        if key in overrides:
            return overrides[key]
        node: Any = self.tree
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node


def _matches(cond: Dict[str, list], point: Dict[str, str], overrides: Dict[str, Any],
             resolver: _Resolver, case_axes: set) -> bool:
    for key, allowed in cond.items():
        if key in case_axes:
            if point.get(key) not in [str(a) for a in allowed]:
                return False
        elif resolver.value(key, overrides) not in allowed:
            return False
    return True


def load_grid(path: str | Path, extra: Sequence[str] = (), name: Optional[str] = None,
              out: Optional[str | Path] = None) -> Sweep:
    """Read a grid file and expand it into runs (ids, overrides, resolved config hashes).

    `extra` are command-line `dotted.key=value` overrides for every run. Every run's config
    is loaded and validated here, so a bad point fails before anything starts.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file {path} does not exist; pass an existing YAML file")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"grid file {path} is not valid YAML; fix its syntax") from None
    if not isinstance(spec, dict):
        raise _err(path, "<root>", "expected a mapping with keys " + ", ".join(GRID_KEYS))
    for key in spec:
        if key not in GRID_KEYS:
            raise _err(path, str(key), f"unknown key; valid keys: {', '.join(GRID_KEYS)}")

    sweep_name = _safe(name or spec.get("name") or path.stem)
    # Without a base, train.py reads configs/default.yaml: hash the same config it will run.
    base = _find_file(str(spec["base"]), path) if spec.get("base") else (
        DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    fixed = _dotted(path, "set", spec.get("set"))

    axes: List[Axis] = []
    for axis_name, bundles in _mapping(path, "cases", spec.get("cases")).items():
        axis_name = str(axis_name)
        if "." in axis_name or axis_name == "seed":
            raise _err(path, f"cases.{axis_name}", "a case axis name is a word without a dot, "
                                                   "not 'seed'; rename it (e.g. rule)")
        bundles = _mapping(path, f"cases.{axis_name}", bundles)
        if not bundles:
            raise _err(path, f"cases.{axis_name}", "give at least one case")
        values = [Value(str(c), _safe(c), _dotted(path, f"cases.{axis_name}.{c}", b))
                  for c, b in bundles.items()]
        axes.append(Axis(axis_name, values, is_case=True))
    for key, values in _mapping(path, "grid", spec.get("grid")).items():
        key = str(key)
        if not isinstance(values, list) or not values:
            raise _err(path, f"grid.{key}", f"expected a non-empty list of values, got {values!r}")
        if len(set(map(yaml_scalar, values))) != len(values):
            raise _err(path, f"grid.{key}", "values repeat; list each value once")
        axes.append(Axis(key, [Value(str(v), _value_segment(key, v), {key: v}) for v in values],
                         is_case=False))
    axis_names = [a.name for a in axes]
    case_axes = {a.name for a in axes if a.is_case}

    seeds = spec.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) else seeds
    if not isinstance(seeds, list) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise _err(path, "seeds", f"expected a non-empty list of integers, got {seeds!r}")

    when = []
    for i, rule in enumerate(spec.get("when") or []):
        rule = _mapping(path, f"when[{i}]", rule)
        if set(rule) != {"if", "set"}:
            raise _err(path, f"when[{i}]", "write each rule as {if: {key: value}, set: {key: value}}")
        when.append((_parse_condition(path, f"when[{i}].if", rule["if"]),
                     _dotted(path, f"when[{i}].set", rule["set"])))
    exclude = [_parse_condition(path, f"exclude[{i}]", c) for i, c in enumerate(spec.get("exclude") or [])]

    reference = spec.get("reference")
    ref_set: Optional[Dict[str, Any]] = None
    ref_label = "reference"
    if reference is not None:
        reference = _mapping(path, "reference", reference)
        if "set" not in reference or set(reference) - {"set", "label"}:
            raise _err(path, "reference", "write it as {label: f=0, set: {key: value, ...}}")
        ref_set = _dotted(path, "reference.set", reference["set"])
        ref_label = str(reference.get("label", ref_label))

    cli: Dict[str, Any] = {}
    for text in extra:
        parts, value = config_mod.parse_override(text)
        cli[".".join(parts)] = value
    swept = set().union(*(a.keys for a in axes)) if axes else set()
    for key in cli:
        if key in swept:
            raise ConfigError(f"override {key}=... names a key the grid sweeps; edit {path} instead")
    if cli and not name:
        # Another setting is another sweep: keep its runs apart (fig3 + data.dataset=mnist
        # -> fig3-mnist) so that neither resumes from the other's results.
        sweep_name = "-".join([sweep_name, *(_value_segment(k, v) for k, v in cli.items())])

    table = _mapping(path, "table", spec.get("table"))
    for k in table:
        if k not in ("rows", "columns", "split", "metric"):
            raise _err(path, f"table.{k}", "unknown key; valid: rows, columns, split, metric")
    table = {
        "rows": _as_axes(path, "table.rows", table.get("rows", axis_names[:1]), axis_names),
        "columns": _as_axes(path, "table.columns", table.get("columns", axis_names[1:2]), axis_names),
        "split": _as_axes(path, "table.split", table.get("split"), axis_names),
        "metric": str(table.get("metric", "final_test_accuracy_last5")),
    }
    plots = []
    raw_plots = spec.get("plots")
    if raw_plots is None:
        raw_plots = [{"kind": "curves", "rows": table["rows"], "columns": table["columns"],
                      "hue": table["split"]},
                     {"kind": "heatmap", "rows": table["rows"], "columns": table["columns"],
                      "split": table["split"]}]
    if not isinstance(raw_plots, list):
        raise _err(path, "plots", "expected a list of {kind: curves|selection|heatmap, ...}")
    for i, p in enumerate(raw_plots):
        p = _mapping(path, f"plots[{i}]", p)
        if p.get("kind") not in PLOT_KINDS:
            raise _err(path, f"plots[{i}].kind", f"'{p.get('kind')}' is not one of {', '.join(PLOT_KINDS)}")
        allowed = {"kind", "rows", "columns", "where", "file",
                   "hue" if p["kind"] == "curves" else "split"}
        for k in p:
            if k not in allowed:
                raise _err(path, f"plots[{i}].{k}", f"unknown key; valid: {', '.join(sorted(allowed))}")
        plot = {"kind": p["kind"], "file": p.get("file")}
        for k in ("rows", "columns", "hue", "split"):
            plot[k] = _as_axes(path, f"plots[{i}].{k}", p.get(k), axis_names)
        plot["where"] = _parse_condition(path, f"plots[{i}].where", p["where"]) if p.get("where") else {}
        plots.append(plot)

    sweep = Sweep(sweep_name, path, base, axes, seeds, ref_label, table, plots,
                  Path(out) if out else Path("runs") / "sweeps" / sweep_name)
    resolver = _Resolver(base)

    def compose(values: Sequence[Value], reference_set: Optional[dict], point: Dict[str, str],
                seed: int) -> Dict[str, Any]:
        ov = dict(fixed)
        for v in values:
            ov.update(v.overrides)
        if reference_set is not None:
            ov.update(reference_set)
        for cond, extra_set in when:
            if _matches(cond, point, ov, resolver, case_axes):
                ov.update(extra_set)
        ov.update(cli)
        ov["seed"] = seed
        return ov

    runs: List[Run] = []
    ids: Dict[str, Run] = {}
    dropped = [a for a in axes if ref_set is not None and a.keys and a.keys <= set(ref_set)]
    for seed in seeds:
        references: List[Run] = []
        for combo in itertools.product(*(a.values for a in axes)):
            point = {a.name: v.label for a, v in zip(axes, combo)}
            ov = compose(combo, None, point, seed)
            if any(_matches(c, point, ov, resolver, case_axes) for c in exclude):
                continue
            segments = [v.segment for v in combo] + [f"seed{seed}"]
            runs.append(Run("-".join(segments), "main", point, seed, ov))
            if ref_set is not None:
                kept = [(a, v) for a, v in zip(axes, combo) if all(a is not d for d in dropped)]
                ref_point = {a.name: v.label for a, v in kept}
                ref_id = "-".join(["ref"] + [v.segment for _, v in kept] + [f"seed{seed}"])
                if ref_id not in {r.id for r in references}:
                    ref_ov = compose([v for _, v in kept], ref_set, ref_point, seed)
                    references.append(Run(ref_id, "reference", ref_point, seed, ref_ov))
        runs.extend(references)
    for run in runs:
        if len(run.id) > 120:  # keep folder names short: a readable head and a digest of the rest
            run.id = f"{run.id[:100]}-{hashlib.sha256(run.id.encode()).hexdigest()[:8]}"
        if run.id in ids:
            raise _err(path, "grid", f"two runs get the id '{run.id}'; give values that differ "
                                     f"after removing characters other than letters, digits and ._+=-")
        ids[run.id] = run
    if not runs:
        raise _err(path, "exclude", "every point is excluded; nothing to run")

    problems = []
    for run in runs:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                cfg = config_mod.load(base, run.override_args())
                run.hash = config_mod.config_hash(cfg)
            except ConfigError as e:
                problems.append(f"run {run.id}: {e}")
        # E.g. a rule run outside its guarantee on purpose (allow_unsafe): say it once.
        sweep.notes += [f"run {run.id}: {w.message}" for w in caught]
    if problems:
        more = f" (and {len(problems) - 1} more runs)" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more)
    sweep.runs = runs
    sweep.dropped = [a.name for a in dropped]
    return sweep


# ---------------------------------------------------------------------------- state of runs

def read_summary(run_dir: Path) -> Optional[dict]:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def folder_hash(run_dir: Path) -> Optional[str]:
    """The config_hash of a run folder: from summary.json when finished, else from the
    config.yaml a started run wrote; None for an empty or missing folder."""
    summary = read_summary(run_dir)
    if summary is not None:
        return str(summary.get("config_hash"))
    try:
        tree = yaml.safe_load((run_dir / "config.yaml").read_text())
    except OSError:
        return None
    except yaml.YAMLError:
        return "unreadable"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return config_mod.config_hash(config_mod.from_dict(tree))
    except (ConfigError, TypeError, AttributeError):
        return "unreadable"


def status(sweep: Sweep, run: Run) -> str:
    """done: a summary of this run's config; pending: nothing yet, or started with this
    config (it resumes from its checkpoints); stale: the folder holds another config."""
    run_dir = sweep.runs_dir / run.id
    if (run_dir / "summary.json").exists():
        return "done" if folder_hash(run_dir) == run.hash else "stale"
    found = folder_hash(run_dir)
    return "pending" if found in (None, run.hash) else "stale"


def prepare(sweep: Sweep) -> List[Run]:
    """The runs still to do; folders of another config are moved to <out>/stale/ first, so
    that a run never resumes from, or reports, another config's state."""
    todo = []
    for run in sweep.runs:
        state = status(sweep, run)
        if state == "stale":
            _move_stale(sweep, run)
        if state != "done":
            todo.append(run)
    return todo


def train_args(sweep: Sweep, run: Run, wandb: Optional[str] = None) -> List[str]:
    """The argument list for train.py (what runs.txt holds, one run a line)."""
    args = ["--config", str(sweep.base.resolve())] if sweep.base else []
    args += run.override_args()
    args += [f"log.dir={sweep.runs_dir.resolve()}", f"log.name={run.id}",
             f"log.wandb_group={sweep.name}", f"log.tags={yaml_scalar(run.tags())}"]
    if "log.progress" not in run.overrides:
        args.append("log.progress=false")  # one progress bar: the sweep's
    if "train.resume" not in run.overrides:
        # A run stopped half-way continues from its newest checkpoint (if it wrote any);
        # prepare() has moved away every folder of another config.
        args.append("train.resume=auto")
    if wandb is not None:
        args.append(f"log.wandb={wandb}")
    return args


def train_command(nproc: Optional[int] = None) -> List[str]:
    """How to start train.py here: plain python, or under torchrun with N processes."""
    script = REPO_ROOT / "train.py"
    entry = [str(script)] if script.is_file() else ["-m", "byzddp.cli"]
    if nproc:
        # --standalone picks a free port, so several torchrun runs can share the machine.
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}", *entry]
    return [sys.executable, *entry]


def _move_stale(sweep: Sweep, run: Run) -> None:
    src = sweep.runs_dir / run.id
    old = _safe(folder_hash(src) or "unknown")
    dest = sweep.out / "stale" / f"{run.id}-{old}"
    k = 1
    while dest.exists():
        dest = sweep.out / "stale" / f"{run.id}-{old}.{k}"
        k += 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(dest))


def _run_env() -> dict:
    env = dict(os.environ)
    # K runs side by side: one thread each unless the user asked otherwise.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _stop(proc: subprocess.Popen) -> None:
    """End one run we started (its whole process group: torchrun and its workers)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def run_sweep(sweep: Sweep, jobs: int = 1, nproc: Optional[int] = None,
              wandb: Optional[str] = None, command: Optional[List[str]] = None,
              progress: bool = True) -> List[str]:
    """Run every unfinished run, up to `jobs` at a time; return the ids of failed runs.

    `command` replaces the train.py command line (before the run's arguments).
    """
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: give at least 1")
    from tqdm import tqdm

    command = list(command or train_command(nproc))
    todo = prepare(sweep)
    total, finished = len(sweep.runs), len(sweep.runs) - len(todo)
    logs = sweep.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    sweep.runs_dir.mkdir(parents=True, exist_ok=True)
    env = _run_env()
    failed: List[str] = []
    active: Dict[subprocess.Popen, Tuple[Run, Any, float]] = {}
    # A live bar on a terminal; in a log file (Slurm, nohup) one plain line per run instead.
    bar = tqdm(total=total, initial=finished, desc=sweep.name, unit="run", dynamic_ncols=True,
               file=sys.stderr, disable=not (progress and sys.stderr.isatty()), mininterval=1.0)
    bar.set_postfix(failed=0)
    began = time.monotonic()

    def say(text: str, always: bool = False) -> None:
        count = finished + ended
        rate = ended / (time.monotonic() - began)
        eta = _duration((total - count) / rate) if rate > 0 and count < total else "-"
        line = f"[{count}/{total}, {len(failed)} failed, ETA {eta}] {text}"
        if bar.disable:
            if progress or always:
                print(line, file=sys.stderr, flush=True)
        else:
            bar.write(line, file=sys.stderr)

    ended = 0
    queue = list(todo)
    try:
        while queue or active:
            while queue and len(active) < jobs:
                run = queue.pop(0)
                argv = command + train_args(sweep, run, wandb)
                log = open(logs / f"{run.id}.log", "w")
                log.write("$ " + shlex.join(argv) + "\n")
                log.flush()
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env, start_new_session=True)
                active[proc] = (run, log, time.monotonic())
            for proc in [p for p in active if p.poll() is not None]:
                run, log, started = active.pop(proc)
                log.close()
                ended += 1
                took = _duration(time.monotonic() - started)
                if proc.returncode == 0 and status(sweep, run) == "done":
                    value = (read_summary(sweep.runs_dir / run.id) or {}).get(sweep.table["metric"])
                    shown = f"{100 * value:.2f}%" if isinstance(value, (int, float)) else "n/a"
                    say(f"done {run.id}: {sweep.table['metric']} {shown} in {took}")
                else:
                    why = (f"exit status {proc.returncode}" if proc.returncode
                           else "exit 0 without a matching summary.json")
                    failed.append(run.id)
                    say(f"FAILED {run.id}: {why} after {took}; log: {logs / (run.id + '.log')}",
                        always=True)
                bar.update(1)
                bar.set_postfix(failed=len(failed))
            if active:
                time.sleep(0.2)
    except KeyboardInterrupt:
        for proc, (_, log, _) in active.items():
            _stop(proc)
            log.close()
        raise
    finally:
        bar.close()
    return failed


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# ---------------------------------------------------------------------------- results

@dataclass
class Record:
    run: Run
    status: str                      # done | stale | pending | unfinished (started, no summary)
    summary: Optional[dict]
    run_dir: Path


def collect(sweep: Sweep) -> List[Record]:
    out = []
    for run in sweep.runs:
        run_dir = sweep.runs_dir / run.id
        state = status(sweep, run)
        if state == "pending" and (sweep.out / "logs" / f"{run.id}.log").exists():
            state = "unfinished"
        out.append(Record(run, state, read_summary(run_dir) if state == "done" else None, run_dir))
    return out


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_csv(sweep: Sweep, records: List[Record]) -> Path:
    """One row per run: id, role, status, the axis values, the seed and the summary numbers."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    axes = [a.name for a in sweep.axes]
    writer.writerow(["run_id", "role", "status", *axes, "seed", *METRICS])
    for r in records:
        s = r.summary or {}
        writer.writerow([r.run.id, r.run.role, r.status, *(r.run.point.get(a, "") for a in axes),
                         r.run.seed, *("" if s.get(m) is None else s[m] for m in METRICS)])
    path = sweep.out / "results.csv"
    write_atomic(path, buf.getvalue())
    return path


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the std of a single value is 0."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def combos(sweep: Sweep, axes: Sequence[str]) -> List[Dict[str, str]]:
    """Every combination of these axes' labels, in the grid file's order ([{}] for none)."""
    lists = [sweep.axis(a).labels() for a in axes]
    return [dict(zip(axes, labels)) for labels in itertools.product(*lists)]


def show(labels: Dict[str, str]) -> str:
    return ", ".join(labels.values())


def _short(key: str) -> str:
    """attack.name -> attack, data.partition -> partition, workers.momentum -> momentum."""
    parts = key.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def titled(sweep: Sweep, labels: Dict[str, str]) -> str:
    """Labels for a plot: case names as they are, grid values as key=value."""
    return ", ".join(v if sweep.axis(a).is_case else f"{_short(a)}={v}" for a, v in labels.items())


def select(records: Sequence[Record], want: Dict[str, str], role: str) -> List[Record]:
    """Finished runs of this role at these axis labels; a reference matches any value of
    the axes it dropped."""
    out = []
    for rec in records:
        if rec.status != "done" or rec.run.role != role:
            continue
        if all(rec.run.point.get(a, v) == v for a, v in want.items()):
            out.append(rec)
    return out


def _where(sweep: Sweep, records: Sequence[Record], where: dict) -> List[Record]:
    if not where:
        return list(records)
    resolver = _Resolver(sweep.base)
    cases = {a.name for a in sweep.axes if a.is_case}
    return [r for r in records if _matches(where, r.run.point, r.run.overrides, resolver, cases)]


def _rest(sweep: Sweep, *used: Sequence[str]) -> List[str]:
    named = set().union(*map(set, used))
    return [a.name for a in sweep.axes if a.name not in named]


@dataclass
class Table:
    """Mean over seeds (%) per (row, column) of one split value; None where nothing finished."""
    title: str
    rows: List[str]
    columns: List[str]
    cells: Dict[Tuple[str, str], List[float]]   # metric values in %, one per seed


def tables(sweep: Sweep, records: Sequence[Record], rows: Sequence[str], columns: Sequence[str],
           split: Sequence[str], metric: str, where: Optional[dict] = None) -> List[Table]:
    """The layout of results.md and of the heatmaps.

    Axes not named become part of the split. Reference runs (f = 0) get an extra column
    when they dropped a column axis (else an extra row when they dropped a row axis).
    """
    records = _where(sweep, records, where or {})
    split = list(split) + _rest(sweep, rows, columns, split)
    ref_col = bool(set(sweep.dropped) & set(columns))
    ref_row = not ref_col and bool(set(sweep.dropped) & set(rows))
    out = []
    for s in combos(sweep, split):
        row_sets, col_sets = combos(sweep, rows), combos(sweep, columns)
        cells: Dict[Tuple[str, str], List[float]] = {}

        def fill(r: str, c: str, recs: List[Record]) -> None:
            values = [100.0 * v for v in (_metric(x, metric) for x in recs) if v is not None]
            if values:
                cells[(r, c)] = values

        for rl in row_sets:
            for cl in col_sets:
                fill(show(rl), show(cl), select(records, {**s, **rl, **cl}, "main"))
            if ref_col:
                fill(show(rl), sweep.reference_label, select(records, {**s, **rl}, "reference"))
        if ref_row:
            for cl in col_sets:
                fill(sweep.reference_label, show(cl), select(records, {**s, **cl}, "reference"))
        row_names = [show(r) for r in row_sets] + ([sweep.reference_label] if ref_row else [])
        col_names = [show(c) for c in col_sets] + ([sweep.reference_label] if ref_col else [])
        title = ", ".join(f"{a} = {v}" for a, v in s.items())
        out.append(Table(title, row_names, col_names, cells))
    return out


def _metric(rec: Record, metric: str) -> Optional[float]:
    v = (rec.summary or {}).get(metric)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def format_cell(values: Sequence[float], seeds: int) -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    text = f"{mean:.2f} +- {std:.2f}" if len(values) > 1 else f"{mean:.2f}"
    return text + (f" ({len(values)}/{seeds})" if len(values) < seeds else "")


def write_markdown(sweep: Sweep, records: List[Record]) -> Path:
    t = sweep.table
    done = sum(r.status == "done" for r in records)
    lines = [f"# Sweep {sweep.name}", "",
             f"{t['metric']} in %, mean +- std over seeds {', '.join(map(str, sweep.seeds))} "
             f"(sample std, n - 1); (k/n): only k of n seeds finished; -: none finished. "
             f"Runs finished: {done}/{len(records)}.", ""]
    for table in tables(sweep, records, t["rows"], t["columns"], t["split"], t["metric"]):
        if table.title:
            lines += [f"## {table.title}", ""]
        columns = [c or t["metric"] for c in table.columns]
        lines.append("| " + " | ".join([", ".join(t["rows"]) or "sweep", *columns]) + " |")
        lines.append("|" + "---|" * (len(columns) + 1))
        for r in table.rows:
            cells = [format_cell(table.cells.get((r, c), []), len(sweep.seeds)) for c in table.columns]
            lines.append("| " + " | ".join([r or sweep.name, *cells]) + " |")
        lines.append("")
    unfinished = [r.run.id for r in records if r.status == "unfinished"]
    if unfinished:
        lines += [f"Started but not finished ({len(unfinished)}); logs in {sweep.out / 'logs'}:", ""]
        lines += [f"- {i}" for i in unfinished] + [""]
    path = sweep.out / "results.md"
    write_atomic(path, "\n".join(lines))
    return path


def read_curve(run_dir: Path) -> Tuple[List[int], List[float]]:
    """(steps, test accuracies) from metrics.jsonl; a line cut by a crash is skipped."""
    steps, acc = [], []
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except OSError:
        return steps, acc
    for line in text.splitlines():
        try:
            rec = json.loads(line)
            steps.append(int(rec["step"]))
            acc.append(float(rec["test_accuracy"]))
        except (ValueError, KeyError, TypeError):
            continue
    return steps, acc


def _byzantine_ids(summary: dict, n: int) -> set:
    """The Byzantine workers are the last f real ones (or the ids the summary lists)."""
    real = summary.get("byzantine_real")
    if isinstance(real, list):
        return {int(i) for i in real}
    if isinstance(real, int) and not isinstance(real, bool) and real > 0:
        return set(range(n - real, n))
    return set()


def selection_total(records: Sequence[Record]) -> Optional[Tuple[List[int], List[int]]]:
    """Selection counts summed over runs (seeds), and the Byzantine worker ids."""
    counts: Optional[List[int]] = None
    byzantine: set = set()
    for rec in records:
        got = (rec.summary or {}).get("selection_counts")
        if not got:
            continue
        counts = list(got) if counts is None else [a + b for a, b in zip(counts, got)]
        byzantine |= _byzantine_ids(rec.summary, len(got))
    return None if counts is None else (counts, sorted(byzantine))


def _file(sweep: Sweep, plot: dict, index: int, figure: Dict[str, str]) -> str:
    """curves.png, or curves-momentum0.9.png for one value of an axis the plot leaves out."""
    stem = plot["file"] or (plot["kind"] if index == 0 else f"{plot['kind']}{index + 1}")
    stem = stem[:-4] if stem.endswith(".png") else stem
    parts = [next(v.segment for v in sweep.axis(a).values if v.label == label)
             for a, label in figure.items()]
    return "-".join([stem, *parts]) + ".png"


def draw_plots(sweep: Sweep, records: List[Record]) -> List[Path]:
    """Every plot the grid asks for; a plot with no finished run to show is skipped."""
    import numpy as np

    from byzddp import plots as P

    written: List[Path] = []
    counters: Dict[str, int] = {}
    folder = sweep.out / "plots"
    for plot in sweep.plots:
        index = counters[plot["kind"]] = counters.get(plot["kind"], -1) + 1
        recs = _where(sweep, records, plot["where"])
        rows, columns = plot["rows"], plot["columns"]
        if plot["kind"] == "heatmap":
            mats = []
            for t in tables(sweep, recs, rows, columns, plot["split"], sweep.table["metric"]):
                values = np.full((len(t.rows), len(t.columns)), np.nan)
                for (r, c), v in t.cells.items():
                    values[t.rows.index(r), t.columns.index(c)] = sum(v) / len(v)
                mats.append(P.Matrix(t.title or sweep.name, t.rows, t.columns, values,
                                     ", ".join(rows), ", ".join(columns)))
            if any(not np.isnan(m.values).all() for m in mats):
                written.append(P.heatmap(mats, folder / _file(sweep, plot, index, {}),
                                         label=f"{sweep.table['metric']} (%)"))
            continue
        hue = plot["hue"] if plot["kind"] == "curves" else []
        row_sets, col_sets = combos(sweep, rows), combos(sweep, columns)
        row_names = [titled(sweep, r) for r in row_sets]
        col_names = [titled(sweep, c) for c in col_sets]
        # One figure per combination of the axes this plot does not name.
        for figure in combos(sweep, _rest(sweep, rows, columns, hue)):
            if plot["kind"] == "curves":
                panels: Dict[Tuple[str, str], List[Any]] = {}
                for rl in row_sets:
                    for cl in col_sets:
                        for k, hl in enumerate(combos(sweep, hue)):
                            want = {**figure, **rl, **cl, **hl}
                            name = titled(sweep, hl) or sweep.name
                            for role, dotted, label in (("main", False, name),
                                                        ("reference", True, f"{name} ({sweep.reference_label})")):
                                if role == "reference" and k > 0 and set(hue) & set(sweep.dropped):
                                    continue  # the reference does not vary with the hue: once
                                found = select(recs, want, role)
                                if found:
                                    panels.setdefault((titled(sweep, rl), titled(sweep, cl)), []).append(
                                        P.Series(label, k, [read_curve(x.run_dir) for x in found], dotted))
                if panels:
                    written.append(P.accuracy_curves(
                        panels, row_names, col_names, folder / _file(sweep, plot, index, figure),
                        title=sweep.name + (f": {titled(sweep, figure)}" if figure else "")))
            else:
                chosen: Dict[Tuple[str, str], Any] = {}
                for rl in row_sets:
                    for cl in col_sets:
                        total = selection_total(select(recs, {**figure, **rl, **cl}, "main"))
                        if total is not None:
                            chosen[(titled(sweep, rl), titled(sweep, cl))] = P.Selection(*total)
                if chosen:
                    written.append(P.selection_histogram(
                        chosen, row_names, col_names, folder / _file(sweep, plot, index, figure),
                        title=f"{sweep.name}: selections" + (f" ({titled(sweep, figure)})" if figure else "")))
    return written


def write_report(sweep: Sweep) -> Dict[str, Any]:
    records = collect(sweep)
    return {"csv": write_csv(sweep, records), "markdown": write_markdown(sweep, records),
            "plots": draw_plots(sweep, records)}


# ---------------------------------------------------------------------------- command line

def write_run_list(sweep: Sweep, wandb: Optional[str] = None) -> Tuple[Path, int]:
    """runs.txt: line i = the shell-quoted train.py arguments of unfinished run i."""
    lines = [shlex.join(train_args(sweep, r, wandb)) for r in prepare(sweep)]
    path = sweep.out / "runs.txt"
    write_atomic(path, "".join(line + "\n" for line in lines))
    return path, len(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m byzddp.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("grid", help="grid file (YAML), e.g. configs/sweeps/smoke.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value for every run, e.g. data.dataset=mnist")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time on this machine")
    parser.add_argument("--nproc", type=int, default=None, help="run each under torchrun with N processes")
    parser.add_argument("--out", default=None, help="output folder (default runs/sweeps/<name>)")
    parser.add_argument("--name", default=None, help="sweep name (default: the grid's name)")
    parser.add_argument("--wandb", choices=("off", "offline", "online"), default=None,
                        help="log every run to W&B (default: as the config says)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--list-only", action="store_true", help="write runs.txt and list the runs")
    mode.add_argument("--slurm", action="store_true", help="write runs.txt and print the sbatch command")
    mode.add_argument("--report-only", action="store_true", help="rebuild results and plots only")
    args = parser.parse_intermixed_args(argv)   # options and overrides in any order
    try:
        if args.nproc is not None and args.nproc < 1:
            raise ConfigError(f"--nproc {args.nproc}: give at least 1 process")
        sweep = load_grid(args.grid, args.overrides, args.name, args.out)
        if sweep.notes:
            more = f" (and {len(sweep.notes) - 1} more)" if len(sweep.notes) > 1 else ""
            print(f"note: {sweep.notes[0]}{more}", file=sys.stderr)
        done = sum(status(sweep, r) == "done" for r in sweep.runs)
        print(f"sweep {sweep.name}: {len(sweep.runs)} runs ({done} finished) in {sweep.out}",
              file=sys.stderr)
        if args.list_only or args.slurm:
            path, count = write_run_list(sweep, args.wandb)
            if args.list_only:
                for r in sweep.runs:
                    print(f"{status(sweep, r):8s} {r.id}")
            print(f"wrote {path} ({count} unfinished runs)", file=sys.stderr)
            if count:
                limit = f"%{args.jobs}" if args.jobs > 1 else ""
                print(f"sbatch --array=0-{count - 1}{limit} slurm/array.sbatch {path.resolve()}")
            return 0
        failed: List[str] = []
        if not args.report_only:
            failed = run_sweep(sweep, args.jobs, args.nproc, args.wandb)
        report = write_report(sweep)
        print(f"wrote {report['csv']}, {report['markdown']} and {len(report['plots'])} plot(s) "
              f"in {sweep.out / 'plots'}", file=sys.stderr)
        if failed:
            print(f"{len(failed)} run(s) failed: {', '.join(failed)}; logs in {sweep.out / 'logs'}",
                  file=sys.stderr)
            return 1
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
