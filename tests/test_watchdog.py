"""The hang guard (sapo_megatron/trainer/watchdog.py): a phase over its limit is reported by name
and ends the process; one that finishes in time is not; nested phases report the innermost; the
heartbeat shows where a rank is; a 2-rank run with one rank hung fails within its limit, naming
the phase."""

from __future__ import annotations

import io
import json
import re
import time

import pytest

from sapo_megatron.trainer import watchdog
from sapo_megatron.trainer.watchdog import EXIT_CODE, Phase, Watchdog, phase
from tests.launch import clean_env, run_python, torchrun


def _phases(*specs, now: float = 100.0) -> list[Phase]:
    """Phase records ``(name, timeout_s, seconds since armed)``, outermost first."""
    return [Phase(name, limit, f"run.timeouts.{name}_s", now - ago, now - ago) for name, limit, ago in specs]


def test_overdue_names_the_innermost_phase_its_path_and_its_key():
    guard = Watchdog(rank=3)
    phases = _phases(("step", 600, 30.0), ("rollout", 20, 21.0))
    message = guard.overdue(phases, 100.0)
    assert message.startswith("[watchdog] rank 3 timed out in phase 'rollout' (step > rollout): 21.0 s without "
                              "progress, over its limit of 20 s (run.timeouts.rollout_s)")
    assert f"exits with code {EXIT_CODE}" in message
    # The outer phase is past its own limit too, but the rank is in the inner one, whose limit governs.
    assert guard.overdue(_phases(("step", 20, 30.0), ("rollout", 600, 21.0)), 100.0) is None
    assert guard.overdue(_phases(("rollout", 20, 19.0)), 100.0) is None
    assert guard.overdue(_phases(("rollout", None, 1e6)), 100.0) is None  # no limit


def test_sub_phases_inherit_their_parents_limit_unless_given_one():
    with phase("weight sync", 30, key="run.timeouts.weight_sync_s"):
        with phase("weight sync bucket 7") as bucket:
            assert (bucket.timeout_s, bucket.key) == (30, "run.timeouts.weight_sync_s")
        with phase("unbounded", None) as free:
            assert free.timeout_s is None
    with phase("alone") as alone:
        assert alone.timeout_s is None
    assert watchdog.current_phases() == []


def test_a_phase_that_finishes_in_time_is_not_reported():
    fired: list[str] = []
    guard = Watchdog(tick_s=0.02, on_expire=fired.append).start()
    try:
        with phase("quick", 0.3):
            time.sleep(0.02)
        time.sleep(0.6)  # past the deadline the phase would have had
        assert fired == []
        # Guard: the same watchdog does report a phase that overruns.
        with phase("slow", 0.1):
            time.sleep(0.6)
        assert len(fired) == 1 and "in phase 'slow'" in fired[0]
    finally:
        guard.stop()


def test_progress_in_sub_phases_restarts_the_parents_clock():
    fired: list[str] = []
    guard = Watchdog(tick_s=0.02, on_expire=fired.append).start()
    try:
        with phase("step 0", 0.5):
            for i in range(3):  # 0.9 s in all, over the step's 0.5 s, but never 0.5 s without progress
                with phase(f"update {i}", 2.0):
                    time.sleep(0.3)
            assert fired == []
            time.sleep(1.0)  # then no progress: the step's own limit
        assert len(fired) == 1 and "in phase 'step 0' (step 0)" in fired[0]
    finally:
        guard.stop()


def test_heartbeat_lines_show_the_phase_and_its_age():
    out = io.StringIO()
    guard = Watchdog(rank=5, heartbeat_s=0.1, stream=out).start()
    try:
        with phase("step 2", None), phase("rollout round 2", None):
            time.sleep(0.55)
    finally:
        guard.stop()
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3, lines
    assert all(re.fullmatch(r"\[heartbeat\] rank 5: (step 2 > rollout round 2 for \d+\.\d s|outside any phase)", line)
               for line in lines), lines
    quiet = io.StringIO()
    guard = Watchdog(rank=5, stream=quiet, tick_s=0.02).start()  # heartbeat off: the default
    with phase("step 2", None):
        time.sleep(0.2)
    guard.stop()
    assert quiet.getvalue() == ""


