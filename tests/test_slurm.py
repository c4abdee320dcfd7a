"""The slurm/ batch scripts, submitted to a real Slurm: an eight-node cluster started on this
host for this module (tests/slurm_cluster.py), training on CPU with gloo.

Every job of the module is submitted at once, so that they run side by side; each test then
waits for its own. A training job must end COMPLETED with exit code 0:0 and leave its run's
summary.json. The signal tests play Slurm's time-limit warning (USR1 to the batch shell, as
--signal=B:USR1 does) and Slurm's own requeue, and check the whole protocol: every rank gets
SIGTERM, rank 0 writes its checkpoint, the job is requeued and its second start resumes.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import slurm_cluster
from slurm_cluster import SlurmCluster, free_ports

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT = 300  # seconds, per wait; a tiny run takes seconds, but all of them share 2 CPUs
TINY = [
    "train.steps=3", "train.eval_every=3", "workers.n=4", "workers.byzantine=0",
    "aggregator.name=mean", "resampling.name=none", "attack.name=none",
    "train.backend=gloo", "train.device=cpu", "log.progress=false",
]
SIGNAL_CASES = [
    ("single_node", "time limit"),
    ("multi_node", "time limit"),
    ("array", "time limit"),
    # Slurm's own requeue (an admin, or preemption with PreemptMode=REQUEUE): SIGTERM to
    # every process of the job, SIGKILL after KillWait.
    ("single_node", "requeue by Slurm"),
]

# A stand-in for train.py with the trainer's contract and nothing else, so that the signal
# tests see the scripts alone: it waits for a signal, records which one it got, lets rank 0
# take two seconds to write a "checkpoint" (long enough that a rank killed before it finished
# would show) and exits 128 + signal; started again with train.resume=auto beside a
# checkpoint, it finishes at once.
STAND_IN = textwrap.dedent('''
    import json, os, signal, sys, time
    from pathlib import Path

    args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
    run = Path(args["log.dir"]) / args["log.name"]
    rank = int(os.environ["RANK"])
    checkpoint = run / "checkpoint"
    if args.get("train.resume") == "auto" and checkpoint.exists():
        if rank == 0:
            (run / "summary.json").write_text(json.dumps({"resumed_from": checkpoint.read_text()}))
        sys.exit(0)
    received = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    run.mkdir(parents=True, exist_ok=True)
    (run / f"started-{rank}").write_text(os.environ.get("SLURM_NODEID", "?"))
    deadline = time.monotonic() + 900
    while not received and time.monotonic() < deadline:
        time.sleep(0.05)
    if not received:
        sys.exit(1)
    (run / f"stopped-{rank}").write_text(str(received[0]))
    if rank == 0:
        time.sleep(2)
        checkpoint.write_text(f"rank 0 after signal {received[0]}")
    sys.exit(128 + received[0])
''')


@dataclass
class Job:
    id: str  # a job id, or <array job>_<task> for an array task
    output: Path
    run_dir: Path
    tasks: list["Job"] = field(default_factory=list)  # an array's tasks


@pytest.fixture(scope="module")
def cluster():
    # The fixture never installs anything: CI (.ci/run) runs tests/slurm_install.sh first.
    if slurm_cluster.missing_commands():
        pytest.skip("Slurm not installed: bash tests/slurm_install.sh")
    if os.geteuid() != 0:
        pytest.skip("the throwaway Slurm cluster needs root: slurmd starts jobs as their user")
    # Not under pytest's tmp_path: munged, running as the munge user, must reach its socket.
    root = Path(tempfile.mkdtemp(prefix="byzddp-slurm-"))
    c = SlurmCluster(root)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory) -> dict:
    """Every job of the module, submitted before the first test waits for one."""
    tmp = tmp_path_factory.mktemp("jobs")
    submitted = {
        "single": submit_single_node(cluster, tmp / "single"),
        "multi": submit_multi_node(cluster, tmp / "multi"),
        "array": submit_array(cluster, tmp / "array"),
        "array, no line": submit_array_past_the_end(cluster, tmp / "array-no-line"),
    }
    for i, (script, event) in enumerate(SIGNAL_CASES):
        submitted[script, event] = submit_stand_in(cluster, tmp / f"stand-in-{i}", script)
    return submitted


def job_env(**extra) -> dict:
    env = {"BYZDDP_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def submit(cluster: SlurmCluster, folder: Path, *args: str, env: dict) -> tuple[str, Path]:
    folder.mkdir(parents=True)
    output = folder / "job.out"
    return cluster.sbatch(f"--output={output}", *args, cwd=REPO, env=env), output


# ---------------------------------------------------------------- arguments, without Slurm
# The scripts run as plain bash with a stand-in for BYZDDP_PYTHON that records what torchrun
# would have been given (and runs `python -c` for real: array.sbatch splits lines with it).
RECORDING_PYTHON = textwrap.dedent('''
    #!{python}
    import json, os, sys
    if sys.argv[1] == "-c":
        os.execv({python!r}, [{python!r}, *sys.argv[1:]])
    with open(os.environ["RECORD"], "w") as fh:
        json.dump(sys.argv[1:], fh)
''').lstrip()
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nnodes=1"]


def launched(tmp_path: Path, script: str, *args: str, **env: str) -> list:
    fake = tmp_path / "python"
    fake.write_text(RECORDING_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    record = tmp_path / "record.json"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "BYZDDP_"))}
    proc = subprocess.run(
        ["bash", f"slurm/{script}.sbatch", *args], cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**clean, "BYZDDP_PYTHON": str(fake), "RECORD": str(record), **env},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(record.read_text())


@pytest.mark.parametrize("args, train_args", [
    (["configs/x.yaml", "seed=1"], ["--config", "configs/x.yaml", "seed=1", "train.resume=auto"]),
    (["--config", "configs/x.yaml", "train.resume=off"], ["--config", "configs/x.yaml", "train.resume=off"]),
    (["seed=1"], ["seed=1", "train.resume=auto"]),
    ([], ["train.resume=auto"]),
])
def test_single_node_passes_config_and_overrides(tmp_path, args, train_args):
    got = launched(tmp_path, "single_node", *args, BYZDDP_NPROC_PER_NODE="3")
    assert got == [*TORCHRUN, "--nproc_per_node=3", "train.py", *train_args]


def test_single_node_takes_one_process_per_allocated_gpu(tmp_path):
    got = launched(tmp_path, "single_node", "seed=1", SLURM_GPUS_ON_NODE="4")
    assert got == [*TORCHRUN, "--nproc_per_node=4", "train.py", "seed=1", "train.resume=auto"]


def test_array_line_is_split_like_a_shell_and_never_evaluated(tmp_path):
    runs = tmp_path / "runs.txt"
    runs.write_text("seed=0\n"
                    "--config configs/x.yaml 'log.name=a b' \"note=$(touch {0}/pwned)\" seed=1\n".format(tmp_path))
    got = launched(tmp_path, "array", str(runs), SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_JOB_ID="7")
    assert got == [*TORCHRUN, "--nproc_per_node=1", "train.py", "--config", "configs/x.yaml", "log.name=a b",
                   f"note=$(touch {tmp_path}/pwned)", "seed=1", "train.resume=auto"]
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- the real train.py

def submit_single_node(cluster, folder: Path) -> Job:
    job, output = submit(
        cluster, folder, "slurm/single_node.sbatch", "configs/default.yaml", *TINY,
        f"log.dir={folder / 'runs'}", "log.name=single",
        env=job_env(BYZDDP_NPROC_PER_NODE=2),
    )
    return Job(job, output, folder / "runs" / "single")


@pytest.mark.slurm
@pytest.mark.slow
def test_single_node_runs_two_processes(cluster, jobs):
    job = jobs["single"]
    record = assert_completed(cluster, job)
    assert record["NumNodes"] == "1"
    s = summary(job)
    assert (s["steps"], s["world_size"], s["backend"]) == (3, 2, "gloo")


def submit_multi_node(cluster, folder: Path) -> Job:
    (port,) = free_ports(1)
    job, output = submit(
        cluster, folder, "--nodes=2", "slurm/multi_node.sbatch", "configs/default.yaml", *TINY,
        f"log.dir={folder / 'runs'}", "log.name=multi",
        # The node names do not resolve; every node is this host.
        env=job_env(BYZDDP_NPROC_PER_NODE=1, BYZDDP_RDZV_HOST="127.0.0.1", BYZDDP_RDZV_PORT=port),
    )
    return Job(job, output, folder / "runs" / "multi")


@pytest.mark.slurm
@pytest.mark.slow
def test_multi_node_runs_one_torchrun_per_node(cluster, jobs):
    job = jobs["multi"]
    record = assert_completed(cluster, job)
    assert record["NumNodes"] == "2"
    s = summary(job)
    assert (s["steps"], s["world_size"], s["backend"]) == (3, 2, "gloo")


def submit_array(cluster, folder: Path) -> Job:
    folder.mkdir(parents=True)
    runs = folder / "runs.txt"
    # "seed 1": a space in a value, which only survives if the line is split as a shell would.
    lines = [["--config", "configs/default.yaml", *TINY, f"seed={seed}",
              f"log.dir={folder / 'runs'}", f"log.name=seed {seed}"] for seed in (1, 2)]
    runs.write_text("".join(shlex.join(words) + "\n" for words in lines))
    job = cluster.sbatch(f"--output={folder}/task-%a.out", "--array=0-1", "slurm/array.sbatch", str(runs),
                         cwd=REPO, env=job_env(BYZDDP_NPROC_PER_NODE=2))
    tasks = [Job(f"{job}_{t}", folder / f"task-{t}.out", folder / "runs" / f"seed {t + 1}") for t in (0, 1)]
    return Job(job, folder / "task-0.out", folder / "runs", tasks)


@pytest.mark.slurm
@pytest.mark.slow
def test_job_array_runs_one_line_per_task(cluster, jobs):
    for seed, task in enumerate(jobs["array"].tasks, start=1):
        assert_completed(cluster, task)
        s = summary(task)
        assert (s["steps"], s["world_size"]) == (3, 2)
        assert f"seed: {seed}\n" in (task.run_dir / "config.yaml").read_text()


def submit_array_past_the_end(cluster, folder: Path) -> Job:
    folder.mkdir(parents=True)
    (folder / "runs.txt").write_text("--config configs/default.yaml\n")
    job = cluster.sbatch(f"--output={folder}/job.out", "--array=1", "slurm/array.sbatch",
                         str(folder / "runs.txt"), cwd=REPO, env=job_env())
    return Job(f"{job}_1", folder / "job.out", folder)


@pytest.mark.slurm
@pytest.mark.slow
def test_array_task_without_a_line_fails_clearly(cluster, jobs):
    job = jobs["array, no line"]
    record = cluster.wait([job.id], JOB_TIMEOUT)[job.id]
    assert (record.get("JobState"), record.get("ExitCode")) == ("FAILED", "2:0"), read(job.output)
    assert "has no line 2 for array task 1" in read(job.output)


# ---------------------------------------------------------------- the signal protocol

def submit_stand_in(cluster, folder: Path, script: str) -> Job:
    (folder / "repo").mkdir(parents=True)
    (folder / "repo" / "train.py").write_text(STAND_IN)
    run_dir = folder / "runs" / "stand-in"
    train_args = [f"log.dir={run_dir.parent}", f"log.name={run_dir.name}"]
    env = job_env(BYZDDP_ROOT=folder / "repo", BYZDDP_NPROC_PER_NODE=2)
    if script == "single_node":
        args = ["slurm/single_node.sbatch", *train_args]
    elif script == "multi_node":
        (port,) = free_ports(1)
        env.update(BYZDDP_NPROC_PER_NODE="1", BYZDDP_RDZV_HOST="127.0.0.1", BYZDDP_RDZV_PORT=str(port))
        args = ["--nodes=2", "slurm/multi_node.sbatch", *train_args]
    else:
        (folder / "runs.txt").write_text(shlex.join(train_args) + "\n")
        args = ["--array=0", "slurm/array.sbatch", str(folder / "runs.txt")]
    output = folder / "job.out"
    job = cluster.sbatch(f"--output={output}", *args, cwd=REPO, env=env)
    return Job(f"{job}_0" if script == "array" else job, output, run_dir)


@pytest.fixture(scope="module")
def signalled(cluster, jobs) -> set:
    """Send each stand-in job its event as soon as both its ranks run, all jobs in one pass
    (the requeues then overlap); return the cases whose ranks never started."""
    waiting = {case: jobs[case] for case in SIGNAL_CASES}
    deadline = time.monotonic() + JOB_TIMEOUT
    while waiting and time.monotonic() < deadline:
        for (script, event), job in list(waiting.items()):
            if not all((job.run_dir / f"started-{rank}").exists() for rank in (0, 1)):
                continue
            if event == "time limit":
                # What --signal=B:USR1@120 does before the time limit: USR1 to the batch shell alone.
                cluster.run("scancel", "--batch", "--signal=USR1", job.id)
            else:
                cluster.run("scontrol", "requeue", job.id)
            del waiting[script, event]
        time.sleep(0.2)
    return set(waiting)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("script, event", SIGNAL_CASES)
def test_stop_signal_checkpoints_and_requeues(cluster, jobs, signalled, script, event):
    job = jobs[script, event]
    assert (script, event) not in signalled, f"the ranks never started\n{read(job.output)}\n{cluster.logs()}"
    record = assert_completed(cluster, job)
    assert record["Restarts"] == "1", read(job.output)
    for rank in (0, 1):
        assert read(job.run_dir / f"stopped-{rank}") == "15", f"rank {rank} got no SIGTERM\n{read(job.output)}"
    if script == "multi_node":
        started = {read(job.run_dir / f"started-{rank}") for rank in (0, 1)}
        assert started == {"0", "1"}, "want one rank on each node"
    resumed = json.loads((job.run_dir / "summary.json").read_text())
    assert resumed == {"resumed_from": "rank 0 after signal 15"}, read(job.output)
    if event == "time limit":
        assert "requeueing" in read(job.output)


# ---------------------------------------------------------------- helpers

def assert_completed(cluster: SlurmCluster, job: Job) -> dict:
    record = cluster.wait([job.id], JOB_TIMEOUT)[job.id]
    state, code = record.get("JobState"), record.get("ExitCode")
    assert (state, code) == ("COMPLETED", "0:0"), (
        f"job {job.id} is {state} with exit code {code} (want COMPLETED 0:0)\n"
        f"----- job output {job.output} -----\n{read(job.output)}\n{cluster.logs()}"
    )
    return record


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else "(no such file)"


def summary(job: Job) -> dict:
    path = job.run_dir / "summary.json"
    assert path.is_file(), f"no {path}\n----- job output -----\n{read(job.output)}"
    return json.loads(path.read_text())
