"""Plug-ins by import path: a model, dataset, rule and attack of the user's own, written outside
byzddp/ (examples/), through train.py, torchrun, vectorized workers, sweeps, the config hash and
resume; and one clear line for every path that does not import or names the wrong thing."""
import textwrap

import pytest
import torch

from byzddp import aggregators, attacks, config, data, models, pipeline
from byzddp.config import ConfigError
from helpers import ROOT, TINY, env, summary, train

MODEL = "examples.my_model:small_cnn"
DATASET = "examples.my_dataset:blobs"
RULE_FN = "examples.my_rule:norm_clipped_mean"
RULE_CLS = "examples.my_rule:NormFilter"
ATTACK = "examples.my_attack:ScaledReversal"

# Every example at once: a small CNN on mnist5k, attacked by the example attack, aggregated by
# the example rule class.
ALL_PLUGINS = [*TINY, f"model.name={MODEL}", "model.args.width=4", f"aggregator.name={RULE_CLS}",
               "resampling.name=none", f"attack.name={ATTACK}", "attack.args.scale=3", "log.wandb=off"]
# The others: the example dataset (feature vectors, so the default mlp) and the function rule.
DATA_PLUGINS = [*TINY, f"data.dataset={DATASET}", "data.args.classes=3", "data.partition=iid",
                f"aggregator.name={RULE_FN}", "log.wandb=off"]


@pytest.fixture(autouse=True)
def importable(monkeypatch):
    """examples/ and tmp modules import from the repository root, as train.py finds them."""
    monkeypatch.syspath_prepend(str(ROOT))


def cfg_of(*overrides):
    return config.load(None, [*TINY, *overrides])


# ---------------------------------------------------------------------------- each example

@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    [f"model.name={MODEL}", "model.args.width=4"],
    [f"data.dataset={DATASET}", "data.args.classes=3", "data.partition=iid"],
    [f"aggregator.name={RULE_FN}"],
    [f"aggregator.name={RULE_CLS}", "resampling.name=none"],
    [f"attack.name={ATTACK}", "attack.args.scale=3"],
], ids=["model", "dataset", "rule-function", "rule-class", "attack"])
def test_each_example_runs_through_train_py(tmp_path, overrides):
    train([*TINY, *overrides, f"log.dir={tmp_path}", "log.name=run", "log.wandb=off"])
    s = summary(tmp_path / "run")
    assert s["steps"] == 6 and 0.0 <= s["final_test_accuracy"] <= 1.0
    # the resolved config keeps the path and its args: the run's hash is the command line's
    expected = config.load(config.DEFAULT_CONFIG, [*TINY, *overrides])
    assert config.config_hash(config.load(tmp_path / "run" / "config.yaml")) == config.config_hash(expected)
    assert s["config_hash"] == config.config_hash(expected)


