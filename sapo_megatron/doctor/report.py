"""The doctor's figures, from per-token gaps and routing counts (pure maths, no model, no server).

Input: for every response token, the gap ``train - rollout`` log-prob (the trainer's forward on
the engine's tokens, once replaying the engine's routes and once routing live), its position in
the response and its sample's advantage; and the routing counts of
:func:`sapo_megatron.routing.agreement.agreement_counts` (engine routes vs the trainer's live
ones). Output: one flat dict (the ``--json`` object) and its text rendering.

Choices:
- Gaps are summarised as ``|gap|`` (mean, p50, p99, max): a mismatch in either direction is
  off-policy noise. Quantiles are the "higher" order statistic (a p99 is a token that exists).
- The SAPO share is the trainer's own metric (``trainer/mismatch.gap_counts``): the gradient
  weight ``sech^2(tau/2 (r - 1))`` at ``r = exp(gap)`` below 0.5, ``tau`` by the sign of the
  token's advantage (``tau_pos`` / ``tau_neg``), plus the same share with ``tau_pos`` and with
  ``tau_neg`` on every token (what an all-positive / all-negative batch would see).
- The GRPO share: tokens with ``r`` outside ``[1 - 0.2, 1 + 0.28]`` (DAPO's clip-higher
  range), i.e. clipped before the policy has moved at all.
- The headline keys (``logprob_gap_mean`` ...) are those of the routing mode the run trains with
  (``R3``: the replay pass; otherwise live routing); both are under ``replay`` / ``live``.
- Positions are bucketed by powers of 4 (0, 1-3, 4-15, 16-63, ...): a gap that grows along the
  response (KV-cache precision, long-context kernels) shows as rising buckets.

Verdict (``VERDICT_RULES``, first match wins; thresholds on the headline figures):
``FAIL`` when the mean gap exceeds 0.1 nat or the median 0.05: the two sides do not compute the
same model (wrong weights, tokenizer, chat template, temperature or a broken conversion; a bf16
engine on a trained model is ~1e-3-1e-2). ``WARN`` when the mean exceeds 0.02, or over 1% of
tokens fall outside the GRPO clip range or under SAPO's half-weight, or live routing agrees on
fewer than 90% of (token, layer) decisions while training without replay: training works but is
measurably off-policy (use R3, TIS/masking, an fp32 LM head, or the engine's deterministic
kernels). ``OK`` otherwise.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sapo_megatron.losses.policy import sapo_gradient_weight
from sapo_megatron.trainer.mismatch import LOW_GATE

CLIP_LOW, CLIP_HIGH = 0.2, 0.28


@dataclass
class TokenGaps:
    """Per response token, all samples concatenated (``T`` tokens)."""

    replay_T: Tensor  # train - rollout log-prob, the trainer replaying the engine's routes
    live_T: Tensor  # the same with the trainer routing live
    position_T: Tensor  # index in its response (0 = first generated token)
    advantage_T: Tensor  # its sample's advantage

    def __post_init__(self) -> None:
        n = self.replay_T.numel()
        for name in ("live_T", "position_T", "advantage_T"):
            if getattr(self, name).numel() != n:
                raise ValueError(f"TokenGaps.{name} has {getattr(self, name).numel()} tokens, expected {n} "
                                 f"(as replay_T)")


def quantile(x: Tensor, q: float) -> float:
    """The ``q`` quantile of ``x`` as an order statistic (``higher``); nan for no tokens."""
    if x.numel() == 0:
        return math.nan
    return float(torch.quantile(x.double(), q, interpolation="higher"))


def gap_figures(gap_T: Tensor, advantage_T: Tensor, tau_pos: float, tau_neg: float) -> dict[str, float]:
    """|gap| statistics, SAPO half-weight shares and the GRPO clip share of one pass."""
    gap = gap_T.double()
    a = gap.abs()
    ratio = torch.exp(gap)
    adv = advantage_T.double()

    def low(tau: Tensor | float) -> float:
        return float((sapo_gradient_weight(ratio, tau) < LOW_GATE).double().mean()) if gap.numel() else math.nan

    tau_by_sign = torch.where(adv > 0, torch.full_like(gap, tau_pos), torch.full_like(gap, tau_neg))
    clipped = (ratio < 1 - CLIP_LOW) | (ratio > 1 + CLIP_HIGH)
    return {
        "logprob_gap_mean": float(a.mean()) if gap.numel() else math.nan,
        "logprob_gap_p50": quantile(a, 0.5),
        "logprob_gap_p99": quantile(a, 0.99),
        "logprob_gap_max": float(a.max()) if gap.numel() else math.nan,
        "logprob_gap_signed_mean": float(gap.mean()) if gap.numel() else math.nan,
        "gate_low_frac": low(tau_by_sign),
        "gate_low_frac_tau_pos": low(tau_pos),
        "gate_low_frac_tau_neg": low(tau_neg),
        "clip_frac": float(clipped.double().mean()) if gap.numel() else math.nan,
    }


def position_buckets(max_position: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges 0, 1-3, 4-15, 16-63, ... covering ``0..max_position``."""
    edges, start, end = [], 0, 1
    while start <= max_position:
        edges.append((start, end))
        start, end = end, end * 4
    return edges


