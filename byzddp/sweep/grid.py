"""The grid language of sweeps, and its expansion into runs (ids, overrides, config hashes).

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
    baseline: {resampling.name: none}   # the arm each axis is compared against, seed by seed
                                        # (default: each axis's first value)
    plots:
      - {kind: curves, rows: attack.name, columns: rule, hue: resampling.name}
      - {kind: selection, columns: resampling.name, where: {rule: krum}}
      - {kind: heatmap, rows: rule, columns: attack.name, split: resampling.name}
      - {kind: diagnostics, rows: attack.name, hue: resampling.name}   # kappa, selection rates

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

Paired differences (results.md, paired.csv): runs that differ only in one axis's value, at
the same seed and the same values of every other axis, are compared seed by seed against
that axis's baseline value: byzddp/sweep/paired.py.

Table and plot layouts name axes; `rows`, `columns`, `split` and `hue` take one axis or a
list. Axes a layout leaves out (other than the seed) become separate tables or figure files.
The tables' worst-case column: byzddp/sweep/records.py; the plots: byzddp/sweep/figures.py.
"""
from __future__ import annotations

import hashlib
import itertools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from byzddp import config as config_mod
from byzddp.config import DEFAULT_CONFIG, ConfigError
from byzddp.sweep.spec import as_axes, condition, dotted, err, find_file, mapping, safe, value_segment

GRID_KEYS = ("name", "base", "set", "cases", "grid", "seeds", "when", "exclude", "reference",
             "table", "baseline", "plots")
PLOT_KINDS = ("curves", "selection", "heatmap", "diagnostics")


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
    config: Any = field(default=None, repr=False, compare=False)   # the resolved config

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
    baseline: Dict[str, str] = field(default_factory=dict)   # axis -> the label paired against
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


class Resolver:
    """Values of dotted keys before validation: defaults < base file < a point's overrides."""

    def __init__(self, base: Optional[Path]):
        self.tree = config_mod.layered(base)

    def value(self, key: str, overrides: Dict[str, Any]) -> Any:
        if key in overrides:
            return overrides[key]
        node: Any = self.tree
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node


def matches(cond: Dict[str, list], point: Dict[str, str], overrides: Dict[str, Any],
            resolver: Resolver, case_axes: set) -> bool:
    for key, allowed in cond.items():
        if key in case_axes:
            if point.get(key) not in [str(a) for a in allowed]:
                return False
        elif resolver.value(key, overrides) not in allowed:
            return False
    return True


def where(sweep: Sweep, records: Sequence[Any], cond: dict) -> List[Any]:
    """The records whose run matches a condition (a plot's `where`); all without one."""
    if not cond:
        return list(records)
    resolver = Resolver(sweep.base)
    cases = {a.name for a in sweep.axes if a.is_case}
    return [r for r in records if matches(cond, r.run.point, r.run.overrides, resolver, cases)]


