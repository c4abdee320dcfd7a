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
for the result. No Python loop runs over rows, pairs or coordinates of the data.

Work over d follows a global grid of column chunks (`Columns`, `grid_width`: a function of d and
the device type only). The Gram matrix is the sum, in chunk order, of per-chunk products, and
every per-column computation runs on fresh buffers chunk by chunk or elementwise row by row, so
one rank's slice of the columns (`byzddp.sharded`) gives bit for bit the whole call's columns.
Memory stays O(m d + m^2).

`rule(grads)` raises NonFiniteError, which reads one flag back from the device;
`rule.aggregate(grads)` does not, and nothing else in a rule waits for the device, so the
training step can queue the aggregation and check the update lazily.
"""
from __future__ import annotations

import math
import warnings
from typing import Iterator, List, Optional

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

class Columns:
    """The columns of the rows a call holds, placed in a global grid of chunks.

    The grid cuts the d coordinates into chunks of `width` columns; `width` depends only on d
    and the device type (`grid_width`), never on how many ranks share the work. A plain call
    holds every chunk; under sharded aggregation (`byzddp.sharded`) a rank holds the chunks
    [first, last). Every computation runs chunk by chunk on freshly made buffers of the same
    shape in both cases, and a quantity that spans columns (a Gram matrix, inner products) is a
    sum of per-chunk partials taken in chunk order. So a rank's slice of the result is bit for bit
    the same columns of the whole call's result. `gather`, when given, maps this holder's stacked
    partials to all chunks' partials in chunk order (a collective).
    """

    def __init__(self, d_total: int, width: int, first: int = 0, last: Optional[int] = None, gather=None):
        self.d_total, self.width = d_total, max(1, width)
        self.num_chunks = -(-d_total // self.width)
        self.first = first
        self.last = self.num_chunks if last is None else last
        self.start = min(self.first * self.width, d_total)
        self.stop = min(self.last * self.width, d_total)
        self.gather = gather

    @classmethod
    def whole(cls, x: Tensor) -> "Columns":
        d = x.shape[1]
        return cls(d, grid_width(d, x.device))

    @property
    def is_whole(self) -> bool:
        return self.gather is None

    @property
    def size(self) -> int:
        return self.stop - self.start

    def chunks(self) -> List[slice]:
        """The held chunks, as slices of the held columns (local indices)."""
        return [slice(c * self.width - self.start, min((c + 1) * self.width, self.d_total) - self.start)
                for c in range(self.first, self.last)]

    def total(self, partials: List[Tensor], like: Tensor) -> Tensor:
        """The sum over every chunk of the grid of its partial, in chunk order. `like` is a zero
        tensor of a partial's shape (for a holder with no chunks)."""
        stacked = torch.stack(partials) if partials else like.new_zeros((0, *like.shape))
        if self.gather is not None:
            stacked = self.gather(stacked)
        out = like.clone()
        for part in stacked:  # a fixed order: the same sum on every rank and in every mode
            out += part
        return out


