"""The ``sapo-megatron`` command: every ``--help`` (entry point and ``python -m``), lazy heavy
imports, dispatch to the right handler, and the ``tools/`` wrappers' old arguments."""

from __future__ import annotations

import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sapo_megatron import cli
from sapo_megatron.commands import compare_logits, config as config_cmd, convert, plot, sweep
from tests.launch import ROOT, clean_env

HELP_CASES = [[], ["train"], ["convert"], ["convert", "hf-to-mcore"], ["convert", "mcore-to-hf"],
              ["compare-logits"], ["plot"], ["config"], ["config", "show"], ["config", "validate"],
              ["plan"], ["sweep"], ["doctor"], ["demo"]]
HELP_IDS = [" ".join(case) or "top" for case in HELP_CASES]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), cwd=ROOT, timeout=120)


def _check_help(proc: subprocess.CompletedProcess, case: list[str]) -> None:
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith(f"usage: sapo-megatron {' '.join(case)}".rstrip()), out[:200]
    assert "example" in out.lower(), f"`sapo-megatron {' '.join(case)} --help` shows no example"


@pytest.mark.parametrize("case", HELP_CASES, ids=HELP_IDS)
def test_help_via_python_m(case):
    _check_help(_run([sys.executable, "-m", "sapo_megatron.cli", *case, "--help"]), case)


@pytest.mark.parametrize("case", HELP_CASES, ids=HELP_IDS)
def test_help_via_installed_entry_point(case):
    exe = shutil.which("sapo-megatron")
    if exe is None:
        pytest.skip("the sapo-megatron entry point is not installed (pip install -e .)")
    _check_help(_run([exe, *case, "--help"]), case)


def test_top_level_lists_every_command_and_refuses_unknown_ones():
    proc = _run([sys.executable, "-m", "sapo_megatron.cli"])
    assert proc.returncode == 0
    for name in cli.COMMANDS:
        assert f"    {name}" in proc.stdout
    proc = _run([sys.executable, "-m", "sapo_megatron.cli", "trian"])
    assert proc.returncode == 2 and "unknown command 'trian'; known: train, convert" in proc.stderr


