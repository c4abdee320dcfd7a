"""Robust aggregation rules on an (m, d) tensor of vectors (one row per input).

`build(name, **params)` returns a callable rule: `agg(grads)` maps an (m, d) tensor on any
device to a (d,) tensor of the same dtype and device. `from_config(cfg)` builds the rule the
config asks for, told the number f' of Byzantine rows it must tolerate after pre-aggregation
(`byzddp.resampling`); `validate(cfg)` checks the rule's requirement on (m, f') first.

Rules (f = rows the rule must tolerate; every rule accepts f):
  mean                 the arithmetic mean; not robust: a non-finite row raises NonFiniteError.
  krum (f)             the row with the smallest score, score(i) = sum of the squared distances
                       to its m-f-2 nearest other rows (Blanchard et al. 2017).
  multikrum (f, m)     the mean of the m rows with the smallest Krum scores (default m = rows - f).
  cm                   coordinate-wise median; the mean of the two middle values for even m.
  trimmed_mean (b)     per coordinate drop the b largest and b smallest values, average the rest
                       (default b = f).
  rfa (T, nu)          geometric median by smoothed Weiszfeld: z = 0, then T times
                       beta_i = 1/max(||z - g_i||, nu), z = sum beta_i g_i / sum beta_i
                       (Pillutla et al. 2019). T = 1 is the normalized mean.
  cclip (tau, L)       centered clipping: L times c <- c + (1/m) sum_i clip_tau(g_i - c), with
                       clip_tau(v) = v min(1, tau/||v||); c starts from the previous call's output
                       (zero at first) and is the rule's state (Karimireddy et al. 2021).
  bulyan (f)           Krum selects theta = m-2f rows one at a time (each time Krum on the rows
                       left); per coordinate, the mean of the beta = theta-2f selected values
                       closest to their median (El Mhamdi et al. 2018).

Exact tie-breaking: Krum, Multi-Krum and Bulyan's selection take the lowest row index among
equal scores (stable sort); among values equally far from the median, Bulyan keeps the
smaller ones. A Krum round on r rows uses max(r-f-2, 1) neighbours: r-f-2 < 1 happens in
Bulyan's last round when f = 1 (and outside the theory). With one neighbour two mutual
nearest rows always tie, so Krum with r = f+3 and Bulyan with f <= 2 pick by input order
among them; otherwise the rules are invariant to the order of their inputs when no ties.

Non-finite rows (a Byzantine worker may send NaN or +-Inf): as long as at most f rows are bad,
no rule lets them reach its output. A bad row is infinitely far from every row in Krum,
Multi-Krum and Bulyan (never selected), counts as +Inf (NaN) or -Inf in the order statistics of
cm and trimmed_mean, and gets weight zero in rfa and a zero clipped step in cclip. A rule whose
output is still non-finite (more bad rows than it tolerates, or mean) raises NonFiniteError
instead of returning it.

Distances come from a float64 Gram matrix of the raw rows, never from `torch.cdist`'s
matrix-multiply shortcut: the rounding error of a squared distance is then about 1e-16 times
the squared norms of the two rows involved, so an outlier cannot spoil the distances between
other rows (as centring on a mean would). Krum, Multi-Krum and Bulyan read the data for that
one (m x d) x (d x m) product, then work on m x m numbers (Bulyan's theta Krum rounds too);
rfa and cclip run all their T or L iterations on that matrix too and read the data once more
for the result. Work over d goes in column chunks: memory stays O(m d + m^2) and no Python loop
runs over rows, pairs or coordinates. Products that average rows (a weighted sum, nnm's mixing)
follow the caller's TF32 setting; distances are float64 and never do.
"""
from __future__ import annotations

import math
import warnings
from typing import Iterator, Optional

import torch
from torch import Tensor

from byzddp.config import ConfigError


class NonFiniteError(RuntimeError):
    """The aggregate would hold NaN/Inf: the rule cannot absorb the non-finite rows it was given."""


