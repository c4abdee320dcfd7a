"""A plug-in attack: `attack.name=examples.my_attack:ScaledReversal`.

An attack subclasses byzddp.attacks.Attack. `forge(ctx)` runs on every rank at every step and
overwrites, in place, the rows of the Byzantine workers hosted there (ctx.local_byzantine) in
ctx.rows, which hold what honest workers would send. What an attack learns about honest workers
it pays for over collectives (ctx.exchange), so every rank calls the same helpers in the same
order: here `honest_mean`, one exact sum, bit-identical for any number of ranks. Its keywords
come from `attack.args`.

    python train.py attack.name=examples.my_attack:ScaledReversal attack.args.scale=4
"""
from byzddp.attacks import Attack, honest_mean


class ScaledReversal(Attack):
    """Send -scale times the honest workers' mean (an inner-product manipulation, Xie et al.
    2020, with a large epsilon)."""
    name = "scaled_reversal"
    params = ("scale",)
    positive = ("scale",)       # checked before the run: attack.args.scale must be > 0
    needs_gradient = False      # Byzantine workers need no honest-looking gradient of their own

    def __init__(self, scale=2.0):
        self.scale = scale

    def forge(self, ctx):
        ctx.send(-self.scale * honest_mean(ctx))
