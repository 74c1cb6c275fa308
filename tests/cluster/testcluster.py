"""A real single-node SLURM cluster for tests: munge, MariaDB, slurmdbd, slurmctld, three slurmd.

Everything runs as root under one directory (ROOT) with its own munge key and socket, its own
MariaDB datadir, its own ports and its own slurm.conf; clients reach it through SLURM_CONF.
Standard library only, so `scripts/slurm_test_cluster.sh` can drive it without a virtualenv:

    python3 tests/cluster/testcluster.py start|stop|status ROOT

Every daemon runs in the foreground as a child we started; its PID and kernel start time are
kept in ROOT/state.json, and stopping signals exactly those PIDs (never a process name).
See docs/cluster-testing.md.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurmdbd", "slurm-client", "munge", "mariadb-server")
BINARIES = ("munged", "mariadbd", "mariadb-install-db", "mariadb", "slurmdbd", "slurmctld",
            "slurmd", "sinfo", "squeue", "sbatch", "scancel", "sacct", "sacctmgr", "scontrol")
CLUSTER_NAME = "btmtest"
# Ports: ROOT's block starts at a base; nodes take base+1.., the services base+7...
PORT_BLOCK = 10
PREFERRED_BASE = 17000
SERVICE_PORT_OFFSETS = {"slurmctld": 7, "slurmdbd": 8, "mariadb": 9}
# MariaDB settings besides paths and port; they also key the accounting DB template.
MARIADB_SETTINGS = ("innodb_buffer_pool_size=32M", "innodb_log_file_size=8M")
# sacct states after which a job allocation will not change again.
TERMINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                             "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"})
# The order daemons start in; stop() goes in reverse.
SERVICES = ("munged", "mariadbd", "slurmdbd", "slurmctld")


class ClusterUnavailable(RuntimeError):
    """The cluster cannot run on this machine at all (not root, packages missing)."""


class ClusterError(RuntimeError):
    """The cluster was set up but a daemon or client misbehaved; the message has the log tail."""


def _which(name: str) -> str | None:
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/usr/bin:/sbin:/bin"
    return shutil.which(name, path=path)


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if _which(b) is None]


def ensure_packages(log=print) -> None:
    """Install the Debian packages when a binary is missing (root only, non-interactive).

    A temporary policy-rc.d keeps apt from starting the packages' system services, which we
    never use: every daemon of the test cluster is started by hand.
    """
    if not missing_binaries():
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"SLURM test cluster: {', '.join(missing_binaries())} missing and "
                                 f"not root, so cannot apt-get install {' '.join(PACKAGES)}")
    if _which("apt-get") is None:
        raise ClusterUnavailable("SLURM test cluster: packages missing and no apt-get here")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    policy = Path("/usr/sbin/policy-rc.d")
    added_policy = not policy.exists()
    if added_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        for argv in (["apt-get", "update", "-q"],
                     ["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=600",
                      *PACKAGES]):
            log(f"[slurm-testcluster] {' '.join(argv)}")
            proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1200)
            if proc.returncode != 0:
                raise ClusterUnavailable(f"SLURM test cluster: {' '.join(argv)} failed "
                                         f"({proc.returncode}):\n{_tail_text(proc.stdout + proc.stderr)}")
    finally:
        if added_policy:
            policy.unlink(missing_ok=True)
    if missing_binaries():
        raise ClusterUnavailable(f"SLURM test cluster: still missing after apt-get install: "
                                 f"{', '.join(missing_binaries())}")


def _tail_text(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return _tail_text(path.read_text(errors="replace"), lines)
    except OSError as exc:
        return f"(cannot read {path}: {exc})"


def _proc_start_time(pid: int) -> int | None:
    """Kernel start time of a live (non-zombie) process, or None: guards against PID reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Like the daemons: a port left in TIME_WAIT is free, one with a listener is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def _machine_lock():
    """Serialises port choice and daemon start-up between test sessions on this machine."""
    path = Path(tempfile.gettempdir()) / "btm-slurm-testcluster.lock"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the daemon if the process that started it dies (a crashed pytest)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def reap_orphans(directory: Path, prefix: str = "btm-slurm-") -> list[Path]:
    """Stop test clusters under directory/prefix* whose owning process died (a crashed run).

    Their daemons are ended by the PIDs in their state.json, like any stop(); most would have
    died with their owner already (PR_SET_PDEATHSIG), but mariadbd drops that when it changes
    to the mysql user. Clusters started by scripts/slurm_test_cluster.sh have no owner and are
    never touched. Returns the roots that were stopped (and removed).
    """
    reaped = []
    for state in sorted(Path(directory).glob(f"{prefix}*/state.json")):
        with contextlib.suppress(ClusterError, OSError, KeyError, ValueError):
            cluster = SlurmTestCluster.load(state.parent)
            if cluster.orphaned():
                cluster.stop(timeout=15)
                shutil.rmtree(cluster.root, ignore_errors=True)
                reaped.append(cluster.root)
    return reaped