def combos(sweep: Sweep, axes: Sequence[str]) -> List[Dict[str, str]]:
    """Every combination of these axes' labels, in the grid file's order ([{}] for none)."""
    lists = [sweep.axis(a).labels() for a in axes]
    return [dict(zip(axes, labels)) for labels in itertools.product(*lists)]


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
        spec = config_mod.read_yaml(path.read_text(), yaml.SafeLoader) or {}
    except config_mod.YAMLExpansionError as e:
        raise ConfigError(f"grid file {path}: {e}") from None
    except yaml.YAMLError:
        raise ConfigError(f"grid file {path} is not valid YAML; fix its syntax") from None
    if not isinstance(spec, dict):
        raise err(path, "<root>", "expected a mapping with keys " + ", ".join(GRID_KEYS))
    for key in spec:
        if key not in GRID_KEYS:
            raise err(path, str(key), f"unknown key; valid keys: {', '.join(GRID_KEYS)}")

    sweep_name = safe(name or spec.get("name") or path.stem)
    # Without a base, train.py reads configs/default.yaml: hash the same config it will run.
    base = find_file(str(spec["base"]), path) if spec.get("base") else (
        DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    fixed = dotted(path, "set", spec.get("set"))

    axes: List[Axis] = []
    for axis_name, bundles in mapping(path, "cases", spec.get("cases")).items():
        axis_name = str(axis_name)
        if "." in axis_name or axis_name == "seed":
            raise err(path, f"cases.{axis_name}", "a case axis name is a word without a dot, "
                                                   "not 'seed'; rename it (e.g. rule)")
        bundles = mapping(path, f"cases.{axis_name}", bundles)
        if not bundles:
            raise err(path, f"cases.{axis_name}", "give at least one case")
        values = [Value(str(c), safe(c), dotted(path, f"cases.{axis_name}.{c}", b))
                  for c, b in bundles.items()]
        axes.append(Axis(axis_name, values, is_case=True))
    for key, values in mapping(path, "grid", spec.get("grid")).items():
        key = str(key)
        if not isinstance(values, list) or not values:
            raise err(path, f"grid.{key}", f"expected a non-empty list of values, got {values!r}")
        if len(set(map(yaml_scalar, values))) != len(values):
            raise err(path, f"grid.{key}", "values repeat; list each value once")
        axes.append(Axis(key, [Value(str(v), value_segment(key, v), {key: v}) for v in values],
                         is_case=False))
    axis_names = [a.name for a in axes]
    case_axes = {a.name for a in axes if a.is_case}

    seeds = spec.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) else seeds
    if not isinstance(seeds, list) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise err(path, "seeds", f"expected a non-empty list of integers, got {seeds!r}")

    when = []
    for i, rule in enumerate(spec.get("when") or []):
        rule = mapping(path, f"when[{i}]", rule)
        if set(rule) != {"if", "set"}:
            raise err(path, f"when[{i}]", "write each rule as {if: {key: value}, set: {key: value}}")
        when.append((condition(path, f"when[{i}].if", rule["if"]),
                     dotted(path, f"when[{i}].set", rule["set"])))
    exclude = [condition(path, f"exclude[{i}]", c) for i, c in enumerate(spec.get("exclude") or [])]

    reference = spec.get("reference")
    ref_set: Optional[Dict[str, Any]] = None
    ref_label = "reference"
    if reference is not None:
        reference = mapping(path, "reference", reference)
        if "set" not in reference or set(reference) - {"set", "label"}:
            raise err(path, "reference", "write it as {label: f=0, set: {key: value, ...}}")
        ref_set = dotted(path, "reference.set", reference["set"])
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
        sweep_name = "-".join([sweep_name, *(value_segment(k, v) for k, v in cli.items())])

    table = mapping(path, "table", spec.get("table"))
    for k in table:
        if k not in ("rows", "columns", "split", "metric", "also"):
            raise err(path, f"table.{k}", "unknown key; valid: rows, columns, split, metric, also")
    also = table.get("also", [])
    if not isinstance(also, list) or not all(isinstance(m, str) for m in also):
        raise err(path, "table.also", "expected a list of summary.json metrics, e.g. [final_attack_success_rate]")
    table = {
        "rows": as_axes(path, "table.rows", table.get("rows", axis_names[:1]), axis_names),
        "columns": as_axes(path, "table.columns", table.get("columns", axis_names[1:2]), axis_names),
        "split": as_axes(path, "table.split", table.get("split"), axis_names),
        "metric": str(table.get("metric", "final_test_accuracy_last5")),
        "also": list(also),     # more metrics, each in tables of its own after the metric's
    }
    plots = []
    raw_plots = spec.get("plots")
    if raw_plots is None:
        raw_plots = [{"kind": "curves", "rows": table["rows"], "columns": table["columns"],
                      "hue": table["split"]},
                     {"kind": "heatmap", "rows": table["rows"], "columns": table["columns"],
                      "split": table["split"]}]
    if not isinstance(raw_plots, list):
        raise err(path, "plots", "expected a list of {kind: curves|selection|heatmap|diagnostics, ...}")
    for i, p in enumerate(raw_plots):
        p = mapping(path, f"plots[{i}]", p)
        if p.get("kind") not in PLOT_KINDS:
            raise err(path, f"plots[{i}].kind", f"'{p.get('kind')}' is not one of {', '.join(PLOT_KINDS)}")
        allowed = {"kind", "rows", "columns", "where", "file",
                   "hue" if p["kind"] in ("curves", "diagnostics") else "split"}
        for k in p:
            if k not in allowed:
                raise err(path, f"plots[{i}].{k}", f"unknown key; valid: {', '.join(sorted(allowed))}")
        plot = {"kind": p["kind"], "file": p.get("file")}
        for k in ("rows", "columns", "hue", "split"):
            plot[k] = as_axes(path, f"plots[{i}].{k}", p.get(k), axis_names)
        plot["where"] = condition(path, f"plots[{i}].where", p["where"]) if p.get("where") else {}
        plots.append(plot)

    baseline = {a.name: a.values[0].label for a in axes}
    for axis_name, value in mapping(path, "baseline", spec.get("baseline")).items():
        if str(axis_name) not in axis_names:
            raise err(path, f"baseline.{axis_name}", f"not an axis of this sweep; axes: "
                                                      f"{', '.join(axis_names) or 'none'}")
        axis = next(a for a in axes if a.name == str(axis_name))
        label = next((v.label for v in axis.values if v.label == str(value)
                      or (not axis.is_case and yaml_scalar(v.overrides[axis.name]) == yaml_scalar(value))), None)
        if label is None:
            raise err(path, f"baseline.{axis_name}", f"{value!r} is not one of the axis's values: "
                                                      f"{', '.join(axis.labels())}")
        baseline[axis.name] = label

    sweep = Sweep(sweep_name, path, base, axes, seeds, ref_label, table, plots,
                  Path(out) if out else Path("runs") / "sweeps" / sweep_name, baseline=baseline)
    resolver = Resolver(base)

    def compose(values: Sequence[Value], reference_set: Optional[dict], point: Dict[str, str],
                seed: int) -> Dict[str, Any]:
        ov = dict(fixed)
        for v in values:
            ov.update(v.overrides)
        if reference_set is not None:
            ov.update(reference_set)
        for cond, extra_set in when:
            if matches(cond, point, ov, resolver, case_axes):
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
            if any(matches(c, point, ov, resolver, case_axes) for c in exclude):
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
            raise err(path, "grid", f"two runs get the id '{run.id}'; give values that differ "
                                     f"after removing characters other than letters, digits and ._+=-")
        ids[run.id] = run
    if not runs:
        raise err(path, "exclude", "every point is excluded; nothing to run")

    problems = []
    for run in runs:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                cfg = config_mod.load(base, run.override_args())
                run.hash, run.config = config_mod.config_hash(cfg), cfg
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

