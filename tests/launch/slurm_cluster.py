"""A one-node SLURM cluster on localhost for tests: munged, slurmctld and slurmd with a generated slurm.conf in a
temporary directory, all in the foreground as children of the test, stopped (by pid) at the end.

Installs nothing: it needs Debian's `slurm-wlm` and `munge` packages (`available()` says why not)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "scancel", "srun")


def missing() -> str | None:
    """Why the cluster cannot start here, or None."""
    absent = [name for name in DAEMONS + CLIENTS if shutil.which(name) is None
              and not Path("/usr/sbin", name).exists()]
    if absent:
        return f"{', '.join(absent)} not installed (Debian: apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "slurmd must run as root to start job steps; run the SLURM tests as root (e.g. in CI containers)"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.procs: list[subprocess.Popen] = []
        self.host = socket.gethostname()
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"

    # ------------------------------------------------------------------------------------------------ set-up
    def env(self) -> dict:
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def _write_config(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(self.root / sub, 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=lctrain-test",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "JobRequeue=1",
            "MinJobAge=600",
            "KillWait=20",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} RealMemory=1000 State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4",
            "",
        ]))
        (self.root / "cgroup.conf").write_text("CgroupPlugin=autodetect\nIgnoreSystemd=yes\n")

    def _spawn(self, args: list[str], log: str) -> None:
        handle = open(self.root / "log" / log, "ab")
        self.procs.append(subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=self.env(),
                                           start_new_session=True))

    def start(self, timeout: float = 60) -> "LocalSlurm":
        self._write_config()
        m = self.root / "munge"
        self._spawn([_binary("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                     f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
                     f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"], "munged.out")
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged did not create its socket")
        self._spawn([_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        self._spawn([_binary("slurmd"), "-D", "-f", str(self.conf), "-N", self.host], "slurmd.out")
        self._wait(self._node_ready, timeout, "the node did not become idle")
        return self

    def _node_ready(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout.strip()
        return out in ("idle", "mixed", "allocated")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{what} within {timeout:.0f}s: {self.logs()}")

    def logs(self) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if path.is_file():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}")
        return "\n".join(parts)

    # ------------------------------------------------------------------------------------------------ use
    def run(self, args: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(args, env=kw.pop("env", self.env()), capture_output=True, text=True,
                              timeout=kw.pop("timeout", 60), **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict of its Key=Value fields."""
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        fields = {}
        for item in out.split():
            key, _, value = item.partition("=")
            fields[key] = value
        return fields

    def wait_for(self, job_id: str, states: tuple[str, ...], timeout: float) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        raise AssertionError(f"job {job_id} not in {states} after {timeout:.0f}s: {self.job(job_id)}\n{self.logs()}")

    # ------------------------------------------------------------------------------------------------ tear-down
    def stop(self) -> None:
        """Cancel what is left, then stop the daemons we started (by pid, newest first)."""
        if self.procs and self.procs[0].poll() is None:
            self.run(["scancel", "--full", "-u", "root"], check=False)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
