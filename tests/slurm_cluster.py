"""A throwaway Slurm on 127.0.0.1 for the tests: munged, slurmctld and slurmd in a temp dir.

    cluster = SlurmCluster.start(tmp_dir)     # raises SlurmUnavailable(reason) when it cannot run here
    cluster = SlurmCluster.start(tmp_dir, nodes=2)   # two slurmd on this one machine: "nodes" vm-n1, vm-n2
    subprocess.run(["sbatch", ...], env=cluster.env)   # clients find it through SLURM_CONF
    cluster.stop()

Everything lives under the given directory (slurm.conf, cgroup.conf, munge key and socket, state, spool,
logs); the daemons run in the foreground as children of this process on free ports, so a system Slurm on
the same machine is left alone. With ``nodes=2`` two slurmd run side by side (each with its own port,
spool and share of the CPUs; Debian's slurmd allows it), so `srun --nodes=2` and multi-node rendezvous
on loopback can be tested; their names do not resolve, their NodeAddr is 127.0.0.1. It needs root (slurmd launches jobs) and the Debian packages slurmctld,
slurmd, slurm-client and munge (.ci/install-slurm). ``python -m tests.slurm_cluster DIR`` starts one and
keeps it up until Ctrl-C (or SIGTERM), for trying the sbatch scripts by hand.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here; the message says why (used as the tests' skip reason)."""


def _which(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None)


def unavailable_reason() -> str | None:
    """Why a cluster cannot be started here, or None when it can be tried."""
    missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} not found); run .ci/install-slurm "
                "(apt-get install slurmctld slurmd slurm-client munge) as root")
    if os.geteuid() != 0:
        return "a throwaway Slurm needs root (slurmd launches the jobs); run the tests as root"
    return None