def cache_dir() -> Path:
    """Where the accounting DB template is kept: out of $TMPDIR, whose cleaners could delete
    some of its files and leave a broken template."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "btm-slurm-testcluster"


def accounting_db_template(directory: Path | None = None) -> tuple[Path, str]:
    """(datadir, slurm DB password) of a stopped MariaDB holding slurmdbd's schema and our
    registered cluster; every start copies it instead of running mariadb-install-db and
    letting slurmdbd create ~40 tables (seconds each on a busy machine).

    Built once per MariaDB and SLURM version under `directory` (default: cache_dir()), by
    a throw-away cluster in $TMPDIR
    (munge, MariaDB, slurmdbd) that is stopped cleanly before its datadir is kept. Call with
    _machine_lock() held. The password only guards a database on 127.0.0.1 used for tests.
    """
    versions = [subprocess.run([_which(b), flag], capture_output=True, text=True).stdout.strip()
                for b, flag in (("mariadbd", "--version"), ("slurmctld", "-V"))]
    key = hashlib.sha256("\n".join([*versions, *MARIADB_SETTINGS, CLUSTER_NAME]).encode())
    directory = Path(directory) if directory else cache_dir()
    template = directory / f"db-{key.hexdigest()[:12]}"
    if (template / "password").is_file():
        return template / "data", (template / "password").read_text()
    directory.mkdir(parents=True, exist_ok=True)
    builder = SlurmTestCluster(tempfile.mkdtemp(prefix="btm-slurm-"))
    password = secrets.token_hex(16)
    try:
        deadline = time.monotonic() + 300
        builder._prepare_root()
        builder._choose_ports()
        builder._write_configs(password)
        builder._start_munge(deadline)
        builder._start_mariadb(deadline, None)
        builder._create_accounting_db(deadline)
        builder.stop()
        staging = template.with_name(f"{template.name}.{os.getpid()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        os.rename(builder.root / "mysql" / "data", staging / "data")
        (staging / "password").write_text(password)
        shutil.rmtree(template, ignore_errors=True)  # an incomplete one, if any
        os.rename(staging, template)
    finally:
        builder.stop()
        shutil.rmtree(builder.root, ignore_errors=True)
    return template / "data", password


class SlurmTestCluster:
    """One test cluster under `root`. API for tests (see docs/cluster-testing.md):

    start(), stop(), env, partitions, nodes, run(argv), wait_idle(), node_states(),
    reconfigure(**settings), kill_slurmd(node), start_slurmd(node), restart_slurmctld(), status().
    """

    def __init__(self, root: Path | str, *, nodes: int = 3, cpus_per_node: int = 2,
                 mem_mb_per_node: int = 4000, tie_to_parent: bool = True):
        self.root = Path(root).resolve()
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        self.cpus_per_node = cpus_per_node
        self.mem_mb_per_node = mem_mb_per_node
        # partition name -> time limit in minutes (None = unlimited).
        self.partitions = {"debug": 10, "batch": None}
        self.default_partition = "batch"
        self.tie_to_parent = tie_to_parent
        # With tie_to_parent, the process whose death ends the daemons (see reap_orphans).
        self.owner = {"pid": os.getpid(), "start_time": _proc_start_time(os.getpid())} \
            if tie_to_parent else None
        self.ports: dict[str, int] = {}
        self.pids: dict[str, dict] = {}  # daemon name -> {"pid", "start_time", "argv", "log"}
        self._procs: dict[str, subprocess.Popen] = {}
        self.hostname = socket.gethostname().split(".")[0]

    # ----------------------------------------------------------------- paths and env
    @property
    def slurm_conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """Variables a client needs to talk to this cluster (merge them into os.environ)."""
        return {"SLURM_CONF": str(self.slurm_conf)}

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    @property
    def mysql_socket(self) -> Path:
        return self.root / "mysql" / "run" / "mysqld.sock"

    def log_path(self, daemon: str) -> Path:
        return self.root / "log" / f"{daemon}.log"

    def _state_file(self) -> Path:
        return self.root / "state.json"

    # ----------------------------------------------------------------- start / stop
    def start(self, timeout: float = 90) -> "SlurmTestCluster":
        """Install packages if needed, start every daemon, wait until all nodes are idle."""
        if os.geteuid() != 0:
            raise ClusterUnavailable("SLURM test cluster: must run as root (slurmd runs jobs as root)")
        ensure_packages()
        reap_orphans(self.root.parent)
        if self.running_daemons():
            raise ClusterError(f"a test cluster is already running under {self.root}; stop it first")
        self._prepare_root()
        try:
            with _machine_lock():
                datadir, password = accounting_db_template()
                deadline = time.monotonic() + timeout
                self._choose_ports()
                self._write_configs(password)
                self._start_munge(deadline)
                try:
                    self._start_mariadb(deadline, datadir)
                except ClusterError as exc:
                    # Perhaps a damaged template: drop it, so the next start builds a new one.
                    shutil.rmtree(datadir.parent, ignore_errors=True)
                    raise ClusterError(f"{exc}\n(removed the accounting DB template "
                                       f"{datadir.parent}; the next start rebuilds it)") from exc
                self._start_slurmdbd(deadline)
                self._start_slurmctld(deadline)
                for node in self.nodes:
                    self.start_slurmd(node, wait=False)
            self.wait_idle(timeout=max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 30) -> None:
        """Cancel jobs, then SIGTERM each daemon we started (by PID) and wait for it to exit."""
        if self.is_alive("slurmctld"):
            self._cancel_all_jobs()
        # The slurmd's go down together, then the services one by one, so slurmctld can
        # still flush accounting to slurmdbd, and slurmdbd to MariaDB.
        self._terminate([f"slurmd-{n}" for n in self.nodes], timeout)
        for name in reversed(SERVICES):
            self._terminate([name], timeout)
        self._save_state()

    def _terminate(self, names: list[str], timeout: float) -> None:
        live = [n for n in names if self.is_alive(n)]
        for name in live:
            self._signal(name, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name in live:
            if not self._wait_exit(name, max(0.1, deadline - time.monotonic())):
                self._signal(name, signal.SIGKILL)
                self._wait_exit(name, 10)
        for name in names:
            proc = self._procs.pop(name, None)
            if proc is not None:
                proc.poll()  # reap the zombie
            self.pids.pop(name, None)

    def _signal(self, name: str, sig: int) -> None:
        if self.is_alive(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pids[name]["pid"], sig)

    def _wait_exit(self, name: str, timeout: float) -> bool:
        proc = self._procs.get(name)
        if proc is not None:
            try:
                proc.wait(timeout=timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout
        while self.is_alive(name):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def is_alive(self, name: str) -> bool:
        info = self.pids.get(name)
        if info is None:
            return False
        proc = self._procs.get(name)
        if proc is not None and proc.poll() is not None:
            return False
        return _proc_start_time(info["pid"]) == info["start_time"]

    def running_daemons(self) -> list[str]:
        return [name for name in self.pids if self.is_alive(name)]

    def status(self) -> dict[str, dict]:
        """Daemon name -> {"pid", "alive", "log"}."""
        return {name: {"pid": info["pid"], "alive": self.is_alive(name), "log": info["log"]}
                for name, info in self.pids.items()}

    # ----------------------------------------------------------------- persistence
    def _save_state(self) -> None:
        state = {"root": str(self.root), "nodes": self.nodes, "cpus_per_node": self.cpus_per_node,
                 "mem_mb_per_node": self.mem_mb_per_node, "partitions": self.partitions,
                 "ports": self.ports, "pids": self.pids, "owner": self.owner, "env": self.env}
        tmp = self._state_file().with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self._state_file())

    @classmethod
    def load(cls, root: Path | str) -> "SlurmTestCluster":
        """The cluster described by ROOT/state.json (started by another process)."""
        root = Path(root).resolve()
        try:
            state = json.loads((root / "state.json").read_text())
        except (OSError, ValueError) as exc:
            raise ClusterError(f"no test cluster state in {root / 'state.json'}: {exc}") from exc
        self = cls(root, nodes=len(state["nodes"]), cpus_per_node=state["cpus_per_node"],
                   mem_mb_per_node=state["mem_mb_per_node"], tie_to_parent=False)
        self.ports = state["ports"]
        self.pids = state["pids"]
        self.owner = state.get("owner")
        return self

    def orphaned(self) -> bool:
        """Started by a process that is gone (crashed) and still has daemons running."""
        owner = self.owner
        return bool(owner) and _proc_start_time(owner["pid"]) != owner["start_time"] \
            and bool(self.running_daemons())

    # ----------------------------------------------------------------- set-up steps
    def _prepare_root(self) -> None:
        """A fresh layout under root; leftovers of a stopped run there are removed."""
        self.root.mkdir(parents=True, exist_ok=True)
        if any(self.root.iterdir()) and not self._state_file().exists():
            raise ClusterError(f"{self.root} is not empty and holds no test cluster; "
                               f"give a new or empty directory")
        if self._state_file().exists():
            old = SlurmTestCluster.load(self.root)
            if old.running_daemons():
                raise ClusterError(f"{self.root} has running daemons {old.running_daemons()}; "
                                   f"stop them first (scripts/slurm_test_cluster.sh stop {self.root})")
        for sub in ("etc", "munge", "mysql", "state", "spool", "log", "run", "state.json"):
            path = self.root / sub
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        # MariaDB runs as the mysql user, which must be able to reach its datadir.
        self.root.chmod(0o755)
        for parent in self.root.parents:
            if not parent.stat().st_mode & 0o001:
                raise ClusterError(f"{parent} is not searchable by other users, so MariaDB (user "
                                   f"mysql) cannot reach {self.root}; use a directory under /tmp")
        for sub in ("etc", "state", "spool", "log", "run"):
            (self.root / sub).mkdir()
        (self.root / "munge").mkdir(mode=0o755)  # munged wants o+x on its socket dir
        mysql = pwd.getpwnam("mysql")
        for sub in ("mysql", "mysql/data", "mysql/run", "mysql/log"):
            (self.root / sub).mkdir()
            os.chown(self.root / sub, mysql.pw_uid, mysql.pw_gid)
        if len(str(self.mysql_socket)) > 100 or len(str(self.munge_socket)) > 100:
            raise ClusterError(f"{self.root} is too long for a unix socket path; use a shorter one")

    def _choose_ports(self) -> None:
        bases = [PREFERRED_BASE] + random.sample(range(17010, 19990, PORT_BLOCK), 298)
        for base in bases:
            ports = list(range(base + 1, base + 1 + len(self.nodes))) + \
                [base + off for off in SERVICE_PORT_OFFSETS.values()]
            if all(_port_free(p) for p in ports):
                self.ports = {**{n: base + i for i, n in enumerate(self.nodes, 1)},
                              **{s: base + off for s, off in SERVICE_PORT_OFFSETS.items()}}
                return
        raise ClusterError("no free block of ports between 17000 and 19999")

    def _write_configs(self, db_password: str) -> None:
        r = self.root
        key = r / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        (r / "etc" / "plugstack.conf").write_text("")
        self._db_password = db_password
        (r / "mysql" / "my.cnf").write_text("\n".join([
            "[mysqld]",
            f"datadir={r}/mysql/data",
            f"socket={self.mysql_socket}",
            f"port={self.ports['mariadb']}",
            "bind-address=127.0.0.1",
            "skip-name-resolve",
            f"pid-file={r}/mysql/run/mariadbd.pid",
            f"log-error={r}/mysql/log/mariadbd.err",
            *MARIADB_SETTINGS,
            "",
        ]))
        auth = f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket}"
        dbd = r / "etc" / "slurmdbd.conf"
        dbd.touch(mode=0o600)
        dbd.write_text("\n".join([
            auth,
            f"DbdHost={self.hostname}",
            "DbdAddr=127.0.0.1",
            f"DbdPort={self.ports['slurmdbd']}",
            "SlurmUser=root",
            "DebugLevel=info",
            f"LogFile={self.log_path('slurmdbd')}",
            f"PidFile={r}/run/slurmdbd.pid",
            "StorageType=accounting_storage/mysql",
            "StorageHost=127.0.0.1",
            f"StoragePort={self.ports['mariadb']}",
            "StorageUser=slurm",
            f"StoragePass={self._db_password}",
            "StorageLoc=slurm_acct_db",
            "",
        ]))
        dbd.chmod(0o600)
        nodes = [f"NodeName={n} NodeHostname={self.hostname} NodeAddr=127.0.0.1 "
                 f"Port={self.ports[n]} CPUs={self.cpus_per_node} Sockets=1 "
                 f"CoresPerSocket={self.cpus_per_node} ThreadsPerCore=1 "
                 f"RealMemory={self.mem_mb_per_node} State=UNKNOWN" for n in self.nodes]
        node_list = ",".join(self.nodes)
        partitions = []
        for name, minutes in self.partitions.items():
            limit = "INFINITE" if minutes is None else f"{minutes}"
            default = "YES" if name == self.default_partition else "NO"
            partitions.append(f"PartitionName={name} Nodes={node_list} Default={default} "
                              f"MaxTime={limit} State=UP")
        self.slurm_conf.write_text("\n".join([
            f"ClusterName={CLUSTER_NAME}",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={self.ports['slurmctld']}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also delays a requeued job's restart (by cred_expire + 1 s): keep it
            # short for fault tests, yet well above the second a job launch takes here.
            f"AuthInfo=socket={self.munge_socket},cred_expire=15",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={self.log_path('slurmctld')}",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"PlugStackConfig={r}/etc/plugstack.conf",
            # Known to work as root without cgroups (containers, CI).
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SchedulerType=sched/backfill",
            # A job that becomes eligible by time (a requeued job after cred_expire) waits for
            # the next periodic pass, not an event: every second instead of 30 s (backfill).
            "SchedulerParameters=bf_interval=1",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            f"DefMemPerCPU={self.mem_mb_per_node // self.cpus_per_node}",
            # All nodes are this machine: trust slurm.conf, not the hardware slurmd detects.
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "SlurmdTimeout=15",
            "SlurmctldTimeout=30",
            "InactiveLimit=0",
            "KillWait=5",
            "MinJobAge=300",
            "JobAcctGatherType=jobacct_gather/linux",
            "JobAcctGatherFrequency=5",
            "AccountingStorageType=accounting_storage/slurmdbd",
            "AccountingStorageHost=127.0.0.1",
            f"AccountingStoragePort={self.ports['slurmdbd']}",
            # For the slurmdbd connection the munge socket is given here, not by AuthInfo.
            f"AccountingStoragePass={self.munge_socket}",
            "JobCompType=jobcomp/none",
            *nodes,
            *partitions,
            "",
        ]))

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = self.root / "log" / f"{name}.out"
        with open(out, "ab") as f:
            proc = subprocess.Popen(argv, cwd=self.root, stdin=subprocess.DEVNULL, stdout=f,
                                    stderr=subprocess.STDOUT, env=self._daemon_env(),
                                    start_new_session=True,
                                    preexec_fn=_die_with_parent if self.tie_to_parent else None)
        start_time = None
        for _ in range(50):
            start_time = _proc_start_time(proc.pid)
            if start_time is not None or proc.poll() is not None:
                break
            time.sleep(0.01)
        self._procs[name] = proc
        self.pids[name] = {"pid": proc.pid, "start_time": start_time, "argv": argv,
                           "log": str(out)}
        self._save_state()

    def _daemon_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(self.env)
        return env

    def _wait(self, what: str, ready, deadline: float, daemon: str, logs: list[Path]) -> None:
        """Poll `ready()` until true; fail early if `daemon` died, with its logs' tails."""
        while True:
            if ready():
                return
            dead = not self.is_alive(daemon)
            if dead or time.monotonic() > deadline:
                why = f"{daemon} exited" if dead else f"timed out waiting for {what}"
                tails = "\n".join(f"--- {p} ---\n{_tail(p)}" for p in logs)
                raise ClusterError(f"SLURM test cluster under {self.root}: {why}\n{tails}")
            time.sleep(0.1)

    def _start_munge(self, deadline: float) -> None:
        m = self.root / "munge"
        self._spawn("munged", [_which("munged"), "--foreground", f"--socket={self.munge_socket}",
                               f"--key-file={m}/munge.key", f"--log-file={m}/munged.log",
                               f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed",
                               "--num-threads=10"])
        self._wait("the munge socket", self.munge_socket.exists, deadline, "munged",
                   [m / "munged.log", self.root / "log" / "munged.out"])

    def _mariadb(self, sql: str) -> subprocess.CompletedProcess:
        return subprocess.run([_which("mariadb"), f"--socket={self.mysql_socket}", "-uroot",
                               "-e", sql], capture_output=True, text=True, timeout=30)

    def _start_mariadb(self, deadline: float, initial_datadir: Path | None) -> None:
        """Start MariaDB on a copy of initial_datadir, or on a new one from mariadb-install-db."""
        cnf = f"--defaults-file={self.root}/mysql/my.cnf"
        datadir = self.root / "mysql" / "data"
        if initial_datadir is None:
            proc = subprocess.run([_which("mariadb-install-db"), cnf, "--user=mysql",
                                   "--auth-root-authentication-method=socket", "--skip-test-db"],
                                  capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise ClusterError(f"mariadb-install-db failed:\n"
                                   f"{_tail_text(proc.stdout + proc.stderr)}")
        else:
            shutil.copytree(initial_datadir, datadir, symlinks=True, dirs_exist_ok=True)
            mysql = pwd.getpwnam("mysql")
            for path in [datadir, *datadir.rglob("*")]:
                os.lchown(path, mysql.pw_uid, mysql.pw_gid)
        self._spawn("mariadbd", [_which("mariadbd"), cnf, "--user=mysql"])
        logs = [self.root / "mysql" / "log" / "mariadbd.err", self.root / "log" / "mariadbd.out"]
        self._wait("MariaDB", lambda: self._mariadb("SELECT 1").returncode == 0, deadline,
                   "mariadbd", logs)

    def _create_accounting_db(self, deadline: float) -> None:
        """The slurmdbd user, the schema (slurmdbd's first start) and the registered cluster."""
        grant = self._mariadb(
            f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{self._db_password}'; "
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';")
        if grant.returncode != 0:
            raise ClusterError(f"creating the MariaDB user for slurmdbd failed: {grant.stderr}")
        self._start_slurmdbd(deadline)
        self._wait("sacctmgr add cluster",
                   lambda: self.run(["sacctmgr", "-i", "add", "cluster", CLUSTER_NAME],
                                    check=False).returncode == 0,
                   deadline, "slurmdbd", [self.log_path("slurmdbd")])

    def _start_slurmdbd(self, deadline: float) -> None:
        # slurmdbd reads slurmdbd.conf next to $SLURM_CONF (it has no -f option).
        self._spawn("slurmdbd", [_which("slurmdbd"), "-D"])
        logs = [self.log_path("slurmdbd"), self.root / "log" / "slurmdbd.out"]
        self._wait("slurmdbd", lambda: _port_open(self.ports["slurmdbd"]), deadline,
                   "slurmdbd", logs)

    def _start_slurmctld(self, deadline: float) -> None:
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.slurm_conf)])
        self._wait("slurmctld", self._ctld_up, deadline, "slurmctld",
                   [self.log_path("slurmctld"), self.root / "log" / "slurmctld.out"])

    def _ctld_up(self) -> bool:
        proc = self.run(["scontrol", "ping"], check=False, timeout=15)
        return proc.returncode == 0 and "is UP" in proc.stdout

    # ----------------------------------------------------------------- client helpers
    def run(self, argv: list[str], *, check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run a client command (sinfo, sbatch, sacct, ...) against this cluster."""
        proc = subprocess.run(argv, env={**self._daemon_env(), **self.env}, capture_output=True,
                              text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(argv)} exited {proc.returncode}\nstdout:\n"
                               f"{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc

    def node_states(self) -> dict[str, str]:
        """Node name -> sinfo's compact state ("idle", "alloc", "mix", "down*", "idle*", ...)."""
        proc = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, timeout=15)
        if proc.returncode != 0:
            return {}
        states = {}
        for line in proc.stdout.splitlines():
            name, state = line.split()
            states[name] = state  # a node in two partitions is listed twice, same state
        return states

    def sacct(self, job_id: str | int) -> list[dict[str, str]]:
        """Accounting rows (allocations only, no steps) of a job or array: JobID, State, ..."""
        fields = ("JobID", "JobName", "State", "ExitCode", "NodeList", "Partition")
        proc = self.run(["sacct", "-j", str(job_id), "-X", "-n", "-P", "-o", ",".join(fields)],
                        timeout=30)
        return [dict(zip(fields, line.split("|"))) for line in proc.stdout.splitlines() if line]

    def wait_job(self, job_id: str | int, count: int = 1, timeout: float = 120) -> list[dict]:
        """Wait until sacct has complete records of `count` finished allocations; return them."""
        rows: list[dict] = []

        def finished() -> bool:
            nonlocal rows
            rows = self.sacct(job_id)
            states = [r["State"].split()[0] for r in rows]
            # A fast job's end can reach slurmdbd before its start record: until then the
            # row has no partition (and the JobName "allocation").
            return len(rows) >= count and all(s in TERMINAL_STATES for s in states) and \
                all(r["Partition"] for r in rows)
        self.wait_for(f"job {job_id} to finish in sacct", finished, timeout)
        return rows

    def wait_for(self, what: str, ready, timeout: float = 60) -> None:
        """Poll `ready()` until true or fail with slurmctld's log tail."""
        deadline = time.monotonic() + timeout
        self._wait(what, ready, deadline, "slurmctld",
                   [self.log_path("slurmctld")] + [self.root / "log" / f"slurmd-{n}.log"
                                                   for n in self.nodes])

    def wait_idle(self, timeout: float = 60) -> None:
        """Wait until every node is idle (registered, responding, no jobs)."""
        self.wait_for(f"all of {self.nodes} idle in sinfo",
                      lambda: self.node_states() == {n: "idle" for n in self.nodes}, timeout)

    def _cancel_all_jobs(self) -> None:
        proc = self.run(["squeue", "-h", "-o", "%A"], check=False, timeout=15)
        job_ids = sorted(set(proc.stdout.split())) if proc.returncode == 0 else []
        if not job_ids:
            return
        self.run(["scancel", *job_ids], check=False, timeout=15)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            left = self.run(["squeue", "-h", "-o", "%A"], check=False, timeout=15)
            if left.returncode != 0 or not left.stdout.strip():
                return
            time.sleep(0.5)

    def reconfigure(self, **settings: str | None) -> dict[str, str | None]:
        """Set slurm.conf keys (``MaxArraySize="2"``; None removes the key) and apply them with
        ``scontrol reconfigure``. Returns the previous values: ``reconfigure(**old)`` restores."""
        lines = self.slurm_conf.read_text().splitlines()
        old: dict[str, str | None] = {}
        for key, value in settings.items():
            at = [i for i, ln in enumerate(lines) if ln.split("=", 1)[0] == key]
            old[key] = lines[at[0]].split("=", 1)[1] if at else None
            for i in reversed(at):
                del lines[i]
            if value is not None:  # before the node and partition lines, with the other globals
                first_node = next(i for i, ln in enumerate(lines) if ln.startswith("NodeName="))
                lines.insert(first_node, f"{key}={value}")
        self.slurm_conf.write_text("\n".join(lines) + "\n")
        self.run(["scontrol", "reconfigure"], timeout=60)
        return old

    # ----------------------------------------------------------------- fault injection
    def kill_slurmd(self, node: str, sig: int = signal.SIGKILL) -> None:
        """Kill one node's slurmd (SIGKILL by default: a crash) and wait for it to exit."""
        name = f"slurmd-{node}"
        if not self.is_alive(name):
            raise ClusterError(f"slurmd for {node} is not running")
        self._signal(name, sig)
        if not self._wait_exit(name, 30):
            raise ClusterError(f"slurmd for {node} did not exit after signal {sig}")
        self._procs.pop(name, None)
        self.pids.pop(name)
        self._save_state()

    def start_slurmd(self, node: str, wait: bool = True, timeout: float = 60) -> None:
        """Start one node's slurmd; with wait, until the controller sees it responding."""
        if node not in self.nodes:
            raise ClusterError(f"unknown node {node!r}; nodes are {self.nodes}")
        name = f"slurmd-{node}"
        if self.is_alive(name):
            raise ClusterError(f"slurmd for {node} is already running")
        self._spawn(name, [_which("slurmd"), "-D", "-N", node, "-f", str(self.slurm_conf)])
        if wait:
            def responding():
                state = self.node_states().get(node, "")
                return bool(state) and not state.endswith(("*", "~", "#")) and \
                    not state.startswith(("down", "drain", "fail"))
            self._wait(f"{node} responding", responding, time.monotonic() + timeout, name,
                       [self.root / "log" / f"slurmd-{node}.log", self.log_path("slurmctld")])

    def restart_slurmctld(self, timeout: float = 60) -> None:
        """Stop slurmctld (SIGTERM, saves state) and start it again; jobs survive."""
        self._terminate(["slurmctld"], 30)
        deadline = time.monotonic() + timeout
        with _machine_lock():
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.slurm_conf)])
            self._wait("slurmctld after restart", self._ctld_up, deadline, "slurmctld",
                       [self.log_path("slurmctld"), self.root / "log" / "slurmctld.out"])


