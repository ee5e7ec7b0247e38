"""Issue 19's pairwise matrix: every pair of feature values in a real trainer run, or refused.

The combinations come from ``tests/matrix.py`` (a greedy all-pairs cover; ``python -m
tests.matrix`` prints them). Each run is one test: 2 RL steps under torchrun with a hard time
limit, ``validate`` first. The only acceptable outcomes are a run that completes with finite
metrics that show its features were on, or a refusal by ``validate`` that names the conflicting
keys (the refusal tests below, no torchrun). A hang, a crash after validation or a refusal at
run time fails.

What "on" means, per feature (checked on every RL row of ``metrics.jsonl``):
- always: every metric finite, ``grad_norm > 0`` (``tests.matrix.reward`` varies within every
  other group of each DP rank);
- R2 / R3: ``routing/coverage > 0`` (routes were replayed); agreement (the live router's top-k
  equals the replayed one) exactly 1 where the replayed routes come from the weights the update
  runs with: R2 always (the logged update is the step's only one, on the weights of the
  old-log-prob pass that recorded them), R3 with the embedded engine while the samples are not
  stale. The mock SGLang server's routes are random, so there R3 shows instead that replay moved
  the log-probs away from live routing's;
- dynamic sampling: the other groups have zero variance, so ``rollout/filtered_frac > 0`` and
  every step takes exactly 2 rounds;
- token budget: ``batch/microbatches``, the plan's count, is logged and more than one
  microbatch holds a DP rank's share;
- staleness 1: step 1 trained on samples one version old;
- cold start: its rows come first, with a gradient;
- distributed optimizer: the checkpoint says so.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from tests import matrix
from tests.launch import torchrun

RUNS, REFUSED_PAIRS = matrix.cover()
RUN_TIMEOUT_S = 300  # the watchdog's phase limits (90 s) answer first; this is the backstop


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tests.dist.ckpt_models import make_hf_model

    # The mock's model: 2 layers (layer 0 dense), 4 experts, top-2; the arithmetic alphabet (16).
    return make_hf_model("qwen3_moe", tmp_path_factory.mktemp("matrix_hf"), vocab_size=16)


def _validate(row: dict, **kwargs):
    from sapo_megatron.config import load_config, validate_for_world

    cfg = load_config(None, matrix.overrides(row, **kwargs))  # load_config runs validate
    return validate_for_world(cfg, matrix.world_size(row))


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("row", RUNS, ids=[matrix.run_id(i, r) for i, r in enumerate(RUNS)])
def test_run(row, hf_dir, tmp_path):
    out = tmp_path / "run"
    server = None
    if row["engine"] == "sglang":
        from tests.sglang_mock import Behaviour, MockSGLang

        server = MockSGLang(Behaviour(num_hidden_layers=2, topk=2, num_experts=4, dense_layers=(0,), vocab_size=16))
    try:
        kwargs = dict(out=str(out), hf_dir=str(hf_dir), url=server and server.url,
                      weight_dir=str(tmp_path / "weights"))
        plan = _validate(row, **kwargs)  # a refusal here is one the matrix does not expect: it fails
        t0 = time.perf_counter()
        torchrun("sapo_megatron.cli", "train", *matrix.overrides(row, **kwargs), nproc=matrix.world_size(row),
                 module=True, timeout=RUN_TIMEOUT_S)
        print(f"{matrix.run_id(0, row)[4:]}: {time.perf_counter() - t0:.1f} s")
    finally:
        if server is not None:
            server.stop()
    _check_metrics(row, out, plan)


def _check_metrics(row: dict, out: Path, plan) -> None:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cold = [r for r in rows if r["phase"] == "cold_start"]
    rl = [r for r in rows if r["phase"] == "rl"]
    assert len(cold) == row["cold_start"] and rows[:len(cold)] == cold, "the cold start comes first"
    assert [r["rl_step"] for r in rl] == list(range(matrix.STEPS))
    for r in rows:
        bad = {k: v for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, f"step {r['step']}: non-finite metrics {bad}"
        assert r["grad_norm"] > 0, f"step {r['step']}: no gradient"
    for r in rl:
        assert r["step_skipped"] == 0.0 and r["abort_frac"] == 0.0
        _check_routing(row, r)
        if row["dynamic"] != "off":
            # Every other group of a DP rank is filtered: 2 rounds fill every quota.
            assert r["rollout/filtered_frac"] > 0 and r["rollout/sampling_rounds"] == 2.0, r
        else:
            assert "rollout/sampling_rounds" not in r
        if row["budget"] == "on":
            # A DP rank's share never fits one budget (tests/matrix.py TOKEN_BUDGET).
            assert r["batch/microbatches"] >= 2, r["batch/microbatches"]
        else:  # one update: a DP rank's whole share
            mine = matrix.PROMPTS * matrix.SAMPLES // plan.data_parallel_size
            assert r["batch/microbatches"] == mine // matrix.MICRO_BATCH
    if row["staleness"]:
        assert [r["async/staleness_max"] for r in rl] == [0.0, 1.0]
    else:
        assert all(r["async/staleness_max"] == 0.0 for r in rl)
    meta = json.loads((out / "checkpoints" / f"iter_{len(rows):07d}" / "meta.json").read_text())
    assert meta["optimizer"]["distributed"] == (row["dist_opt"] == "on"), meta["optimizer"]


def _check_routing(row: dict, r: dict) -> None:
    if row["routing"] == "none":
        assert "routing/coverage" not in r
        return
    # Every token but each sample's last (its route comes from no forward) is replayed.
    assert 0.5 < r["routing/coverage"] < 1.0, r["routing/coverage"]
    if row["routing"] == "R2" or (row["engine"] == "embedded" and r["async/staleness_max"] == 0.0):
        # Not a tolerance: the same weights route the same tokens alike, bit for bit on CPU.
        assert r["routing/agreement_mean"] == 1.0, r["routing/agreement_mean"]
    elif row["engine"] == "sglang":
        # The mock routes at random: the agreement says so (the check above is not vacuous), and
        # replaying its routes gives other log-probs than live routing.
        assert r["routing/agreement_mean"] < 1.0
        assert r["train_rollout_logprob_abs_diff_live"] != r["train_rollout_logprob_abs_diff"]


@pytest.mark.parametrize("refusal", matrix.REFUSALS, ids=[r.name for r in matrix.REFUSALS])
def test_refused_by_validate(refusal, tmp_path):
    """Each refusal, on the first combination it applies to: ``validate`` names the keys."""
    from sapo_megatron.config import ConfigError

    if not any(refusal.applies(r) for r in matrix._all_rows()):
        pytest.skip(f"{refusal.name} applies to nothing on this machine")
    row = matrix.representative(refusal)
    with pytest.raises(ConfigError) as err:
        _validate(row, out=str(tmp_path), hf_dir=None)
    for key in refusal.keys:
        assert key in str(err.value), f"{refusal.name}: {key!r} not named in:\n{err.value}"


@pytest.mark.slow  # 30 validations, ~10 s
def test_every_pair_is_run_or_refused(tmp_path):
    """The runs hold every pair some allowed combination holds; ``validate`` accepts each run and
    refuses a few combinations that together hold every other pair."""
    from sapo_megatron.config import ConfigError

    covered = set().union(*map(matrix._pairs, RUNS))
    every = set().union(*map(matrix._pairs, matrix._all_rows()))
    assert covered | set(REFUSED_PAIRS) == every and not covered & set(REFUSED_PAIRS)
    for run in RUNS:
        _validate(run, out=str(tmp_path), hf_dir=None)
    for row in matrix.refused_cover(REFUSED_PAIRS):
        assert matrix.refusals(row)
        with pytest.raises(ConfigError):
            _validate(row, out=str(tmp_path), hf_dir=None)