OVERRUN = """
import time
from sapo_megatron.trainer import watchdog

def wait_for_peer():
    time.sleep(60)

watchdog.start(rank=1, tick_s=0.05)
with watchdog.phase("step 3", 30, key="run.timeouts.step_s"):
    with watchdog.phase("weight sync", 0.5, key="run.timeouts.weight_sync_s"):
        with watchdog.phase("weight sync bucket 7"):
            wait_for_peer()
print("finished")
"""


def test_a_phase_over_its_limit_ends_the_process_naming_the_phase():
    proc = run_python("-c", OVERRUN, timeout=60, check=False)
    assert proc.returncode == EXIT_CODE, proc.stderr
    assert "finished" not in proc.stdout
    reports = [line for line in proc.stderr.splitlines() if line.startswith("[watchdog]")]
    assert len(reports) == 1, proc.stderr
    assert reports[0].startswith("[watchdog] rank 1 timed out in phase 'weight sync bucket 7' "
                                 "(step 3 > weight sync > weight sync bucket 7)")
    assert "(run.timeouts.weight_sync_s)" in reports[0]
    # The main thread's stack says where it waits.
    stack = proc.stderr.split("Thread MainThread (most recent call last):", 1)[1]
    assert "in wait_for_peer" in stack


def test_process_group_timeout_outlasts_every_phase_limit():
    from sapo_megatron.config.schema import TimeoutsSection

    assert TimeoutsSection().process_group_s() == 2400.0 + 300.0  # weight_sync_s, the longest, + margin
    short = TimeoutsSection(step_s=20, rollout_s=20, checkpoint_s=None, weight_sync_s=None)
    assert short.process_group_s() == 1800.0  # never below torch's default
    with pytest.raises(ValueError, match=r"^run.timeouts.rollout_s must be a number of seconds > 0, or null"):
        TimeoutsSection(rollout_s=0)


@pytest.mark.dist
@pytest.mark.slow
def test_a_rank_hung_in_a_phase_fails_the_job_within_its_limit(tmp_path):
    """Rank 1 sleeps forever in the reward function (tests/dist/hang_reward.py), inside the first
    rollout round; rank 0, its tensor-parallel peer, waits for it in the log-prob pass."""
    out = tmp_path / "hung"
    limit = 20
    proc = torchrun(
        "sapo_megatron.cli", "train", "--config", "tests/configs/tiny_rl.yaml", f"run.output_dir={out}",
        "run.steps=2", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4", "train.micro_batch_size=4",
        "run.tensorboard=false", "run.progress=false", "task.reward_fn=tests.dist.hang_reward:reward",
        f"run.timeouts.rollout_s={limit}", "run.timeouts.heartbeat_s=5",
        nproc=2, module=True, check=False, timeout=300, env=clean_env(SAPO_TEST_HANG_RANK="1"))
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    reports = [line for line in text.splitlines() if line.startswith("[watchdog]")]
    assert len(reports) == 1, text[-6000:]  # rank 0's step limit (600 s) is far off
    assert reports[0].startswith("[watchdog] rank 1 timed out in phase 'rollout round 0' (step 0 > rollout round 0)")
    assert f"over its limit of {limit} s (run.timeouts.rollout_s)" in reports[0]
    assert "in reward" in text.split("Thread MainThread", 1)[1]  # the stack reaches the hung function
    assert re.search(rf"exitcode\s*:\s*{EXIT_CODE}", text), text[-3000:]  # torchrun names the rank's exit
    # The heartbeat showed each rank's phase while it waited.
    beats = [line for line in text.splitlines() if line.startswith("[heartbeat]")]
    assert any(line.startswith("[heartbeat] rank 1: step 0 > rollout round 0 for") for line in beats), beats
    assert any(line.startswith("[heartbeat] rank 0: step 0 > log-probs for") for line in beats), beats
    metrics = out / "metrics.jsonl"
    assert not metrics.exists() or [json.loads(x) for x in metrics.read_text().splitlines()] == []
