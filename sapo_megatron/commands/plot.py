"""``sapo-megatron plot``: a run's training curves from its ``metrics.jsonl`` (also ``tools/plot_metrics.py``).

    sapo-megatron plot runs/tiny-cpu/metrics.jsonl --out docs/img
    sapo-megatron plot runs/a/metrics.jsonl runs/b/metrics.jsonl --label sapo grpo --out plots
    sapo-megatron plot runs/*/seed*/metrics.jsonl --group-by parent --out plots

One PNG per panel (reward, exact-answer rate, SAPO gate statistics, train/rollout log-prob difference, routing
agreement, ratio spread, grad norm, loss, entropy; and ``sapo-megatron doctor``'s gap by response
position, from its ``doctor_positions.jsonl``); a panel whose keys no file has is skipped,
and a key missing from some steps leaves a gap. Several files are overlaid, one line each.
``--group-by`` averages runs that share a label (e.g. seeds of one ablation arm) and draws the
mean with a +-1 std band; the label comes from ``--label`` or from the file path (``parent``:
the run directory's parent, e.g. ``runs/sapo/seed1/metrics.jsonl`` -> ``sapo``).

Needs matplotlib (``pip install -e ".[plot]"``); the rest of the package does not.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

from sapo_megatron.jsonl import JSONLineError, json_lines

# (file name, title, [(key, legend suffix)], y label[, x label (default "step")])
PANELS = [
    ("reward", "Mean reward", [("reward_mean", "")], "reward"),
    ("exact_frac", "Exact-answer rate", [("exact_frac", "")], "fraction"),
    ("sapo_gate", "SAPO gate", [("gate_mean_pos", "gate A>0"), ("gate_mean_neg", "gate A<0"),
                                ("low_weight_frac", "low-weight frac")], "value"),
    ("logprob_diff", "Train vs rollout log-prob |diff|", [("train_rollout_logprob_abs_diff", ""),
                                                          ("train_rollout_logprob_abs_diff_live", "live routing")],
     "nats/token"),
    ("routing_agreement", "Routing agreement (train vs rollout)", [("routing/agreement_mean", "under replay"),
                                                                   ("routing/live_agreement_mean", "without replay")],
     "fraction"),
    ("routing_live", "Routing without replay (engine vs trainer)",
     [("routing/live_agreement_moe0", "agree MoE 0"), ("routing/live_agreement_moe1", "agree MoE 1"),
      ("routing/live_token_differ_frac", "tokens differing in >= 1 layer")], "fraction"),
    ("ratio", "Importance ratio spread", [("ratio_min", "min"), ("ratio_mean", "mean"),
                                          ("ratio_max", "max")], "ratio"),
    ("grad_norm", "Gradient norm", [("grad_norm", "")], "norm"),
    ("loss", "Loss", [("loss", ""), ("sft_loss", "cold-start NLL")], "loss"),
    ("entropy", "Entropy", [("entropy", "")], "nats/token"),
    # sapo-megatron doctor's doctor_positions.jsonl: one row per response-position bucket.
    ("doctor_gap_by_position", "Train/inference |log-prob gap| by response position",
     [("doctor/gap_mean_replay", "mean, R3 replay"), ("doctor/gap_mean_live", "mean, live routing"),
      ("doctor/gap_p99_replay", "p99, R3 replay"), ("doctor/gap_p99_live", "p99, live routing")],
     "nats/token", "response position (first of a bucket: 0, 1-3, 4-15, ...)"),
]


class MetricsError(ValueError):
    pass


def read_metrics(path: Path) -> list[dict]:
    rows = []
    try:
        for number, row in json_lines(path):
            if not isinstance(row, dict):
                raise MetricsError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    except JSONLineError as err:
        raise MetricsError(f"{path}:{err.lineno}: not a JSON object ({err.msg}): {err.line.strip()[:80]!r}") from None
    return rows


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) where ``key`` holds a finite number; the step defaults to the line index."""
    xs, ys = [], []
    for index, row in enumerate(rows):
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(row.get("step", index))
            ys.append(float(value))
    return xs, ys