def _free_ports(n: int) -> list[int]:
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class SlurmCluster:
    root: Path
    nodes: list  # node names; one slurmd each, all on this machine
    cpus: int  # CPUs of each node
    env: dict
    processes: dict = field(default_factory=dict)

    @property
    def node(self) -> str:
        return self.nodes[0]

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    # -------------------------------------------------------------------------------------------- start

    @classmethod
    def start(cls, root: Path, *, nodes: int = 1, timeout: float = 60.0) -> "SlurmCluster":
        reason = unavailable_reason()
        if reason:
            raise SlurmUnavailable(reason)
        root = Path(root).resolve()
        for sub in ("etc", "munge", "state", "spool", "log"):
            (root / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(root / sub, 0o700)
        host = socket.gethostname().split(".")[0]
        names = [host] if nodes == 1 else [f"{host}-n{i}" for i in range(1, nodes + 1)]
        cluster = cls(root=root, nodes=names, cpus=max(1, (os.cpu_count() or 1) // nodes),
                      env={**os.environ, "SLURM_CONF": str(root / "etc" / "slurm.conf")})
        for name in list(cluster.env):  # a job's environment must not leak into the clients we run
            if name.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_")) and name != "SLURM_CONF":
                del cluster.env[name]
        try:
            cluster._write_config()
            cluster._start_munge(timeout)
            cluster._start_slurm(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _write_config(self) -> None:
        ctld_port, *slurmd_ports = _free_ports(1 + len(self.nodes))
        r = self.root
        host = socket.gethostname().split(".")[0]
        node_lines = "\n".join(
            f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname={host} Port={port} CPUs={self.cpus} State=UNKNOWN"
            for name, port in zip(self.nodes, slurmd_ports))
        config = f"""\
# throwaway Slurm written by tests/slurm_cluster.py
ClusterName=speakeridtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_ports[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={r}/munge/munge.socket,cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/slurmd-%n
SlurmctldPidFile={r}/state/slurmctld.pid
SlurmdPidFile={r}/spool/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# schedule often: a requeued job is eligible again after cred_expire, then waits for the next pass
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
# finished jobs stay visible to `scontrol show job` (state, exit code, restarts) without accounting
MinJobAge=3600
KillWait=10
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=60
MaxArraySize=1001
{node_lines}
PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
        (r / "etc" / "slurm.conf").write_text(config)
        # no cgroup plugins are used (proctrack/linuxproc, task/none); slurmd still reads this file
        (r / "etc" / "cgroup.conf").write_text("CgroupAutomount=no\nConstrainCores=no\nConstrainRAMSpace=no\n")
        (r / "etc" / "plugstack.conf").write_text("")

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   env=self.env, start_new_session=True)
        log.close()
        self.processes[name] = process
        return process

    def _check_alive(self, name: str, log: Path) -> None:
        process = self.processes[name]
        if process.poll() is not None:
            raise SlurmUnavailable(f"{name} exited with {process.returncode} at start-up:\n"
                                   f"{_tail(self.root / 'log' / f'{name}.stdout')}\n{_tail(log)}")

    def _start_munge(self, timeout: float) -> None:
        m = self.root / "munge"
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--key-file={key}",
                               f"--socket={m}/munge.socket", f"--pid-file={m}/munged.pid",
                               f"--log-file={self.root}/log/munged.log", f"--seed-file={m}/munged.seed"])
        deadline = time.monotonic() + timeout
        while not (m / "munge.socket").exists():
            self._check_alive("munged", self.root / "log" / "munged.log")
            if time.monotonic() > deadline:
                raise SlurmUnavailable("munged did not create its socket in time:\n" + _tail(self.root / "log" / "munged.log"))
            time.sleep(0.1)

    def _start_slurm(self, timeout: float) -> None:
        conf = str(self.conf)
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-i", "-f", conf])
        deadline = time.monotonic() + timeout
        while self.run("scontrol", "ping", check=False).returncode != 0 or "UP" not in self.run("scontrol", "ping", check=False).stdout:
            self._check_alive("slurmctld", self.root / "log" / "slurmctld.log")
            if time.monotonic() > deadline:
                raise SlurmUnavailable("slurmctld did not answer `scontrol ping`:\n" + _tail(self.root / "log" / "slurmctld.log"))
            time.sleep(0.25)
        for name in self.nodes:
            self._spawn(f"slurmd-{name}", [_which("slurmd"), "-D", "-f", conf, "-N", name])
        while True:
            states = dict(line.split() for line in self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.splitlines()
                          if len(line.split()) == 2)
            if all(states.get(name) == "idle" for name in self.nodes):
                return
            for name in self.nodes:
                self._check_alive(f"slurmd-{name}", self.root / "log" / f"slurmd-{name}.log")
            if time.monotonic() > deadline:
                raise SlurmUnavailable(f"nodes not idle after {timeout:.0f} s: {states or 'no answer from sinfo'}:\n"
                                       + "\n".join(_tail(self.root / "log" / f"slurmd-{name}.log") for name in self.nodes)
                                       + "\n" + _tail(self.root / "log" / "slurmctld.log"))
            time.sleep(0.25)

    # -------------------------------------------------------------------------------------------- use

    def run(self, *argv: str, check: bool = True, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        result = subprocess.run(list(argv), env=kwargs.pop("env", self.env), capture_output=True, text=True,
                                timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stdout}{result.stderr}")
        return result

    def jobs(self, job_id: str | int) -> list[dict]:
        """`scontrol show job -o` as one dict of fields (JobState, ExitCode, Restarts, …) per job or array
        task; [] once the controller has forgotten it."""
        result = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        records = []
        for line in result.stdout.splitlines():
            fields: dict = {}
            for token in line.split():
                if "=" in token:
                    key, _, value = token.partition("=")
                    fields.setdefault(key, value)
            if "JobId" in fields:
                records.append(fields)
        return records

    def job(self, job_id: str | int) -> dict:
        records = self.jobs(job_id)
        return records[0] if records else {}

    def queued(self) -> list[str]:
        """Ids of the jobs (array tasks expanded) still pending or running."""
        out = self.run("squeue", "-h", "-r", "-o", "%i", check=False).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.queued():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return True

    def logs(self) -> str:
        return "\n".join(f"--- {name}.log ---\n{_tail(self.root / 'log' / f'{name}.log', 30)}"
                         for name in ["slurmctld", *(f"slurmd-{n}" for n in self.nodes)])

    # -------------------------------------------------------------------------------------------- stop

    def stop(self) -> None:
        """Cancel every job, wait for them to go, then stop slurmd, slurmctld and munged (only ours)."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            try:
                jobs = self.queued()
                if jobs:
                    self.run("scancel", *{j.split("_")[0] for j in jobs}, check=False)
                    self.wait_idle(30)
            except (OSError, subprocess.SubprocessError):
                pass
        for name in [*(f"slurmd-{n}" for n in self.nodes), "slurmctld", "munged"]:
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def main() -> None:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description="start a throwaway single-node Slurm; Ctrl-C stops it")
    parser.add_argument("dir", nargs="?", help="state directory (default: a new temp dir)")
    parser.add_argument("--nodes", type=int, default=1, help="slurmd daemons (nodes) on this machine")
    args = parser.parse_args()
    cluster = SlurmCluster.start(Path(args.dir or tempfile.mkdtemp(prefix="slurm-")), nodes=args.nodes)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))  # stop cleanly on kill
    print(f"Slurm is up with node(s) {', '.join(cluster.nodes)}: export SLURM_CONF={cluster.conf}   (Ctrl-C stops it)",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
