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
- distributed optimizer: the checkpoint says so;
- multi-turn (calculator, ``retry_on_wrong``): ``episode/turns_mean > 2`` and environment tokens
  in the samples; single-turn rows log no episode metrics;
- partial rollouts: the partial mode's per-token metrics, and on the mock every update after the
  first is sent paused in place (``/pause_generation`` mode ``in_place``, ``flush_cache: false``,
  ``/continue_generation``); no pause otherwise;
- delta weight sync (``sglang_delta``): after the first full sync the updates are
  ``/update_weights_from_tensor`` with the delta loader, whose digests (checked on every push)
  equal the trainer's, with no fallback; plain ``sglang`` sends no tensor update;
- ``loss.fused_logprobs``: no metric names the path; its numbers are checked against the
  float64 reference in tests/test_logprobs.py (and under TP/PP in tests/test_dist_step.py); here
  only that it runs in combination.
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
def hf_dirs(tmp_path_factory):
    """vocabulary size -> the HF model, made on first use."""
    from tests.dist.ckpt_models import make_hf_model

    made: dict = {}

    def get(vocab: int) -> Path:
        # The mock's model: 2 layers (layer 0 dense), 4 experts, top-2; the task's alphabet.
        if vocab not in made:
            made[vocab] = make_hf_model("qwen3_moe", tmp_path_factory.mktemp(f"matrix_hf{vocab}"), vocab_size=vocab)
        return made[vocab]

    return get


def _validate(row: dict, **kwargs):
    from sapo_megatron.config import load_config, validate_for_world

    cfg = load_config(None, matrix.overrides(row, **kwargs))  # load_config runs validate
    return validate_for_world(cfg, matrix.world_size(row))


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("row", RUNS, ids=[matrix.run_id(i, r) for i, r in enumerate(RUNS)])
def test_run(row, hf_dirs, tmp_path):
    out = tmp_path / "run"
    server = None
    if row["engine"] != "embedded":
        from sapo_sglang.delta_loader import LOADER
        from tests.sglang_mock import Behaviour, MockSGLang

        server = MockSGLang(Behaviour(
            num_hidden_layers=2, topk=2, num_experts=4, dense_layers=(0,), vocab_size=matrix.vocab_size(row),
            # Delta pushes: the mock runs the loader's host side (model=None), acks and digests.
            custom_weight_loaders=(LOADER,) if row["engine"] == "sglang_delta" else (),
            # Partial rollouts pause in place: the servers must report the radix cache off.
            disable_radix_cache=row["partial"] == "on"))
    try:
        kwargs = dict(out=str(out), hf_dir=str(hf_dirs(matrix.vocab_size(row))), url=server and server.url,
                      weight_dir=str(tmp_path / "weights"))
        plan = _validate(row, **kwargs)  # a refusal here is one the matrix does not expect: it fails
        t0 = time.perf_counter()
        torchrun("sapo_megatron.cli", "train", *matrix.overrides(row, **kwargs), nproc=matrix.world_size(row),
                 module=True, timeout=RUN_TIMEOUT_S)
        print(f"{matrix.run_id(0, row)[4:]}: {time.perf_counter() - t0:.1f} s")
        requests = [] if server is None else [(path, body) for path, body in _requests(server)]
    finally:
        if server is not None:
            server.stop()
    _check_metrics(row, out, plan)
    if server is not None:
        _check_server(row, out, requests)


def _requests(server) -> list[tuple[str, dict]]:
    with server.lock:
        return [(r["path"], r["body"]) for r in server.requests]


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
        if row["turns"] > 1:
            # Every wrong answer gets ">?;" and another turn: most episodes play all 3 turns.
            assert r["episode/turns_mean"] > 2.0 and r["episode/env_token_frac"] > 0.0, r
        else:
            assert "episode/turns_mean" not in r
        if row["partial"] == "on":
            # Per-token versions from the spans: the partial mode's own metrics.
            assert 0.0 <= r["async/masked_token_frac"] <= 1.0 and 0.0 <= r["async/spanning_frac"] <= 1.0, r
        else:
            assert "async/spanning_frac" not in r
        if row["engine"] == "sglang_delta":
            assert r["weight_sync/delta_fallbacks"] == 0.0, r
    if row["staleness"]:
        assert [r["async/staleness_max"] for r in rl] == [0.0, 1.0]
    else:
        assert all(r["async/staleness_max"] == 0.0 for r in rl)
    meta = json.loads((out / "checkpoints" / f"iter_{len(rows):07d}" / "meta.json").read_text())
    assert meta["optimizer"]["distributed"] == (row["dist_opt"] == "on"), meta["optimizer"]
    if row["engine"] == "sglang_delta":
        # A delta went out after the first (full) sync, and its checksum held (else a fallback).
        assert sum(r.get("weight_sync/delta_checksums", 0.0) for r in rl) >= 1, rl
        assert all(0.0 < r["weight_sync/delta_ratio"] <= 1.0 for r in rl if "weight_sync/delta_ratio" in r)


def _check_server(row: dict, out: Path, requests: list) -> None:
    """What the mock was asked: the weight path of the engine value, the partial mode's pauses."""
    paths = [p for p, _ in requests]
    updates = [(p, b) for p, b in requests if p in ("/update_weights_from_disk", "/update_weights_from_tensor")]
    assert updates and updates[0][0] == "/update_weights_from_disk", paths  # the first sync is a full one
    tensor = [b for p, b in updates if p == "/update_weights_from_tensor"]
    if row["engine"] == "sglang_delta":
        assert tensor and all(b["load_format"] == "sapo_sglang.delta_loader.apply_delta" for b in tensor), paths
    else:
        assert not tensor, paths
    if row["partial"] == "on":
        # Every update after the first is sent paused in place, without a flush, then continued.
        assert paths.count("/pause_generation") == paths.count("/continue_generation") == len(updates) - 1 > 0, paths
        assert [b["flush_cache"] for _, b in updates] == [True] + [False] * (len(updates) - 1), updates
        assert all(b.get("mode") == "in_place" for p, b in requests if p == "/pause_generation")
    else:
        assert "/pause_generation" not in paths


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

    if not any(refusal.name in names for names in matrix._table()[2]):
        pytest.skip(f"{refusal.name} applies to nothing on this machine")
    row = matrix.representative(refusal)
    with pytest.raises(ConfigError) as err:
        _validate(row, out=str(tmp_path), hf_dir=None)
    for key in refusal.keys:
        assert key in str(err.value), f"{refusal.name}: {key!r} not named in:\n{err.value}"


@pytest.mark.slow  # ~30 validations and the cover of the refused pairs, ~5 s
def test_every_pair_is_run_or_refused(tmp_path):
    """The runs hold every pair some allowed combination holds; ``validate`` accepts each run and
    refuses a few combinations that together hold every other pair."""
    from sapo_megatron.config import ConfigError

    covered = set().union(*map(matrix._pairs, RUNS))
    every = matrix.every_pair()
    assert covered | set(REFUSED_PAIRS) == every and not covered & set(REFUSED_PAIRS)
    for run in RUNS:
        _validate(run, out=str(tmp_path), hf_dir=None)
    for row in matrix.refused_cover(REFUSED_PAIRS):
        assert matrix.refusals(row)
        with pytest.raises(ConfigError):
            _validate(row, out=str(tmp_path), hf_dir=None)
