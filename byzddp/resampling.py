"""Pre-aggregation: turn the n workers' vectors into the m vectors a robust rule sees.

`build(name, s=..., f=..., seed=...)` returns a callable: `r(grads, generator)` with grads (n, d)
returns (outputs (m, d), groups), where groups[j] lists the input rows (with repetition) averaged,
or for nnm mixed, into output j. The generator is a CPU `torch.Generator` keyed by (seed, step)
(`byzddp.streams.generator("resampling", seed, step)`): every draw happens on CPU and the
indices then move to the vectors' device, so every rank and device draws the same groups.
Groups are returned as CPU LongTensors.

  name              m           f' (Byzantine outputs)  what
  none              n           f                       the inputs as they are
  s_replacement     n           s*f                     the paper's Algorithm 2: n outputs, each
                                                        the mean of s inputs, every input used
                                                        exactly s times
  bucketing         ceil(n/s)   f                       a fresh random permutation each step, cut
                                                        into groups of s (the last may be
                                                        smaller), each averaged
  with_replacement  n           s*f (see below)         Algorithm 3: each output the mean of s
                                                        inputs drawn uniformly with replacement
  fixed_groups      ceil(n/s)   f                       bucketing with one permutation drawn once
                                                        from `seed` (appendix D.1; Chen et al.)
  nnm               n           f                       nearest-neighbour mixing: each vector
                                                        replaced by the mean of its n-f nearest
                                                        (itself included; Allouah et al. 2023)
  arc               n           f                       adaptive robust clipping: the k =
                                                        floor(2 (f/n) (n-f)) largest-norm vectors
                                                        clipped to the (k+1)-th largest norm
                                                        (Allouah et al. 2024)
  clipping          n           f                       static clipping: every vector of norm
                                                        above tau scaled to norm tau

s = 1 makes s_replacement and bucketing a shuffle; nnm, arc and clipping ignore s, and only
clipping uses tau (`resampling.tau`). f' is capped at m. An output that averages a
NaN row is NaN: the rule then sees at most f' such rows and copes (`byzddp.aggregators`).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from byzddp import clipping, streams
from byzddp.geometry import Columns, columns_of, pairwise_squared_distances, sub_chunks
from byzddp.errors import ConfigError

NAMES = ("none", "s_replacement", "bucketing", "with_replacement", "fixed_groups", "nnm", "arc", "clipping")
# clipping's default radius: see StaticClipping.
TAU = 10.0


def _average_groups(x: Tensor, index: Tensor, sizes: List[int]) -> Tensor:
    """out[j] = mean of x[index[j, :sizes[j]]]; groups sorted by size, largest first.

    One gather per group slot (s of them, not one per group or worker), summed in a fixed order
    so the result does not depend on the device's atomics.
    """
    m, width = index.shape
    index = index.to(x.device)
    out = x.index_select(0, index[:, 0])
    for k in range(1, width):
        rows = sum(1 for size in sizes if size > k)  # the groups that have a k-th member
        out[:rows] += x.index_select(0, index[:rows, k])
    size = torch.tensor(sizes, dtype=x.dtype, device=x.device)
    return out / size[:, None]


def _cut(perm: Tensor, s: int) -> Tuple[Tensor, List[int]]:
    """A permutation cut into consecutive groups of s (the last one shorter when s does not
    divide n), as a padded (ceil(n/s), s) index and the group sizes."""
    n = perm.numel()
    m = math.ceil(n / s)
    sizes = [min(s, n - j * s) for j in range(m)]
    padded = torch.cat([perm, perm.new_zeros(m * s - n)]).view(m, s)
    return padded, sizes


def _group_list(index: Tensor, sizes: List[int]) -> List[Tensor]:
    if sizes[-1] == index.shape[1]:
        return list(index.unbind(0))
    return [index[j, :size] for j, size in enumerate(sizes)]


class Resampler:
    """`r(grads, generator) -> (outputs, groups)`; see the module docstring."""
    name = ""
    grouped = True      # averages groups of s inputs (s must not exceed n)
    spans_columns = False  # needs the column plan: a quantity summed over every column (a norm)

    @classmethod
    def check(cls, s: int, n: int, f: int) -> None:
        """One-line ConfigError for an s, n, f this pre-aggregation cannot run on."""
        if not isinstance(s, int) or s < 1:
            raise ConfigError(f"config key resampling.s: must be an integer >= 1, got {s!r}")
        if cls.grouped and s > n:
            raise ConfigError(f"config key resampling.s: {cls.name} groups s={s} of the {n} workers "
                              f"(workers.n); lower resampling.s to at most {n}")

    @property
    def seen(self) -> str:
        """How the rule's inputs came to be, for requirement messages."""
        return f"after resampling {self.name} (s={self.s})"

    generic_fix = "lower workers.byzantine or resampling.s"

    def __init__(self, s: int = 2, f: int = 0, seed: int = 0) -> None:
        self.s, self.f, self.seed = s, f, seed

    def num_outputs(self, n: int) -> int:
        return n

    def byzantine_outputs(self, n: int, f: int) -> int:
        """An upper bound on the outputs a set of f Byzantine inputs can touch."""
        return min(f, self.num_outputs(n))

    @torch.no_grad()
    def __call__(self, grads: Tensor, generator: torch.Generator,
                 columns: Optional[Columns] = None) -> Tuple[Tensor, List[Tensor]]:
        """`columns`: the column plan of a slice under sharded aggregation (nnm's distances span
        the slices); the groups depend only on the generator, so every rank draws the same."""
        if grads.dim() != 2 or grads.shape[0] < 1:
            raise ValueError(f"resampling {self.name}: expected an (n, d) tensor, got {tuple(grads.shape)}")
        if self.spans_columns:
            return self._resample(grads, generator, columns_of(grads, columns))
        return self._resample(grads, generator)

    def _resample(self, x: Tensor, g: torch.Generator) -> Tuple[Tensor, List[Tensor]]:
        index, sizes = self._groups(x.shape[0], g)
        return _average_groups(x, index, sizes), _group_list(index, sizes)

    def _groups(self, n: int, g: torch.Generator) -> Tuple[Tensor, List[int]]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"resampling {self.name} keeps no state, got keys {sorted(state)}")

    def __repr__(self) -> str:
        return f"{self.name}(s={self.s}, f={self.f})"


