"""A throwaway one-node SLURM for tests: this host as controller and only node, two fake GPUs.

Installs Debian's `slurmctld slurmd slurm-client munge` when they are missing, writes a minimal
/etc/slurm/slurm.conf and gres.conf, starts munged, slurmctld and slurmd in the foreground as children of
this process (no systemd) and stops exactly those PIDs again. Everything else (state, spool, logs, the munge
key and socket, the GPU device nodes) lives in one scratch folder.

No accounting storage, so `sacct` does not work here: Snakemake's SLURM plugin must poll with `squeue`,
which MinJobAge (finished jobs stay visible for an hour) makes reliable.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "scancel"]
CONF_DIR = Path("/etc/slurm")
MARKER = "# written by cmrcnet tests/slurm_cluster.py"
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


def cannot_run() -> str | None:
    """Why a throwaway SLURM cannot be brought up on this machine, or None when it can."""
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root: installs SLURM with apt-get and runs slurmctld, slurmd and munged"
    if not shutil.which("apt-get") and not all(shutil.which(b) for b in BINARIES):
        return "needs apt-get (Debian/Ubuntu) to install slurmctld, slurmd, slurm-client and munge"
    conf = CONF_DIR / "slurm.conf"
    if conf.exists() and MARKER not in conf.read_text(errors="replace"):
        return f"{conf} exists and is not ours: this host has its own SLURM, which the test must not replace"
    return None


def install(timeout: int = 600) -> None:
    """apt-get install the SLURM and munge packages unless their programs are already there.

    Services are kept from starting at install time (policy-rc.d), so the only daemons are the ones we start.
    """
    if all(shutil.which(b) for b in BINARIES):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    own_policy = not POLICY_RC_D.exists()
    if own_policy:
        POLICY_RC_D.write_text("#!/bin/sh\n# cmrcnet tests: no service starts during apt-get install\nexit 101\n")
        POLICY_RC_D.chmod(0o755)
    try:
        for cmd in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
            result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-2000:]}"
                                   f"\n{result.stderr[-2000:]}")
    finally:
        if own_policy:
            POLICY_RC_D.unlink(missing_ok=True)
    missing = [b for b in BINARIES if not shutil.which(b)]
    if missing:
        raise RuntimeError(f"installed {PACKAGES} but these programs are still missing: {missing}")


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports that are free right now."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def node_hardware() -> dict[str, str]:
    """This host's CPU layout as slurmd itself sees it (`slurmd -C`)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True, timeout=60).stdout
    fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
    return {k: fields[k] for k in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
            if k in fields}


class OneNodeSlurm:
    """munged + slurmctld + slurmd for this host, partitions `main` (default) and `gpu`, two fake GPUs of type `fake`.

    Use as a context manager or call start() and stop(); stop() is safe after a partial start.
    """

    GPU_TYPE = "fake"
    N_GPUS = 2
    DEFAULT_PARTITION = "main"
    GPU_PARTITION = "gpu"

    def __init__(self, root: Path, real_memory_mb: int = 64000):
        self.root = Path(root)
        self.real_memory_mb = real_memory_mb  # with config_overrides, more than the host has is fine
        self.host = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = CONF_DIR / "slurm.conf"
        self.gres_conf = CONF_DIR / "gres.conf"
        self.ctld_log = self.root / "log" / "slurmctld.log"
        self.slurmd_log = self.root / "log" / "slurmd.log"

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- configuration -----------------------------------------------------------------------------------------

    def write_config(self) -> None:
        for sub in ("munge", "state", "spool", "log", "dev"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o755)
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.munge_key = self.root / "munge" / "munge.key"
        if not self.munge_key.exists():
            self.munge_key.write_bytes(os.urandom(1024))
        self.munge_key.chmod(0o600)
        self.gpu_devices = []
        for i in range(self.N_GPUS):  # one character device per GPU; nothing ever opens them
            dev = self.root / "dev" / f"fakegpu{i}"
            if not dev.exists():
                os.mknod(dev, stat.S_IFCHR | 0o600, os.makedev(195, i))
            self.gpu_devices.append(dev)
        hw = " ".join(f"{k}={v}" for k, v in node_hardware().items())
        r = self.root
        ctld_port, slurmd_port = free_ports(2)
        CONF_DIR.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""{MARKER} ({r}); removed again when the test cluster stops
ClusterName=cmrcnetci
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/builtin
GresTypes=gpu
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=3600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={self.ctld_log}
SlurmdLogFile={self.slurmd_log}
SlurmctldDebug=info
SlurmdDebug=info
NodeName={self.host} NodeAddr=127.0.0.1 {hw} RealMemory={self.real_memory_mb} \
Gres=gpu:{self.GPU_TYPE}:{self.N_GPUS} State=UNKNOWN
PartitionName={self.DEFAULT_PARTITION} Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
PartitionName={self.GPU_PARTITION} Nodes={self.host} Default=NO MaxTime=INFINITE State=UP
""")
        self.gres_conf.write_text(f"{MARKER}\nAutoDetect=off\n" + "".join(
            f"NodeName={self.host} Name=gpu Type={self.GPU_TYPE} File={dev}\n" for dev in self.gpu_devices))

    # -- daemons ---------------------------------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.out", "ab")
        try:
            self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            out.close()

    def _wait_until(self, what: str, check, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for {what}\n{self.diagnostics()}")
            if check():
                return
            time.sleep(0.25)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.diagnostics()}")

    def start(self, timeout: float = 60) -> None:
        self.write_config()
        m = self.root / "munge"
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={self.munge_key}", f"--pid-file={m / 'munged.pid'}",
                               f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"])
        self._wait_until("munged", lambda: self.munge_socket.exists(), timeout)
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self._wait_until("slurmctld", lambda: self.run(["scontrol", "ping"], check=False).returncode == 0, timeout)
        self._spawn("slurmd", ["slurmd", "-D", "-N", self.host])
        self._wait_until("the node to be idle", self.node_idle, timeout)

    def node_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout.split()
        return bool(out) and all(state == "idle" for state in out)

    def run(self, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=60)

    def jobs(self) -> dict[str, dict[str, str]]:
        """Every job slurmctld still knows (finished ones for MinJobAge), as `scontrol -d -o show job` fields."""
        out = self.run(["scontrol", "-d", "-o", "show", "job"]).stdout
        jobs = {}
        for line in out.splitlines():
            fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
            if "JobId" in fields:
                jobs[fields["JobId"]] = fields
        return jobs

    def diagnostics(self) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if path.is_file():
                parts.append(f"--- {path}\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def stop(self, timeout: float = 30) -> None:
        """Cancel what is left in the queue, then stop the daemons this object started, by PID, newest first."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                queued = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
                if queued:
                    self.run(["scancel", *queued], check=False)
                    deadline = time.monotonic() + timeout
                    while time.monotonic() < deadline and self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split():
                        time.sleep(0.5)
            except (OSError, subprocess.SubprocessError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=timeout)
        for path in (self.conf, self.gres_conf):
            try:
                if MARKER in path.read_text(errors="replace"):
                    path.unlink()
            except FileNotFoundError:
                pass

    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.procs.items()}