def by_position(gap_T: Tensor, position_T: Tensor, advantage_T: Tensor, tau_pos: float, tau_neg: float
                ) -> list[dict[str, float]]:
    """:func:`gap_figures` per position bucket (``position_start``, ``position_end``, ``tokens``)."""
    if position_T.numel() == 0:
        return []
    rows = []
    for start, end in position_buckets(int(position_T.max())):
        sel = (position_T >= start) & (position_T < end)
        if sel.any():
            figures = gap_figures(gap_T[sel], advantage_T[sel], tau_pos, tau_neg)
            rows.append({"position_start": start, "position_end": end, "tokens": int(sel.sum()), **figures})
    return rows


def routing_figures(agree_M: Tensor, tokens_M: Tensor, differ: float, counted: float) -> dict:
    """Per-MoE-layer agreement, its mean over layers, and the share of tokens differing somewhere."""
    per_layer = [float(a) / float(t) if t > 0 else math.nan for a, t in zip(agree_M, tokens_M)]
    counted_layers = [v for v in per_layer if not math.isnan(v)]
    return {
        "routing_agreement_mean": sum(counted_layers) / len(counted_layers) if counted_layers else math.nan,
        "routing_agreement_per_layer": per_layer,
        "token_differ_frac": differ / counted if counted else math.nan,
    }


# (verdict, reason, test on the report): first match wins; see the module docstring.
VERDICT_RULES = [
    ("FAIL", "mean |gap| > 0.1 nat: trainer and engine do not compute the same model "
             "(weights, tokenizer, chat template, temperature, conversion)", lambda r: r["logprob_gap_mean"] > 0.1),
    ("FAIL", "median |gap| > 0.05 nat: most tokens disagree (weights or conversion)",
     lambda r: r["logprob_gap_p50"] > 0.05),
    ("WARN", "mean |gap| > 0.02 nat: measurably off-policy before any update", lambda r: r["logprob_gap_mean"] > 0.02),
    ("WARN", "> 1% of tokens outside the GRPO clip range [0.8, 1.28] at ratio = exp(gap)",
     lambda r: r["clip_frac"] > 0.01),
    ("WARN", "> 1% of tokens below SAPO's half gradient weight at ratio = exp(gap)",
     lambda r: r["gate_low_frac"] > 0.01),
    ("WARN", "live routing agrees on < 90% of decisions and the run does not replay routes (use routing.mode=R3)",
     lambda r: r["routing_mode"] != "R3" and r["routing_agreement_mean"] < 0.9),
]


def verdict(report: dict) -> tuple[str, str]:
    """``(OK|WARN|FAIL, reason)`` of a :func:`build_report` dict."""
    if not report["num_tokens"]:
        return "FAIL", "no response tokens were measured (every request aborted?)"
    for level, reason, test in VERDICT_RULES:
        if test(report):
            return level, reason
    return "OK", "the gap is within bf16 noise; train on"


