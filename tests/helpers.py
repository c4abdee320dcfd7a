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


def probe_ranks(spec: dict, out: Path, nproc: int) -> dict:
    """tests/attack_probe.py on `nproc` ranks started as torchrun starts them (its environment
    variables), without the launcher process: one import of torch less per launch on a busy
    machine. Returns the probe's results (saved by rank 0 to `out`)."""
    spec_file = Path(out).with_suffix(".json")
    spec_file.write_text(json.dumps(spec))
    got = run_ranks(ROOT / "tests" / "attack_probe.py", out, spec_file, nproc)
    return got["results"]


def run_ranks(script: Path, out: Path, spec_file: Path, nproc: int, timeout: int = 600) -> dict:
    """`script out spec_file` on `nproc` ranks started as torchrun starts them (its environment
    variables, no launcher); returns what rank 0 saved to `out` (checked to hold "world")."""
    import torch
    port = free_port()
    ranks = [{"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)} for r in range(nproc)]
    procs = [subprocess.Popen([sys.executable, str(script), str(out), str(spec_file)], cwd=ROOT,
                              env={**env(), **extra}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for extra in ranks]
    try:
        errors = [p.communicate(timeout=timeout)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errors)
    got = torch.load(out, weights_only=True)
    assert got["world"] == nproc
    return got


def assert_probes_bit_identical(one: dict, two: dict, cases) -> None:
    """attack_probe.py's results on 1 and 2 ranks: every case's rows, sent rows, aggregate,
    Byzantine set and model bits the same."""
    import torch
    assert two.keys() == one.keys() == cases.keys()
    for label in cases:
        for key in ("rows", "sent", "aggregate", "byzantine", "sha"):
            a, b = one[label][key], two[label][key]
            same = torch.equal(a.view(torch.int32), b.view(torch.int32)) if torch.is_tensor(a) else a == b
            assert same, f"{label}: {key} differs on 2 ranks"


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
