"""Paired comparisons: each arm against its axis's baseline, seed by seed.

For an axis (a case axis such as `rule`, or a grid key such as `resampling.name`) and one of
its values other than the baseline (the arm), a cell is one combination of the other axes'
values. At every seed where both the arm's run and the baseline's run of that cell finished,
the difference is arm - baseline; the row gives the mean difference over those seeds, its 95%
Student t interval (two seeds or more) and the number of seeds where the arm did better
(higher accuracy; lower for the metrics in LOWER_IS_BETTER; a tie is no win).

Pairing removes the seed's share of the noise only where the two runs draw the same honest
randomness. Every random stream is keyed by (seed, worker, step) or (seed, step), so runs of
one seed that differ only in the rule or the pre-aggregation draw the same model
initialisation and give every honest worker the same batches at every step. The data
partition, though, depends on who holds a shard: a fixed Byzantine set (the last f, the paper)
samples the whole training set, and the shards are cut for the workers that remain. Attack
`none` has no Byzantine worker (every one of the n holds a shard), an attack has n - f
holders (unless it trains on data of its own, backdoor, or the set rotates: then all n hold
one), so `none` against an attack, or attacks that differ in `attack.count`, give the honest
workers other shards. `honest_draws` names what fixes these draws; a row whose runs differ in
it says so (`shared_randomness` no, and which part differs).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from byzddp import attacks
from byzddp import config as config_mod
from byzddp.sweep.grid import Run, Sweep, combos
from byzddp.sweep.stats import mean_ci

# Metrics where lower is better (an attacker drives them up); the others: higher is better.
LOWER_IS_BETTER = ("final_test_loss", "final_attack_success_rate", "mean_kappa",
                   "mean_aggregation_error", "mean_byzantine_selection_rate")
COLUMNS = ("metric", "axis", "baseline", "arm", "cell", "mean_difference", "ci_low", "ci_high",
           "seeds", "wins", "baseline_mean", "arm_mean", "shared_randomness", "differs_in")


def shard_holders(cfg) -> List[int]:
    """The logical workers that hold a shard of the partition, as the trainer decides: all n,
    unless a fixed Byzantine set samples the whole training set (then the n - f others)."""
    fixed = set(attacks.whole_set_samplers(cfg) or ())
    return [w for w in range(cfg.workers.n) if w not in fixed]


def honest_draws(cfg) -> Dict[str, Any]:
    """What fixes the honest workers' random draws (model initialisation, shards, batches,
    augmentation, participation, dropout), by part: two runs with equal parts give every worker
    honest in both the same batch at every step."""
    return {
        "seed": cfg.seed,
        "data": dataclasses.asdict(cfg.data),
        "batches": (cfg.train.batch_size, cfg.train.local_steps),
        "participation": (cfg.workers.n, cfg.workers.participation),
        "model": dataclasses.asdict(cfg.model),
        "shards": tuple(shard_holders(cfg)),
    }


def differing(a: Dict[str, Any], b: Dict[str, Any]) -> List[str]:
    return [k for k in a if a[k] != b.get(k)]


def run_config(sweep: Sweep, run: Run):
    """The run's resolved config (kept from the grid's expansion when it is there)."""
    if run.config is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # load_grid has said them once already
            run.config = config_mod.load(sweep.base, run.override_args())
    return run.config


@dataclass
class Paired:
    """One row of the paired-differences table."""
    metric: str
    axis: str
    baseline: str
    arm: str
    cell: Dict[str, str]           # the other axes' labels
    seeds: List[int]               # seeds where both runs finished
    differences: List[float]       # arm - baseline per seed, in the metric's own units
    baseline_values: List[float]
    arm_values: List[float]
    differs_in: List[str]          # parts of honest_draws that differ between the two runs

    @property
    def better(self) -> int:
        return -1 if self.metric in LOWER_IS_BETTER else 1

    @property
    def wins(self) -> int:
        return sum(self.better * d > 0 for d in self.differences)

    @property
    def shared(self) -> bool:
        return not self.differs_in

    def interval(self):
        return mean_ci(self.differences)


def paired(sweep: Sweep, records: Sequence[Any], metrics: Sequence[str]) -> List[Paired]:
    """Every (metric, axis, arm, cell) with at least one seed where both runs finished."""
    main = {}
    for rec in records:
        if rec.run.role == "main" and rec.status == "done":
            main[(tuple(sorted(rec.run.point.items())), rec.run.seed)] = rec
    out: List[Paired] = []
    for metric in metrics:
        for axis in sweep.axes:
            if len(axis.values) < 2:
                continue
            base = sweep.baseline.get(axis.name, axis.values[0].label)
            others = [a.name for a in sweep.axes if a.name != axis.name]
            for arm in (v.label for v in axis.values if v.label != base):
                for cell in combos(sweep, others):
                    row = Paired(metric, axis.name, base, arm, cell, [], [], [], [], [])
                    for seed in sweep.seeds:
                        a = main.get((tuple(sorted({**cell, axis.name: arm}.items())), seed))
                        b = main.get((tuple(sorted({**cell, axis.name: base}.items())), seed))
                        va, vb = _value(a, metric), _value(b, metric)
                        if va is None or vb is None:
                            continue
                        row.seeds.append(seed)
                        row.arm_values.append(va)
                        row.baseline_values.append(vb)
                        row.differences.append(va - vb)
                        for part in differing(honest_draws(run_config(sweep, a.run)),
                                              honest_draws(run_config(sweep, b.run))):
                            if part not in row.differs_in:
                                row.differs_in.append(part)
                    if row.seeds:
                        out.append(row)
    return out


def _value(rec, metric: str) -> Optional[float]:
    if rec is None:
        return None
    v = (rec.summary or {}).get(metric)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def cell_label(sweep: Sweep, cell: Dict[str, str]) -> str:
    return ", ".join(f"{a}={v}" for a, v in cell.items())


def to_csv(sweep: Sweep, rows: Sequence[Paired]) -> str:
    """paired.csv: one row per (metric, axis, arm, cell), numbers in summary.json's units."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        mean, low, high = r.interval()
        writer.writerow([r.metric, r.axis, r.baseline, r.arm, cell_label(sweep, r.cell), repr(mean),
                         "" if low is None else repr(low), "" if high is None else repr(high),
                         len(r.seeds), r.wins, repr(sum(r.baseline_values) / len(r.seeds)),
                         repr(sum(r.arm_values) / len(r.seeds)), "yes" if r.shared else "no",
                         ";".join(r.differs_in)])
    return buf.getvalue()


