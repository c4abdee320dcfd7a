"""Coordinate-wise order statistics of rows, exact and the same bits on a slice of the columns
as on the whole (used by cm, trimmed_mean and Bulyan).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

from byzddp.geometry import Columns


# On CPU a bitonic min/max network over the rows, on a GPU torch.sort of the transposed layout;
# NaN ranks as +Inf (docs/design.md, "The bitonic network").
_NETWORK_DEVICES = {"cpu"}  # device types that sort with the network
_NETWORK_BYTES = 1 << 19    # one network buffer: padded rows x columns (both buffers within L2)


class Network:
    """A bitonic sorting network over the rows of (n, c) blocks, planned once for blocks of up
    to `width` columns: N = the power of two >= n rows, the n real ones first, then +Inf.

    Every layer is a few torch.minimum / torch.maximum calls over strided views of two buffers
    (bound once here, so a block costs only the kernels). Stage k sorts blocks of k rows, which
    then hold exactly their original rows' values: a block of padding alone is all +Inf and is
    skipped (both buffers keep +Inf there). With `wanted` ranks, the last merge only follows the
    halves that hold them, with only the min or the max where only one side is wanted; the
    wanted rows are then exact, the others not."""

    def __init__(self, n: int, width: int, wanted: Optional[tuple], dtype, device):
        self.n, self.wanted = n, wanted
        self.N = 1 << max(n - 1, 0).bit_length()
        self.buf = torch.empty(self.N, width, dtype=dtype, device=device)
        self.alt = torch.empty_like(self.buf)
        self.pad_from = min(self.N, -(-n // 2) * 2)     # the first layer writes alt's rows below
        self.plans = {}

    def _plan(self, c: int):
        """(steps, result): the calls that sort columns [0, c), and the buffer that ends sorted."""
        N, n = self.N, self.n
        buf, alt = self.buf[:, :c], self.alt[:, :c]
        steps = []

        def op(fn, a, b, out):
            steps.append(partial(fn, a, b, out=out))
        k = 2
        while k <= N:
            j = k // 2
            live = -(-n // k)        # k-blocks holding a real row; the later ones are padding alone
            while j >= 1:
                if k < N:            # pairs of k-blocks: the first sorted up, the second down
                    v = buf.view(N // (2 * k), 2, k // (2 * j), 2, j, c)
                    o = alt.view(N // (2 * k), 2, k // (2 * j), 2, j, c)
                    up, down = (live + 1) // 2, live // 2
                    op(torch.minimum, v[:up, 0, :, 0], v[:up, 0, :, 1], o[:up, 0, :, 0])
                    op(torch.maximum, v[:up, 0, :, 0], v[:up, 0, :, 1], o[:up, 0, :, 1])
                    if down:
                        op(torch.maximum, v[:down, 1, :, 0], v[:down, 1, :, 1], o[:down, 1, :, 0])
                        op(torch.minimum, v[:down, 1, :, 0], v[:down, 1, :, 1], o[:down, 1, :, 1])
                    buf, alt = alt, buf
                elif self.wanted is None or (j == N // 2 and self._both(0, j)):   # the last merge, all up
                    v, o = buf.view(N // (2 * j), 2, j, c), alt.view(N // (2 * j), 2, j, c)
                    op(torch.minimum, v[:, 0], v[:, 1], o[:, 0])
                    op(torch.maximum, v[:, 0], v[:, 1], o[:, 1])
                    buf, alt = alt, buf
                else:                # only the blocks of 2j rows holding wanted ranks, in place
                    v = buf.view(N // (2 * j), 2, j, c)
                    for blk in sorted({w // (2 * j) for w in self.wanted}):
                        a, b = v[blk, 0], v[blk, 1]
                        low, high = self._sides(blk * 2 * j, j)
                        if low and high:
                            t = torch.empty_like(a)
                            op(torch.minimum, a, b, t)
                            op(torch.maximum, a, b, b)
                            steps.append(partial(a.copy_, t))
                        elif low:
                            op(torch.minimum, a, b, a)
                        else:
                            op(torch.maximum, a, b, b)
                j //= 2
            k *= 2
        return steps, buf

    def _sides(self, start: int, j: int) -> tuple:
        """Whether wanted ranks lie in rows [start, start+j) and in [start+j, start+2j)."""
        return (any(start <= w < start + j for w in self.wanted),
                any(start + j <= w < start + 2 * j for w in self.wanted))

    def _both(self, start: int, j: int) -> bool:
        return all(self._sides(start, j))

    def sort(self, x: Tensor, index: Optional[Tensor] = None) -> Tensor:
        """x (n, c) (or its rows `index`), c <= width: a buffer whose rows 0..n-1 hold each
        column's values in ascending order (all, or the wanted ranks), valid until the next call."""
        c = x.shape[1]
        if c not in self.plans:
            self.plans[c] = self._plan(c)
        steps, result = self.plans[c]
        n, buf = self.n, self.buf[:, :c]
        for attempt in range(2):
            buf[:n].copy_(x if index is None else x.index_select(0, index))
            if attempt:
                torch.nan_to_num_(buf[:n], nan=math.inf, posinf=math.inf, neginf=-math.inf)
            buf[n:].fill_(math.inf)
            self.alt[self.pad_from:, :c].fill_(math.inf)
            for step in steps:
                step()
            # min and max carry a NaN to every exact rank; then again with NaN as +Inf (rare)
            if attempt or not result[self.wanted[0] if self.wanted else 0].isnan().any():
                return result


