"""Running train.py as users do: plain python or torchrun, in a subprocess."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A tiny, fast experiment: 8 workers, an MLP with one small hidden layer, a few steps.
TINY = ["train.steps=6", "train.eval_every=3", "train.check_every=2", "workers.n=8",
        "workers.byzantine=1", "model.hidden=[16]", "train.batch_size=8", "log.progress=false",
        "data.test_size=200", "train.eval_batch_size=200"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    return e


def train(args, nproc: int = 0, timeout: int = 300, check: bool = True,
          environ: dict = None) -> subprocess.CompletedProcess:
    """Run train.py with `args`; nproc > 0 runs it under torchrun with that many processes."""
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "train.py", *args]
    else:
        cmd = [sys.executable, "train.py", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=environ or env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{_stderr(proc.stderr)}")
    return proc


def _stderr(text: str) -> str:
    """The end of stderr, and from its first fatal-error report on (a crashed rank's stack
    comes before torchrun's long summary)."""
    fatal = [i for i in (text.find("Fatal Python error"), text.find("terminate called")) if i >= 0]
    head = text[min(fatal):min(fatal) + 6000] + "\n...\n" if fatal else ""
    return head + text[-3000:]


def summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def metrics(run_dir: Path) -> list:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