class NoResampling(Resampler):
    name = "none"
    grouped = False
    seen = "without resampling"
    generic_fix = "lower workers.byzantine or raise workers.n"

    def _resample(self, x: Tensor, g: torch.Generator) -> Tuple[Tensor, List[Tensor]]:
        return x, list(torch.arange(x.shape[0]).view(-1, 1))


class SReplacement(Resampler):
    """Algorithm 2: n outputs, each the mean of s inputs, each input used exactly s times.

    The s inputs of each output are drawn without replacement from the multiset holding s copies
    of every input (one permutation of n*s items, cut into n groups of s). That is the sampling
    model behind Proposition I: each output has mean mu and variance (n-1)/(sn-1) sigma^2. An
    output may average two copies of the same input, which Algorithm 2 allows. A Byzantine input
    reaches at most s outputs, so f' = s*f.
    """
    name = "s_replacement"

    def byzantine_outputs(self, n: int, f: int) -> int:
        return min(self.s * f, n)

    def _groups(self, n: int, g: torch.Generator) -> Tuple[Tensor, List[int]]:
        items = torch.randperm(n * self.s, generator=g) % n
        return items.view(n, self.s), [self.s] * n


class Bucketing(Resampler):
    """A fresh random permutation every step, cut into ceil(n/s) buckets of s, each averaged.
    A Byzantine input is in one bucket only, so the rule is told f unchanged."""
    name = "bucketing"

    def num_outputs(self, n: int) -> int:
        return math.ceil(n / self.s)

    def _groups(self, n: int, g: torch.Generator) -> Tuple[Tensor, List[int]]:
        return _cut(torch.randperm(n, generator=g), self.s)


