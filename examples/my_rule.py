"""Plug-in rules: `aggregator.name=examples.my_rule:norm_clipped_mean` or `examples.my_rule:NormFilter`.

A rule is either a plain function of the (m, d) tensor of vectors the server holds after
pre-aggregation, returning the (d,) update, or a subclass of byzddp.aggregators.Aggregator for
a rule that needs f (the number of Byzantine vectors it must tolerate, f' after resampling),
parameters (`aggregator.args`), state for checkpoints, or a requirement on (m, f').

    python train.py aggregator.name=examples.my_rule:NormFilter
"""
import torch

from byzddp.aggregators import Aggregator


def norm_clipped_mean(grads):
    """Every vector clipped to the median norm, then averaged."""
    norms = grads.norm(dim=1, keepdim=True)
    scale = (norms.median() / norms.clamp_min(1e-12)).clamp(max=1.0)
    return (grads * scale).mean(dim=0)


# What `python -m byzddp.check examples.my_rule:norm_clipped_mean` is not to hold it to, and why
# (docs/check.md).
norm_clipped_mean.exempt = {
    "translation": "norms are measured from the origin",
    "bounded": "a NaN or Inf vector makes the median norm NaN, so the call refuses the step "
               "(NonFiniteError) rather than filter it; and a function is told no f",
}


class NormFilter(Aggregator):
    """Drop the f vectors of largest norm, average the rest; `aggregator.args.keep_extra=k`
    keeps k of the dropped ones back (a parameter, to show how they arrive)."""
    name = "norm_filter"
    params = ("keep_extra",)
    sharded = False     # needs whole rows (norms): not under train.exchange=sharded
    exempt = {"translation": "norms are measured from the origin"}     # for python -m byzddp.check

    def __init__(self, f=0, keep_extra=0):
        super().__init__(f)
        self.keep_extra = keep_extra

    @classmethod
    def requirements(cls, m, fp, params):
        # (holds, condition, numbers, fix): refused unless it holds (or aggregator.allow_unsafe).
        return [(2 * fp + 1 <= m, "2f'+1 <= m (an honest majority)", f"2*{fp}+1={2 * fp + 1} > {m}", None)]

    def _aggregate(self, x, cols):
        drop = max(0, self.f - self.keep_extra)
        order = torch.argsort(x.norm(dim=1), stable=True)     # ties: the lower row index first
        self.selected = order[:x.shape[0] - drop]     # logged as the rule's selection counts
        return x[self.selected].mean(dim=0)
