"""Coordinate-wise order statistics of rows, exact and the same bits on a slice of the columns
as on the whole (used by cm, trimmed_mean and Bulyan).
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
from torch import Tensor

from byzddp.geometry import Columns


# On CPU a bitonic min/max network over the rows, on a GPU torch.sort of the transposed layout;
# NaN ranks as +Inf (docs/design.md, "The bitonic network").
_NETWORK_DEVICES = {"cpu"}  # device types that sort with the network
_NETWORK_BYTES = 1 << 21    # one network block: padded rows x columns (about the L2 cache)


def bitonic_sort(buf: Tensor, wanted: Optional[tuple] = None) -> Tensor:
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


def sorted_block(x: Tensor, wanted: Optional[tuple] = None) -> Tensor:
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
    return bitonic_sort(buf, wanted)


def column_blocks(n: int, x: Tensor, cols: Columns) -> Iterator[slice]:
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