def test_help_imports_no_heavy_modules():
    """``--help`` of every command in one process: torch, Megatron and matplotlib stay unloaded."""
    code = f"""
import sys
from sapo_megatron import cli
for case in {HELP_CASES!r}:
    try:
        cli.main([*case, "--help"])
    except SystemExit as exit:
        assert exit.code in (0, None), (case, exit.code)
print(sorted(m for m in ("torch", "megatron", "matplotlib", "sympy", "sapo_megatron.config") if m in sys.modules))
"""
    proc = _run([sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


def test_handlers_resolve_to_the_package_functions():
    assert cli.handler("convert") is convert.main
    assert cli.handler("compare-logits") is compare_logits.main
    assert cli.handler("plot") is plot.main
    assert cli.handler("config") is config_cmd.main
    assert cli.handler("sweep") is sweep.main
    assert cli.handler("train") is cli.train and cli.handler("demo") is cli.demo


@pytest.mark.parametrize("direction, args, expected", [
    ("hf-to-mcore", ["--hf-dir", "H", "--out", "O"], {"hf_dir": "H", "out": "O", "no_progress": False}),
    ("mcore-to-hf", ["--ckpt", "C", "--out", "O", "--dtype", "bfloat16", "--max-shard-gb", "2", "--no-progress"],
     {"ckpt": "C", "out": "O", "dtype": "bfloat16", "max_shard_gb": 2.0, "no_progress": True}),
])
def test_convert_dispatches_to_its_direction(monkeypatch, capsys, direction, args, expected):
    seen = {}

    def fake(parsed):
        seen.update(vars(parsed))
        return {"bytes": 2e6, "seconds": 1.0}

    help_text, add_args, _ = convert.DIRECTIONS[direction]
    monkeypatch.setitem(convert.DIRECTIONS, direction, (help_text, add_args, fake))
    assert cli.main(["convert", direction, *args]) == 0
    assert {k: seen[k] for k in expected} == expected and seen["command"] == direction
    assert f"{direction}: 2.0 MB in 1.00 s" in capsys.readouterr().out


def test_convert_reports_bad_input_in_one_line(monkeypatch, capsys):
    def fail(parsed):
        raise ValueError("H: no config.json")

    monkeypatch.setitem(convert.DIRECTIONS, "hf-to-mcore", (*convert.DIRECTIONS["hf-to-mcore"][:2], fail))
    assert cli.main(["convert", "hf-to-mcore", "--hf-dir", "H", "--out", "O"]) == 2
    assert capsys.readouterr().err == "error: H: no config.json\n"


def test_plot_dispatches(monkeypatch, tmp_path, capsys):
    path = tmp_path / "run" / "metrics.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps({"step": 0, "reward_mean": 0.5}) + "\n")
    seen = {}

    def fake_plot(runs, out, *, grouped):
        seen.update(runs=runs, out=out, grouped=grouped)
        return [out / "reward.png"]

    monkeypatch.setattr(plot, "plot", fake_plot)
    assert cli.main(["plot", str(path), "--out", str(tmp_path / "p")]) == 0
    assert seen == {"runs": [("", [{"step": 0, "reward_mean": 0.5}])], "out": tmp_path / "p", "grouped": False}
    assert capsys.readouterr().out.strip() == str(tmp_path / "p" / "reward.png")
    assert cli.main(["plot", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "p")]) == 2
    assert "sapo-megatron plot: " in capsys.readouterr().err


def test_sweep_dispatches(tmp_path, capsys):
    assert cli.main(["sweep", "--out", str(tmp_path), "--seeds", "0", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(sweep.unique_runs(sweep.ARMS)) and lines[0].startswith(f"[1/{len(lines)}] sapo_k0 seed 0")


def test_config_calls_run_config_command_with_the_remaining_args(monkeypatch):
    import sapo_megatron.config.commands as config_commands

    calls = []
    monkeypatch.setattr(config_commands, "run_config_command", lambda argv: calls.append(argv) or 7)
    assert cli.main(["config", "validate", "--config", "c.yaml", "--world-size", "4", "seed=1"]) == 7
    assert cli.main(["config", "show", "seed=2"]) == 7
    assert calls == [["validate", "--config", "c.yaml", "--world-size", "4", "seed=1"], ["show", "seed=2"]]


@pytest.mark.slow  # loads and validates real configs (imports Megatron's config classes)
def test_config_show_and_validate_run_for_real(capsys):
    cfg = str(ROOT / "tests" / "configs" / "tiny_rl.yaml")
    assert cli.main(["config", "validate", "--config", cfg, "--world-size", "2"]) == 0
    assert capsys.readouterr().out.startswith("OK")
    assert cli.main(["config", "show", "--config", cfg, "seed=5"]) == 0
    assert "  seed: 5\n" in capsys.readouterr().out
    assert cli.main(["config", "validate", "--config", cfg, "loss.tua_pos=1"]) == 2
    assert "'loss.tua_pos'" in capsys.readouterr().err


def test_train_dispatches_with_overrides(monkeypatch, capsys):
    import sapo_megatron.trainer.loop as loop

    seen = []
    monkeypatch.setattr(loop, "train", seen.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli.main(["train", "--config", str(ROOT / "tests" / "configs" / "tiny_rl.yaml"), "seed=3",
                     "parallel.tensor_model_parallel_size=1"]) == 0
    assert len(seen) == 1 and seen[0].run.seed == 3
    assert cli.main(["train", "--config", str(ROOT / "tests" / "configs" / "tiny_rl.yaml"), "loss.tua_pos=1"]) == 2
    assert "sapo-megatron train: " in capsys.readouterr().err and len(seen) == 1


def test_demo_starts_torchrun_with_its_arguments(monkeypatch, capsys):
    launched = []
    monkeypatch.setattr(cli, "_launch_torchrun", lambda module, nproc, argv: launched.append((module, nproc, argv)) or 0)
    monkeypatch.delenv("RANK", raising=False)
    assert cli.main(["demo", "--nproc", "2", "--ep", "2"]) == 0
    assert launched == [("sapo_megatron.demo", 2, ["--nproc", "2", "--ep", "2"])]
    assert cli.main(["demo", "--nproc", "0"]) == 2
    assert "--nproc must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["demo", "--tpp", "2"])  # a typo is refused before torchrun starts
    assert len(launched) == 1


# ---------------------------------------------------------------------------------------------
# The old scripts: thin wrappers, same arguments
# ---------------------------------------------------------------------------------------------

WRAPPERS = {
    "tools/convert_checkpoint.py": (convert, [
        ["hf-to-mcore", "--hf-dir", "Qwen3-30B-A3B/", "--out", "ckpt/"],
        ["hf-to-mcore", "--hf-dir", "h", "--out", "o", "--no-progress"],
        ["mcore-to-hf", "--ckpt", "ckpt/", "--out", "hf_out/", "--dtype", "bfloat16", "--max-shard-gb", "1",
         "--no-progress"],
    ]),
    "tools/compare_logits.py": (compare_logits, [
        ["--hf-dir", "D", "--ckpt", "C"],
        ["--hf-dir", "D", "--ckpt", "C", "--dump", "F", "--seq-len", "16", "--batch", "2", "--seed", "1",
         "--tol", "1e-4"],
    ]),
    "tools/plot_metrics.py": (plot, [
        ["a.jsonl", "--out", "plots"],
        ["a.jsonl", "b.jsonl", "--label", "sapo", "grpo", "--out", "plots"],
        ["a/s0/metrics.jsonl", "a/s1/metrics.jsonl", "--group-by", "parent", "--out", "plots"],
    ]),
    "examples/ablations/sweep.py": (sweep, [
        ["--out", "runs/ablations", "--dry-run"],
        ["--out", "runs/ablations", "--report-only", "--seeds", "0", "1"],
    ]),
}


@pytest.mark.parametrize("script", sorted(WRAPPERS))
def test_wrapper_is_the_package_main_and_takes_its_old_arguments(script):
    module, argument_lines = WRAPPERS[script]
    namespace = runpy.run_path(str(ROOT / script), run_name="not_main")
    assert namespace["main"] is module.main
    parser = module.build_parser() if hasattr(module, "build_parser") else None
    for argv in argument_lines:
        if parser is not None:
            parser.parse_args(argv)  # raises SystemExit on an argument the old script took
    proc = _run([sys.executable, script, "--help"])
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: {Path(script).name}"), proc.stderr[-1000:]


def test_sweep_wrapper_runs_a_dry_run(tmp_path):
    proc = _run([sys.executable, "examples/ablations/sweep.py", "--out", str(tmp_path), "--seeds", "0", "--dry-run"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    from sapo_megatron.commands import sweep

    lines = proc.stdout.splitlines()
    assert len(lines) == len(sweep.unique_runs(sweep.ARMS)) and all("configs/ablation_cpu.yaml" in line for line in lines)
