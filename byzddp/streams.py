"""Random streams keyed by what they are for, never by rank or global RNG state.

Every random draw of a run comes from `generator(purpose, seed, ...)`: the key names the
purpose ("batch", "resampling", ...) and the logical ids it belongs to (worker, step). The same
key gives the same numbers on every rank and for any number of ranks, which is what makes a
run a function of its config alone.
"""
from __future__ import annotations

import hashlib

import torch


def key(purpose: str, *ids: int) -> int:
    """A 63-bit seed from a purpose and integer ids (stable across processes and versions)."""
    text = purpose + ":" + ",".join(str(int(i)) for i in ids)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def generator(purpose: str, *ids: int) -> torch.Generator:
    """A CPU generator for `key(purpose, *ids)`; draw on CPU, then move to the device."""
    g = torch.Generator()
    g.manual_seed(key(purpose, *ids))
    return g
