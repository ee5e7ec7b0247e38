"""Metrics out of the trainer: JSONL (always), TensorBoard and wandb (optional), a progress line.

Each phase of a step (rollout, log-prob passes, updates, weight sync, checkpoint) shows a tqdm
bar on rank 0 when stderr is a terminal; in a batch log (not a TTY) only the one-line step
summary is printed. ``metrics.jsonl`` gets one JSON object per step (``step``, ``reward_mean``,
the loss and routing statistics, timings) and is what ``sapo-megatron plot`` reads. TensorBoard
is used when ``torch.utils.tensorboard`` can be imported (the ``tensorboard`` package), wandb
when ``run.wandb_project`` is set and wandb is installed. wandb gets the run's resolved config
with secrets redacted (``sapo_megatron.config.redact``); its API key comes from the environment
(``WANDB_API_KEY``) and is never written anywhere by us. Only rank 0 logs.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm


def wandb_config(config: Any) -> dict | None:
    """The config as wandb should see it: resolved, secrets redacted. Takes a ``TrainConfig``
    or an already plain mapping (redacted again: redaction is idempotent)."""
    if config is None:
        return None
    from sapo_megatron.config import config_to_dict, redact

    return redact(dict(config) if isinstance(config, Mapping) else config_to_dict(config, resolved=True))


class MetricsLogger:
    def __init__(self, out_dir: Path, *, enabled: bool, tensorboard: bool = True, progress: bool = True,
                 total_steps: int | None = None, wandb_project: str | None = None, wandb_entity: str | None = None,
                 config: Any = None):
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

                self.wandb = wandb.init(project=wandb_project, entity=wandb_entity, config=wandb_config(config),
                                        dir=str(out_dir))
            except ImportError:
                print("wandb is not installed; logging to JSONL/TensorBoard only", file=sys.stderr)

    @contextlib.contextmanager
    def phase(self, name: str, total: int):
        """A tqdm bar for one phase of a step; yields ``advance(n=1)``. Shown on rank 0 only, and
        only on a terminal (``disable=None``: off when stderr is not a TTY), because in a batch
        log the bars would bury the per-step lines."""
        bar = tqdm(total=total, desc=f"{name:>12}", leave=False, file=sys.stderr, dynamic_ncols=True,
                   disable=None if (self.enabled and self.progress) else True)
        try:
            yield bar.update
        finally:
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
            keys = ("sft_loss", "reward_mean", "exact_frac", "loss", "ratio_max", "low_weight_frac",
                    "routing/agreement_mean")
            shown = " ".join(f"{k}={metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), float))
            print(f"[step {done}{total} | {elapsed:.0f}s] {shown}", flush=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