RULES = ("mean", "krum", "multikrum", "cm", "trimmed_mean", "rfa", "cclip", "bulyan")

# Parameters each rule accepts besides f.
PARAMS = {"mean": (), "krum": (), "multikrum": ("m",), "cm": (), "trimmed_mean": ("b",),
          "rfa": ("T", "nu"), "cclip": ("tau", "L"), "bulyan": ()}


# ---------------------------------------------------------------------------- shared pieces

def _chunk_elements(device: torch.device) -> int:
    # Column chunks bound the temporaries of sorts and distance passes; a GPU wants few big launches.
    return 1 << 26 if device.type == "cuda" else 1 << 24


def column_chunks(x: Tensor) -> Iterator[slice]:
    """Slices of x's columns, each holding about `_chunk_elements` entries (at least one column)."""
    n, d = x.shape
    width = max(1, _chunk_elements(x.device) // max(n, 1))
    for start in range(0, d, width):
        yield slice(start, min(start + width, d))


def gram_matrix(x: Tensor, centre: Optional[Tensor] = None) -> tuple:
    """(G, good, p, q): G = x x^T in float64, accumulated over column chunks, with the rows and
    columns of non-finite rows zeroed; `good` marks the finite rows; given a `centre` c, also
    p = x c (zero on bad rows) and q = ||c||^2 in float64, else None.

    A NaN/Inf entry only spoils its own row and column of the product, and always its diagonal
    entry, which is how a bad row is found (a row so large that its squared norm overflows
    float64 counts as bad too; impossible for float32 inputs).
    """
    n = x.shape[0]
    gram = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    p = q = None
    if centre is not None:
        p = torch.zeros(n, dtype=torch.float64, device=x.device)
        q = torch.zeros((), dtype=torch.float64, device=x.device)
    for cols in column_chunks(x):
        part = x[:, cols].to(torch.float64)
        gram.addmm_(part, part.T)
        if centre is not None:
            c = centre[cols].to(torch.float64)
            p.addmv_(part, c)
            q += c @ c
    good = torch.isfinite(gram.diagonal())
    both = good[:, None] & good[None, :]
    gram = torch.where(both, gram, torch.zeros_like(gram))
    if p is not None:
        p = torch.where(good, p, torch.zeros_like(p))
    return gram, good, p, q


def pairwise_squared_distances(x: Tensor) -> tuple:
    """(D, good): D[i, j] = ||x_i - x_j||^2 in float64 and `good` marks the finite rows.

    From the float64 Gram matrix of the raw rows: the rounding error of D[i, j] is about 1e-16
    (||x_i||^2 + ||x_j||^2), whatever the other rows hold. Every distance from or to a non-finite
    row is +Inf, its own included; D[i, i] = 0 for good rows.
    """
    gram, good, _, _ = gram_matrix(x)
    sq = gram.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min_(0)
    dist.fill_diagonal_(0)
    both = good[:, None] & good[None, :]
    return torch.where(both, dist, torch.full_like(dist, math.inf)), good


def _combine(w: Tensor, x: Tensor, good: Tensor) -> Tensor:
    """sum_i w_i x_i in x's dtype, for float64 weights w that are zero on the bad rows, which
    are left out (0 * NaN would still be NaN)."""
    if not bool(good.all()):
        keep = good.nonzero().flatten()
        w, x = w[keep], x.index_select(0, keep)
    return w.to(x.dtype) @ x


def _lowest_first(score: Tensor, tier: Tensor) -> Tensor:
    """Row order by (tier, score), ties to the lowest index. Tier 0 rows (good) come before
    tier 1 (bad) and tier 2 (already taken) whatever their scores, even infinite ones."""
    big = torch.finfo(score.dtype).max
    by_score = torch.sort(score.clamp(max=big), stable=True).indices
    return by_score[torch.sort(tier[by_score], stable=True).indices]


def _krum_scores(dist: Tensor, f: int, alive: Optional[Tensor] = None, r: Optional[int] = None) -> Tensor:
    """Krum score of each row among the r `alive` rows (default: all): the sum of the squared
    distances to its r-f-2 nearest other alive rows, that count clamped to [1, r-1] outside the
    theory; rows not alive score +Inf."""
    n = dist.shape[0]
    others = dist.clone() if alive is None else dist.masked_fill(~alive[None, :], math.inf)
    others.fill_diagonal_(math.inf)
    r = n if r is None else r
    k = min(max(r - f - 2, 1), r - 1)
    if k < 1:  # a single row left: its score does not matter
        score = torch.zeros(n, dtype=dist.dtype, device=dist.device)
    else:
        score = torch.topk(others, k, dim=1, largest=False).values.sum(dim=1)
    return score if alive is None else score.masked_fill(~alive, math.inf)


# Coordinate-wise order statistics. NaN ranks above +Inf in both torch.sort and torch.topk (on
# every device), so a NaN row counts as +Inf and -Inf rows sit at the other end. The kernel is
# chosen by measurement (bench/aggregators.py --variants, 16-core CPU and H100): on CPU with
# 32 rows or more, torch.topk selects the needed ranks in 0.5x to 1.2x the time of one
# torch.sort of the whole tensor, while sorting it in column chunks costs up to 1.5x; with
# fewer rows a chunked sort is as fast as one sort, and topk up to 1.5x slower. On a GPU topk
# is 1.5x to 4x slower than a sort, and sorting the transposed (d, n) layout takes 0.6x to 1x
# the time of torch.sort along dim 0. Every kernel is exact and gives the same values.
_SELECT_BY_TOPK = {"cpu"}   # device types that select ranks with topk ...
_TOPK_MIN_ROWS = 32         # ... from this many rows on
_SORT_ALONG_ROWS = {"cpu"}  # device types that sort along dim 0; others sort the (d, n) layout


def _by_topk(x: Tensor) -> bool:
    return x.device.type in _SELECT_BY_TOPK and x.shape[0] >= _TOPK_MIN_ROWS


def _sort_columns(x: Tensor) -> Tensor:
    """x (n, c) sorted along dim 0 (on a GPU by sorting the transposed layout: faster)."""
    if x.device.type in _SORT_ALONG_ROWS:
        return torch.sort(x, dim=0).values
    return torch.sort(x.T.contiguous(), dim=1).values.T


def _median_columns(x: Tensor) -> Tensor:
    """Per column the median: the middle value, or the mean of the two middle values."""
    n = x.shape[0]
    lo, hi = (n - 1) // 2, n // 2
    if _by_topk(x):
        low = torch.topk(x, hi + 1, dim=0, largest=False, sorted=False).values  # ranks 0..hi
        if lo == hi:
            return low.max(dim=0).values
        top = torch.topk(low, 2, dim=0).values                                    # ranks hi, lo
        return (top[0] + top[1]) / 2
    s = _sort_columns(x)
    return s[lo] if lo == hi else (s[lo] + s[hi]) / 2


def _trimmed_columns(x: Tensor, b: int) -> Tensor:
    """Per column the mean of the values ranked b .. n-b-1."""
    n = x.shape[0]
    if _by_topk(x):
        kept = torch.topk(x, n - b, dim=0, largest=False, sorted=False).values   # drop the b largest
        return torch.topk(kept, n - 2 * b, dim=0, sorted=False).values.mean(dim=0)  # and the b smallest
    return _sort_columns(x)[b:n - b].mean(dim=0)


def _check_input(grads: Tensor, name: str) -> Tensor:
    if not isinstance(grads, Tensor) or grads.dim() != 2 or grads.shape[0] < 1:
        shape = tuple(grads.shape) if isinstance(grads, Tensor) else type(grads).__name__
        raise ValueError(f"aggregator {name}: expected an (m, d) tensor with m >= 1 rows, got {shape}")
    if not grads.is_floating_point():
        raise ValueError(f"aggregator {name}: expected a floating-point tensor, got {grads.dtype}")
    return grads


# ---------------------------------------------------------------------------- the rules

class Aggregator:
    """A robust rule: `rule(grads)` with grads (m, d) returns the (d,) aggregate.

    `selected` holds the row indices the last call picked (Krum, Multi-Krum, Bulyan), else None.
    """
    name = ""

    def __init__(self, f: int = 0) -> None:
        self.f = f
        self.selected: Optional[Tensor] = None

    @torch.no_grad()
    def __call__(self, grads: Tensor) -> Tensor:
        x = _check_input(grads, self.name)
        self.selected = None
        out = self._aggregate(x)
        if not bool(torch.isfinite(out).all()):
            raise NonFiniteError(self._non_finite_message(x.shape[0]))
        return out

    def _aggregate(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _non_finite_message(self, m: int) -> str:
        return (f"aggregator {self.name}: the aggregate of {m} rows is not finite: more rows hold "
                f"NaN/Inf than the f={self.f} it tolerates; the update was not applied")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"aggregator {self.name} keeps no state, got keys {sorted(state)}")

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={getattr(self, k)}" for k in ("f", *PARAMS[self.name]))
        return f"{self.name}({params})"


class Mean(Aggregator):
    """The arithmetic mean: optimal without attackers, broken by a single bad row."""
    name = "mean"

    def _aggregate(self, x: Tensor) -> Tensor:
        return x.mean(dim=0)

    def _non_finite_message(self, m: int) -> str:
        return ("aggregator mean: an input row holds NaN/Inf and the mean cannot exclude it; "
                "use a robust rule (cm, krum, rfa, cclip, ...) or find the worker that diverged")


class Krum(Aggregator):
    """The row with the lowest Krum score (lowest index among equal scores)."""
    name = "krum"

    def _aggregate(self, x: Tensor) -> Tensor:
        dist, good = pairwise_squared_distances(x)
        order = _lowest_first(_krum_scores(dist, self.f), (~good).long())
        self.selected = order[:1]
        return x.index_select(0, self.selected)[0]


class MultiKrum(Aggregator):
    """The mean of the m rows with the lowest Krum scores (default m = rows - f)."""
    name = "multikrum"

    def __init__(self, f: int = 0, m: Optional[int] = None) -> None:
        super().__init__(f)
        self.m = m

    def _aggregate(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        m = n - self.f if self.m is None else self.m
        m = min(max(m, 1), n)
        dist, good = pairwise_squared_distances(x)
        order = _lowest_first(_krum_scores(dist, self.f), (~good).long())
        self.selected = order[:m]
        return x.index_select(0, self.selected).mean(dim=0)


class CoordinateMedian(Aggregator):
    """Per coordinate the median; the mean of the two middle values when the row count is even."""
    name = "cm"

    def _aggregate(self, x: Tensor) -> Tensor:
        out = x.new_empty(x.shape[1])
        for cols in column_chunks(x):
            out[cols] = _median_columns(x[:, cols])
        return out


class TrimmedMean(Aggregator):
    """Per coordinate, drop the b largest and the b smallest values and average the rest."""
    name = "trimmed_mean"

    def __init__(self, f: int = 0, b: Optional[int] = None) -> None:
        super().__init__(f)
        self.b = b

    def _aggregate(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        b = self.f if self.b is None else self.b
        if 2 * b >= n:
            raise ValueError(f"aggregator trimmed_mean: b={b} trims all of the {n} rows; needs 2b < {n}")
        out = x.new_empty(x.shape[1])
        for cols in column_chunks(x):
            out[cols] = _trimmed_columns(x[:, cols], b)
        return out


class RFA(Aggregator):
    """Smoothed Weiszfeld iterations for the geometric median, from z = 0, equal weights;
    a non-finite row gets weight zero."""
    name = "rfa"

    def __init__(self, f: int = 0, T: int = 8, nu: float = 0.1) -> None:
        super().__init__(f)
        self.T, self.nu = T, nu

    def _aggregate(self, x: Tensor) -> Tensor:
        # z is always a combination w^T x of the rows, so ||z - g_i||^2 = G_ii - 2 (G w)_i
        # + w^T G w comes from one float64 Gram matrix: the T iterations run on n x n numbers,
        # and the data is read twice (the product, then z).
        gram, good, _, _ = gram_matrix(x)
        if not bool(good.any()):
            return x.new_full((x.shape[1],), math.nan)
        norms = gram.diagonal()
        w = torch.zeros_like(norms)  # z = 0
        for _ in range(self.T):
            gw = gram @ w
            dist = (norms - 2 * gw + w @ gw).clamp_min(0).sqrt()
            beta = torch.where(good, 1.0 / dist.clamp_min(self.nu), torch.zeros_like(dist))
            w = beta / beta.sum()
        return _combine(w, x, good)


class CenteredClipping(Aggregator):
    """L steps c <- c + (1/m) sum_i clip_tau(g_i - c) from the previous call's centre; a
    non-finite row takes a zero step (it still counts in the 1/m)."""
    name = "cclip"

    def __init__(self, f: int = 0, tau: float = 10.0, L: int = 3) -> None:
        super().__init__(f)
        self.tau, self.L = tau, L
        self.centre: Optional[Tensor] = None

    def _aggregate(self, x: Tensor) -> Tensor:
        n, d = x.shape
        if self.centre is None:
            c0 = x.new_zeros(d)
        elif self.centre.shape != (d,):
            raise ValueError(f"aggregator cclip: the carried centre has {self.centre.numel()} "
                             f"coordinates but the rows have {d}")
        else:
            c0 = self.centre.to(device=x.device, dtype=x.dtype)
        # c stays a combination a c0 + w^T x, so ||g_i - c||^2 = G_ii - 2 (G w)_i - 2a p_i
        # + w^T G w + 2a w^T p + a^2 q with p = x c0 and q = ||c0||^2: one float64 product,
        # the L steps on n x n numbers, and c itself at the end.
        gram, good, p, q = gram_matrix(x, c0)
        norms = gram.diagonal()
        a = torch.ones((), dtype=torch.float64, device=x.device)
        w = torch.zeros_like(norms)
        for _ in range(self.L):
            gw = gram @ w
            sq = norms - 2 * gw - 2 * a * p + w @ gw + 2 * a * (w @ p) + a * a * q
            scale = (self.tau / sq.clamp_min(0).sqrt()).clamp(max=1.0)  # distance 0: inf -> 1
            scale = torch.where(good, scale, torch.zeros_like(scale))     # a bad row takes no step
            keep = 1 - scale.sum() / n
            a, w = a * keep, w * keep + scale / n
        c = a.to(x.dtype) * c0 + _combine(w, x, good)
        if bool(torch.isfinite(c).all()):
            self.centre = c.clone()
        return c

    def state_dict(self) -> dict:
        return {} if self.centre is None else {"centre": self.centre.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state) - {"centre"}
        if unknown:
            raise ValueError(f"aggregator cclip: unknown state keys {sorted(unknown)}")
        centre = state.get("centre")
        self.centre = None if centre is None else centre.detach().clone()


class Bulyan(Aggregator):
    """Krum picks theta = m-2f rows one by one; per coordinate the mean of the beta = theta-2f
    picked values closest to their median (clamped to >= 1 outside the theory)."""
    name = "bulyan"

    def _aggregate(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        theta = max(n - 2 * self.f, 1)
        beta = max(theta - 2 * self.f, 1)
        dist, good = pairwise_squared_distances(x)
        alive = torch.ones(n, dtype=torch.bool, device=x.device)
        tier = (~good).long()
        picks = []
        # theta rounds of Krum on the n x n distances (no pass over the data), each on the rows left.
        for taken in range(theta):
            score = _krum_scores(dist, self.f, alive, n - taken)
            pick = _lowest_first(score, torch.where(alive, tier, 2))[0]
            picks.append(pick)
            alive[pick] = False
        self.selected = torch.stack(picks)
        out = x.new_empty(x.shape[1])
        lo, hi = (theta - 1) // 2, theta // 2
        windows = theta - beta + 1
        offsets = torch.arange(beta, device=x.device)[:, None]
        for cols in column_chunks(x):
            # float64 from here: the window choice compares differences of nearby values.
            s = _sort_columns(x[:, cols].index_select(0, self.selected)).to(torch.float64)
            median = s[lo] if lo == hi else (s[lo] + s[hi]) / 2
            # The beta values closest to the median are a contiguous window s[a : a+beta] of the
            # sorted values. Sliding it right from a = 0 swaps s[a] for s[a+beta]; that helps
            # while s[a+beta] is strictly closer, which holds for a prefix of the a's (one side
            # draws nearer, the other farther), so a = the count of such a. Equal distances
            # keep the window on the left.
            closer = (s[beta:] - median) < (median - s[:windows - 1])
            start = closer.sum(dim=0)
            out[cols] = s.gather(0, start[None, :] + offsets).mean(dim=0).to(x.dtype)
        return out


_CLASSES = {"mean": Mean, "krum": Krum, "multikrum": MultiKrum, "cm": CoordinateMedian,
            "trimmed_mean": TrimmedMean, "rfa": RFA, "cclip": CenteredClipping, "bulyan": Bulyan}


# ---------------------------------------------------------------------------- building

def _param_problem(key: str, value) -> Optional[str]:
    """Why `value` is not valid for parameter `key`, or None."""
    if key in ("f", "m", "b", "T", "L"):
        low = 0 if key in ("f", "b") else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            return f"must be an integer >= {low}"
    elif not isinstance(value, (int, float)) or isinstance(value, bool) or not (0 < value < math.inf):
        return "must be a positive number"
    return None


def build(name: str, **params) -> Aggregator:
    """The rule `name` with its parameters (f for every rule; m, b, T, nu, tau, L where used;
    None means the default)."""
    if name not in _CLASSES:
        raise ConfigError(f"unknown aggregator '{name}'; choose one of {', '.join(RULES)}")
    allowed = ("f", *PARAMS[name])
    for key, value in params.items():
        if key not in allowed:
            raise ConfigError(f"aggregator {name} takes no parameter '{key}'; "
                              f"its parameters: {', '.join(allowed)}")
        problem = None if value is None else _param_problem(key, value)
        if problem:
            raise ConfigError(f"aggregator {name}: parameter {key} {problem}, got {value!r}")
    return _CLASSES[name](**{k: v for k, v in params.items() if v is not None})


def _setting(cfg):
    """(resampler, m, f'): the vectors the rule sees after the config's pre-aggregation, and
    how many of them may be Byzantine."""
    from byzddp import resampling
    res = resampling.from_config(cfg)
    n, f = cfg.workers.n, cfg.workers.byzantine
    return res, res.num_outputs(n), res.byzantine_outputs(n, f)


def _rule_params(cfg, m: int, fp: int) -> dict:
    a = cfg.aggregator
    params = {"f": fp}
    if a.name == "multikrum":
        params["m"] = a.m if a.m is not None else max(m - fp, 1)
    elif a.name == "trimmed_mean":
        # Default b = f', kept computable (2b < m) when an expert runs outside the guarantee.
        params["b"] = a.b if a.b is not None else min(fp, (m - 1) // 2)
    elif a.name == "rfa":
        params.update(T=a.T, nu=a.nu)
    elif a.name == "cclip":
        params.update(tau=a.tau, L=a.L)
    return params


def from_config(cfg) -> Aggregator:
    """The rule of cfg.aggregator, told f' = the Byzantine rows it may see after cfg.resampling
    (defaults: multikrum m = m - f', trimmed_mean b = f')."""
    _, m, fp = _setting(cfg)
    return build(cfg.aggregator.name, **_rule_params(cfg, m, fp))


def _requirements(name: str, m: int, fp: int, params: dict) -> list:
    """(holds, condition, numbers, fix or None) for each guarantee the rule needs of (m, f')."""
    if name in ("krum", "multikrum"):
        reqs = [(2 * fp + 3 <= m, "2f'+3 <= m", f"2*{fp}+3={2 * fp + 3} > {m}", None)]
        if name == "multikrum":
            k = params["m"]
            reqs.append((k <= m - fp, "aggregator.m <= m-f'", f"aggregator.m={k} > {m}-{fp}",
                         f"lower aggregator.m to {max(m - fp, 1)}"))
        return reqs
    if name in ("cm", "rfa", "cclip"):
        return [(2 * fp + 1 <= m, "2f'+1 <= m (an honest majority)", f"2*{fp}+1={2 * fp + 1} > {m}", None)]
    if name == "trimmed_mean":
        b = params["b"]
        fix = f"raise aggregator.b to {fp}" if 2 * fp < m else None
        return [(b >= fp, "b >= f'", f"b={b} < {fp}", fix)]
    if name == "bulyan":
        return [(4 * fp + 3 <= m, "4f'+3 <= m", f"4*{fp}+3={4 * fp + 3} > {m}", None)]
    return []  # mean promises nothing


def validate(cfg) -> None:
    """Check the rule's requirement on (m, f') after pre-aggregation; refuse (or, with
    aggregator.allow_unsafe, warn) with one line naming the rule, the numbers and the condition."""
    a = cfg.aggregator
    if a.name not in _CLASSES:
        raise ConfigError(f"config key aggregator.name: '{a.name}' is not one of {', '.join(RULES)}")
    for key in ("m", "b", "T", "nu", "tau", "L"):
        value = getattr(a, key)
        problem = None if value is None else _param_problem(key, value)
        if problem:
            raise ConfigError(f"config key aggregator.{key}: {problem}, got {value!r}")
    res, m, fp = _setting(cfg)
    params = _rule_params(cfg, m, fp)
    # Without these the rule cannot run at all: no flag lifts them.
    if a.name == "multikrum" and params["m"] > m:
        raise ConfigError(f"config key aggregator.m: multikrum averages m={params['m']} vectors but "
                          f"sees only {m}; lower aggregator.m")
    if a.name == "trimmed_mean" and 2 * params["b"] >= m:
        raise ConfigError(f"config key aggregator.b: trimmed_mean with b={params['b']} trims all of "
                          f"the {m} vectors it sees (needs 2b < m); lower aggregator.b")
    if res.name in ("none", "nnm"):
        seen = "without resampling" if res.name == "none" else "after nnm"
        generic = "lower workers.byzantine or raise workers.n"
    else:
        seen = f"after resampling {res.name} (s={res.s})"
        generic = "lower workers.byzantine or resampling.s"
    for holds, condition, numbers, fix in _requirements(a.name, m, fp, params):
        if holds:
            continue
        msg = (f"aggregator {a.name} needs {condition}, but {seen} the rule sees m={m} vectors with "
               f"up to f'={fp} Byzantine ({numbers})")
        if a.allow_unsafe:
            warnings.warn(f"{msg}; running outside the rule's guarantee (aggregator.allow_unsafe=true)",
                          UserWarning, stacklevel=2)
        else:
            raise ConfigError(f"{msg}; {fix or generic}, or set aggregator.allow_unsafe=true")