def grid_width(d: int, device: torch.device) -> int:
    """Columns per chunk of the global grid: a multiple of 1024 (aligned rows), about d/16 so that
    slices balance over a few ranks, at most 2^16 columns on CPU (a float64 chunk of 128 rows is
    64 MiB) and 2^18 on a GPU (fewer launches)."""
    cap = 1 << 18 if device.type == "cuda" else 1 << 16
    return min(cap, max(1, -(-d // (16 * 1024))) * 1024)


def _columns(x: Tensor, columns: Optional[Columns]) -> Columns:
    if columns is None:
        return Columns.whole(x)
    if columns.size != x.shape[1]:
        raise ValueError(f"the rows hold {x.shape[1]} columns but the column plan {columns.size}")
    return columns


def gram_matrix(x: Tensor, centre: Optional[Tensor] = None, columns: Optional[Columns] = None) -> tuple:
    """(G, good, p, q): G = x x^T in float64, the sum of per-chunk products in chunk order, with
    the rows and columns of non-finite rows zeroed; `good` marks the finite rows; given a
    `centre` c (the held columns), also p = x c (zero on bad rows) and q = ||c||^2 in float64,
    else None.

    A NaN/Inf entry only spoils its own row and column of the product, and always its diagonal
    entry, which is how a bad row is found (a row so large that its squared norm overflows
    float64 counts as bad too; impossible for float32 inputs).
    """
    cols = _columns(x, columns)
    n = x.shape[0]
    width = n * n + (n + 1 if centre is not None else 0)
    partials = []
    for c in cols.chunks():
        part = x[:, c].to(torch.float64).contiguous()
        pieces = [(part @ part.T).reshape(-1)]
        if centre is not None:
            cc = centre[c].to(torch.float64).contiguous()
            pieces += [part @ cc, (cc @ cc).reshape(1)]
        partials.append(torch.cat(pieces) if len(pieces) > 1 else pieces[0])
    total = cols.total(partials, torch.zeros(width, dtype=torch.float64, device=x.device))
    gram = total[:n * n].view(n, n)
    good = torch.isfinite(gram.diagonal())
    both = good[:, None] & good[None, :]
    gram = torch.where(both, gram, torch.zeros_like(gram))
    p = q = None
    if centre is not None:
        p = torch.where(good, total[n * n:n * n + n], torch.zeros(n, dtype=torch.float64, device=x.device))
        q = total[-1]
    return gram, good, p, q


def pairwise_squared_distances(x: Tensor, columns: Optional[Columns] = None) -> tuple:
    """(D, good): D[i, j] = ||x_i - x_j||^2 in float64 and `good` marks the finite rows.

    From the float64 Gram matrix of the raw rows: the rounding error of D[i, j] is about 1e-16
    (||x_i||^2 + ||x_j||^2), whatever the other rows hold. Every distance from or to a non-finite
    row is +Inf, its own included; D[i, i] = 0 for good rows.
    """
    gram, good, _, _ = gram_matrix(x, columns=columns)
    sq = gram.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min_(0)
    dist.fill_diagonal_(0)
    both = good[:, None] & good[None, :]
    return torch.where(both, dist, torch.full_like(dist, math.inf)), good


def sub_chunks(cols: Columns, rows: int, element_size: int) -> Iterator[slice]:
    """The held grid chunks cut into pieces of about 1 MiB for `rows` rows (a multiple of 1024
    columns), the same pieces on a slice as on the whole: for products whose zeroed copy of the
    data should stay in cache."""
    width = max(1, (1 << 20) // (max(rows, 1) * element_size * 1024)) * 1024
    for chunk in cols.chunks():
        for start in range(chunk.start, chunk.stop, width):
            yield slice(start, min(start + width, chunk.stop))


def _combine(w: Tensor, x: Tensor, good: Tensor, cols: Columns) -> Tensor:
    """sum_i w_i x_i in x's dtype, for float64 weights w that are zero on the bad rows; piece by
    piece, no host sync. A bad row's non-finite entries are zeroed first (0 * NaN would still be
    NaN); a good row has none, so nothing else changes (nan_to_num is cheaper than a row mask)."""
    out = x.new_empty(x.shape[1])
    w = w.to(x.dtype)
    for c in sub_chunks(cols, x.shape[0], x.element_size()):
        out[c] = w @ torch.nan_to_num(x[:, c], nan=0.0, posinf=0.0, neginf=0.0)
    return out


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


# Coordinate-wise order statistics. On CPU, a bitonic sorting network over the rows: each layer
# is one torch.minimum and one torch.maximum over whole rows (vectorised over the columns), on a
# block of columns small enough to stay in the L2 cache, rows padded with +Inf to a power of
# two. That beats torch.median / kthvalue / sort along dim 0, which walk one strided column at a
# time (bench/aggregators.py). NaN is first turned into +Inf (minimum and maximum would spread
# it), which is the order torch.sort uses. On a GPU, torch.sort of the transposed (d, n) layout,
# where NaN ranks above +Inf. Every kernel is exact and gives the same finite values.
_NETWORK_DEVICES = {"cpu"}  # device types that sort with the network
_NETWORK_BYTES = 1 << 21    # one network block: padded rows x columns (about the L2 cache)


def _bitonic_sort(buf: Tensor, wanted: Optional[tuple] = None) -> Tensor:
    """buf (N, c), N a power of two, sorted along dim 0 (buf is used as scratch). With `wanted`
    row indices, the last merge only finishes the blocks that hold them (those rows are then
    exact, the others not). Full layers write min and max into a second buffer (two ops, no copy)."""
    N, c = buf.shape
    alt = torch.empty_like(buf)
    k = 2
    while k <= N:
        j = k // 2
        while j >= 1:
            if k < N:  # pairs of blocks of k rows: the first sorted up, the second down
                v = buf.view(N // (2 * k), 2, k // (2 * j), 2, j, c)
                o = alt.view(N // (2 * k), 2, k // (2 * j), 2, j, c)
                torch.minimum(v[:, 0, :, 0], v[:, 0, :, 1], out=o[:, 0, :, 0])
                torch.maximum(v[:, 0, :, 0], v[:, 0, :, 1], out=o[:, 0, :, 1])
                torch.maximum(v[:, 1, :, 0], v[:, 1, :, 1], out=o[:, 1, :, 0])
                torch.minimum(v[:, 1, :, 0], v[:, 1, :, 1], out=o[:, 1, :, 1])
                buf, alt = alt, buf
            elif wanted is None or j == N // 2:  # the last merge, all up
                v, o = buf.view(N // (2 * j), 2, j, c), alt.view(N // (2 * j), 2, j, c)
                torch.minimum(v[:, 0], v[:, 1], out=o[:, 0])
                torch.maximum(v[:, 0], v[:, 1], out=o[:, 1])
                buf, alt = alt, buf
            else:      # only the blocks holding wanted rows, in place
                v = buf.view(N // (2 * j), 2, j, c)
                for blk in sorted({w // (2 * j) for w in wanted}):
                    a, b = v[blk, 0], v[blk, 1]
                    low = torch.minimum(a, b)
                    torch.maximum(a, b, out=b)
                    a.copy_(low)
            j //= 2
        k *= 2
    return buf


def _sorted_block(x: Tensor, wanted: Optional[tuple] = None) -> Tensor:
    """x (n, c) -> a fresh tensor whose rows 0..n-1 hold each column's values in ascending order
    (all of them, or only the `wanted` ranks; on a GPU always all)."""
    n, c = x.shape
    if x.device.type not in _NETWORK_DEVICES:
        return torch.sort(x.T.contiguous(), dim=1).values.T
    size = 1 << max(n - 1, 0).bit_length()
    buf = torch.empty(size, c, dtype=x.dtype, device=x.device)
    buf[:n].copy_(x)
    buf[n:].fill_(math.inf)
    torch.nan_to_num_(buf[:n], nan=math.inf, posinf=math.inf, neginf=-math.inf)
    return _bitonic_sort(buf, wanted)


def _blocks(n: int, x: Tensor, cols: Columns) -> Iterator[slice]:
    """Column blocks for the order statistics of n rows. On CPU, blocks of the held columns small
    enough for a network block to stay in cache, cut without regard to the grid: the order
    statistics are exact and the sums over ranks below run row by row (elementwise), so every
    column comes out the same whatever block holds it. Elsewhere the grid's chunks."""
    if x.device.type not in _NETWORK_DEVICES:
        yield from cols.chunks()
        return
    size = 1 << max(n - 1, 0).bit_length()
    width = max(1, _NETWORK_BYTES // (size * x.element_size()))
    for start in range(0, x.shape[1], width):
        yield slice(start, min(start + width, x.shape[1]))


def _sum_rows(rows: Tensor) -> Tensor:
    """rows (k, c) summed row after row: the same order for every column, whatever c is."""
    acc = rows[0].clone()
    for i in range(1, rows.shape[0]):
        acc += rows[i]
    return acc


def _check_input(grads: Tensor, name: str) -> Tensor:
    if not isinstance(grads, Tensor) or grads.dim() != 2 or grads.shape[0] < 1:
        shape = tuple(grads.shape) if isinstance(grads, Tensor) else type(grads).__name__
        raise ValueError(f"aggregator {name}: expected an (m, d) tensor with m >= 1 rows, got {shape}")
    if not grads.is_floating_point():
        raise ValueError(f"aggregator {name}: expected a floating-point tensor, got {grads.dtype}")
    return grads


# ---------------------------------------------------------------------------- the rules

class Aggregator:
    """A robust rule: `rule(grads)` with grads (m, d) returns the (d,) aggregate and raises
    NonFiniteError rather than return a non-finite one (that check reads one flag from the
    device). `rule.aggregate(grads, columns)` is the same without the check, so without a host
    sync: the training step checks the update on the device itself; with a `Columns` plan it
    computes one rank's slice of the columns (`byzddp.sharded`).

    `selected` holds the row indices the last call picked (Krum, Multi-Krum, Bulyan), else None.
    """
    name = ""
    stateful = False  # whether the rule keeps state that `settle` must confirm

    def __init__(self, f: int = 0) -> None:
        self.f = f
        self.selected: Optional[Tensor] = None

    @torch.no_grad()
    def __call__(self, grads: Tensor) -> Tensor:
        out = self.aggregate(grads)
        if not bool(torch.isfinite(out).all()):
            raise NonFiniteError(self._non_finite_message(grads.shape[0]))
        return out

    @torch.no_grad()
    def aggregate(self, grads: Tensor, columns: Optional[Columns] = None) -> Tensor:
        x = _check_input(grads, self.name)
        cols = _columns(x, columns)
        self.selected = None
        out = self._aggregate(x, cols)
        if cols.is_whole and self.stateful:
            self.settle(torch.isfinite(out).all())
        return out

    def settle(self, finite: Tensor) -> None:
        """Told (a device flag) whether the whole aggregate was finite; a slice's caller tells it
        after combining the slices. Stateful rules keep their new state only then."""

    def _aggregate(self, x: Tensor, cols: Columns) -> Tensor:
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

    def _aggregate(self, x: Tensor, cols: Columns) -> Tensor:
        # Chunk by chunk of the grid, straight into the output: a reduction's order can
        # depend on the width it is given, so a slice and the whole call use the same widths.
        out = x.new_empty(x.shape[1])
        for c in cols.chunks():
            torch.mean(x[:, c], dim=0, out=out[c])
        return out

    def _non_finite_message(self, m: int) -> str:
        return ("aggregator mean: an input row holds NaN/Inf and the mean cannot exclude it; "
                "use a robust rule (cm, krum, rfa, cclip, ...) or find the worker that diverged")


class Krum(Aggregator):
    """The row with the lowest Krum score (lowest index among equal scores)."""
    name = "krum"

    def _aggregate(self, x: Tensor, cols: Columns) -> Tensor:
        dist, good = pairwise_squared_distances(x, cols)
        order = _lowest_first(_krum_scores(dist, self.f), (~good).long())
        self.selected = order[:1]
        return x.index_select(0, self.selected)[0]


class MultiKrum(Aggregator):
    """The mean of the m rows with the lowest Krum scores (default m = rows - f)."""
    name = "multikrum"

    def __init__(self, f: int = 0, m: Optional[int] = None) -> None:
        super().__init__(f)
        self.m = m

    def _aggregate(self, x: Tensor, cols: Columns) -> Tensor:
        n = x.shape[0]
        m = n - self.f if self.m is None else self.m
        m = min(max(m, 1), n)
        dist, good = pairwise_squared_distances(x, cols)
        order = _lowest_first(_krum_scores(dist, self.f), (~good).long())
        self.selected = order[:m]
        out = x.new_empty(x.shape[1])
        for c in cols.chunks():
            out[c] = x[:, c].index_select(0, self.selected).mean(dim=0)
        return out


class CoordinateMedian(Aggregator):
    """Per coordinate the median; the mean of the two middle values when the row count is even."""
    name = "cm"

    def _aggregate(self, x: Tensor, cols: Columns) -> Tensor:
        n = x.shape[0]
        lo, hi = (n - 1) // 2, n // 2
        out = x.new_empty(x.shape[1])
        for c in _blocks(n, x, cols):
            s = _sorted_block(x[:, c], wanted=(lo, hi))
            out[c] = s[lo] if lo == hi else (s[lo] + s[hi]) / 2
        return out


class TrimmedMean(Aggregator):
    """Per coordinate, drop the b largest and the b smallest values and average the rest."""
    name = "trimmed_mean"

    def __init__(self, f: int = 0, b: Optional[int] = None) -> None:
        super().__init__(f)
        self.b = b

    def _aggregate(self, x: Tensor, cols: Columns) -> Tensor:
        n = x.shape[0]
        b = self.f if self.b is None else self.b
        if 2 * b >= n:
            raise ValueError(f"aggregator trimmed_mean: b={b} trims all of the {n} rows; needs 2b < {n}")
        out = x.new_empty(x.shape[1])
        for c in _blocks(n, x, cols):
            out[c] = _sum_rows(_sorted_block(x[:, c])[b:n - b]) / (n - 2 * b)
        return out


class RFA(Aggregator):
    """Smoothed Weiszfeld iterations for the geometric median, from z = 0, equal weights;
    a non-finite row gets weight zero."""
    name = "rfa"

    def __init__(self, f: int = 0, T: int = 8, nu: float = 0.1) -> None:
        super().__init__(f)
        self.T, self.nu = T, nu

    def _aggregate(self, x: Tensor, cols: Columns) -> Tensor:
        # z is always a combination w^T x of the rows, so ||z - g_i||^2 = G_ii - 2 (G w)_i
        # + w^T G w comes from one float64 Gram matrix: the T iterations run on n x n numbers,
        # and the data is read twice (the product, then z). No finite row: the weights are
        # 0/0 = NaN and so is z.
        gram, good, _, _ = gram_matrix(x, columns=cols)
        norms = gram.diagonal()
        w = torch.zeros_like(norms)  # z = 0
        for _ in range(self.T):
            gw = gram @ w
            dist = (norms - 2 * gw + w @ gw).clamp_min(0).sqrt()
            beta = torch.where(good, 1.0 / dist.clamp_min(self.nu), torch.zeros_like(dist))
            w = beta / beta.sum()
        return _combine(w, x, good, cols)


class CenteredClipping(Aggregator):
    """L steps c <- c + (1/m) sum_i clip_tau(g_i - c) from the previous call's centre; a
    non-finite row takes a zero step (it still counts in the 1/m). The centre moves on only when
    the aggregate is finite. Under sharded aggregation each rank keeps its slice of the centre."""
    name = "cclip"
    stateful = True

    def __init__(self, f: int = 0, tau: float = 10.0, L: int = 3) -> None:
        super().__init__(f)
        self.tau, self.L = tau, L
        self.centre: Optional[Tensor] = None
        self._proposal: Optional[tuple] = None

    def _aggregate(self, x: Tensor, cols: Columns) -> Tensor:
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
        gram, good, p, q = gram_matrix(x, c0, columns=cols)
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
        c = a.to(x.dtype) * c0 + _combine(w, x, good, cols)
        self._proposal = (c, c0)
        return c

    def settle(self, finite: Tensor) -> None:
        if self._proposal is None:
            return
        c, c0 = self._proposal
        self._proposal = None
        self.centre = torch.where(finite, c, c0)  # on the device: no host sync

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

    def _aggregate(self, x: Tensor, cols: Columns) -> Tensor:
        n = x.shape[0]
        theta = max(n - 2 * self.f, 1)
        beta = max(theta - 2 * self.f, 1)
        dist, good = pairwise_squared_distances(x, cols)
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
        for cols_ in _blocks(theta, x, cols):
            # float64 from here: the window choice compares differences of nearby values.
            s = _sorted_block(x[:, cols_].index_select(0, self.selected))[:theta].to(torch.float64)
            median = s[lo] if lo == hi else (s[lo] + s[hi]) / 2
            # The beta values closest to the median are a contiguous window s[a : a+beta] of the
            # sorted values. Sliding it right from a = 0 swaps s[a] for s[a+beta]; that helps
            # while s[a+beta] is strictly closer, which holds for a prefix of the a's (one side
            # draws nearer, the other farther), so a = the count of such a. Equal distances
            # keep the window on the left.
            closer = (s[beta:] - median) < (median - s[:windows - 1])
            start = closer.sum(dim=0)
            out[cols_] = (_sum_rows(s.gather(0, start[None, :] + offsets)) / beta).to(x.dtype)
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
