"""One way for tests to start real multi-process runs: ``torchrun`` with gloo, a clean env.

Every distributed test runs its worker through :func:`torchrun` (a plain script through
:func:`run_python`, any other command, e.g. a launch script, through :func:`run`), so the environment, the time limit and the failure message are the same
everywhere. The environment drops any torchrun variables the test process itself may have
(``RANK``, ``MASTER_PORT``...), pins ``OMP_NUM_THREADS=1`` so that ranks do not oversubscribe
the cores, and puts this checkout first on ``PYTHONPATH``. A time limit is always set: a failed
dist-checkpoint write can leave a spawned manager process holding stdout.

Usage::

    from tests.launch import torchrun
    torchrun(WORKER, "--out", str(out), nproc=2)                     # a script
    torchrun("sapo_megatron.cli", "train", "--config", cfg, nproc=2, module=True)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                  "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without torchrun's variables, one thread per rank, this checkout first."""
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    env.update(extra)
    return env


def _check(cmd: list[str], proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def run(cmd, *, timeout: float = 600, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` (a list) from the repository root in a clean environment, output captured."""
    cmd = [str(c) for c in cmd]
    # Its own process group: on a time-out the whole tree goes (torchrun's workers, a dist
    # checkpoint's manager), not just the launcher, so a hung run does not outlive its test.
    # torchrun starts each worker in a session of its own, out of that group's reach: they are
    # found as the launcher's descendants and killed one by one (otherwise a hung worker keeps
    # the output pipes open and communicate() below waits for it).
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or clean_env(),
                          cwd=ROOT, start_new_session=True) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            import psutil

            try:
                tree = psutil.Process(popen.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                tree = []
            os.killpg(popen.pid, signal.SIGKILL)
            for child in tree:
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass
            stdout, stderr = popen.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr) from None
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    return _check(cmd, proc) if check else proc


def torchrun(target, *args, nproc: int, module: bool = False, timeout: float = 600,
             env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``target`` (a script path, or a module with ``module=True``) on ``nproc`` local gloo ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *(["-m", target] if module else [target]), *args]
    return run(cmd, timeout=timeout, env=env, check=check)


def run_python(*args, timeout: float = 300, env: dict[str, str] | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python ARGS...`` in a clean environment from the repository root."""
    return run([sys.executable, *args], timeout=timeout, env=env, check=check)
