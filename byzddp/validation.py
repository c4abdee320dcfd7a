"""The cross-field checks of a config, that need no data and no process group (`validate`):
every key's range, the choices, and each component's own checks (models, data, the robust
pipeline, attacks), called where their code lives. The config is duck-typed: this module never
imports byzddp.config (which calls it)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from byzddp import plugins
from byzddp.errors import ConfigError

NAME_MAX = 255     # bytes in one file name (Linux, macOS); a smaller file system says so when made


DATASETS = ("mnist5k", "mnist", "fashionmnist", "emnist", "cifar10", "cifar100", "svhn", "text")
GRAYSCALE = ("mnist5k", "mnist", "fashionmnist", "emnist")   # 1x28x28 images
PARTITIONS = ("iid", "sorted", "dirichlet", "two_groups", "contiguous")
MODELS = ("mlp", "cnn", "cnn_relu", "resnet20", "resnet18", "gpt")


ALPHA_MIN = 1.1754943508222875e-38   # the smallest normal float32: the Dirichlet draw's precision


def _choice(key: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"config key {key}: '{value}' is not one of {', '.join(allowed)}")


def _positive(key: str, value, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"config key {key}: must be {'>= 0' if zero_ok else '> 0'}, got {value}; "
                          f"give a {'non-negative' if zero_ok else 'positive'} value")


def _name(key: str, value: Optional[str]) -> None:
    """A folder name, not a path: a run folder must stay inside log.dir, fit in one file name,
    and read back safely in a shell (`ls -d runs/<name>`, `rm -r runs/<name>`)."""
    if value is None:
        return      # absent: the name is derived from the config
    if not value.strip():
        raise ConfigError(f"config key {key}: the name is empty; give a name, or remove {key} to derive "
                          f"it from the config")
    if value in (".", "..") or "/" in value or "\\" in value or "\0" in value:
        raise ConfigError(f"config key {key}: {value!r} is not a plain folder name; give a name without "
                          f"'/' or '..' (log.dir says where run folders go)")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ConfigError(f"config key {key}: {value!r} holds a control character (a newline or tab); "
                          f"give a name of printable characters")
    if value.startswith("-"):
        raise ConfigError(f"config key {key}: {value!r} starts with '-', which commands read as an option; "
                          f"give a name that starts with a letter or digit")
    if len(value.encode("utf-8", "surrogateescape")) > NAME_MAX:
        raise ConfigError(f"config key {key}: the name is {len(value.encode('utf-8', 'surrogateescape'))} bytes, "
                          f"over the file system's limit of {NAME_MAX}; give a shorter name")


def validate(cfg) -> None:
    """Cross-field checks that need no data and no process group."""
    # Each component's module holds its table of built-in names (byzddp.plugins resolves a name,
    # built-in or import path, for all of them); importing them registers the tables.
    from byzddp import attacks, data, models, pipeline
    plugins.resolve("data.dataset", cfg.data.dataset)
    _choice("data.partition", cfg.data.partition, PARTITIONS)
    plugins.resolve("model.name", cfg.model.name)
    if cfg.data.classes is not None:
        _positive("data.classes", cfg.data.classes)
    _choice("log.wandb", cfg.log.wandb, ("off", "offline", "online"))
    _choice("train.lr_schedule", cfg.train.lr_schedule, ("constant", "cosine", "step"))
    _choice("train.device", cfg.train.device, ("auto", "cpu", "cuda"))
    _choice("train.backend", cfg.train.backend, ("auto", "gloo", "nccl"))
    _choice("train.exchange", cfg.train.exchange, ("gather", "sharded"))
    _choice("data.byzantine_data", cfg.data.byzantine_data, ("all", "own"))
    _choice("data.split", cfg.data.split, ("balanced", "official"))
    _choice("data.sampling", cfg.data.sampling, ("stream", "epoch"))
    _positive("seed", cfg.seed, zero_ok=True)
    _positive("data.alpha", cfg.data.alpha)
    if cfg.data.alpha < ALPHA_MIN:
        raise ConfigError(f"config key data.alpha: {cfg.data.alpha:g} is too small to be represented in the "
                          f"float32 Dirichlet draw (its smallest normal number is {ALPHA_MIN:.3g}); raise data.alpha "
                          f"(0.01 and above draw safely)")
    for i, width in enumerate(cfg.model.hidden):
        _positive(f"model.hidden[{i}]", width)
    w = cfg.workers
    _positive("workers.n", w.n)
    _positive("workers.byzantine", w.byzantine, zero_ok=True)
    if 2 * w.byzantine >= w.n:
        raise ConfigError(f"config key workers.byzantine: f={w.byzantine} needs f < n/2 "
                          f"(n={w.n}); lower workers.byzantine or raise workers.n")
    if not 0.0 <= w.momentum < 1.0:
        raise ConfigError(f"config key workers.momentum: beta must be in [0, 1), got {w.momentum}")
    if w.chunk is not None:
        _positive("workers.chunk", w.chunk)
    if not 0.0 < w.participation <= 1.0:
        raise ConfigError(f"config key workers.participation: the share of workers per round must be in "
                          f"(0, 1], got {w.participation}")
    t = cfg.train
    if t.local_steps < 1:
        raise ConfigError(f"config key train.local_steps: a round takes K >= 1 local steps, got {t.local_steps}")
    for key in ("steps", "batch_size", "eval_every", "eval_batch_size", "keep_checkpoints", "threads"):
        _positive(f"train.{key}", getattr(t, key))
    _positive("train.lr", t.lr)
    if not 0.0 <= t.momentum < 1.0:
        raise ConfigError(f"config key train.momentum: server momentum must be in [0, 1), got {t.momentum}")
    _positive("train.weight_decay", t.weight_decay, zero_ok=True)
    _positive("train.lr_decay", t.lr_decay)
    for i, milestone in enumerate(t.lr_decay_steps):
        _positive(f"train.lr_decay_steps[{i}]", milestone)
    _positive("train.check_every", t.check_every, zero_ok=True)
    _positive("train.checkpoint_every", t.checkpoint_every, zero_ok=True)
    _positive("train.timeout_s", t.timeout_s)
    _positive("log.diagnostics_every", cfg.log.diagnostics_every, zero_ok=True)
    if t.timeout_s > 7 * 24 * 3600:
        raise ConfigError(f"config key train.timeout_s: {t.timeout_s:g} s is longer than a week; "
                          f"give at most 604800")
    _positive("resampling.s", cfg.resampling.s)
    if cfg.data.dataset == "mnist5k" and not (0 < cfg.data.test_size < 5000 and cfg.data.test_size % 10 == 0):
        raise ConfigError(f"config key data.test_size: {cfg.data.test_size} must be a multiple of 10 "
                          f"between 10 and 4990")
    if cfg.data.dataset == "mnist5k" and cfg.data.split == "official" and cfg.data.test_size != 1000:
        raise ConfigError("config key data.test_size: data.split=official fixes the test set (the last "
                          "1,000 digits); leave data.test_size at 1000")
    _name("log.name", cfg.log.name)
    _text_task(cfg)
    if cfg.model.name in ("resnet20", "resnet18") and cfg.data.dataset in GRAYSCALE:
        raise ConfigError(f"config key model.name: {cfg.model.name} is for colour images (cifar10, cifar100, "
                          f"svhn); set data.dataset to one of them or model.name=mlp|cnn")
    # Model, data, rule, pre-aggregation and attack checks live beside their code (plug-ins are
    # imported there, so that a bad import path fails here, before anything starts).
    models.validate(cfg)
    data.validate(cfg)
    pipeline.validate(cfg)
    attacks.validate(cfg)
    # Checks data.py and checkpoint.py repeat at run time, made here before anything starts.
    if cfg.data.byzantine_data == "own" and not cfg.attack.rotate and attacks.real_f(cfg) > 0:
        raise ConfigError("data.byzantine_data=own needs attack.rotate=true (a fixed Byzantine "
                          "set holds no shard); use data.byzantine_data=all")
    if t.resume not in ("off", "auto", "fresh") and not Path(t.resume).is_file():
        raise ConfigError(f"config key train.resume: {t.resume} does not exist; use off, auto, fresh or a "
                          f"checkpoint path")


def _text_task(cfg) -> None:
    """data.dataset=text and model.name=gpt go together (a plug-in model may read text too)."""
    for key in ("width", "depth", "heads"):
        _positive(f"model.{key}", getattr(cfg.model, key))
    _positive("data.block_size", cfg.data.block_size)
    if cfg.model.width % cfg.model.heads:
        raise ConfigError(f"config key model.width: {cfg.model.width} is not a multiple of model.heads="
                          f"{cfg.model.heads} (each head takes width/heads); change one of them")
    text, gpt = cfg.data.dataset == "text", cfg.model.name == "gpt"
    if gpt and not text:
        raise ConfigError(f"config key model.name: gpt reads character sequences; set data.dataset=text "
                          f"(got {cfg.data.dataset})")
    if text and not (gpt or plugins.is_path(cfg.model.name)):
        raise ConfigError(f"config key model.name: data.dataset=text gives sequences of character ids; "
                          f"use model.name=gpt (got {cfg.model.name})")
    if text and cfg.data.partition in ("dirichlet", "two_groups"):
        raise ConfigError(f"config key data.partition: {cfg.data.partition} splits by class label, which text "
                          f"has not; use contiguous (or sorted, the same for text) or iid")
    if text and cfg.attack.name == "backdoor":
        raise ConfigError("config key attack.name: backdoor stamps a pixel trigger on images; data.dataset=text "
                          "has none (labelflip works on text: it trains on character V-1-y)")