def finite(obj):
    """``obj`` with every NaN or infinite float as ``None``: what a figure of no tokens is, in
    strict JSON (``json.dumps`` would write ``NaN``, which JSON parsers refuse)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def to_json(obj, **kwargs) -> str:
    """Strict JSON of a report or a plot row (no ``NaN``: see :func:`finite`)."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def build_report(gaps: TokenGaps, routing: dict, *, routing_mode: str, tau_pos: float, tau_neg: float) -> dict:
    """The ``--json`` object: headline figures (of ``routing_mode``'s pass), both passes, buckets."""
    passes = {"replay": gaps.replay_T, "live": gaps.live_T}
    detail = {name: gap_figures(g, gaps.advantage_T, tau_pos, tau_neg) for name, g in passes.items()}
    headline = "replay" if routing_mode == "R3" else "live"
    report = {
        "num_tokens": int(gaps.replay_T.numel()),
        "routing_mode": routing_mode,
        "headline_pass": headline,
        **routing,
        **detail[headline],
        "tau_pos": tau_pos,
        "tau_neg": tau_neg,
        "clip_range": [1 - CLIP_LOW, 1 + CLIP_HIGH],
        "replay": detail["replay"],
        "live": detail["live"],
        "by_position": {name: by_position(g, gaps.position_T, gaps.advantage_T, tau_pos, tau_neg)
                        for name, g in passes.items()},
    }
    report["verdict"], report["verdict_reason"] = verdict(report)
    return report


def _f(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def render(report: dict) -> str:
    """The text report."""
    lines = [f"tokens measured: {report['num_tokens']}  (routing mode {report['routing_mode']}: headline = "
             f"{report['headline_pass']} pass)", "",
             "routing, engine vs trainer live (no replay):",
             f"  agreement mean over MoE layers {_f(report['routing_agreement_mean'])}; per layer "
             + " ".join(_f(v) for v in report["routing_agreement_per_layer"]),
             f"  tokens differing in >= 1 layer {_f(report['token_differ_frac'])}", "",
             "train - rollout log-prob          |gap| mean    p50      p99      max   gate<0.5  clip(0.2/0.28)"]
    for name in ("replay", "live"):
        d = report[name]
        lines.append(f"  {name + (' (R3)' if name == 'replay' else ' routing'):<30} {_f(d['logprob_gap_mean']):>9} "
                     f"{_f(d['logprob_gap_p50']):>8} {_f(d['logprob_gap_p99']):>8} {_f(d['logprob_gap_max']):>8} "
                     f"{_f(d['gate_low_frac']):>9} {_f(d['clip_frac']):>9}")
    lines += [f"  (SAPO gate: tau_pos {report['tau_pos']} for A>0, tau_neg {report['tau_neg']} for A<0; all tokens "
              f"at tau_pos {_f(report['gate_low_frac_tau_pos'])}, at tau_neg {_f(report['gate_low_frac_tau_neg'])})",
              "", f"by response position ({report['headline_pass']} pass):",
              "  positions        tokens  |gap| mean      p99   clip"]
    for row in report["by_position"][report["headline_pass"]]:
        span = f"{row['position_start']}-{row['position_end'] - 1}"
        lines.append(f"  {span:<14} {row['tokens']:>8} {_f(row['logprob_gap_mean']):>11} "
                     f"{_f(row['logprob_gap_p99']):>8} {_f(row['clip_frac']):>6}")
    lines += ["", f"verdict: {report['verdict']} - {report['verdict_reason']}"]
    return "\n".join(lines)


def plot_rows(report: dict) -> list[dict]:
    """Rows for ``sapo-megatron plot`` (x = a position bucket's first position): one per bucket."""
    rows = {}
    for name, buckets in report["by_position"].items():
        for b in buckets:
            row = rows.setdefault(b["position_start"], {"step": b["position_start"], "tokens": b["tokens"]})
            row[f"doctor/gap_mean_{name}"] = b["logprob_gap_mean"]
            row[f"doctor/gap_p99_{name}"] = b["logprob_gap_p99"]
            row[f"doctor/clip_frac_{name}"] = b["clip_frac"]
    return [rows[k] for k in sorted(rows)]
