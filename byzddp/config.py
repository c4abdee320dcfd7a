"""Typed run configuration: dataclasses, YAML files and dotted command-line overrides.

A config is a tree of dataclasses. `load(path, overrides)` reads a YAML file, applies
`dotted.key=value` overrides (values parsed as YAML scalars), checks every key and type,
and runs the cross-field checks. Every problem raises ConfigError with one line that names
the key and how to fix it; the command-line entry point prints that line and exits 2.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from byzddp.errors import ConfigError  # noqa: F401  (re-exported: config.ConfigError)
from byzddp.validation import NAME_MAX, validate
from byzddp.yamlio import YAMLExpansionError, read_yaml, _DuplicateKey  # noqa: F401  (re-exported)


@dataclass
class DataConfig:
    dataset: str = "mnist5k"        # mnist5k | mnist | fashionmnist | emnist | cifar10 | cifar100 | svhn
                                    # | text (the characters of the UTF-8 file or folder data.root)
                                    # | package.module:loader (docs/extending.md)
    args: Dict[str, Any] = field(default_factory=dict)  # keywords for a plug-in loader (besides root)
    classes: Optional[int] = None   # plug-in loader: number of classes (default: inferred from the labels)
    partition: str = "sorted"       # iid | sorted | dirichlet | two_groups | contiguous (the dataset's own
                                    # order cut in spans; for text, sorted means contiguous)
    alpha: float = 1.0              # dirichlet concentration
    root: str = "data"              # where torchvision datasets live
    download: bool = True           # torchvision datasets: download when missing
    test_size: int = 1000           # mnist5k: digits held out as the test set (split=balanced)
    split: str = "balanced"         # mnist5k: balanced (test_size/10 per class) | official (the official code's files)
    sampling: str = "stream"        # stream: endless per-worker permutations | epoch: the official loaders' epochs
    block_size: int = 64            # text: characters per sequence (the gpt's context length)
    byzantine_data: str = "all"     # all: Byzantine workers sample the whole training set (paper);
                                    # own: a shard each (needs attack.rotate=true)


@dataclass
class ModelConfig:
    name: str = "mlp"               # mlp | cnn (the official code's) | cnn_relu | resnet20 | resnet18
                                    # | gpt (a causal transformer, for data.dataset=text)
                                    # | package.module:factory (docs/extending.md)
    hidden: List[int] = field(default_factory=lambda: [200])  # mlp hidden sizes
    width: int = 128                # gpt: embedding width (a multiple of model.heads)
    depth: int = 2                  # gpt: transformer blocks
    heads: int = 4                  # gpt: attention heads per block
    args: Dict[str, Any] = field(default_factory=dict)  # keywords for a plug-in factory


@dataclass
class WorkersConfig:
    n: int = 10                     # logical workers
    byzantine: int = 2              # f: declared Byzantine workers (what the rule is told)
    momentum: float = 0.0           # worker momentum beta: m <- beta m + g
    vectorize: bool = True          # a rank's workers' gradients at once (torch.func; on the CPU from 4 a chunk); false: one by one
    chunk: Optional[int] = None     # workers per vectorized chunk (default: all n within a memory budget)
    participation: float = 1.0      # q: each round a seeded round(q n) of the n workers take part


@dataclass
class AggregatorConfig:
    name: str = "cm"                # mean | krum | multikrum | cm | trimmed_mean | rfa | cclip | bulyan | meamed
                                    # | dnc | signguard | fltrust | mda | smea | monna | caf
                                    # | package.module:rule (docs/extending.md)
    args: Dict[str, Any] = field(default_factory=dict)  # keywords for a plug-in rule class
    m: Optional[int] = None         # multikrum: how many best-scored to average (default n - f)
    b: Optional[int] = None         # trimmed_mean: trimmed per side (default f'); dnc: coordinates
                                    # subsampled per iteration (default 10000, capped at d)
    T: int = 8                      # rfa: smoothed Weiszfeld iterations
    nu: float = 0.1                 # rfa: smoothing
    tau: float = 10.0               # cclip: clipping radius
    L: int = 3                      # cclip: inner iterations
    niters: int = 5                 # dnc: iterations (random coordinate subsets)
    c: float = 1.0                  # dnc: filtering fraction, keeps m - floor(c f') rows per iteration
    norm_low: float = 0.1           # signguard: keep norms >= norm_low x the median norm
    norm_high: float = 3.0          # signguard: keep norms <= norm_high x the median norm
    sign_fraction: float = 0.1      # signguard: fraction of coordinates drawn for the sign statistics
    root_size: int = 100            # fltrust: training examples in the server's trusted root set
    designated: int = 0             # monna: the trusted (honest) worker whose m-f nearest rows are averaged
    allow_unsafe: bool = False      # run even when the rule's requirement on (m, f') fails


@dataclass
class ResamplingConfig:
    name: str = "s_replacement"     # none | s_replacement | bucketing | with_replacement | fixed_groups | nnm | arc | clipping
    s: int = 2                      # group size
    tau: float = 10.0               # clipping: the static clipping radius (resampling.StaticClipping says why 10)


@dataclass
class AttackConfig:
    name: str = "none"              # none | bitflip | labelflip | gaussian | nm | mimic | mimic2 | alie | ipm | ...
                                    # (all: byzddp.attacks.ATTACKS; docs/attacks.md)
                                    # | package.module:Attack (docs/extending.md)
    args: Dict[str, Any] = field(default_factory=dict)  # keywords for a plug-in attack class
    count: Optional[int] = None     # real number of attackers (default: workers.byzantine)
    rotate: bool = False            # draw a new Byzantine set every step
    sigma: float = 200.0            # gaussian
    epsilon: float = 0.1            # ipm
    z: Optional[float] = None       # alie (default from n and f); rop: the perturbation's norm (same default)
    warmup: int = 1                 # mimic: steps to pick the target
    delay: int = 10                 # stale: resend the gradient of this many steps ago
    perturbation: str = "std"       # minmax/minsum: std | unit | sign
    gamma_init: float = 10.0        # minmax/minsum: first gamma of the binary search
    gamma_tol: float = 1e-5         # minmax/minsum: binary search stops at this step size
    target: str = "auto"            # fang: the rule type attacked: auto (krum for krum/multikrum/bulyan,
                                    # median otherwise) | median | krum (needs a krum-type rule)
    search_max: float = 10.0        # optimal_alie/optimal_ipm/adaptive: the scale (z, epsilon) is searched in [0, this]
    search_evals: int = 20          # optimal_alie/optimal_ipm: pipeline evaluations per step (half a grid,
                                    # half golden-section refinement)
    grid: int = 4                   # adaptive: scales tried per family (alie z, ipm epsilon, sign-flip
                                    # factor: search_max / 2**k, k < grid) and mimic targets
    objective: str = "distance"     # adaptive: what the choice maximises: distance (||aggregate - honest mean||)
                                    # | alignment (-<aggregate, honest mean>/||honest mean||)
    pi: float = 1.0                 # rop: attack location, pi * previous update + (1 - pi) * honest mean
    lamb: float = 0.9               # rop: reference direction, lamb * previous update + (1 - lamb) * honest mean
    angle: float = 90.0             # rop: degrees between the perturbation and the reference (90: orthogonal)
    target_class: int = 0           # backdoor: the label triggered examples are relabelled to (and the
                                    # attack_success_rate's target, reported for every run on images)
    poison_fraction: float = 0.5    # backdoor: share of each Byzantine batch stamped and relabelled
    trigger_size: int = 4           # backdoor: side in pixels of the square trigger, bottom-right corner
    boost: float = 1.0              # backdoor: the Byzantine vector is sent times this (model replacement)


@dataclass
class TrainConfig:
    steps: int = 600                # rounds of the server (one update each)
    lr: float = 0.01                # the server's (and the local steps') SGD learning rate
    momentum: float = 0.0           # server SGD momentum
    weight_decay: float = 0.0       # server SGD weight decay
    lr_schedule: str = "constant"   # constant | cosine | step
    lr_decay_steps: List[int] = field(default_factory=list)  # step schedule milestones
    lr_decay: float = 0.1           # step schedule factor
    batch_size: int = 32            # per worker
    local_steps: int = 1            # K: local SGD steps per round; a worker sends its pseudo-gradient
                                    # (global - local) / (lr K), the mean of its K gradients
    eval_every: int = 30            # steps between evaluations (and the last step)
    eval_batch_size: int = 1000     # test examples per forward pass at evaluation
    check_every: int = 50           # replica checksum interval (0: off)
    checkpoint_every: int = 200     # steps between checkpoints (0: off)
    keep_checkpoints: int = 2       # checkpoints kept: the newest, and one to fall back on
    resume: str = "off"             # off | auto | fresh | path to a checkpoint. off refuses a folder
                                    # holding checkpoints; fresh moves the earlier run to previous-<time>/
    device: str = "auto"            # auto | cpu | cuda
    backend: str = "auto"           # auto | gloo | nccl
    timeout_s: float = 600.0        # collective timeout
    threads: int = 1                # intra-op CPU threads per process (the model's bits depend on it)
    exchange: str = "gather"        # gather (rank 0 aggregates) | sharded (each rank a column slice)


@dataclass
class LogConfig:
    dir: str = "runs"               # where run folders go
    name: Optional[str] = None      # run folder name (derived from the config when absent)
    wandb: str = "off"              # off | offline | online
    wandb_project: str = "byzddp"   # W&B project
    wandb_group: Optional[str] = None  # W&B group (sweeps set it to the sweep's name)
    tags: List[str] = field(default_factory=list)  # W&B tags
    progress: bool = True           # progress bar on rank 0
    diagnostics_every: int = 0      # the server's diagnostics (kappa, selection rates) every k steps; 0: at evaluations


@dataclass
class Config:
    seed: int = 0                   # the only source of randomness
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    resampling: ResamplingConfig = field(default_factory=ResamplingConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)


# ---------------------------------------------------------------------------- parsing

def _fields(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the annotation `hint`; ints are accepted where floats are."""
    origin = typing.get_origin(hint)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin in (dict, Dict):   # a plug-in's keywords: a mapping with string keys, values as YAML gave them
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"config key {key}: expected a mapping of keyword: value, got {value!r}")
        return dict(value)
    if origin in (list, List):
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("on", "off", "yes", "no", "true", "false"):
            return value.lower() in ("on", "yes", "true")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"config key {key}: must be a finite number, got {value}; give a finite value")
            return float(value)
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, bool):  # YAML reads `off`/`on` as booleans
            return "on" if value else "off"
        if isinstance(value, dict) and len(value) == 1 and None in value.values():
            # YAML reads `pkg.mod:` as {pkg.mod: None}: the text was a name ending in ':'
            (name,) = value
            if isinstance(name, str):
                return f"{name}:"
    raise ConfigError(f"config key {key}: expected {getattr(hint, '__name__', hint)}, "
                      f"got {value!r}; give a value of that type")


