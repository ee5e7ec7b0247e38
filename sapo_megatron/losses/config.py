"""Configuration of the policy-gradient loss (SAPO and its clip-based baselines).

Design choices:
- One flat dataclass shared by every registered loss: each loss reads the fields it needs
  (``tau_*`` for SAPO, ``eps_*`` for clip losses), so switching ``loss_type`` never needs a
  different config object, and a YAML section maps onto it one to one.
- Validation runs in ``__post_init__`` AND again in ``compute_policy_loss`` (``validate()`` is
  pure Python, no tensors), so a field mutated after construction cannot reach the math
  unchecked. Errors name the field and the value.
- ``dual_clip_c=None`` means "3.0 when the loss is dual_clip" (the common default in verl and
  Ye et al. 2020); ``eps_clip_high=None`` means symmetric clipping.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from .kl import KL_PENALTIES

DEFAULT_DUAL_CLIP_C = 3.0


@dataclass
class PolicyLossConfig:
    key_prefix: ClassVar[str] = "PolicyLossConfig"  # how errors name the fields
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    eps_clip: float = 0.2
    eps_clip_high: float | None = None
    dual_clip_c: float | None = None
    log_ratio_clamp: float = 20.0
    kl_coef: float = 0.0
    kl_type: str = "low_var_kl"
    entropy_coef: float = 0.0
    tis_cap: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        # `not (x > 0)` rather than `x <= 0` so that NaN is rejected too.
        positive = {"tau_pos": self.tau_pos, "tau_neg": self.tau_neg, "eps_clip": self.eps_clip,
                    "log_ratio_clamp": self.log_ratio_clamp}
        for field in ("eps_clip_high", "tis_cap"):
            if getattr(self, field) is not None:
                positive[field] = getattr(self, field)
        for field, value in positive.items():
            if not _is_real(value) or not value > 0 or math.isinf(value):
                raise ValueError(f"{self.key_prefix}.{field} must be a finite number > 0, got {value!r}")
        if self.dual_clip_c is not None and (not _is_real(self.dual_clip_c) or not 1 < self.dual_clip_c < math.inf):
            raise ValueError(f"{self.key_prefix}.dual_clip_c must be a finite number > 1, got {self.dual_clip_c!r}")
        if not _is_real(self.kl_coef) or not 0 <= self.kl_coef < math.inf:
            raise ValueError(f"{self.key_prefix}.kl_coef must be a finite number >= 0, got {self.kl_coef!r}")
        if not _is_real(self.entropy_coef) or not math.isfinite(self.entropy_coef):
            raise ValueError(f"{self.key_prefix}.entropy_coef must be a finite number, got {self.entropy_coef!r}")
        if self.kl_type not in KL_PENALTIES:
            raise ValueError(f"{self.key_prefix}.kl_type must be one of {sorted(KL_PENALTIES)}, got {self.kl_type!r}")

    @property
    def eps_high(self) -> float:
        return self.eps_clip if self.eps_clip_high is None else self.eps_clip_high

    @property
    def dual_clip_constant(self) -> float:
        return DEFAULT_DUAL_CLIP_C if self.dual_clip_c is None else self.dual_clip_c


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
