"""A rank's replica of the model, as the worker side, the server side and the loop all see it:
its parameters as one flat vector of d values, its BatchNorm buffers as nb more, and the
fingerprints (`sha256`, `checksum`) that say whether two replicas hold the same bits."""
from __future__ import annotations

import hashlib
from typing import List

import torch
import torch.nn as nn


class Replica:
    def __init__(self, model: nn.Module):
        self.model = model
        self.params = list(model.parameters())
        self.buffers = list(model.buffers())
        self.d = sum(p.numel() for p in self.params)
        self.nb = sum(b.numel() for b in self.buffers)
        self.has_dropout = any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules())
        self.device = self.params[0].device if self.params else torch.device("cpu")

    def views(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """`flat` (d values) seen as one tensor per parameter, shaped like it (no copy)."""
        out, start = [], 0
        for p in self.params:
            out.append(flat[start:start + p.numel()].view_as(p))
            start += p.numel()
        return out

    def flat_params(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def load_params(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, self.views(flat)):
                p.copy_(v)

    def flat_buffers(self) -> torch.Tensor:
        if not self.buffers:
            return torch.zeros(0, device=self.device)
        return torch.cat([b.detach().reshape(-1).float() for b in self.buffers])

    def load_buffers(self, flat: torch.Tensor) -> None:
        start = 0
        for b in self.buffers:
            b.copy_(flat[start:start + b.numel()].view_as(b).to(b.dtype))
            start += b.numel()

    def sha256(self) -> str:
        """The model's bits: every state_dict entry's name and bytes, in order."""
        h = hashlib.sha256()
        for name, t in self.model.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def checksum(self) -> torch.Tensor:
        """Two int64 sums of the parameters' bits (plain and position-weighted), on the device:
        cheap to compare across ranks, and a single flipped bit changes them."""
        bits = self.flat_params().view(torch.int32).to(torch.int64)
        weights = torch.arange(1, bits.numel() + 1, device=bits.device, dtype=torch.int64) % 65521
        return torch.stack([bits.sum(), (bits * weights).sum()])
