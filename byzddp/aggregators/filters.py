"""Filtering rules that drop or down-weight suspicious rows before averaging: divide-and-conquer
(dnc), SignGuard (signguard) and FLTrust (fltrust).

dnc and signguard draw a random set of coordinates each call, from the generator the caller
gives (`aggregate(..., generator=g)`); the trainer gives `streams.generator("aggregator", seed,
step)`, so every rank and every mode draws the same coordinates. Without one they draw from the
stream of (seed 0, step 0). fltrust needs the server's own gradient on its trusted root set
(`aggregate(..., root_gradient=g0)`), which the server side computes (byzddp.server.Server.root_gradient).

Work over d follows the global column grid (`byzddp.geometry.Columns`): each rule sums per-chunk
partials in chunk order (a subset's centred Gram matrix, norms, sign counts, inner products with
g0) and then works on m x m or m numbers, so a rank's slice of the columns gives bit for bit the
whole call's result (`byzddp.sharded`). A non-finite row is found from those sums (its squared
norm or its count of non-finite entries) and never selected or weighted.

dnc and signguard read the selection back to the host (`selected` is a data-dependent set; dnc's
eigendecomposition and signguard's clustering run on m x m and m x 3 numbers), one sync per call;
fltrust too, for `selected`: the rows of positive trust.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor

from byzddp import streams
from byzddp.aggregators.base import Aggregator, honest_majority
from byzddp.aggregators.krum import lowest_first
from byzddp.geometry import Columns, weighted_sum


def default_generator() -> torch.Generator:
    """The stream a library call without a generator draws from: the trainer's for seed 0, step 0."""
    return streams.generator("aggregator", 0, 0)


def draw_coordinates(generator: torch.Generator, d: int, k: int) -> Tensor:
    """k of the d coordinates without replacement, sorted (CPU); all of them (no draw) when k >= d."""
    if k >= d:
        return torch.arange(d)
    return torch.randperm(d, generator=generator)[:k].sort().values


def in_chunks(coords: Tensor, cols: Columns) -> List[Tensor]:
    """For each held grid chunk, the sorted global `coords` that fall in it, as indices of the
    held columns (on CPU; the caller moves them)."""
    out = []
    for c in cols.chunks():
        lo, hi = cols.start + c.start, cols.start + c.stop
        a, b = torch.searchsorted(coords, torch.tensor([lo, hi])).tolist()
        out.append(coords[a:b] - cols.start)
    return out


def kept_lowest(score: Tensor, good: Tensor, keep: int) -> Tensor:
    """Mask of the `keep` good rows with the lowest scores (ties to the lowest index); never a bad
    row, so fewer when fewer rows are good. On the device, no host sync."""
    n = score.shape[0]
    order = lowest_first(score, (~good).long())
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=score.device)
    return (rank < keep) & good


