"""tools/gpu_smoke.sh and its driver: runnable, and every stage's CPU side works (dry run).

The GPU itself is not here; ``--device cpu`` runs the same stages at toy sizes in float32
(build, the RL steps with the first step and its gradients dumped, the CPU reference, save +
resume, the memory slice, the benchmark), so a broken import, config key, stage hand-off or
summary field fails here first. The dry run runs in a bare environment (only what a bare GPU
machine has, plus the carried wheels installed with ``--no-index``), so a GPU session does not
spend its minutes on a missing import; one run checks both (the stages' figures and the install).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import ROOT, clean_env
from tests.real_sglang.harness import venv_dir

SCRIPT = ROOT / "tools" / "gpu_smoke.sh"


def test_shell_script_parses_and_is_executable():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert SCRIPT.stat().st_mode & 0o111


def test_hbm_floor_is_three_passes_over_bf16_logits():
    spec = importlib.util.spec_from_file_location("bench_logprobs", ROOT / "benchmarks" / "bench_logprobs.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # 8192 x 151936 bf16: read forward, read backward, write the gradient = 7.47 GB at 4 TB/s.
    assert bench.hbm_floor_s(8192, 151936, 2) == pytest.approx(3 * 8192 * 151936 * 2 / 4.0e12)
    assert 1.86e-3 < bench.hbm_floor_s(8192, 151936, 2) < 1.87e-3


def _summary(stdout: str) -> dict:
    line = stdout.strip().splitlines()[-1]
    assert line.startswith("GPU_SMOKE ok=1 "), stdout[-3000:]
    return dict(item.split("=", 1) for item in line.split()[1:])


def test_summary_fails_without_transformer_engine_on_a_gpu():
    """TE absent on a GPU is reported and fails the run; a CPU dry run has no TE to check."""
    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "tools" / "gpu_smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    good = {"build": {"local": "ok", "te": "ok"}, "rl": {"steps": 3, "finite": True}, "cpu-reference": {"ok": True},
            "resume": {"ok": True}, "memory": {"finite": True}, "bench": {}}
    assert smoke.passed(good, "cuda")
    assert not smoke.passed({**good, "build": {"local": "ok", "te": "absent"}}, "cuda")
    assert smoke.passed({**good, "build": {"local": "ok", "te": "skipped(cpu)"}}, "cpu")
    assert not smoke.passed({**good, "rl": {"steps": 3, "finite": False}}, "cuda"), "a NaN loss must fail"
    assert not smoke.passed({**good, "cpu-reference": {"ok": False}}, "cuda")


def test_grad_parity_measure():
    import torch

    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "tools" / "gpu_smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    want = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0, 1e-4])}
    got = {"a": torch.tensor([3.0, 4.5]), "b": torch.tensor([0.0, 1.0])}
    out = smoke.grad_parity(got, want)
    # total: sqrt(0.5^2 + ~1^2) / ~5; "b" holds < 1% of the largest norm, so it is not the worst.
    assert out["relative"] == pytest.approx((0.25 + (1 - 1e-4) ** 2) ** 0.5 / (25 + 1e-8) ** 0.5)
    assert out["worst_param"] == "a" and out["worst"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="vacuous"):
        smoke.grad_parity({"a": torch.zeros(2)}, {"a": torch.zeros(2)})


BARE = ["numpy", "safetensors", "transformers", "pyyaml", "tqdm"]  # + torch: a bare GPU machine
READY = ".sapo_bare_ready"  # holds the venv's `pip freeze` when it was built


def _freeze(python: Path) -> str:
    done = subprocess.run([str(python), "-m", "pip", "freeze", "--all"], capture_output=True, text=True, timeout=120)
    return done.stdout if done.returncode == 0 else ""


def _bare_venv() -> Path:
    """The bare environment's python: built once per machine (a file lock, as the SGLang venv),
    reused only while its `pip freeze` is what was installed then, so it stays bare (the smoke
    script installs the carried wheels into a site of its own, never into this venv)."""
    import torch

    wanted = [f"torch=={torch.__version__.split('+')[0]}", *BARE]
    key = hashlib.sha256(json.dumps([sys.version, wanted]).encode()).hexdigest()[:12]
    root = venv_dir().parent  # the test virtualenvs' cache root, the SGLang venv's
    venv = root / f"bare-smoke-{key}"
    python = venv / "bin" / "python"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"bare-smoke-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = venv / READY
        if marker.exists() and python.exists() and marker.read_text() == _freeze(python):
            return python
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *wanted], check=True, timeout=1200,
                       capture_output=True)
        marker.write_text(_freeze(python))
        return python


@pytest.mark.slow
def test_dry_run_in_a_bare_environment(tmp_path):
    """Only torch, numpy, safetensors, transformers, pyyaml and tqdm, then the carried wheels
    installed by the script with --no-index: the smoke's CPU dry run passes every stage there."""
    python = _bare_venv()
    probe = [str(python), "-c", "import megatron.core"]
    assert subprocess.run(probe, capture_output=True).returncode != 0, "the venv must start without megatron-core"
    wheels = tmp_path / "wheels"
    subprocess.run(["bash", str(SCRIPT), "prepare", str(wheels)], check=True, timeout=900, capture_output=True)
    # No torchrun variables (this pytest process may hold a process group's port) and nothing of
    # this environment on the path: the script puts the checkout and its install site there.
    env = clean_env(PYTHON=str(python), SAPO_SMOKE_SITE=str(tmp_path / "site"))
    env.pop("PYTHONPATH")
    proc = subprocess.run(["bash", str(SCRIPT), str(wheels), "--device", "cpu", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=1200, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    installed = next(line for line in proc.stdout.splitlines() if line.startswith("installing from"))
    for name in ("megatron-core", "omegaconf", "antlr4-python3-runtime", "pybase64", "psutil"):
        assert name in installed, installed
    fields = _summary(proc.stdout)
    assert fields["build_local"] == "ok" and fields["build_te"] == "skipped(cpu)" and fields["rl_steps"] == "3"
    assert fields["resume"] == "True" and fields["rl_finite"] == "True"
    assert fields["logprob_ok"] == "True" and float(fields["logprob_max_abs"]) <= 1e-4
    # Same device, same dtype: the gradients agree to float32 rounding, and wrong routes do not.
    assert fields["grad_ok"] == "True" and float(fields["grad_rel"]) <= 1e-4
    assert float(fields["grad_rel_wrong_routes"]) > 0.1
    # On CPU the resumed step equals the uninterrupted run's exactly.
    assert float(fields["resume_loss_gap"]) == 0.0
    out = tmp_path / "out"
    assert (out / "first_step.pt").exists() and (out / "summary.json").exists()


def test_stage_budgets_fit_inside_the_limits():
    """The stages' budgets add up to less than the driver's limit less the summary's reserve,
    and the shell's outer timeout is longer than the driver's limit: the summary always prints."""
    import re

    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "tools" / "gpu_smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    assert sum(smoke.STAGE_BUDGET_S.values()) < smoke.DEFAULT_LIMIT_S - smoke.SUMMARY_RESERVE_S
    outer = int(re.search(r"SAPO_SMOKE_TIMEOUT:-(\d+)", SCRIPT.read_text()).group(1))
    assert outer > smoke.DEFAULT_LIMIT_S
    deadline = smoke.Deadline(100.0)
    assert deadline.cap(1000.0) <= 100.0 - smoke.SUMMARY_RESERVE_S and deadline.cap(10.0) == 10.0
