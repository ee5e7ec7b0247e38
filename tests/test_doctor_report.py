"""The doctor's maths (sapo_megatron/doctor/report.py) against plain-Python references, and its
consistency with the trainer's own mismatch metric (trainer/mismatch.gap_counts)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sapo_megatron.doctor.report import (
    TokenGaps,
    build_report,
    gap_figures,
    plot_rows,
    position_buckets,
    render,
    routing_figures,
    verdict,
)
from sapo_megatron.trainer.mismatch import gap_counts


def _gaps(n=400, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    gap = torch.randn(n, generator=g, dtype=torch.float64) * scale
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    pos = torch.randint(0, 70, (n,), generator=g)
    return gap, adv, pos


def _reference(gap, adv, tau_pos, tau_neg):
    """Token by token in Python floats: sech^2(tau/2 (r - 1)) < 0.5 and r outside [0.8, 1.28]."""
    gap, adv = gap.tolist(), adv.tolist()
    low = clip = 0
    for x, a in zip(gap, adv):
        r = math.exp(x)
        tau = tau_pos if a > 0 else tau_neg
        x_ = min(abs(tau / 2 * (r - 1)), 700.0)  # cosh overflows past ~710; the weight is 0 there anyway
        low += (1 / math.cosh(x_)) ** 2 < 0.5
        clip += not (0.8 <= r <= 1.28)
    ab = sorted(abs(x) for x in gap)
    n = len(ab)
    return {"mean": sum(ab) / n, "p50": ab[math.ceil(0.5 * (n - 1))], "p99": ab[math.ceil(0.99 * (n - 1))],
            "max": ab[-1], "low": low / n, "clip": clip / n}


@pytest.mark.parametrize("scale", [0.05, 1.0, 3.0])
def test_gap_figures_match_a_token_by_token_reference(scale):
    gap, adv, _ = _gaps(scale=scale)
    got = gap_figures(gap, adv, 1.0, 1.05)
    ref = _reference(gap, adv, 1.0, 1.05)
    # float64 on both sides, one summation order apart: 1e-12.
    assert got["logprob_gap_mean"] == pytest.approx(ref["mean"], rel=1e-12)
    # Order statistics and counts: exact.
    assert (got["logprob_gap_p50"], got["logprob_gap_p99"], got["logprob_gap_max"]) == (ref["p50"], ref["p99"], ref["max"])
    assert got["gate_low_frac"] == ref["low"] and got["clip_frac"] == ref["clip"]
    if scale >= 1.0:  # the guard: these sizes do cross both thresholds, so the shares are tested
        assert 0 < ref["low"] < 1 and 0 < ref["clip"] < 1


def test_gate_share_is_the_trainers_metric():
    """The doctor's SAPO share is trainer/mismatch.gap_counts' (what the trainer logs), tau by the advantage's sign."""
    gap, adv, _ = _gaps(scale=2.0, seed=1)
    rollout = torch.randn(gap.numel(), dtype=torch.float64) - 3
    total, low, count = gap_counts(rollout + gap, rollout, torch.ones_like(gap, dtype=torch.bool), adv, 0.5, 2.0)
    got = gap_figures(gap, adv, 0.5, 2.0)
    assert got["gate_low_frac"] == low / count
    assert got["logprob_gap_mean"] == pytest.approx(total / count, rel=1e-12)
    # The one-tau variants bracket it (tau_neg > tau_pos silences more) and differ from it here.
    assert got["gate_low_frac_tau_pos"] < got["gate_low_frac"] < got["gate_low_frac_tau_neg"]


def test_position_buckets_cover_every_position_once():
    assert position_buckets(0) == [(0, 1)]
    assert position_buckets(70) == [(0, 1), (1, 4), (4, 16), (16, 64), (64, 256)]
    gap, adv, pos = _gaps()
    report = build_report(TokenGaps(gap, gap * 2, pos, adv), routing_figures(torch.ones(2), torch.ones(2), 0, 1),
                          routing_mode="R3", tau_pos=1.0, tau_neg=1.05)
    rows = report["by_position"]["replay"]
    assert sum(r["tokens"] for r in rows) == gap.numel()
    first = rows[0]
    sel = pos == 0
    assert first["tokens"] == int(sel.sum()) and first["logprob_gap_mean"] == pytest.approx(float(gap[sel].abs().mean()))