def test_the_plugin_model_is_the_factorys_model_under_the_runs_seed():
    cfg = cfg_of(f"model.name={MODEL}", "model.args.width=4")
    a, b = models.build(cfg, (1, 28, 28), 10), models.build(cfg, (1, 28, 28), 10)
    from examples.my_model import small_cnn
    plain = small_cnn((1, 28, 28), 10, width=4)
    assert [p.shape for p in a.parameters()] == [p.shape for p in plain.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    other = models.build(cfg_of(f"model.name={MODEL}", "model.args.width=4", "seed=1"), (1, 28, 28), 10)
    assert not torch.equal(next(a.parameters()), next(other.parameters()))


def test_the_plugin_dataset_is_held_like_a_built_in_one():
    ds = data.load(cfg_of(f"data.dataset={DATASET}", "data.args.classes=3", "data.args.per_class=8"))
    from examples.my_dataset import blobs
    (tx, ty), test = blobs("data", classes=3, per_class=8)
    assert torch.equal(ds.train_x, tx) and torch.equal(ds.train_y, ty)
    assert torch.equal(ds.test_x, torch.stack([x for x, _ in test]))        # the Dataset, stacked
    assert ds.num_classes == 3 and ds.train_y.dtype == torch.int64


def test_classes_come_from_the_config_then_the_datasets_attribute_then_the_labels(tmp_path, monkeypatch):
    (tmp_path / "loaders.py").write_text(textwrap.dedent("""
        import torch
        class Named(torch.utils.data.TensorDataset):
            classes = ["a", "b", "c", "d", "e"]
        def tensors(root):
            x = torch.randn(6, 4)
            return (x, torch.tensor([0, 1, 2, 0, 1, 2])), (x[:2], torch.tensor([0, 1]))
        def named(root):
            x = torch.randn(6, 4)
            return Named(x, torch.tensor([0, 1, 2, 0, 1, 2])), (x[:2], torch.tensor([0, 1]))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert data.load(cfg_of("data.dataset=loaders:tensors", "workers.n=3", "workers.byzantine=0")).num_classes == 3
    assert data.load(cfg_of("data.dataset=loaders:named", "workers.n=3", "workers.byzantine=0")).num_classes == 5
    assert data.load(cfg_of("data.dataset=loaders:named", "data.classes=7", "workers.n=3",
                            "workers.byzantine=0")).num_classes == 7
    with pytest.raises(ConfigError, match="data.classes.*outside 0..1"):
        data.load(cfg_of("data.dataset=loaders:tensors", "data.classes=2", "workers.n=3", "workers.byzantine=0"))


def test_a_function_rule_is_the_function_and_refuses_non_finite_output():
    from examples.my_rule import norm_clipped_mean
    rule = pipeline.build(cfg_of(f"aggregator.name={RULE_FN}", "resampling.name=none")).rule
    x = torch.randn(7, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rule(x), norm_clipped_mean(x))
    x[0, 0] = float("nan")
    with pytest.raises(aggregators.NonFiniteError):
        rule(x)


def test_a_rule_class_gets_f_its_args_and_its_requirement_is_checked():
    p = pipeline.build(cfg_of(f"aggregator.name={RULE_CLS}", "resampling.name=none", "aggregator.args.keep_extra=1"))
    assert (p.rule.f, p.rule.keep_extra) == (1, 1)
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    x[3] *= 100
    assert torch.allclose(p.rule(x), x.mean(0))       # keep_extra=1 of f=1: nothing dropped
    p = pipeline.build(cfg_of(f"aggregator.name={RULE_CLS}", "resampling.name=none"))
    assert torch.allclose(p.rule(x), x[torch.arange(8) != 3].mean(0))   # the largest norm dropped
    # after resampling with s=2, f'=4 of m=5 vectors may be Byzantine: no honest majority
    with pytest.raises(ConfigError, match="needs 2f'\\+1 <= m .* m=5 vectors with up to f'=4"):
        cfg_of(f"aggregator.name={RULE_CLS}", "resampling.name=s_replacement", "workers.n=5", "workers.byzantine=2")


def test_the_attack_class_gets_its_args_and_its_checks():
    a = attacks.from_config(cfg_of(f"attack.name={ATTACK}", "attack.args.scale=3"))
    assert type(a).__name__ == "ScaledReversal" and a.scale == 3
    with pytest.raises(ConfigError, match="config key attack.args.scale: must be > 0"):
        cfg_of(f"attack.name={ATTACK}", "attack.args.scale=-1")


def test_the_import_path_is_part_of_the_run_name_and_hash():
    a = cfg_of(f"model.name={MODEL}", "model.args.width=4")
    b = cfg_of(f"model.name={MODEL}", "model.args.width=5")
    assert "examples.my_model.small_cnn" in config.run_name(a)
    assert config.config_hash(a) != config.config_hash(b)
    assert config.config_hash(a) == config.config_hash(cfg_of(f"model.name={MODEL}", "model.args.width=4"))


# ---------------------------------------------------------------------------- bad paths

BAD = textwrap.dedent("""
    import torch
    NOT_CALLABLE = 3
    def not_a_module(input_shape, classes):
        return "a string"
    def wrong_output(input_shape, classes):
        return torch.nn.Linear(784, classes + 1)
    class NotAnAttack:
        pass
    class NotARule:
        def __call__(self, grads):
            return grads.mean(0)
    def loader_of_garbage(root):
        return 42
    def rule_of_rows(grads):
        return grads
    def rule_that_fails(grads):
        raise RuntimeError("no rows today")
""")


@pytest.mark.parametrize("override, message", [
    ("model.name=nowhere_at_all:f", "config key model.name: cannot import module 'nowhere_at_all'"),
    ("model.name=badplugins:missing", "config key model.name: module 'badplugins' has no attribute 'missing'"),
    ("model.name=badplugins:NOT_CALLABLE", "config key model.name: 'badplugins:NOT_CALLABLE' is a int, not a callable"),
    ("model.name=badplugins:not_a_module", "config key model.name: 'badplugins:not_a_module' is a str, not a factory"),
    ("model.name=badplugins:wrong_output", "config key model.name: 'badplugins:wrong_output' fails on a batch"),
    ("attack.name=badplugins:NotAnAttack", "config key attack.name: 'badplugins:NotAnAttack' is a NotAnAttack, not a subclass"),
    ("attack.name=badplugins:NOT_CALLABLE", "config key attack.name: .* not a subclass of byzddp.attacks.Attack"),
    ("aggregator.name=badplugins:NotARule", "config key aggregator.name: .* not a function"),
    ("aggregator.name=badplugins:rule_of_rows",
     "config key aggregator.name: .* maps rows of shape \\(8, 3\\) to shape \\(8, 3\\); it must return a \\(3,\\) tensor"),
    ("aggregator.name=badplugins:rule_that_fails",
     "config key aggregator.name: .* fails on rows of shape \\(8, 3\\): RuntimeError: no rows today"),
    ("data.dataset=badplugins:NOT_CALLABLE", "config key data.dataset: .* not a callable"),
    ("data.dataset=badplugins:loader_of_garbage", "config key data.dataset: .* not a loader of \\(train, test\\)"),
    ("model.name=badplugins:a:b", "config key model.name: 'badplugins:a:b' is not an import path"),
    ("model.name=broken_module:f", "config key model.name: importing module 'broken_module' .* ZeroDivisionError"),
    ("aggregator.args.x=1", "config key aggregator.args: only a plug-in rule"),
    ("model.args.x=1", "config key model.args: only a plug-in model"),
])
def test_a_bad_plugin_is_one_line_naming_the_key(tmp_path, monkeypatch, override, message):
    (tmp_path / "badplugins.py").write_text(BAD)
    (tmp_path / "broken_module.py").write_text("f = 1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=message) as err:
        cfg = cfg_of(override)
        ds = data.load(cfg)     # loaders and models are called at run time
        models.build(cfg, tuple(ds.train_x.shape[1:]), ds.num_classes)
    assert "\n" not in str(err.value)


def test_a_bad_path_exits_2_with_one_line_and_no_traceback(tmp_path):
    proc = train([*TINY, "attack.name=examples.my_attack:NoSuchAttack", f"log.dir={tmp_path}"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "config key attack.name: module 'examples.my_attack' has no attribute 'NoSuchAttack'; check the name after the ':'")
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())


def test_a_plain_function_rule_refuses_sharded_aggregation():
    with pytest.raises(ConfigError, match="train.exchange: the rule .* needs whole rows"):
        cfg_of(f"aggregator.name={RULE_FN}", "train.exchange=sharded")


# ---------------------------------------------------------------------------- the harness

@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("plugins", [ALL_PLUGINS, DATA_PLUGINS], ids=["model-rule-class-attack", "dataset-rule-function"])
def test_plugins_give_the_same_model_on_1_2_and_4_ranks(tmp_path, plugins):
    shas = []
    for nproc in (1, 2, 4):
        train([*plugins, f"log.dir={tmp_path}", f"log.name=r{nproc}", "train.threads=1"], nproc=nproc)
        shas.append(summary(tmp_path / f"r{nproc}")["model_sha256"])
    assert shas[0] == shas[1] == shas[2]


TRACED = textwrap.dedent("""
    import torch.nn as nn
    class DataDependent(nn.Module):
        '''Branches on a value of its input: torch.func's vmap cannot take that.'''
        def __init__(self, classes):
            super().__init__()
            self.fc = nn.Linear(784, classes)
        def forward(self, x):
            x = x.flatten(1)
            return self.fc(x) if float(x.sum()) > -1e30 else -self.fc(x)
    def data_dependent(input_shape, classes):
        return DataDependent(classes)
""")


@pytest.mark.slow
def test_vectorized_workers_take_a_plugin_model_or_fall_back_to_the_loop_with_a_note(tmp_path, monkeypatch):
    (tmp_path / "traced.py").write_text(TRACED)
    environ = {**env(), "PYTHONPATH": str(tmp_path)}
    runs = {}
    for name, model, vectorize in (("vec", MODEL, "true"), ("loop", MODEL, "false"),
                                   ("fallback", "traced:data_dependent", "true")):
        proc = train([*TINY, f"model.name={model}", "model.args.width=4" if model == MODEL else "seed=0",
                      f"workers.vectorize={vectorize}", f"log.dir={tmp_path}", f"log.name={name}"], environ=environ)
        runs[name] = (proc.stderr, summary(tmp_path / name))
    assert "workers vectorized with torch.func" in runs["vec"][0]
    # the vectorized and the loop path compute the same step (to float rounding)
    assert abs(runs["vec"][1]["final_test_loss"] - runs["loop"][1]["final_test_loss"]) < 1e-4
    assert "workers computed one by one: torch.func failed on this model" in runs["fallback"][0]
    assert runs["fallback"][1]["steps"] == 6


@pytest.mark.slow
@pytest.mark.parametrize("plugins", [ALL_PLUGINS, DATA_PLUGINS], ids=["model-rule-class-attack", "dataset-rule-function"])
def test_a_run_with_plugins_resumes_exactly(tmp_path, plugins):
    common = [*plugins, "train.steps=8", "train.eval_every=4", "train.checkpoint_every=4", "workers.momentum=0.9"]
    train([*common, f"log.dir={tmp_path}", "log.name=full"])
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    for name in ("step_4.pt", "step_4.pt.sha256"):
        (part / "checkpoints" / name).write_bytes((tmp_path / "full" / "checkpoints" / name).read_bytes())
    train([*common, f"log.dir={tmp_path}", "log.name=part", "train.resume=auto"])
    assert summary(part)["resumed_from"].endswith("step_4.pt")
    assert summary(part)["model_sha256"] == summary(tmp_path / "full")["model_sha256"]


@pytest.mark.slow
def test_a_sweep_over_plugin_rules_runs_each_and_names_it(tmp_path, monkeypatch, capsys):
    import yaml
    from byzddp import sweep
    spec = {"name": "plug",
            "set": {"train.steps": 3, "train.eval_every": 3, "workers.n": 4, "workers.byzantine": 0,
                    "resampling.name": "none", "attack.name": "none", "log.progress": False,
                    "model.hidden": [16], "data.test_size": 200},
            "grid": {"aggregator.name": [RULE_FN, "cm"]},
            "seeds": [0]}
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(ROOT)
    assert sweep.main([str(grid), "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().err[-3000:]
    sw = sweep.load_grid(grid, out=tmp_path / "out")
    assert len(sw.runs) == 2
    for run in sw.runs:
        assert summary(tmp_path / "out" / "runs" / run.id)["config_hash"] == run.hash
    assert any("norm_clipped_mean" in run.id for run in sw.runs)