def markdown(sweep: Sweep, rows: Sequence[Paired], metric: str, scale: float, unit: str,
             heading: str) -> List[str]:
    """The "Paired differences" tables of one metric: one per (axis, arm)."""
    rows = [r for r in rows if r.metric == metric]
    lines: List[str] = []
    groups: Dict[tuple, List[Paired]] = {}
    for r in rows:
        groups.setdefault((r.axis, r.arm), []).append(r)
    for (axis, arm), group in groups.items():
        base = group[0].baseline
        direction = "lower" if metric in LOWER_IS_BETTER else "higher"
        lines += [f"{heading} {axis}: {arm} - {base}", ""]
        decided = [g for g in group if len(g.seeds) > 1]
        above = sum(g.interval()[1] > 0 for g in decided)
        below = sum(g.interval()[2] < 0 for g in decided)
        better = sum(g.better * g.interval()[0] > 0 for g in group)
        summary = f"{arm} is better ({direction} {metric}) than {base} on average in {better} of {len(group)} cells"
        if decided:
            summary += (f"; the 95% interval of the difference lies above 0 in {above} and below 0 in "
                        f"{below} of the {len(decided)} cells with two seeds or more")
        lines += [summary + ".", ""]
        others = list(group[0].cell)
        lines.append("| " + " | ".join([", ".join(others) or "cell", f"mean difference{unit}", "95% CI",
                                        "seeds", "wins", "honest draws"]) + " |")
        lines.append("|" + "---|" * 6)
        for g in group:
            mean, low, high = g.interval()
            ci = "-" if low is None else f"[{scale * low:+.2f}, {scale * high:+.2f}]"
            draws = "shared" if g.shared else "differ: " + ", ".join(g.differs_in)
            lines.append("| " + " | ".join([", ".join(g.cell.values()) or sweep.name, f"{scale * mean:+.2f}",
                                            ci, str(len(g.seeds)), f"{g.wins}/{len(g.seeds)}", draws]) + " |")
        lines.append("")
    return lines