# --------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Start, stop or inspect a SLURM test cluster under ROOT (run as root).")
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("root", type=Path, help="directory holding the cluster (e.g. /tmp/slurm1)")
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            cluster = SlurmTestCluster(args.root, tie_to_parent=False)
            started = time.monotonic()
            cluster.start()
            print(f"# SLURM test cluster up under {cluster.root} in "
                  f"{time.monotonic() - started:.1f}s; ports {cluster.ports}", file=sys.stderr)
            for key, value in cluster.env.items():
                print(f"export {key}={value}")
        elif args.action == "stop":
            SlurmTestCluster.load(args.root).stop()
            print(f"# stopped the SLURM test cluster under {args.root}", file=sys.stderr)
        else:
            cluster = SlurmTestCluster.load(args.root)
            if not cluster.pids:
                print(f"no SLURM test cluster running under {cluster.root}")
                return 1
            for name, info in cluster.status().items():
                print(f"{name:16} pid {info['pid']:>7}  {'up' if info['alive'] else 'DOWN'}")
            print(f"ports {cluster.ports}")
            print(f"export SLURM_CONF={cluster.slurm_conf}")
            if cluster.is_alive("slurmctld"):
                print(cluster.run(["sinfo"], check=False).stdout, end="")
            return 0 if len(cluster.running_daemons()) == len(cluster.pids) else 1
    except (ClusterError, ClusterUnavailable) as exc:
        print(f"slurm_test_cluster: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
