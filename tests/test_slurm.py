"""examples/slurm/tiny_cpu.sbatch under a real Slurm: a private slurmctld + slurmd on loopback.

The sbatch scripts' DRY_RUN tests (tests/test_launch.py) only print commands. Here the CPU demo
goes through Slurm for real: a ``slurm.conf`` generated in a temp dir (auth/none and cred/none,
so no munge; one node named ``localhost`` with 2 CPUs; free ports; state, spool, pid and log
files in the temp dir; no cgroups: proctrack/linuxproc, task/none) runs ``slurmctld -D`` and
``slurmd -D`` as root. In the foreground they are children of this test, so their PIDs are known
without a race (their pid files must agree) and can be waited on. ``sbatch --wait --nodes=1 --ntasks-per-node=2``
then runs the job: its 2 tasks are the 2 torchrun "nodes" on the one real host, and must meet at
the c10d rendezvous as node ranks 0 and 1 of a world of 2 and train 3 steps.

Teardown (also when the test fails): cancel the private cluster's jobs, stop both daemons by the
PIDs this test started (SIGTERM, wait, SIGKILL if they hang), then SIGKILL any process still
carrying this cluster's ``SLURM_CONF`` (a job step that outlived its slurmd): only our processes
have that temp path in their environment.

Needs Debian's ``slurm-wlm`` (``.ci/run`` installs it: ``apt-get install slurmctld slurmd``) and
root; skips with the reason otherwise. About 45 s on an idle 2-core machine: the daemons are up
in ~1 s and stop in ~1 s; the rest is the job (~2x a plain examples/run_tiny_cpu.sh run with the
same overrides: 4 Python processes instead of 3, and sbatch --wait polls at most every 10 s).

    python -m pytest -q tests/test_slurm.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.launch import ROOT, clean_env

DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "sinfo", "squeue", "scancel", "scontrol", "srun")
NODE = "localhost"  # the node's Slurm name: `scontrol show hostnames` gives it, and it resolves on any host
# The rendezvous port is derived from the job id (examples/common.sh, rdzv_port): 20000 + id % 10000.
RDZV_BASE, RDZV_SPAN = 20000, 10000
# Small rollouts, as in tests/test_trainer.py; 3 steps, one checkpoint (the last).
OVERRIDES = ["run.steps=3", "run.save_every=0", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4",
             "train.micro_batch_size=4", "run.tensorboard=false", "run.progress=false"]


# The daemons live in /usr/sbin, which a non-login PATH may lack.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])


def _unavailable() -> str | None:
    """Why a private Slurm cannot run here, or None."""
    missing = [b for b in (*DAEMONS, *CLIENTS) if shutil.which(b, path=SEARCH_PATH) is None]
    if missing:
        why = os.environ.get("SAPO_SLURM_INSTALL_ERROR")  # .ci/run's apt-get error, when it failed
        return (f"Slurm is not installed ({', '.join(missing)} not found); "
                + (f"installing it failed: {why}" if why else "as root: apt-get install slurmctld slurmd (Debian)"))
    if os.geteuid() != 0:
        return "a private Slurm needs root: slurmd starts job steps as the submitting user"
    return None


def _free_port(lo: int = 0, hi: int = 0) -> int:
    """A TCP port nothing listens on: any (lo=hi=0), or a free one in [lo, hi), searched from a per-process start."""
    candidates = [0] if lo == hi == 0 else [lo + (i + os.getpid()) % (hi - lo) for i in range(hi - lo)]
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free TCP port in [{lo}, {hi})")


def _write_conf(d: Path, first_job_id: int) -> Path:
    ctld_port, slurmd_port = _free_port(), _free_port()
    conf = d / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=sapotest",
        f"SlurmctldHost={NODE}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/none", "CredType=cred/none",  # no munge daemon: this cluster is one loopback host
        f"StateSaveLocation={d / 'state'}", f"SlurmdSpoolDir={d / 'spool'}",
        f"SlurmctldPidFile={d / 'slurmctld.pid'}", f"SlurmdPidFile={d / 'slurmd.pid'}",
        f"SlurmctldLogFile={d / 'slurmctld.log'}", f"SlurmdLogFile={d / 'slurmd.log'}",
        # No cgroups (a container may not delegate them), no accounting, no MPI plugin.
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "MpiDefault=none", "SwitchType=switch/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "SchedulerType=sched/builtin",
        "MailProg=/bin/true", "ReturnToService=2",
        f"FirstJobId={first_job_id}",
        # The node has 2 CPUs whatever the machine reports: one per task, one rank per task.
        "SlurmdParameters=config_overrides",
        f"NodeName={NODE} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN",
        f"PartitionName=test Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
    ]) + "\n")
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    return conf


def _tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else f"({path} missing)"


class PrivateSlurm:
    """slurmctld + slurmd on loopback, configured by ``dir/slurm.conf``; :meth:`stop` tears it down."""

    def __init__(self, d: Path):
        self.dir = d
        # FirstJobId puts the job-id-derived rendezvous port (rdzv_port) on a port found free just
        # now, so the derivation runs for real and cannot meet another listener on this machine.
        port = _free_port(RDZV_BASE, RDZV_BASE + RDZV_SPAN)
        self.first_job_id = RDZV_SPAN + port - RDZV_BASE
        self.conf = _write_conf(d, self.first_job_id)
        env = {k: v for k, v in clean_env().items() if not k.startswith("SLURM")}  # not an outer job's
        self.env = {**env, "SLURM_CONF": str(self.conf)}
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, timeout: float = 60) -> None:
        for name, args in (("slurmctld", []), ("slurmd", ["-N", NODE])):
            with open(self.dir / f"{name}.out", "wb") as out:
                self.procs[name] = subprocess.Popen([shutil.which(name, path=SEARCH_PATH), "-D", *args],
                                                    env=self.env, stdout=out,
                                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}):\n{self.logs()}")
            sinfo = self.run("sinfo", "-h", "-N", "-o", "%t", check=False)
            state = sinfo.stdout.strip()
            if state == "idle":
                # The pid files (in our temp dir, from our conf) name the processes we started:
                # stop() signals exactly these PIDs.
                for name, proc in self.procs.items():
                    pid = int((self.dir / f"{name}.pid").read_text())
                    assert pid == proc.pid, f"{name}.pid says {pid}, but we started {proc.pid}"
                return
            time.sleep(0.5)
        raise RuntimeError(f"node {NODE} not idle after {timeout}s (sinfo: {state!r}):\n{self.logs()}")

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=timeout,
                              stdin=subprocess.DEVNULL, cwd=ROOT)

    def logs(self) -> str:
        return "\n".join(f"--- {name}:\n{_tail(self.dir / name)}" for name in
                         ("slurmctld.out", "slurmctld.log", "slurmd.out", "slurmd.log"))

    def stop(self) -> None:
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                    time.sleep(0.5)
        for name in reversed(DAEMONS):  # slurmd first: it reports to slurmctld
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        self._kill_leftovers()

    def _kill_leftovers(self) -> None:
        """SIGKILL processes whose environment names this cluster's conf: only ours can."""
        marker = f"SLURM_CONF={self.conf}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ValueError):
                pass  # gone already, or not ours to read


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = _unavailable()
    if why:
        pytest.skip(why)
    cluster = PrivateSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
    for name, proc in cluster.procs.items():
        assert proc.poll() is not None, f"{name} (pid {proc.pid}) still running after teardown"


