#!/usr/bin/env bash
# The checks that need a GPU, in under 5 minutes on one:
#   1. bench/workers.py on cuda: loop against vectorized workers, mlp up to 1024 workers, cnn;
#   2. a worker's vectorized gradient is the same bits whatever chunk it lands in, on cuda;
#   3. gloo on CUDA tensors: 2 ranks sharing the one GPU give the model of 1 rank (model_sha256),
#      vectorized, with worker momentum and a gradient attack;
#   4. nccl with 2 ranks on 1 GPU is refused with one line (exit 2).
#
#   bash bench/gpu_check.sh          # on a GPU machine
#   bash bench/gpu_check.sh cpu      # the same checks, small, on the CPU (a dry run)
set -euo pipefail
DEV=${1:-cuda}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
run_train() {  # nproc name args...
  local nproc=$1 name=$2; shift 2
  local common=(train.steps=20 train.eval_every=10 workers.n=8 workers.byzantine=2 attack.name=bitflip
                workers.momentum=0.9 aggregator.name=krum aggregator.allow_unsafe=true model.hidden=[64]
                log.progress=false "log.dir=$OUT" "log.name=$name" "train.device=$DEV" train.backend=gloo)
  if [ "$nproc" = 1 ]; then
    timeout 120 "$PY" train.py "${common[@]}" "$@" >"$OUT/$name.log" 2>&1
  else
    timeout 120 "$PY" -m torch.distributed.run --nproc_per_node="$nproc" --master_addr=127.0.0.1 \
      --master_port=$((29500 + RANDOM % 1000)) train.py "${common[@]}" "$@" >"$OUT/$name.log" 2>&1
  fi
  "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['model_sha256'])" "$OUT/$name/summary.json"
}

echo "## 1. bench/workers.py on $DEV"
if [ "$DEV" = cuda ]; then
  timeout 150 "$PY" bench/workers.py --device cuda --models mlp --n 8,64,128,1024 --steps 3
  timeout 100 "$PY" bench/workers.py --device cuda --models cnn --n 8,32,128 --steps 3
else
  "$PY" bench/workers.py --device cpu --models mlp --n 8 --steps 1
fi

echo "## 2. chunk invariance on $DEV"
timeout 120 "$PY" - "$DEV" <<'EOF'
import sys
import torch
from byzddp import config, distributed, workers
from byzddp.trainer import Trainer
dev = sys.argv[1]
for model in ("mlp", "cnn"):
    cfg = config.load(None, [f"model.name={model}", "workers.n=6", "workers.byzantine=0", "attack.name=none",
                             "train.batch_size=8", f"train.device={dev}", "workers.chunk=4", "log.progress=false"])
    t = Trainer(cfg, distributed.setup(cfg))
    jobs = [workers.Job(i, w, *t.data.batch_of(w, 2)) for i, w in enumerate(range(6))]
    got = []
    for order in ([3], [0, 1, 2, 3, 4, 5], [5, 4, 3], [1, 2, 4, 5, 0, 3]):
        v, l = torch.zeros(6, t.d, device=t.device), torch.zeros(6, device=t.device)
        t.vectorized.compute([jobs[i] for i in order], 2, v, None, l)
        got.append(v[3].clone())
    same = all(torch.equal(g, got[0]) for g in got)
    print(f"{model} on {dev}: worker 3's gradient identical in 4 chunk layouts: {same}")
    assert same
EOF

echo "## 3. gloo on $DEV: 1 rank against 2 ranks (vectorized, momentum, bitflip)"
a=$(run_train 1 gloo1)
b=$(run_train 2 gloo2)
echo "1 rank $a"; echo "2 ranks $b"
[ "$a" = "$b" ] || { echo "FAIL: model_sha256 differs"; tail -5 "$OUT"/gloo*.log; exit 1; }
echo "identical"

if [ "$DEV" = cuda ] && [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" = 1 ]; then
  echo "## 4. nccl with 2 ranks on 1 GPU is refused"
  set +e
  timeout 60 "$PY" -m torch.distributed.run --nproc_per_node=2 --master_addr=127.0.0.1 \
    --master_port=$((30500 + RANDOM % 1000)) train.py train.backend=nccl train.steps=2 log.progress=false \
    "log.dir=$OUT" >"$OUT/nccl.log" 2>&1
  rc=$?
  set -e
  grep -m1 "error: config key train.backend" "$OUT/nccl.log" || { echo "FAIL: no refusal (rc $rc)"; exit 1; }
fi
echo "gpu_check: all passed on $DEV"