def test_routing_figures_average_layers_and_count_tokens():
    agree, tokens = torch.tensor([90.0, 50.0, 0.0]), torch.tensor([100.0, 100.0, 0.0])  # layer 2: on another stage
    out = routing_figures(agree, tokens, differ=55, counted=100)
    assert out["routing_agreement_per_layer"][:2] == [0.9, 0.5] and math.isnan(out["routing_agreement_per_layer"][2])
    assert out["routing_agreement_mean"] == pytest.approx(0.7) and out["token_differ_frac"] == 0.55


def _report(scale, mode="R3", agree=1.0):
    gap, adv, pos = _gaps(scale=scale)
    return build_report(TokenGaps(gap, gap, pos, adv), routing_figures(torch.tensor([agree]), torch.ones(1), 0, 1),
                        routing_mode=mode, tau_pos=1.0, tau_neg=1.05)


def test_verdicts_follow_the_documented_thresholds():
    assert _report(1e-4)["verdict"] == "OK"
    assert _report(0.03)["verdict"] == "WARN"  # mean |gap| ~0.024 > 0.02
    assert _report(1.0)["verdict"] == "FAIL"
    assert _report(1e-4, mode="none", agree=0.5)["verdict"] == "WARN"  # live routing disagrees, no replay
    assert _report(1e-4, mode="R3", agree=0.5)["verdict"] == "OK"  # R3 replays the engine's routes
    empty = TokenGaps(*(torch.zeros(0) for _ in range(4)))
    assert verdict(build_report(empty, routing_figures(torch.zeros(1), torch.zeros(1), 0, 0), routing_mode="R3",
                                tau_pos=1.0, tau_neg=1.0))[0] == "FAIL"


def test_headline_is_the_training_modes_pass_and_json_keys_exist():
    gap, adv, pos = _gaps(scale=0.1)
    gaps = TokenGaps(gap, gap * 3, pos, adv)
    routing = routing_figures(torch.tensor([9.0]), torch.tensor([10.0]), 1, 10)
    r3 = build_report(gaps, routing, routing_mode="R3", tau_pos=1.0, tau_neg=1.05)
    live = build_report(gaps, routing, routing_mode="none", tau_pos=1.0, tau_neg=1.05)
    assert r3["logprob_gap_mean"] == r3["replay"]["logprob_gap_mean"] != live["logprob_gap_mean"]
    assert live["logprob_gap_mean"] == live["live"]["logprob_gap_mean"]
    for key in ("routing_agreement_mean", "token_differ_frac", "logprob_gap_mean", "logprob_gap_p99",
                "gate_low_frac", "num_tokens"):
        assert key in r3
    json.dumps(r3)  # the --json object is plain JSON
    text = render(r3)
    assert "verdict:" in text and "tokens differing in >= 1 layer 0.1" in text


def test_a_report_of_no_tokens_is_strict_json():
    """No tokens: the figures are NaN in the report, ``null`` in its JSON (a JSON parser refuses
    ``NaN``), and the verdict says why."""
    from sapo_megatron.doctor.report import to_json

    empty = torch.zeros(0)
    gaps = TokenGaps(empty, empty, empty.long(), empty)
    report = build_report(gaps, routing_figures(torch.zeros(1), torch.zeros(1), 0, 0), routing_mode="R3",
                          tau_pos=1.0, tau_neg=1.05)
    assert math.isnan(report["logprob_gap_mean"])  # guard: plain json.dumps would write NaN
    assert "NaN" in json.dumps(report)

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    parsed = json.loads(to_json(report), parse_constant=refuse)
    assert parsed["logprob_gap_mean"] is None and parsed["num_tokens"] == 0
    assert parsed["verdict"] == "FAIL" and "no response tokens" in parsed["verdict_reason"]


def test_plot_rows_feed_the_plot_command(tmp_path):
    pytest.importorskip("matplotlib")
    from sapo_megatron.commands.plot import main as plot_main

    report = _report(0.1)
    path = tmp_path / "doctor_positions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in plot_rows(report)))
    assert [r["step"] for r in plot_rows(report)] == [0, 1, 4, 16, 64]
    assert plot_main([str(path), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "doctor_gap_by_position.png").is_file()


def test_token_gaps_refuse_mismatched_lengths():
    with pytest.raises(ValueError, match="TokenGaps.live_T has 3 tokens, expected 2"):
        TokenGaps(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2))

