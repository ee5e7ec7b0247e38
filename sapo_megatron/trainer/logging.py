"""Metrics out of the trainer: JSONL (always), TensorBoard and wandb (optional), a progress line.

Each phase of a step (rollout, log-prob passes, updates, weight sync, checkpoint) shows a
progress bar on rank 0 when tqdm is installed; ``metrics.jsonl`` gets one JSON object per step (``step``, ``reward_mean``, the loss and
routing statistics, timings) and is what ``tools/plot_metrics.py`` reads. TensorBoard is used
when ``torch.utils.tensorboard`` can be imported (the ``tensorboard`` package), wandb when
``run.wandb_project`` is set and wandb is installed; its API key comes from the environment
(``WANDB_API_KEY``) and is never written anywhere by us. Only rank 0 logs.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, out_dir: Path, *, enabled: bool, tensorboard: bool = True, progress: bool = True,
                 total_steps: int | None = None, wandb_project: str | None = None, wandb_entity: str | None = None,
                 config: dict | None = None):
        self.enabled = enabled
        self.progress = progress
        self.total = total_steps
        self.start = time.time()
        self.tb = self.wandb = self.file = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(out_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                self.tb = None
        if wandb_project:
            try:
                import wandb

                self.wandb = wandb.init(project=wandb_project, entity=wandb_entity, config=config, dir=str(out_dir))
            except ImportError:
                print("wandb is not installed; logging to JSONL/TensorBoard only", file=sys.stderr)

    @contextlib.contextmanager
    def phase(self, name: str, total: int):
        """A progress bar for one phase of a step (rank 0, on a terminal, tqdm when installed);
        yields ``advance()``. Otherwise a no-op."""
        bar = None
        # Bars only on a terminal: in a log file they would bury the per-step lines.
        if self.enabled and self.progress and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                bar = tqdm(total=total, desc=f"{name:>12}", leave=False, file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                bar = None
        try:
            yield (lambda n=1: bar.update(n)) if bar is not None else (lambda n=1: None)
        finally:
            if bar is not None:
                bar.close()

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}
        self.file.write(json.dumps(clean, sort_keys=True) + "\n")
        self.file.flush()
        step = metrics["step"]
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.progress:
            done = step + 1
            elapsed = time.time() - self.start
            total = f"/{self.total}" if self.total else ""
            keys = ("reward_mean", "loss", "ratio_max", "low_weight_frac", "routing/agreement_mean")
            shown = " ".join(f"{k}={metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), float))
            print(f"[step {done}{total} | {elapsed:.0f}s] {shown}", flush=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
