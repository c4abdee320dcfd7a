"""A throwaway Slurm cluster of eight nodes on this host, for tests/test_slurm.py.

One slurmctld and eight slurmd daemons (nodes n1 to n8) run from a temporary folder: their
own slurm.conf (found through SLURM_CONF), ports, spool, state, pid and log files, and a
private munged on its own socket, so nothing in /etc/slurm or /run/munge is touched. No
systemd, cgroups or accounting database: processes are tracked by parentage, and job
states come from `squeue` / `scontrol show job`. The node names do not resolve; every
node lives at 127.0.0.1. Needs root (slurmd starts jobs as the submitting user).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

# Enough nodes for every job of the test module at once: a job that waits for a signal from
# a later test must not hold the nodes that an earlier test's requeued job needs.
NODES = tuple(f"n{i}" for i in range(1, 9))
CPUS_PER_NODE = 2
INSTALL_SCRIPT = Path(__file__).with_name("slurm_install.sh")
COMMANDS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "munged")
FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "PREEMPTED",
}


class ClusterError(RuntimeError):
    pass


def missing_commands() -> list[str]:
    return [c for c in COMMANDS if shutil.which(c, path=_sbin_path()) is None]


def _sbin_path() -> str:
    # slurmctld, slurmd and munged live in /usr/sbin, which a non-login PATH may lack.
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def free_ports(count: int) -> list[int]:
    """Ports nobody listens on now (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class SlurmCluster:
    """Start with `start()`, always end with `stop()` (also after a failed start)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.log_dir = self.root / "log"
        self.pid_dir = self.root / "run"
        self.pid_files: list[Path] = []  # in start order; stopped in reverse

    # -- environment for every slurm command and job ---------------------------------
    def env(self, extra: dict | None = None) -> dict:
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = _sbin_path()
        env.update(extra or {})
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            cmd, env=kw.pop("env", None) or self.env(), capture_output=True, text=True,
            timeout=timeout, **kw,
        )
        if check and proc.returncode != 0:
            raise ClusterError(
                f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}\n{self.logs()}"
            )
        return proc

    # -- start / stop -----------------------------------------------------------------
    def start(self, timeout: float = 60) -> None:
        for d in (self.conf.parent, self.log_dir, self.pid_dir, self.root / "state",
                  *(self.root / "spool" / n for n in NODES)):
            d.mkdir(parents=True, exist_ok=True)
        # munged (running as the munge user) must reach its socket and log files.
        os.chmod(self.root, 0o755)
        self._start_munged()
        ctld_port, *node_ports = free_ports(1 + len(NODES))
        self._write_conf(ctld_port, node_ports)
        self._daemon("slurmctld", ["slurmctld", "-i"], self.pid_dir / "slurmctld.pid")
        for node in NODES:
            self._daemon(f"slurmd {node}", ["slurmd", "-N", node], self.pid_dir / f"slurmd-{node}.pid")
        self._wait_nodes_idle(timeout)

    def stop(self) -> None:
        """Cancel the jobs left (a failed test may leave some), then stop every daemon started,
        by its pid file, and wait until each is gone."""
        if self.conf.exists() and any("slurmctld" in p.name for p in self.pid_files):
            self.run("scancel", "--full", f"--user={pwd.getpwuid(os.getuid()).pw_name}", check=False)
            deadline = time.monotonic() + 30
            while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for pid_file in reversed(self.pid_files):
            pid = _read_pid(pid_file)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 15
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.pid_files.clear()

    def _start_munged(self) -> None:
        munge = pwd.getpwnam("munge")
        # munged wants a socket folder it owns, that all may enter and only it may write.
        self.munge_dir.mkdir(exist_ok=True)
        os.chmod(self.munge_dir, 0o755)
        os.chown(self.munge_dir, munge.pw_uid, munge.pw_gid)
        pid_file = self.munge_dir / "munged.pid"
        self.pid_files.append(pid_file)
        cmd = [
            "munged", f"--socket={self.munge_socket}", f"--pid-file={pid_file}",
            f"--log-file={self.munge_dir / 'munged.log'}", f"--seed-file={self.munge_dir / 'munged.seed'}",
        ]
        # The key is munged's default, /etc/munge/munge.key, which the munge package made.
        self.run("runuser", "-u", "munge", "--", *cmd)
        self._wait_for(lambda: self.munge_socket.exists(), 10, "munged socket")

    def _write_conf(self, ctld_port: int, node_ports: list[int]) -> None:
        r = self.root
        lines = [
            "ClusterName=byzddptest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            # cred_expire also sets how long a requeued job waits before it may start again
            # (120 s by default): the slurmd refuses the job while it holds a revoked credential.
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmctldPidFile={self.pid_dir / 'slurmctld.pid'}",
            f"SlurmctldLogFile={self.log_dir / 'slurmctld.log'}",
            # %n: one spool, pid and log file per node daemon on this host.
            f"SlurmdSpoolDir={r / 'spool' / '%n'}",
            f"SlurmdPidFile={self.pid_dir / 'slurmd-%n.pid'}",
            f"SlurmdLogFile={self.log_dir / 'slurmd-%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # The node daemons share this host, so slurmd's own hardware check and the config
            # hash check would reject them; the declared CPUs are trusted.
            "SlurmdParameters=config_overrides",
            "DebugFlags=NO_CONF_HASH",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            # Look at pending jobs every second, not every minute: a requeued job starts sooner.
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            "ReturnToService=2",
            # A short wait between a job's SIGTERM and SIGKILL; finished jobs stay visible to
            # scontrol for 10 minutes (there is no accounting database to ask afterwards).
            "KillWait=10",
            "InactiveLimit=0",
            "MinJobAge=600",
            "SlurmdTimeout=60",
        ]
        for node, port in zip(NODES, node_ports):
            lines.append(
                f"NodeName={node} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={CPUS_PER_NODE} RealMemory=1000 State=UNKNOWN"
            )
        lines.append("PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _daemon(self, name: str, cmd: list[str], pid_file: Path) -> None:
        self.pid_files.append(pid_file)
        self.run(*cmd)  # each daemonizes and writes its pid file
        self._wait_for(lambda: _read_pid(pid_file) is not None, 15, f"{name} pid file")

    def _wait_nodes_idle(self, timeout: float) -> None:
        def idle() -> bool:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            return all(states.get(n, "").rstrip("*") == "idle" for n in NODES)
        self._wait_for(idle, timeout, f"nodes {', '.join(NODES)} to be idle")

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}")
            time.sleep(0.2)

    # -- jobs -------------------------------------------------------------------------
    def sbatch(self, *args: str, cwd: Path, env: dict | None = None) -> str:
        out = self.run("sbatch", "--parsable", *args, cwd=cwd, env=self.env(env)).stdout
        return out.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` of one job (or array task) as key -> value."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False).stdout
        return dict(re.findall(r"(\w+(?::\w+)?)=(\S*)", out))

    def wait(self, job_ids: list[str], timeout: float) -> dict[str, dict[str, str]]:
        """Poll until every job (or array task id) is in a final state; return their records."""
        deadline = time.monotonic() + timeout
        while True:
            records = {j: self.job(j) for j in job_ids}
            if all(r.get("JobState") in FINAL_STATES for r in records.values()):
                return records
            if time.monotonic() > deadline:
                return records
            time.sleep(1)

    def logs(self) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*.log")) + [self.munge_dir / "munged.log"]:
            if path.exists():
                text = path.read_text(errors="replace")
                parts.append(f"----- {path.name} (last 2000 chars) -----\n{text[-2000:]}")
        return "\n".join(parts)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # A zombie has exited; its parent (init, once the daemon forked away) reaps it later.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