def median_of_good(values: Tensor, good: Tensor) -> Tensor:
    """The median of the good entries (the mean of the two middle ones for an even count; NaN for
    none), on the device."""
    k = good.sum()
    s = torch.sort(torch.where(good, values, torch.full_like(values, math.inf))).values
    lo, hi = ((k - 1).clamp_min(0) // 2), (k // 2).clamp(max=values.shape[0] - 1)
    med = (s[lo] + s[hi]) / 2
    return torch.where(k > 0, med, torch.full_like(med, math.nan))


class Drawing(Aggregator):
    """A rule that draws coordinates each call from the caller's generator (`draws`)."""
    draws = True

    def aggregate(self, grads: Tensor, columns: Optional[Columns] = None,
                  generator: Optional[torch.Generator] = None) -> Tensor:
        self._generator = generator if generator is not None else default_generator()
        return super().aggregate(grads, columns)


# ---------------------------------------------------------------------------- dnc

class DivideAndConquer(Drawing):
    """Divide-and-conquer (Shejwalkar & Houmansadr, NDSS 2021, Algorithm 2). niters times: draw b
    coordinates, centre the rows' subsampled vectors on their mean, score each row by its squared
    projection on the top right-singular vector, keep the m - floor(c f) lowest scores; the output
    is the mean of the rows kept every time. The score (X_c v)_i^2 = lambda_1 u_i^2 comes from the
    top eigenpair (lambda_1, u) of the centred m x m Gram matrix X_c X_c^T, a sum over column chunks.

    Non-finite rows are left out of the mean that centres the others and are never kept (so at
    most min(m - floor(c f), finite rows) are kept per iteration). When the intersection is empty
    (few rows, many iterations), the output is the mean of the rows kept in the most iterations;
    with no finite row it is NaN and `rule(grads)` raises NonFiniteError.
    """
    name = "dnc"
    params = ("niters", "b", "c")

    def __init__(self, f: int = 0, niters: int = 5, b: int = 10000, c: float = 1.0) -> None:
        super().__init__(f)
        self.niters, self.b, self.c = niters, b, c

    @classmethod
    def requirements(cls, m: int, fp: int, params: dict) -> list:
        return [honest_majority(m, fp)]

    @classmethod
    def impossible(cls, m: int, params: dict) -> Optional[tuple]:
        f, c = params.get("f", 0), params.get("c", 1.0)
        if m - math.floor(c * f) < 1:
            return ("aggregator.c", f"dnc keeps m - floor(c f) = {m} - floor({c:g}*{f}) < 1 rows; lower aggregator.c")
        if params.get("b", 10000) < 1:
            return ("aggregator.b", "dnc subsamples b >= 1 coordinates per iteration; raise aggregator.b")
        return None


    def _aggregate(self, x: Tensor, cols: Columns) -> Tensor:
        n, dev = x.shape[0], x.device
        subsets = [in_chunks(draw_coordinates(self._generator, cols.d_total, self.b), cols)
                   for _ in range(self.niters)]
        # The finite rows first (a row may hold NaN only in columns another rank holds): they
        # alone give the mean that centres the subsampled vectors.
        counts = [(~torch.isfinite(x[:, c])).sum(1).to(torch.float64) for c in cols.chunks()]
        good = cols.total(counts, torch.zeros(n, dtype=torch.float64, device=dev)) == 0
        k = good.sum().to(torch.float64)
        # Per chunk, per iteration: the centred Gram matrix of the chunk's subsampled columns.
        partials = []
        for j, _ in enumerate(cols.chunks()):
            pieces = []
            for it in range(self.niters):
                sub = x[:, subsets[it][j].to(dev)].to(torch.float64)
                sub = torch.where(good[:, None], sub, torch.zeros_like(sub))
                centred = torch.where(good[:, None], sub - sub.sum(0) / k, torch.zeros_like(sub))
                pieces.append((centred @ centred.T).reshape(-1))
            partials.append(torch.cat(pieces))
        grams = cols.total(partials, torch.zeros(self.niters * n * n, dtype=torch.float64, device=dev))
        keep = max(n - math.floor(self.c * self.f), 1)
        kept = torch.zeros(n, dtype=torch.long, device=dev)    # iterations that kept each row
        for gram in grams.view(self.niters, n, n):
            evals, evecs = torch.linalg.eigh(gram)
            score = evals[-1] * evecs[:, -1] ** 2
            kept += kept_lowest(score, good, keep).long()
        # The rows kept every time (the paper's intersection); when no row was, the rows kept
        # most often, so that few vectors (after bucketing) do not stop the run for nothing.
        chosen = good & (kept == kept.max()) & (kept > 0)
        self.selected = torch.nonzero(chosen).flatten()
        w = chosen.to(torch.float64) / chosen.sum()   # no row kept: 0/0, a NaN aggregate
        return weighted_sum(w, x, good, cols)


# ---------------------------------------------------------------------------- signguard

def mean_shift_largest_cluster(points: Tensor, quantile: float = 0.5, max_iter: int = 300) -> Tensor:
    """Mask of the largest cluster of `points` (k, p) by flat-kernel mean shift, deterministic.

    The bandwidth h is the mean over points of the distance to their floor(quantile k)-th nearest
    point, the point itself counted first (scikit-learn's estimate_bandwidth, on every point).
    Every point seeds a mode: y <- mean of the points within h of y, until y moves by at most
    1e-3 h or max_iter times. Modes are taken in order of their count of points within h (most
    first, ties to the lowest seed), a mode within h of an earlier taken one is dropped, and every
    point joins its nearest taken mode (ties to the earlier one). The largest cluster wins, ties
    to the earlier mode.
    """
    k = points.shape[0]
    if k == 0:
        return torch.zeros(0, dtype=torch.bool)
    dist = torch.cdist(points, points, compute_mode="donot_use_mm_for_euclid_dist")
    nth = max(int(k * quantile), 1)
    h = float(torch.sort(dist, dim=1).values[:, nth - 1].mean())
    y, count = points.clone(), torch.zeros(k, dtype=torch.long)
    moving = torch.ones(k, dtype=torch.bool)
    for _ in range(max_iter):
        within = torch.cdist(y, points, compute_mode="donot_use_mm_for_euclid_dist") <= h
        count = torch.where(moving, within.sum(1), count)
        new = (within.to(points.dtype) @ points) / within.sum(1, keepdim=True).clamp_min(1)
        shift = (new - y).norm(dim=1)
        y = torch.where(moving[:, None], new, y)
        moving &= shift > 1e-3 * h
        if not moving.any():
            break
    order = sorted(range(k), key=lambda i: (-int(count[i]), i))
    taken: List[int] = []
    for i in order:
        if all(float((y[i] - y[j]).norm()) > h for j in taken):
            taken.append(i)
    modes = y[taken]
    label = torch.argmin(torch.cdist(points, modes, compute_mode="donot_use_mm_for_euclid_dist"), dim=1)
    sizes = torch.bincount(label, minlength=len(taken))
    return label == int(torch.argmax(sizes))   # argmax: the first of the largest


class SignGuard(Drawing):
    """SignGuard (Xu et al., ICDCS 2022, Algorithm 1). Norm filter: the rows whose norm lies in
    [L M, R M], M the median norm (L = norm_low, R = norm_high). Sign filter: on a random
    sign_fraction of the coordinates, each row's fractions of positive, zero and negative entries,
    clustered by mean shift (`mean_shift_largest_cluster`, a deterministic flat-kernel version of
    the paper's MeanShift), the largest cluster. The output is the mean of the rows in both sets,
    each clipped to norm M: (1/|S|) sum_{i in S} g_i min(1, M/||g_i||).

    Non-finite rows are in neither set and do not count in M. When the two sets do not meet
    (few rows), the norm filter's rows are averaged; no finite row gives a NaN aggregate
    (NonFiniteError from `rule(grads)`).
    """
    name = "signguard"
    exempt = {"translation": "it filters by norms relative to the median norm and by sign statistics, "
                             "both measured from the origin",
              "permutation": "mean-shift modes of equal count and clusters of equal size go to the lowest "
                             "row (sign statistics on few coordinates tie often)"}
    params = ("norm_low", "norm_high", "sign_fraction")

    def __init__(self, f: int = 0, norm_low: float = 0.1, norm_high: float = 3.0,
                 sign_fraction: float = 0.1) -> None:
        super().__init__(f)
        self.norm_low, self.norm_high, self.sign_fraction = norm_low, norm_high, sign_fraction

    @classmethod
    def requirements(cls, m: int, fp: int, params: dict) -> list:
        return [honest_majority(m, fp)]   # the largest cluster is the honest one

    @classmethod
    def impossible(cls, m: int, params: dict) -> Optional[tuple]:
        low, high = params.get("norm_low", 0.1), params.get("norm_high", 3.0)
        if low > high:
            return ("aggregator.norm_low", f"signguard keeps norms in [norm_low, norm_high] times the "
                                           f"median, but {low:g} > {high:g}; lower aggregator.norm_low")
        return None


    def _aggregate(self, x: Tensor, cols: Columns) -> Tensor:
        n, dev = x.shape[0], x.device
        size = max(1, int(self.sign_fraction * cols.d_total))
        subset = in_chunks(draw_coordinates(self._generator, cols.d_total, size), cols)
        # Per chunk: squared norms, and the counts of positive, zero and negative subset entries.
        partials = []
        for j, c in enumerate(cols.chunks()):
            part = x[:, c].to(torch.float64)
            sub = x[:, subset[j].to(dev)]
            partials.append(torch.cat([(part * part).sum(1), (sub > 0).sum(1).to(torch.float64),
                                       (sub == 0).sum(1).to(torch.float64), (sub < 0).sum(1).to(torch.float64)]))
        total = cols.total(partials, torch.zeros(4 * n, dtype=torch.float64, device=dev)).view(4, n)
        good = torch.isfinite(total[0])
        norms = torch.where(good, total[0], torch.zeros_like(total[0])).sqrt()
        median = median_of_good(norms, good)
        by_norm = good & (norms >= self.norm_low * median) & (norms <= self.norm_high * median)
        features = (total[1:] / size).T.cpu()
        good_cpu = good.cpu()
        by_sign = torch.zeros(n, dtype=torch.bool)
        by_sign[good_cpu] = mean_shift_largest_cluster(features[good_cpu])
        chosen = by_norm & by_sign.to(dev)
        # Few rows (after bucketing) can leave the two sets disjoint: then the norm filter's rows
        # (never empty while a row is finite: the median row passes), rather than stop the run.
        chosen = torch.where(chosen.any(), chosen, by_norm)
        self.selected = torch.nonzero(chosen).flatten()
        clip = (median / norms).clamp(max=1.0)     # a zero row: inf -> 1
        w = torch.where(chosen, clip, torch.zeros_like(clip)) / chosen.sum()   # none: 0/0 = NaN
        return weighted_sum(w, x, good, cols)


# ---------------------------------------------------------------------------- fltrust

class FLTrust(Aggregator):
    """FLTrust (Cao et al., NDSS 2021). The server holds a small trusted root set and computes its
    own gradient g0 on it each step (a different threat model: the server has clean data of the
    task). Trust score TS_i = ReLU(cos(g_i, g0)); each g_i is rescaled to ||g0||; the output is
    sum_i TS_i (||g0||/||g_i||) g_i / sum_i TS_i. No bound on f: any number of rows may be
    Byzantine.

    A zero or non-finite row gets trust 0. When no row has positive trust the output is zero (no
    step); a non-finite g0 gives a NaN aggregate.
    """
    name = "fltrust"
    exempt = {"translation": "trust is the cosine to the root gradient and every row is rescaled to its norm, "
                             "both measured from the origin"}
    params = ("root_size",)
    trusted_root = True

    def __init__(self, f: int = 0, root_size: int = 100) -> None:
        super().__init__(f)
        self.root_size = root_size   # used by the trainer, which computes g0 on that many examples

    def aggregate(self, grads: Tensor, columns: Optional[Columns] = None,
                  root_gradient: Optional[Tensor] = None) -> Tensor:
        if root_gradient is None:
            raise ValueError("aggregator fltrust needs the server's root gradient: aggregate(grads, root_gradient=g0)")
        self._root = root_gradient
        return super().aggregate(grads, columns)

    def _aggregate(self, x: Tensor, cols: Columns) -> Tensor:
        n, dev = x.shape[0], x.device
        if self._root.shape != (cols.d_total,):
            raise ValueError(f"aggregator fltrust: the root gradient has shape {tuple(self._root.shape)}, "
                             f"the rows {cols.d_total} coordinates")
        g0 = self._root[cols.start:cols.stop].to(device=dev)
        partials = []
        for c in cols.chunks():
            part, r = x[:, c].to(torch.float64), g0[c].to(torch.float64)
            partials.append(torch.cat([(part * part).sum(1), part @ r, (r @ r).reshape(1)]))
        total = cols.total(partials, torch.zeros(2 * n + 1, dtype=torch.float64, device=dev))
        sq, dots, q = total[:n], total[n:2 * n], total[-1]
        good = torch.isfinite(sq)
        norms = torch.where(good, sq, torch.zeros_like(sq)).sqrt()
        norm0 = q.sqrt()
        both = norms * norm0
        cos = torch.where(good & (both > 0), dots / both, torch.zeros_like(dots))
        trust = torch.relu(cos)
        self.selected = torch.nonzero(trust > 0).flatten()     # the rows it trusts (their weights are > 0)
        scale = torch.where(trust > 0, norm0 / norms, torch.zeros_like(norms))
        total_trust = trust.sum()
        w = torch.where(total_trust > 0, trust * scale / total_trust, torch.zeros_like(trust))
        w = w + (q - q)   # a non-finite g0 (q Inf or NaN) makes every weight NaN, so the aggregate too
        return weighted_sum(w, x, good, cols)
