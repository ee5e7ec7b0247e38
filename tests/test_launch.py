"""The launch scripts: `bash -n`, and DRY_RUN=1 printing the resolved commands (no Slurm, GPUs
or SGLang needed)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*REPO.glob("examples/*.sh"), *REPO.glob("examples/slurm/*.sbatch")])


def dry_run(script: str, *args: str, **env: str) -> list[list[str]]:
    """The printed commands, split into words (comment lines dropped)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SGLANG_", "QWEN3_", "SAPO_"))}
    clean.pop("HOSTS", None)
    clean.pop("CONFIG", None)  # run_tiny_cpu.sh / tiny_cpu.sbatch read it
    out = subprocess.run(["bash", str(REPO / script), *args], env={**clean, "DRY_RUN": "1", **env},
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return [shlex.split(line) for line in out.splitlines() if line and not line.startswith("#")]


def test_every_script_is_tested():
    names = {p.relative_to(REPO).as_posix() for p in SCRIPTS}
    assert names == {"examples/common.sh", "examples/run_tiny_cpu.sh", "examples/run_qwen3_30b_a3b_sapo.sh",
                     "examples/slurm/qwen3_30b_a3b_sapo.sbatch", "examples/slurm/qwen3_235b_a22b_sapo.sbatch",
                     "examples/slurm/tiny_cpu.sbatch", "examples/run_multiturn_cpu.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_multiturn_cpu_launches_its_config_on_two_ranks():
    (cmd,) = dry_run("examples/run_multiturn_cpu.sh", "output_dir=/tmp/mt", "seed=2")
    assert "--nproc_per_node=2" in cmd and cmd[cmd.index("--config") + 1] == "configs/multiturn_cpu.yaml", cmd
    assert cmd[-2:] == ["output_dir=/tmp/mt", "seed=2"], cmd


def test_tiny_cpu_passes_overrides_through():
    (cmd,) = dry_run("examples/run_tiny_cpu.sh", "output_dir=/tmp/run a", "seed=3", "loss.tau_neg=1.1")
    assert cmd[:2] == ["env", "OMP_NUM_THREADS=1"]
    assert cmd[2:] == ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "sapo_megatron.cli", "train",
                       "--config", "configs/tiny_cpu.yaml", "output_dir=/tmp/run a", "seed=3", "loss.tau_neg=1.1"]


def test_tiny_cpu_takes_another_config_from_the_environment():
    # What the trainer tests use (tests/configs/tiny_rl.yaml): the same launch, another config.
    (cmd,) = dry_run("examples/run_tiny_cpu.sh", "seed=1", CONFIG="tests/configs/tiny_rl.yaml")
    assert cmd[cmd.index("--config"):] == ["--config", "tests/configs/tiny_rl.yaml", "seed=1"]
    (cmd,) = dry_run("examples/slurm/tiny_cpu.sbatch", "seed=1", CONFIG="tests/configs/tiny_rl.yaml")
    assert cmd[cmd.index("--config"):] == ["--config", "tests/configs/tiny_rl.yaml", "seed=1"]


def test_tiny_cpu_command_resolves_to_a_valid_config():
    from sapo_megatron.config import config_from_argv, validate_for_world

    (cmd,) = dry_run("examples/run_tiny_cpu.sh", "output_dir=/tmp/x", "seed=7")
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        cfg = config_from_argv(cmd[cmd.index("train") + 1:])
    finally:
        os.chdir(cwd)
    assert (cfg.run.output_dir, cfg.run.seed) == ("/tmp/x", 7)
    validate_for_world(cfg, int(cmd[cmd.index("--standalone") + 1].split("=")[1]))


def test_single_node_30b():
    cmds = dry_run("examples/run_qwen3_30b_a3b_sapo.sh", "seed=2", QWEN3_30B_A3B_HF_DIR="/models/q30",
                   SGLANG_API_KEY="very-secret")
    servers, (trainer,) = cmds[:-1], cmds[-1:]
    assert len(servers) == 2
    for i, (server, gpus) in enumerate(zip(servers, ["4,5", "6,7"])):
        assert server[:2] == ["env", f"CUDA_VISIBLE_DEVICES={gpus}"]
        assert "sglang.launch_server" in server and "--enable-return-routed-experts" in server
        assert server[server.index("--host") + 1] == "127.0.0.1"  # loopback: one node
        assert server[server.index("--port") + 1] == str(30000 + i)
        assert server[server.index("--model-path") + 1] == "/models/q30"
        assert server[server.index("--api-key") + 1] == "$SGLANG_API_KEY"  # the name, never the value
    assert trainer[1] == "CUDA_VISIBLE_DEVICES=0,1,2,3" and "--nproc_per_node=4" in trainer
    assert "rollout.sglang.urls=[http://127.0.0.1:30000,http://127.0.0.1:30001]" in trainer
    assert trainer[-1] == "seed=2" and "configs/qwen3_30b_a3b_sapo.yaml" in trainer


def test_single_node_30b_key_never_printed():
    out = subprocess.run(["bash", str(REPO / "examples/run_qwen3_30b_a3b_sapo.sh")], capture_output=True,
                         text=True, env={**os.environ, "DRY_RUN": "1", "SGLANG_API_KEY": "very-secret"}).stdout
    assert "very-secret" not in out


@pytest.mark.parametrize("script, nodes, trainer_nodes, server_flags", [
    ("examples/slurm/qwen3_30b_a3b_sapo.sbatch", 2, 1, ["--tp-size", "2", "--dp-size", "4"]),
    ("examples/slurm/qwen3_235b_a22b_sapo.sbatch", 12, 8, ["--tp-size", "8"]),
])
def test_slurm_dry_run(script, nodes, trainer_nodes, server_flags):
    hosts = [f"gpu{i:02d}" for i in range(nodes)]
    cmds = dry_run(script, "output_dir=ignored-by-nobody", "loss.tau_neg=1.1",
                   HOSTS=" ".join(hosts), SAPO_SHARED_DIR="/shared/run")
    servers, trainer = cmds[:-1], cmds[-1]
    sglang_hosts = hosts[trainer_nodes:]
    assert len(servers) == len(sglang_hosts)
    for server, host in zip(servers, sglang_hosts):
        assert server[:4] == ["srun", "--nodes=1", "--ntasks=1", f"--nodelist={host}"]
        assert "--enable-return-routed-experts" in server
        assert server[server.index("--host") + 1] == "0.0.0.0"  # reached from the trainer nodes
        i = server.index(server_flags[0])
        assert server[i:i + len(server_flags)] == server_flags
        assert "--api-key" not in server  # no key in the environment: none passed
    assert trainer[:2] == ["srun", f"--nodes={trainer_nodes}"]
    assert f"--nodelist={','.join(hosts[:trainer_nodes])}" in trainer
    assert f"--nnodes={trainer_nodes}" in trainer and "--nproc_per_node=8" in trainer
    assert "--rdzv_backend=c10d" in trainer and f"--rdzv_endpoint={hosts[0]}:29500" in trainer
    urls = ",".join(f"http://{h}:30000" for h in sglang_hosts)
    assert f"rollout.sglang.urls=[{urls}]" in trainer
    assert "rollout.sglang.weight_dir=/shared/run/weights" in trainer
    assert trainer[-2:] == ["output_dir=ignored-by-nobody", "loss.tau_neg=1.1"]  # user's last: they win


def test_slurm_dry_run_without_hosts_uses_a_fake_hostlist():
    cmds = dry_run("examples/slurm/qwen3_235b_a22b_sapo.sbatch")
    assert "--rdzv_endpoint=node001:29500" in cmds[-1]
    assert cmds[0][3] == "--nodelist=node009"
    assert cmds[0][cmds[0].index("--model-path") + 1] == "$QWEN3_235B_A22B_HF_DIR"


def test_slurm_refuses_too_few_nodes():
    result = subprocess.run(["bash", str(REPO / "examples/slurm/qwen3_235b_a22b_sapo.sbatch")],
                            env={**os.environ, "DRY_RUN": "1", "HOSTS": "a b c"}, capture_output=True, text=True)
    assert result.returncode != 0 and "need more than TRAINER_NODES=8 nodes" in result.stderr


def test_slurm_tiny_cpu_dry_run():
    """Two Slurm tasks, one torchrun agent each, meeting on the first host; the user's overrides last."""
    (cmd,) = dry_run("examples/slurm/tiny_cpu.sbatch", "output_dir=/tmp/run a", "run.steps=3",
                     HOSTS="cpu07 cpu08", SLURM_NTASKS="2", SLURM_JOB_ID="123456")
    launcher = cmd.index("torchrun")
    assert cmd[:launcher] == ["srun", "--ntasks=2", "--cpus-per-task=1", "--kill-on-bad-exit=1", "--label",
                              "env", "OMP_NUM_THREADS=1", "LOGLEVEL=INFO"]
    # 123456 % 10000 = 3456: the port follows the job id, so two jobs on one host do not collide.
    assert cmd[launcher:cmd.index("-m")] == ["torchrun", "--nnodes=2", "--nproc_per_node=1", "--rdzv_id=123456",
                                             "--rdzv_backend=c10d", "--rdzv_endpoint=cpu07:23456"]
    assert cmd[cmd.index("-m"):] == ["-m", "sapo_megatron.cli", "train", "--config", "configs/tiny_cpu.yaml",
                                     "output_dir=/tmp/run a", "run.steps=3"]


def test_slurm_tiny_cpu_dry_run_defaults_and_port_override():
    (cmd,) = dry_run("examples/slurm/tiny_cpu.sbatch")  # no Slurm: 2 tasks on node001..node002, port 29500
    assert "--nnodes=2" in cmd and "--rdzv_endpoint=node001:29500" in cmd and cmd[1] == "--ntasks=2"
    (cmd,) = dry_run("examples/slurm/tiny_cpu.sbatch", SLURM_JOB_ID="7", RDZV_PORT="31000", SLURM_NTASKS="4")
    assert "--rdzv_endpoint=node001:31000" in cmd and "--nnodes=4" in cmd and cmd[1] == "--ntasks=4"


def test_slurm_tiny_cpu_command_resolves_to_a_valid_config():
    from sapo_megatron.config import config_from_argv, validate_for_world

    (cmd,) = dry_run("examples/slurm/tiny_cpu.sbatch", "output_dir=/tmp/x", "run.steps=3")
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        cfg = config_from_argv(cmd[cmd.index("train") + 1:])
    finally:
        os.chdir(cwd)
    assert (cfg.run.output_dir, cfg.run.steps) == ("/tmp/x", 3)
    nnodes = int(next(w for w in cmd if w.startswith("--nnodes=")).split("=")[1])
    nproc = int(next(w for w in cmd if w.startswith("--nproc_per_node=")).split("=")[1])
    validate_for_world(cfg, nnodes * nproc)  # TP=2 on 2 nodes x 1 rank


def test_slurm_scripts_refuse_another_working_directory(tmp_path):
    for script in SCRIPTS:
        if script.suffix != ".sbatch":
            continue
        result = subprocess.run(["bash", str(script)], env={**os.environ, "DRY_RUN": "1",
                                                           "SLURM_SUBMIT_DIR": str(tmp_path)},
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode != 0 and "submit from the repository root" in result.stderr, script.name


def test_a_timed_out_run_takes_its_whole_process_tree():
    """A hung torchrun must not outlive its test: its workers are killed with the launcher."""
    import subprocess
    import time

    from tests.launch import run

    marker = f"sapo-launch-test-{time.time_ns()}"
    with pytest.raises(subprocess.TimeoutExpired):
        run(["bash", "-c", f"exec -a {marker} sleep 300 & wait"], timeout=2)
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left behind: {left}"