def _rendezvous(log: str) -> dict[int, dict[str, str]]:
    """Per Slurm task (srun --label), the fields of its torchrun agent's 'Rendezvous complete' report."""
    fields: dict[int, dict[str, str]] = {}
    report = r"^(\d+): .*\]\s+(group_rank|group_world_size|global_world_sizes)=(\S+)$"
    for task, key, value in re.findall(report, log, flags=re.MULTILINE):
        fields.setdefault(int(task), {})[key] = value
    return fields


@pytest.mark.slow
@pytest.mark.dist
def test_tiny_cpu_sbatch_trains_on_two_slurm_nodes(slurm, tmp_path):
    out, job_log = tmp_path / "run", tmp_path / "job-%j.out"
    env = {**slurm.env, "TORCHRUN": f"{sys.executable} -m torch.distributed.run",
           "CONFIG": "tests/configs/tiny_rl.yaml"}  # not the demo's config, which may change
    cmd = ["sbatch", "--wait", "--parsable", "--nodes=1", "--ntasks-per-node=2", f"--output={job_log}",
           "examples/slurm/tiny_cpu.sbatch", f"output_dir={out}", *OVERRIDES]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT,
                          stdin=subprocess.DEVNULL, check=False)  # its failure is reported below, with the logs
    job_id = proc.stdout.strip().split(";")[0]
    log_path = Path(str(job_log).replace("%j", job_id))
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    assert proc.returncode == 0, f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stderr}\n{log[-6000:]}\n{slurm.logs()}"
    assert int(job_id) == slurm.first_job_id

    # Two Slurm tasks on the one node, each a torchrun agent: the rendezvous gave them node ranks
    # 0 and 1 of 2, and each agent's single worker a global world size of 2.
    job = slurm.run("scontrol", "show", "job", job_id).stdout
    assert re.search(r"\bNumTasks=2\b", job) and re.search(rf"\bNodeList={NODE}\b", job), job
    agents = _rendezvous(log)
    assert sorted(agents) == [0, 1], f"expected the reports of Slurm tasks 0 and 1, got {agents}\n{log[-4000:]}"
    assert sorted(int(a["group_rank"]) for a in agents.values()) == [0, 1], agents
    assert all(a["group_world_size"] == "2" and a["global_world_sizes"] == "[2]" for a in agents.values()), agents
    # Both met on the first host of the node list, at the port derived from the job id.
    port = RDZV_BASE + int(job_id) % RDZV_SPAN
    endpoints = re.findall(r"^(\d+): .*\]\s+rdzv_endpoint\s*:\s*(\S+)$", log, flags=re.MULTILINE)
    assert sorted(endpoints) == [("0", f"{NODE}:{port}"), ("1", f"{NODE}:{port}")], endpoints

    # The run itself: 3 steps with the overrides given on the sbatch line, TP=2 on the 2 ranks.
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["run"]["steps"] == 3 and cfg["run"]["output_dir"] == str(out)
    assert cfg["parallel"]["tensor_model_parallel_size"] == 2
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert all(m["num_sequences"] > 0 and m["loss"] == m["loss"] for m in metrics), metrics  # trained, not NaN
    # run.save_every=0: no periodic checkpoint, only the final one.
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("iter_*")) == ["iter_0000003"], sorted(ckpts.iterdir())


def test_ci_installs_slurm_then_runs_the_readme_command():
    """.ci/run installs what this test needs before the README's test command, which it runs verbatim."""
    readme = (ROOT / "README.md").read_text()
    (test_cmd,) = [line for line in readme.splitlines() if line.endswith("python -m pytest -q")]
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines(), "the README's test command, verbatim, on a line of its own"
    assert re.search(r"apt-get install[^;]*\bslurmctld slurmd\b", ci), "the install names the daemons this test starts"
    assert ci.index("apt-get install") < ci.index(test_cmd)