class WithReplacement(Resampler):
    """Algorithm 3: n outputs, each the mean of s inputs drawn uniformly with replacement.

    Nothing caps how many outputs one input reaches, so no worst-case bound short of n exists.
    byzantine_outputs returns min(s*f, n), a bound on the expected number of outputs touching a
    Byzantine input, n(1 - (1-f/n)^s) <= s*f (Bernoulli's inequality), which is what the paper's
    Lemma 3 gives; a single draw can exceed it.
    """
    name = "with_replacement"

    def byzantine_outputs(self, n: int, f: int) -> int:
        return min(self.s * f, n)

    def _groups(self, n: int, g: torch.Generator) -> Tuple[Tensor, List[int]]:
        return torch.randint(0, n, (n, self.s), generator=g), [self.s] * n


class FixedGroups(Resampler):
    """Groups of s drawn once (from `seed`, not from the step's generator) and kept for the run:
    the fixed grouping the paper compares resampling with in appendix D.1."""
    name = "fixed_groups"

    def __init__(self, s: int = 2, f: int = 0, seed: int = 0) -> None:
        super().__init__(s, f, seed)
        self.perm: Optional[Tensor] = None

    def num_outputs(self, n: int) -> int:
        return math.ceil(n / self.s)

    def _groups(self, n: int, g: torch.Generator) -> Tuple[Tensor, List[int]]:
        if self.perm is None:
            self.perm = torch.randperm(n, generator=streams.generator("fixed_groups", self.seed))
        elif self.perm.numel() != n:
            raise ValueError(f"resampling fixed_groups: the groups were drawn for {self.perm.numel()} "
                             f"inputs, got {n}")
        return _cut(self.perm, self.s)

    def state_dict(self) -> dict:
        return {} if self.perm is None else {"perm": self.perm.clone()}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state) - {"perm"}
        if unknown:
            raise ValueError(f"resampling fixed_groups: unknown state keys {sorted(unknown)}")
        perm = state.get("perm")
        self.perm = None if perm is None else perm.detach().to("cpu", torch.long).clone()


class NearestNeighbourMixing(Resampler):
    """Each vector replaced by the mean of its n-f nearest vectors (itself included), nearest by
    Euclidean distance, the lower index first among equal distances. A non-finite row is farthest
    from every row; it is itself replaced by the mean of n-f finite rows (the lowest indices), so
    as long as at most f rows are bad no output is non-finite. One (n x n) x (n x d) product."""
    name = "nnm"
    grouped = False
    spans_columns = True
    seen = "after nnm"
    generic_fix = "lower workers.byzantine or raise workers.n"

    @classmethod
    def check(cls, s: int, n: int, f: int) -> None:
        super().check(s, n, f)
        if 2 * f >= n:
            raise ConfigError(f"config key workers.byzantine: nnm mixes each vector with its n-f nearest "
                              f"and needs f < n/2, got f={f}, n={n}; lower workers.byzantine")

    def _resample(self, x: Tensor, g: torch.Generator, cols: Columns) -> Tuple[Tensor, List[Tensor]]:
        n = x.shape[0]
        k = n - self.f
        if k < 1:
            raise ValueError(f"resampling nnm: f={self.f} leaves no neighbours among {n} rows")
        dist, good = pairwise_squared_distances(x, cols)
        key = torch.where(good[:, None], dist, torch.zeros_like(dist))  # a bad row: any good row will do
        key = key.masked_fill(~good[None, :], math.inf)                 # never mix in a bad row
        nearest = torch.sort(key, dim=1, stable=True).indices[:, :k]
        mixing = torch.zeros(n, n, dtype=x.dtype, device=x.device)
        mixing.scatter_(1, nearest, 1.0)
        # Piece by piece of the grid on fresh buffers (the same products on a slice as on the whole), bad
        # rows zeroed on the device (0 * NaN would still be NaN).
        out = x.new_empty(x.shape)
        keep = good[:, None]
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        for c in sub_chunks(cols, n, x.element_size()):
            out[:, c] = (mixing @ torch.where(keep, x[:, c], zero)) / k
        return out, list(nearest.cpu())


class _Clipping(Resampler):
    """A row-wise rescaling: output j is input j, shrunk when its norm is too large. Norms are
    float64 over the column grid (`byzddp.clipping`); a non-finite row passes through unchanged."""
    grouped = False
    spans_columns = True
    generic_fix = "lower workers.byzantine or raise workers.n"

    @property
    def seen(self) -> str:
        return f"after {self.name}"

    def _threshold(self, norms: Tensor) -> Tensor:
        raise NotImplementedError

    def _resample(self, x: Tensor, g: torch.Generator, cols: Columns) -> Tuple[Tensor, List[Tensor]]:
        norms, good = clipping.row_norms(x, cols)
        out = clipping.clipped(x, norms, good, self._threshold(norms))
        return out, list(torch.arange(x.shape[0]).view(-1, 1))