def sorted_blocks(x: Tensor, cols: Columns, wanted: Optional[tuple] = None,
                  index: Optional[Tensor] = None) -> Iterator[Tuple[slice, Tensor]]:
    """(columns, sorted) for blocks of the held columns of x (n, d) (or of its rows `index`):
    `sorted` holds each column's values in ascending order in rows 0..n-1 (all of them, or only
    the `wanted` ranks; on a GPU always all), valid until the next block.

    On CPU, blocks small enough for the network's buffers to stay in cache, cut without regard
    to the grid: the order statistics are exact and the sums over ranks below run row by row
    (elementwise), so every column comes out the same whatever block holds it. Elsewhere the
    grid's chunks, sorted by torch.sort of the transposed layout."""
    n = x.shape[0] if index is None else len(index)
    if x.device.type not in _NETWORK_DEVICES:
        for c in cols.chunks():
            block = x[:, c] if index is None else x[:, c].index_select(0, index)
            yield c, torch.sort(block.T.contiguous(), dim=1).values.T
        return
    size = 1 << max(n - 1, 0).bit_length()
    width = max(1, min(x.shape[1], _NETWORK_BYTES // (size * x.element_size())))
    network = Network(n, width, wanted, x.dtype, x.device)
    for start in range(0, x.shape[1], width):
        c = slice(start, min(start + width, x.shape[1]))
        yield c, network.sort(x[:, c], index)


def sum_rows(rows: Tensor) -> Tensor:
    """rows (k, c) summed row after row: the same order for every column, whatever c is."""
    acc = rows[0].clone()
    for i in range(1, rows.shape[0]):
        acc += rows[i]
    return acc



def mean_closest_to_median(s: Tensor, k: int) -> Tensor:
    """s (n, c): each column's values sorted ascending, in float64 (the choice below compares
    differences of nearby values). Per column, the mean of the k values closest to the median
    (the mean of the two middle values for even n); among equally far values the smaller ones.

    The k closest values are a window s[a : a+k] of the sorted values. Sliding it right from
    a = 0 swaps s[a] for s[a+k]; that helps while s[a+k] is strictly closer, which holds for a
    prefix of the a's (one side draws nearer, the other farther), so a = the count of such a.
    Equal distances keep the window on the left."""
    n = s.shape[0]
    lo, hi = (n - 1) // 2, n // 2
    median = s[lo] if lo == hi else (s[lo] + s[hi]) / 2
    start = ((s[k:] - median) < (median - s[:n - k])).sum(dim=0)
    offsets = torch.arange(k, device=s.device)[:, None]
    return sum_rows(s.gather(0, start[None, :] + offsets)) / k
