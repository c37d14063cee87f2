"""A real SLURM cluster on this one host, for the suite: `munged`, `slurmctld` and two `slurmd`
(nodes `n1` and `n2`, both 127.0.0.1 on ports of their own, partition `debug`), all started from one
temporary directory and stopped by their PIDs.

Everything the cluster writes stays in that directory: munge's key, socket, PID and seed files (so
it never meets a system munged), `slurm.conf`, the controller's state, the nodes' spool dirs, the
daemons' logs (`log/`) and the job completion log (`log/jobcomp.txt`). Clients reach it through
`SLURM_CONF=<dir>/slurm.conf` only, so nothing else on the machine sees it.

There is no slurmdbd, so no accounting database: finished jobs are lines of `log/jobcomp.txt`
(`jobcomp/filetxt`, with their ExitCode), which `sacct --completion` reads, and `scontrol show job`
reports them for an hour (MinJobAge). submitit (Hydra's SLURM launcher) polls `sacct -o
JobID,State,NodeList --parsable2 -j ID` to see jobs that ended without a result (a time limit, a
cancel, a failed task): `<dir>/bin/sacct`, first on the cluster's PATH, is `sacct --completion`, so
it answers from the same records (a job still pending or running is not there yet, which submitit
reads as not finished, as it should).

Needs root (slurmd launches jobs as their user; CI runs as root) and Debian's `slurm-wlm` and
`munge` (`apt-get install slurm-wlm munge`; `.ci/run` installs them). `n1` and `n2` must resolve:
if they do not, `start` appends `127.0.0.1 n1 n2` to /etc/hosts (and leaves it there, marked
`# mtft test cluster`), since srun's tasks and torch's rendezvous look the node names up.

As a pytest helper: `skip_reason()` says why no cluster can start here (None if one can),
`start(dir)` returns a running `Cluster`, `Cluster.stop()` ends it. As a script:

    python tests/cluster/slurm.py start [DIR]   # prints `export SLURM_CONF=... PATH=...`; DIR: a new temp dir
    python tests/cluster/slurm.py stop DIR      # (or python -m tests.cluster.slurm from the repository root)
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

NODES = ("n1", "n2")
PARTITION = "debug"
# Each node offers this host's cores (at least 2, so a node can run the 2 tasks of a job) and a
# nominal memory; `SlurmdParameters=config_overrides` keeps them idle whatever the host reports.
CPUS = max(2, os.cpu_count() or 2)
REAL_MEMORY_MB = 2000
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "squeue", "scontrol", "scancel")
HOSTS_MARK = "# mtft test cluster"
# `scontrol show job` states of a job that has not ended yet.
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "STAGE_OUT"}
# UNIX socket paths (munge's, slurmstepd's in the spool dirs) must stay under 108 bytes.
MAX_ROOT_LEN = 60


def skip_reason() -> str | None:
    """Why a cluster cannot start on this machine, or None when it can."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"no SLURM here ({', '.join(missing)} not on PATH): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "the test SLURM cluster needs root (slurmd runs jobs as their user)"
    return None


def version() -> str:
    """`slurm-wlm 22.05.8`, as `slurmctld -V` prints it."""
    return subprocess.run(["slurmctld", "-V"], capture_output=True, text=True).stdout.strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resolves(name: str) -> bool:
    try:
        socket.gethostbyname(name)
    except OSError:
        return False
    return True


def ensure_hosts(names: tuple[str, ...] = NODES, hosts: str = "/etc/hosts") -> None:
    """Make the node names resolve, to 127.0.0.1, by a line in /etc/hosts (root only; the line stays)."""
    missing = [n for n in names if not _resolves(n)]
    if missing:
        text = Path(hosts).read_text()
        with open(hosts, "a") as f:
            f.write(
                ("" if text.endswith("\n") or not text else "\n")
                + f"127.0.0.1 {' '.join(missing)} {HOSTS_MARK}\n"
            )