class AdaptiveRobustClipping(_Clipping):
    """ARC (Allouah et al. 2024, "Boosting robustness by clipping gradients in distributed
    learning", arXiv:2405.14432): the k = floor(2 (f/n) (n-f)) rows of largest norm are clipped to
    the (k+1)-th largest norm, the others unchanged (k = 0 for f = 0: the identity). A row tied
    with the threshold is unchanged either way. A non-finite row counts as the largest."""
    name = "arc"

    def _threshold(self, norms: Tensor) -> Tensor:
        n = norms.numel()
        if self.f > n:
            raise ValueError(f"resampling arc: f={self.f} Byzantine among {n} rows")
        return clipping.arc_threshold(norms, clipping.arc_count(n, self.f))


class StaticClipping(_Clipping):
    """Every row of norm above tau scaled to norm tau (`resampling.tau`). The default tau = 10 lies
    just above the honest gradients of the default experiment (mlp on MNIST-5k, sorted split,
    batch 32; measured with its 8 honest workers averaged for 600 steps: norms about 7 at first,
    3 at the end, at most 10.4), so by default honest vectors pass (nearly) unchanged and an
    attack is cut to the size of the largest honest gradient; it is also cclip's default radius
    (aggregator.tau). Other models and losses need their own tau."""
    name = "clipping"

    def __init__(self, s: int = 2, f: int = 0, seed: int = 0, tau: float = TAU) -> None:
        super().__init__(s, f, seed)
        self.tau = tau

    @property
    def seen(self) -> str:
        return f"after clipping (tau={self.tau:g})"

    def _threshold(self, norms: Tensor) -> Tensor:
        return torch.full((), float(self.tau), dtype=torch.float64, device=norms.device)

    def __repr__(self) -> str:
        return f"clipping(tau={self.tau:g})"


_CLASSES = {"none": NoResampling, "s_replacement": SReplacement, "bucketing": Bucketing,
            "with_replacement": WithReplacement, "fixed_groups": FixedGroups, "nnm": NearestNeighbourMixing,
            "arc": AdaptiveRobustClipping, "clipping": StaticClipping}


def _tau_problem(tau) -> Optional[str]:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau < math.inf:
        return f"config key resampling.tau: the clipping radius must be a positive finite number, got {tau!r}"
    return None


def build(name: str, s: int = 2, f: int = 0, seed: int = 0, tau: float = TAU) -> Resampler:
    """The pre-aggregation `name`: groups of s (ignored by none, nnm, arc and clipping), f
    Byzantine inputs (used by nnm and arc), seed (used by fixed_groups), tau (used by clipping)."""
    if name not in _CLASSES:
        raise ConfigError(f"unknown resampling '{name}'; choose one of {', '.join(NAMES)}")
    for key, value in (("s", s), ("f", f)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "s" else 0):
            raise ConfigError(f"resampling {name}: {key} must be an integer >= {1 if key == 's' else 0}, "
                              f"got {value!r}")
    if name == "clipping":
        problem = _tau_problem(tau)
        if problem:
            raise ConfigError(problem)
        return StaticClipping(s=s, f=f, seed=seed, tau=tau)
    return _CLASSES[name](s=s, f=f, seed=seed)


def check(name: str, s: int, n: int, f: int, tau: float = TAU) -> None:
    """One-line ConfigError for a pre-aggregation that cannot run on n workers, f Byzantine (or a
    clipping radius tau that is not positive; checked whatever the name, as a bad value)."""
    if name not in _CLASSES:
        raise ConfigError(f"config key resampling.name: '{name}' is not one of {', '.join(NAMES)}")
    problem = _tau_problem(tau)
    if problem:
        raise ConfigError(f"{problem}; give a positive radius such as {TAU:g}")
    _CLASSES[name].check(s, n, f)