def group_label(path: Path, how: str) -> str:
    if how == "parent":  # runs/<arm>/<seed>/metrics.jsonl -> <arm>
        return path.parent.parent.name or str(path.parent)
    if how == "dir":  # runs/<run>/metrics.jsonl -> <run>
        return path.parent.name
    raise ValueError(how)


def mean_std(curves: list[tuple[list[float], list[float]]]) -> tuple[list[float], list[float], list[float]]:
    """Per-step mean and std over the curves that have that step."""
    by_step: dict[float, list[float]] = defaultdict(list)
    for xs, ys in curves:
        for x, y in zip(xs, ys):
            by_step[x].append(y)
    steps = sorted(by_step)
    means = [sum(by_step[s]) / len(by_step[s]) for s in steps]
    stds = [math.sqrt(sum((v - m) ** 2 for v in by_step[s]) / len(by_step[s])) for s, m in zip(steps, means)]
    return steps, means, stds


def plot(runs: list[tuple[str, list[dict]]], out: Path, *, grouped: bool) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, title, keys, ylabel, *xlabel in PANELS:
        fig, ax = plt.subplots(figsize=(7, 4))
        drawn = 0
        labels = list(dict.fromkeys(label for label, _ in runs))
        for label in labels:
            members = [rows for run_label, rows in runs if run_label == label]
            for key, suffix in keys:
                full = " ".join(part for part in (label, suffix) if part)
                if grouped:
                    curves = [c for c in (series(rows, key) for rows in members) if c[0]]
                    if not curves:
                        continue
                    steps, means, stds = mean_std(curves)
                    line, = ax.plot(steps, means, label=f"{full} (n={len(curves)})")
                    ax.fill_between(steps, [m - s for m, s in zip(means, stds)],
                                    [m + s for m, s in zip(means, stds)], color=line.get_color(), alpha=0.2)
                    drawn += 1
                else:
                    for rows in members:
                        xs, ys = series(rows, key)
                        if xs:
                            ax.plot(xs, ys, label=full or key)
                            drawn += 1
        if drawn:
            ax.set_title(title)
            ax.set_xlabel(xlabel[0] if xlabel else "step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = out / f"{name}.png"
            fig.savefig(path, dpi=110)
            written.append(path)
        plt.close(fig)
    return written


EPILOG = """examples:
  sapo-megatron plot runs/a/metrics.jsonl --out runs/a/plots
  sapo-megatron plot runs/a/metrics.jsonl runs/b/metrics.jsonl --label sapo grpo --out plots
  sapo-megatron plot runs/*/seed*/metrics.jsonl --group-by parent --out plots   # mean +- std over seeds

One PNG per panel (reward, SAPO gates, log-prob diff, routing agreement, ratios, grad norm,
loss, entropy); panels whose keys no file has are skipped. Needs matplotlib (the [plot] extra)."""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Draw training curves from metrics.jsonl files.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, help="metrics.jsonl files")
    parser.add_argument("--out", type=Path, required=True, help="directory for the PNGs")
    parser.add_argument("--label", nargs="+", help="one label per file (default: the run directory)")
    parser.add_argument("--group-by", choices=["label", "parent", "dir"],
                        help="average runs sharing a label: 'label' uses --label, 'parent' / 'dir' "
                             "the run directory's parent / the run directory")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    name = parser.prog
    if args.label and len(args.label) != len(args.files):
        parser.error(f"--label has {len(args.label)} labels for {len(args.files)} files")
    if args.group_by == "label" and not args.label:
        parser.error("--group-by label needs --label")
    runs = []
    for i, path in enumerate(args.files):
        if not path.is_file():
            print(f"{name}: {path} does not exist", file=sys.stderr)
            return 2
        try:
            rows = read_metrics(path)
        except MetricsError as err:
            print(f"{name}: {err}", file=sys.stderr)
            return 2
        if args.group_by in ("parent", "dir"):
            label = group_label(path, args.group_by)
        elif args.label:
            label = args.label[i]
        else:
            label = path.parent.name if len(args.files) > 1 else ""
        runs.append((label, rows))
    written = plot(runs, args.out, grouped=args.group_by is not None)
    if not written:
        print(f"{name}: none of the known metrics are in these files", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0
