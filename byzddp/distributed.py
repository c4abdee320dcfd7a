"""Process group set-up (torchrun, Slurm's srun, or plain python) and the worker <-> rank map."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from byzddp.errors import ConfigError


@dataclass
class Topology:
    """Where this process sits: its rank, the world, its device and its block of workers."""
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str          # "gloo", "nccl", or "none" for a single process without a group
    n: int                # logical workers

    @property
    def workers(self) -> range:
        return worker_block(self.rank, self.world, self.n)

    @property
    def block(self) -> int:
        """Rows every rank sends: the largest block (smaller blocks are padded)."""
        return -(-self.n // self.world)

    @property
    def is_server(self) -> bool:
        return self.rank == 0


def worker_block(rank: int, world: int, n: int) -> range:
    """The contiguous block of logical workers hosted by `rank`, as even as possible.

    The first n % world ranks host one worker more: 10 workers on 4 ranks -> 3, 3, 2, 2.
    """
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def setup(cfg) -> Topology:
    """Join the process group described by the environment (torchrun or srun), or run alone."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and _env_int("SLURM_NTASKS", 1) > 1:
        # `srun python train.py`: one task per rank; MASTER_ADDR/PORT come from the batch script.
        os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
        os.environ.setdefault("WORLD_SIZE", os.environ["SLURM_NTASKS"])
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)

    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key train.device: cuda asked for but no GPU is visible; use auto or cpu")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if world > cfg.workers.n:
        raise ConfigError(f"{world} ranks but workers.n={cfg.workers.n}: every rank needs a worker; "
                          f"raise workers.n or use fewer processes")
    backend = cfg.train.backend
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl" and not use_cuda:
        raise ConfigError("config key train.backend: nccl needs CUDA devices; use gloo on CPU")
    if backend == "nccl" and world > 1:
        # NCCL cannot run two ranks of one group on the same GPU: without this check the group
        # hangs or fails deep inside the first collective. torchrun says how many ranks share
        # the node (LOCAL_WORLD_SIZE); under srun, this rank's local id bounds it.
        local_world = max(_env_int("LOCAL_WORLD_SIZE", 0), local_rank + 1)
        gpus = torch.cuda.device_count()
        if local_world > gpus:
            raise ConfigError(f"config key train.backend: nccl with {local_world} ranks "
                              f"on a node with {gpus} GPU(s); start one rank per GPU "
                              f"(--nproc_per_node={gpus}) or set train.backend=gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if world > 1:
        if not dist.is_initialized():
            timeout = timedelta(seconds=cfg.train.timeout_s)
            store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
            # After torchrun restarts the group, the store can still hold the old ranks'
            # addresses; a prefix per attempt keeps the new group from dialling dead ones.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.PrefixStore(f"byzddp/attempt{attempt}", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout,
                                    device_id=device if use_cuda else None)
    else:
        backend = "none"
    return Topology(rank, world, local_rank, device, backend, cfg.workers.n)


def teardown(clean: bool = False) -> None:
    """Leave the process group. After a clean finish every rank first waits for the others:
    a rank that destroys its gloo group while a peer still uses the connection makes that
    peer abort ("terminate called without an active exception") after a run that succeeded.
    After a failure a peer may be gone, so no rank waits."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