def _build(cls, tree: dict, prefix: str):
    """Build dataclass `cls` from a nested dict, refusing unknown keys."""
    if not isinstance(tree, dict):
        raise ConfigError(f"config key {prefix.rstrip('.') or '<root>'}: expected a mapping, got {tree!r}")
    hints = _fields(cls)
    kwargs = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"unknown config key '{full}'; valid keys here: {', '.join(hints)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, {} if value is None else value, f"{full}.")
        else:
            kwargs[key] = _coerce(value, hint, full)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (['a', 'b'], value parsed as a YAML scalar)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' has no '='; write it as dotted.key=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override '{text}' has no key; write it as dotted.key=value")
    try:
        value = read_yaml(raw) if raw != "" else ""
    except YAMLExpansionError as e:
        raise ConfigError(f"override '{key}=...': {e}") from None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section; check the key's spelling")
            node = child
        node[path[-1]] = value
    return tree


def from_dict(tree: dict) -> Config:
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def load(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    return from_dict(apply_overrides(_file_tree(path), list(overrides or [])))


# What train.py reads without --config (and a sweep's runs without `base:`).
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def layered(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> dict:
    """The config tree before any check: the defaults, then the file, then the overrides.

    A sweep reads dotted keys of it to match its conditions on points that are not yet
    complete configs (a `when` rule may still fix them)."""
    def merge(into: dict, upper: dict) -> None:
        for key, value in upper.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value
    tree = to_dict(Config())
    merge(tree, _file_tree(path))
    return apply_overrides(tree, list(overrides or []))


def _file_tree(path: Optional[str | Path]) -> dict:
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise ConfigError(f"config file {path} {what}; pass an existing YAML file to --config")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not a text file; pass a YAML file to --config") from None
        except OSError as e:
            raise ConfigError(f"config file {path} cannot be read ({e.strerror}); check its permissions") from None
        try:
            tree = read_yaml(text)
        except (_DuplicateKey, YAMLExpansionError) as e:
            raise ConfigError(f"config file {path}: {e}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {path} is not valid YAML{where}; fix its syntax") from None
        if tree is None:
            tree = {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} holds a {type(tree).__name__}, not a mapping of "
                              f"sections; write it like `train: {{steps: 100}}`")
    return tree


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# Settings that change how a run is operated, never what it computes.
OPERATIONAL = ("resume", "checkpoint_every", "keep_checkpoints", "check_every", "timeout_s", "threads",
               "exchange")   # sharded aggregation gives the gather mode's bits


def config_hash(cfg: Config) -> str:
    """A short stable digest of what the run computes (log and operational settings excluded)."""
    tree = to_dict(cfg)
    tree.pop("log")
    for key in OPERATIONAL:
        tree["train"].pop(key)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:10]




def run_name(cfg: Config) -> str:
    if cfg.log.name:
        return cfg.log.name
    r = cfg.resampling
    resampling = "none" if r.name == "none" else f"{r.name}{r.s}"
    # A plug-in's import path is part of the name, its ':' written as '.' (W&B, shells, Windows).
    dataset, model, rule, attack = (name.replace(":", ".") for name in (
        cfg.data.dataset, cfg.model.name, cfg.aggregator.name, cfg.attack.name))
    head = (f"{dataset}-{cfg.data.partition}-{model}-n{cfg.workers.n}"
            f"f{cfg.workers.byzantine}-{rule}-{resampling}-{attack}-s{cfg.seed}")
    tail = f"-{config_hash(cfg)}"
    # Long plug-in paths could pass one file name's limit: cut the readable head, keep the hash.
    room = NAME_MAX - len(tail.encode())
    if len(head.encode()) > room:
        head = head.encode()[:room].decode("utf-8", "ignore")
    return head + tail
