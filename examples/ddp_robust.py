"""A plain DDP training script, made Byzantine-robust by one line (byzddp.ddp.register).

    OMP_NUM_THREADS=1 torchrun --nproc_per_node=4 examples/ddp_robust.py
    OMP_NUM_THREADS=1 torchrun --nproc_per_node=4 examples/ddp_robust.py --rule mean --attack bitflip

Each rank trains on its own part of MNIST-5k sorted by label (non-iid); with --attack, the last
rank is Byzantine and forges its gradient inside the hook. Delete the register line and this is
the DDP script you started from.
"""
import argparse
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import byzddp.ddp
from byzddp.data import load_mnist5k
from byzddp.errors import ConfigError

ap = argparse.ArgumentParser()
ap.add_argument("--rule", default="cm")
ap.add_argument("--attack", default="none")
ap.add_argument("--steps", type=int, default=300)
args = ap.parse_args()

dist.init_process_group("gloo")                       # "nccl" on GPUs
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)                                  # the same initial model on every rank
model = DDP(nn.Sequential(nn.Flatten(), nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 10)))

# The one line: a robust rule in place of the mean all-reduce (f = ranks it tolerates).
bad = [world - 1] if args.attack != "none" else []
try:
    byzddp.ddp.register(model, rule=args.rule, f=(world - 1) // 2, byzantine_ranks=bad, attack=args.attack)
except ConfigError as e:                              # e.g. krum needs 2f+3 ranks: one line, exit 2
    print(f"rank {rank}: {e}", file=sys.stderr) if rank == 0 else None
    sys.exit(2)

data = load_mnist5k()
order = data.train_y.argsort(stable=True)             # non-iid: each rank a span of the labels
mine = order.tensor_split(world)[rank]
x, y = data.train_x[mine], data.train_y[mine]
opt = torch.optim.SGD(model.parameters(), lr=0.1)
g = torch.Generator().manual_seed(rank)
for step in range(args.steps):
    pick = torch.randint(len(y), (32,), generator=g)
    opt.zero_grad()
    F.cross_entropy(model(x[pick]), y[pick]).backward()   # the hook aggregates here
    opt.step()

with torch.no_grad():
    accuracy = (model.module(data.test_x).argmax(1) == data.test_y).float().mean().item()
sums = [torch.empty(2, dtype=torch.int64) for _ in range(world)]
dist.all_gather(sums, byzddp.ddp.parameter_checksum(model.module))
if rank == 0:
    same = all(torch.equal(s, sums[0]) for s in sums)
    print(f"rule={args.rule} attack={args.attack}: test accuracy {accuracy:.3f}, "
          f"parameters identical on all {world} ranks: {same}")
# Free DDP's reducer before the process group: left to the interpreter's exit, gloo's threads
# abort the process now and then ("terminate called without an active exception").
del model, opt
dist.destroy_process_group()
