"""Distances and Gram matrices of rows, over a global grid of column chunks: the one place
the robust rules (`byzddp.aggregators`) and the pre-aggregations (`byzddp.resampling`) get them.

Distances come from a float64 Gram matrix of the raw rows, never from `torch.cdist`'s
matrix-multiply shortcut: the rounding error of a squared distance is then about 1e-16 times
the squared norms of the two rows involved, so an outlier cannot spoil the distances between
other rows (as centring on a mean would).

Work over d follows a global grid of column chunks (`Columns`, `grid_width`: a function of d and
the device type only). The Gram matrix is the sum, in chunk order, of per-chunk products, so one
rank's slice of the columns (`byzddp.sharded`) gives bit for bit the whole call's numbers.
See docs/design.md, "Exact sums over a column grid".
"""
from __future__ import annotations

import math
from typing import Iterator, List, Optional

import torch
from torch import Tensor


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


def columns_of(x: Tensor, columns: Optional[Columns]) -> Columns:
    if columns is None:
        return Columns.whole(x)
    if columns.size != x.shape[1]:
        raise ValueError(f"the rows hold {x.shape[1]} columns but the column plan {columns.size}")
    return columns


def cache_width(rows: int, element_size: int, budget: int = 1 << 20) -> int:
    """Columns (a multiple of 1024) whose `rows` entries of `element_size` bytes fill about
    `budget` bytes: a piece that stays in cache."""
    return max(1, budget // (max(rows, 1) * element_size * 1024)) * 1024


def pieces(chunk: slice, width: int) -> Iterator[slice]:
    """`chunk` cut into consecutive slices of `width` columns, the last one shorter."""
    for start in range(chunk.start, chunk.stop, max(width, 1)):
        yield slice(start, min(start + width, chunk.stop))


def chunk_gram(x: Tensor, chunk: slice, centre: Optional[Tensor] = None) -> Tensor:
    """One chunk's partial for `gram_matrix`: x[:, chunk] x[:, chunk]^T in float64, flattened,
    then (with a centre) x[:, chunk] c[chunk] and ||c[chunk]||^2.

    The upper triangle is computed and mirrored, so G is exactly symmetric (one matmul is not, in
    the last bit). On the CPU the chunk is converted to float64 in pieces of about 2 MiB that are
    multiplied while they are in cache, and from 64 rows the upper triangle comes in row panels
    that skip most of the lower one: together 2.4x (n = 25) and 2.0x (n = 128) faster than
    converting the whole chunk and one matmul (one thread). Pieces and panels depend on n and the
    device type only, so a slice of the columns still gives the whole call's bits."""
    n = x.shape[0]
    on_cpu = x.device.type == "cpu"
    panels = 1 if not on_cpu or n < 64 else (2 if n < 192 else 4)
    height = -(-n // panels)
    width = cache_width(n, 8, 1 << 21) if on_cpu else chunk.stop - chunk.start
    g = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    if centre is not None:
        xc = torch.zeros(n, dtype=torch.float64, device=x.device)
        cc = torch.zeros(1, dtype=torch.float64, device=x.device)
    for s in pieces(chunk, width):
        part = x[:, s].to(torch.float64).contiguous()
        for top in range(0, n, height):
            g[top:top + height, top:].addmm_(part[top:top + height], part[top:].T)
        if centre is not None:
            c = centre[s].to(torch.float64)
            xc.addmv_(part, c)
            cc += c @ c
    upper = torch.ones(n, n, dtype=torch.bool, device=x.device).triu_()
    g = torch.where(upper, g, g.T).reshape(-1)
    return g if centre is None else torch.cat([g, xc, cc])


def gram_matrix(x: Tensor, centre: Optional[Tensor] = None, columns: Optional[Columns] = None) -> tuple:
    """(G, good, p, q): G = x x^T in float64, the sum of per-chunk products in chunk order, with
    the rows and columns of non-finite rows zeroed; `good` marks the finite rows; given a
    `centre` c (the held columns), also p = x c (zero on bad rows) and q = ||c||^2 in float64,
    else None.

    A NaN/Inf entry only spoils its own row and column of the product, and always its diagonal
    entry, which is how a bad row is found (a row so large that its squared norm overflows
    float64 counts as bad too; impossible for float32 inputs).
    """
    cols = columns_of(x, columns)
    n = x.shape[0]
    width = n * n + (n + 1 if centre is not None else 0)
    partials = [chunk_gram(x, c, centre) for c in cols.chunks()]
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
    width = cache_width(rows, element_size)
    for chunk in cols.chunks():
        yield from pieces(chunk, width)


def weighted_sum(w: Tensor, x: Tensor, good: Tensor, cols: Columns) -> Tensor:
    """sum_i w_i x_i in x's dtype, for float64 weights w that are zero on the bad rows; piece by
    piece. A bad row's non-finite entries are zeroed first (0 * NaN would still be NaN); a good
    row has none, so nothing else changes (nan_to_num is cheaper than a row mask). On an
    accelerator the zeroing always runs, to avoid a host sync; on the CPU reading `good` costs
    nothing, and when every row is good the copy is skipped (same bits: nan_to_num is the
    identity on finite values)."""
    out = x.new_empty(x.shape[1])
    w = w.to(x.dtype)
    zero_bad = x.device.type != "cpu" or not bool(good.all())
    for c in sub_chunks(cols, x.shape[0], x.element_size()):
        piece = x[:, c]
        out[c] = w @ (torch.nan_to_num(piece, nan=0.0, posinf=0.0, neginf=0.0) if zero_bad else piece)
    return out


def all_finite(t: Tensor) -> Tensor:
    """torch.isfinite(t).all() as a 0-d device flag, in one cheap pass: NaN and Inf propagate
    into a sum, and a float64 sum of float32 (or narrower) values cannot overflow (at most
    3.4e38 each), so the sum is finite exactly when every value is. float64 input, whose sum
    can overflow, takes the elementwise check."""
    if t.dtype == torch.float64:
        return torch.isfinite(t).all()
    if t.device.type == "cpu":
        # Reading a flag is free on the CPU: a finite sum in t's own dtype (4x cheaper) already
        # proves every value finite; only a non-finite one (or an overflow) needs float64.
        quick = torch.isfinite(t.sum())
        if bool(quick):
            return quick
    return torch.isfinite(t.sum(dtype=torch.float64))