def slurm_conf(root: Path, ctld_port: int, node_ports: dict[str, int], munge_socket: Path) -> str:
    nodes = "\n".join(
        f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname={name} Port={port} CPUs={CPUS} "
        f"RealMemory={REAL_MEMORY_MB} State=UNKNOWN"
        for name, port in node_ports.items()
    )
    return f"""\
# A test cluster on one host, written by tests/cluster/slurm.py.
ClusterName=mtfttest
SlurmctldHost={socket.gethostname()}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's new start (cred_expire + 1 s; the default 120 s would
# hold the suite's requeue tests for two minutes each).
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={root}/state
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmdSpoolDir={root}/spool/%n
SlurmdLogFile={root}/log/slurmd-%n.log
# The nodes' CPUs and memory are the configured ones, not what this host reports.
SlurmdParameters=config_overrides
# No cgroups in a container: processes tracked through /proc, tasks neither bound nor confined.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# Jobs get CPUs, not whole nodes: several jobs share the two nodes.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Schedules at every submission and job end (backfill would wait for its 30 s cycle).
SchedulerType=sched/builtin
# A requeued job becomes eligible by the clock, not by an event: look at pending jobs every 2 s.
SchedulerParameters=sched_interval=2
JobAcctGatherType=jobacct_gather/none
# No slurmdbd: each finished job is a line of log/jobcomp.txt with its ExitCode (`sacct --completion`
# reads it), and `scontrol show job` keeps reporting it (ExitCode=...) for MinJobAge seconds.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
MinJobAge=3600
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
ReturnToService=2
# A job past its time limit or cancelled: SIGTERM, then SIGKILL KillWait seconds later.
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
{nodes}
PartitionName={PARTITION} Nodes={",".join(node_ports)} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Cluster:
    """A running test cluster: `env` (SLURM_CONF, and PATH with the `sacct` above) is what its
    clients need."""

    root: Path
    nodes: tuple[str, ...] = NODES
    env: dict[str, str] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """A SLURM client command (sinfo, squeue, sbatch, ...) against this cluster."""
        proc = subprocess.run(
            args, env={**os.environ, **self.env}, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr}{self.logs()}")
        return proc

    def node_states(self) -> dict[str, str]:
        out = self.run("sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N %T", check=False).stdout
        return dict(line.split() for line in out.splitlines() if len(line.split()) == 2)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict: JobState, ExitCode (`2:0` is exit 2), NodeList, ..."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def sbatch(self, script: str, *options: str, env: dict[str, str] | None = None) -> str:
        """Submit a batch script (its text) with `sbatch options...`; returns the job id. The job
        gets `env` (default: this process's) with the cluster's variables on top."""
        proc = subprocess.run(
            ["sbatch", "--parsable", *options],
            input=script,
            env={**(env or os.environ), **self.env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout.strip().split(";")[0]

    def wait(self, job_id: str, timeout: float) -> dict[str, str]:
        """Wait until the job has ended (polling the controller, faster than `sbatch --wait`) and
        return its record; after `timeout` seconds cancel it and raise TimeoutError."""
        deadline = time.monotonic() + timeout
        while (job := self.job(job_id))["JobState"] in ACTIVE:
            if time.monotonic() > deadline:
                self.run("scancel", job_id, check=False)
                raise TimeoutError(f"job {job_id} still {job['JobState']} after {timeout:.0f} s: cancelled")
            time.sleep(0.5)
        return job

    def logs(self, lines: int = 20) -> str:
        """The tail of every daemon's log, for failure messages."""
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"\n--- {log}\n" + "\n".join(tail))
        return "".join(parts)

    def stop(self) -> None:
        stop(self.root)


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, name: str) -> bool:
    """Whether `pid` is still a `name` process (not a reused PID)."""
    try:
        return name in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _wait_for(what: str, ready, timeout: float, cluster: Cluster) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the test cluster: no {what} after {timeout:.0f} s{cluster.logs()}")
        time.sleep(0.2)


