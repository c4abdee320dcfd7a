"""The collective protocol of the step: every rank's rows go to the server (rank 0), the
server's aggregate comes back; or, under sharded aggregation (byzddp/sharded.py), every rank
gets a column slice of every row and the update slices are all-gathered. Also the collectives
that omniscient attacks pay for.

Rows are flat tensors: each rank sends one contiguous (block, width) buffer, padded when its
block of workers is smaller than the largest. With one process every call is local.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from byzddp.distributed import Topology, worker_block


class Exchange:
    def __init__(self, topo: Topology):
        self.topo = topo
        # Where each logical worker's row sits in the (world * block) gathered buffer.
        rows = [r * topo.block + i for r in range(topo.world)
                for i in range(len(worker_block(r, topo.world, topo.n)))]
        self.row_of_worker = torch.tensor(rows, device=topo.device)
        self.padded = topo.world * topo.block != topo.n

    @property
    def single(self) -> bool:
        return self.topo.world == 1

    def _in_worker_order(self, stacked: torch.Tensor) -> torch.Tensor:
        flat = stacked.reshape(-1, stacked.shape[-1])
        return flat.index_select(0, self.row_of_worker) if self.padded else flat

    def gather(self, rows: torch.Tensor) -> Optional[torch.Tensor]:
        """(block, width) from every rank -> (n, width) on the server in worker order; None elsewhere."""
        if self.single:
            return rows
        topo = self.topo
        if topo.is_server:
            stacked = torch.empty(topo.world, *rows.shape, dtype=rows.dtype, device=rows.device)
            dist.gather(rows, list(stacked.unbind(0)), dst=0)
            return self._in_worker_order(stacked)
        dist.gather(rows, None, dst=0)
        return None

    def broadcast(self, payload: torch.Tensor) -> torch.Tensor:
        """The server's payload, in place, on every rank."""
        if not self.single:
            dist.broadcast(payload, src=0)
        return payload

    # -- omniscience: what colluding Byzantine workers learn from honest ones ------------

    def all_gather(self, rows: torch.Tensor) -> torch.Tensor:
        """(block, width) from every rank -> (n, width) on every rank, in worker order."""
        if self.single:
            return rows
        stacked = torch.empty(self.topo.world * rows.shape[0], rows.shape[1],
                              dtype=rows.dtype, device=rows.device)
        if hasattr(dist, "all_gather_single"):
            dist.all_gather_single(stacked, rows)
        else:
            dist.all_gather_into_tensor(stacked, rows)
        return self._in_worker_order(stacked)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.single:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        """Coordinate-wise max over ranks, in place (exact in any order: omniscient attacks use it
        to agree on a common scale before an exact integer sum)."""
        if not self.single:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def gather_object(self, obj) -> Optional[list]:
        """One picklable object per rank -> the list in rank order on the server; None elsewhere.
        For rare, small state (an attack's buffers at a checkpoint), not for the step."""
        if self.single:
            return [obj]
        out = [None] * self.topo.world if self.topo.is_server else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast_from_worker(self, worker: int, t: torch.Tensor) -> torch.Tensor:
        """`t` as held by the rank hosting logical `worker`, on every rank."""
        if not self.single:
            src = next(r for r in range(self.topo.world) if worker in worker_block(r, self.topo.world, self.topo.n))
            dist.broadcast(t, src=src)
        return t

    def all_agree(self, value: torch.Tensor) -> bool:
        """True when every rank holds the same small integer tensor (the replica checksum)."""
        if self.single:
            return True
        gathered = [torch.empty_like(value) for _ in range(self.topo.world)]
        dist.all_gather(gathered, value)
        return all(torch.equal(g, gathered[0]) for g in gathered)

    # -- sharded aggregation (train.exchange=sharded, byzddp/sharded.py) -------------------

    def all_to_all_columns(self, rows: torch.Tensor, ranges: list) -> torch.Tensor:
        """(block, d) on every rank -> (n, len_r) on rank r: columns ranges[r] = (start, stop) of
        every worker's row, in worker order. Rank r sends columns ranges[q] of its rows to q."""
        start, stop = ranges[self.topo.rank]
        if self.single:
            return rows[:, start:stop].contiguous()
        block = rows.shape[0]
        send = torch.empty(block * rows.shape[1], dtype=rows.dtype, device=rows.device)
        offset = 0
        for a, b in ranges:  # one copy: each slice straight into its place in the send buffer
            send[offset:offset + block * (b - a)].view(block, b - a).copy_(rows[:, a:b])
            offset += block * (b - a)
        recv = torch.empty(self.topo.world * block * (stop - start), dtype=rows.dtype, device=rows.device)
        dist.all_to_all_single(recv, send, output_split_sizes=[block * (stop - start)] * self.topo.world,
                               input_split_sizes=[block * (b - a) for a, b in ranges])
        return self._in_worker_order(recv.view(self.topo.world, block, stop - start))

    def all_gather_uneven(self, part: torch.Tensor, counts: list, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """part (counts[rank], ...) from every rank -> their concatenation in rank order, on
        every rank (padded to the largest count for the collective; written into `out` if given)."""
        if self.single:
            return part if out is None else out.copy_(part)
        most = max(counts)
        if part.shape[0] == most:
            padded = part.contiguous()
        else:
            padded = part.new_zeros((most, *part.shape[1:]))
            padded[:part.shape[0]] = part
        stacked = torch.empty((self.topo.world * most, *part.shape[1:]), dtype=part.dtype, device=part.device)
        if hasattr(dist, "all_gather_single"):
            dist.all_gather_single(stacked, padded)
        else:
            dist.all_gather_into_tensor(stacked, padded)
        if all(c == most for c in counts):
            return stacked if out is None else out.copy_(stacked)
        if out is None:
            return torch.cat([stacked[r * most:r * most + c] for r, c in enumerate(counts)])
        start = 0
        for r, c in enumerate(counts):
            out[start:start + c] = stacked[r * most:r * most + c]
            start += c
        return out