def start(root: Path | str, nodes: tuple[str, ...] = NODES, timeout: float = 60) -> Cluster:
    """Start munged, slurmctld and one slurmd per node from `root` (created, or empty), and wait
    until every node is idle. On failure the daemons already started are stopped again."""
    reason = skip_reason()
    if reason:
        raise RuntimeError(reason)
    root = Path(root).resolve()
    if len(str(root)) > MAX_ROOT_LEN:
        raise RuntimeError(f"{root}: too long a path for the cluster's UNIX sockets (at most {MAX_ROOT_LEN})")
    ensure_hosts(nodes)
    for sub in ("munge", "run", "log", "state", *(f"spool/{n}" for n in nodes)):
        (root / sub).mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    munge = root / "munge"
    munge.chmod(0o711)  # its socket is reachable, its files (the key) are not
    key = munge / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    munge_socket = munge / "munged.sock"
    conf = root / "slurm.conf"
    ports = {name: _free_port() for name in nodes}
    conf.write_text(slurm_conf(root, _free_port(), ports, munge_socket))
    bin_dir = root / "bin"
    bin_dir.mkdir(exist_ok=True)
    sacct = bin_dir / "sacct"
    sacct.write_text(
        f'#!/bin/sh\n# No accounting database: the job completion log.\nexec {shutil.which("sacct")} --completion "$@"\n'
    )
    sacct.chmod(0o755)
    env = {"SLURM_CONF": str(conf), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', os.defpath)}"}
    cluster = Cluster(root, nodes, env)
    daemons = [
        ["munged", f"--socket={munge_socket}", f"--key-file={key}", f"--pid-file={munge}/munged.pid",
         f"--log-file={root}/log/munged.log", f"--seed-file={munge}/munged.seed", "--force"],
        ["slurmctld", "-f", str(conf)],
        *(["slurmd", "-f", str(conf), "-N", name] for name in nodes),
    ]  # fmt: skip
    try:
        for argv in daemons:
            # Each daemon forks into the background and writes its own PID file.
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=root)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}{cluster.logs()}"
                )
            if argv[0] == "munged":
                _wait_for("munge socket", munge_socket.exists, timeout, cluster)
            if argv[0] == "slurmctld":
                _wait_for("answer from slurmctld", lambda: cluster.node_states() != {}, timeout, cluster)
        _wait_for(
            f"idle nodes {', '.join(nodes)}",
            lambda: all(cluster.node_states().get(n) == "idle" for n in nodes),
            timeout,
            cluster,
        )
    except BaseException:
        stop(root)
        raise
    return cluster


def stop(root: Path | str, timeout: float = 15) -> None:
    """Cancel the cluster's jobs and let them end, then end its daemons by the PIDs in their PID
    files (the nodes, the controller, munge): SIGTERM, and SIGKILL after `timeout` seconds."""
    root = Path(root)
    conf = root / "slurm.conf"
    run = root / "run"
    pids = [
        *((path, "slurmd") for path in sorted(run.glob("slurmd-*.pid"))),
        (run / "slurmctld.pid", "slurmctld"),
        (root / "munge" / "munged.pid", "munged"),
    ]
    live = [(pid, name) for path, name in pids if (pid := _pid(path)) and _alive(pid, name)]
    if conf.exists() and any(name == "slurmctld" for _, name in live):
        env = {**os.environ, "SLURM_CONF": str(conf)}
        subprocess.run(["scancel", "--user=root"], env=env, capture_output=True, timeout=30)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            queue = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True, timeout=30)
            if queue.returncode != 0 or not queue.stdout.strip():
                break
            time.sleep(0.2)
    for pid, name in live:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid, name) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid, name):
            os.kill(pid, signal.SIGKILL)
    # A job step the controller could no longer hear from outlives its slurmd: its slurmstepd holds
    # the node's log (in `root`) open, which tells it from any other cluster's.
    for pid in _stepds(root):
        os.kill(pid, signal.SIGKILL)


def _stepds(root: Path) -> list[int]:
    """The slurmstepd processes with a file of `root` open."""
    prefix, found = f"{root.resolve()}/", []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if not (proc / "cmdline").read_bytes().startswith(b"slurmstepd"):
                continue
            if any(os.readlink(fd).startswith(prefix) for fd in (proc / "fd").iterdir()):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("start", help="start a cluster and print the environment its clients need")
    up.add_argument("dir", nargs="?", help="the cluster's directory (default: a new one under /tmp)")
    down = sub.add_parser("stop", help="stop the cluster started from DIR")
    down.add_argument("dir")
    args = parser.parse_args(argv)
    if args.command == "stop":
        stop(args.dir)
        return 0
    reason = skip_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 1
    root = args.dir or tempfile.mkdtemp(prefix="mtft-slurm-")
    cluster = start(root)
    print(f"# {version()}: nodes {', '.join(cluster.nodes)} idle in partition {PARTITION}", file=sys.stderr)
    print(f"# stop: python {Path(__file__).resolve()} stop {cluster.root}", file=sys.stderr)
    print(f"export SLURM_CONF={cluster.conf} PATH={cluster.root / 'bin'}:$PATH")
    return 0


if __name__ == "__main__":
    sys.exit(main())
