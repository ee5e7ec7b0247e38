"""The rollout-engine interface the trainer talks to (embedded CPU engine, SGLang over HTTP).

An engine turns prompts (token ids) into responses with the engine's own token log-probs and,
when asked, the MoE routes it used, already decoded into our compact form
(``[prompt + response - 1, num_moe_layers, top_k]``, uint8/int16: see
``sapo_megatron.routing``). It also receives the trainer's new weights after every update.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch


@dataclass
class SamplingParams:
    """One request's sampling; the config's ``rollout:`` section subclasses it (one definition)."""

    key_prefix: ClassVar[str] = "sampling"  # how errors name the fields ("rollout" in a config)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        # `not (x > 0)` rather than `x <= 0` so that NaN is rejected too.
        if not self.temperature > 0:
            raise ValueError(f"{self.key_prefix}.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{self.key_prefix}.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"{self.key_prefix}.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class RouteSpec:
    """What is needed to decode an engine's routes into the trainer's MoE-layer axis."""

    num_hidden_layers: int
    topk: int
    num_experts: int
    moe_layers: list[int]  # global indices of MoE layers (dense layers are mapped out)


@dataclass
class RolloutResult:
    prompt_ids: list[int]
    response_ids: list[int]
    # The engine's log-prob of each response token (after temperature, before top-p).
    response_log_probs: list[float]
    finish_reason: str  # "stop" | "length" | "abort"
    # [len(prompt) + len(response) - 1, num_moe_layers, topk], compact dtype; None if not asked.
    routes: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)
    # Multi-turn episodes (rollout/episodes.py): True for the model's response tokens, False for
    # the environment's; None: every response token is the model's.
    response_mask: list[bool] | None = None

    @property
    def model_tokens(self) -> int:
        """The response tokens the model wrote (an episode's environment tokens left out)."""
        return len(self.response_ids) if self.response_mask is None else sum(self.response_mask)


class RolloutEngine(Protocol):
    """What the trainer needs from a rollout engine."""

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, *, return_routes: bool,
        routes_start: list[int] | None = None,
    ) -> list[RolloutResult]:
        """One result per prompt, in order (a failed request: finish_reason "abort").
        ``routes_start[i]``: prompt ``i``'s routes start at that token (SGLang's
        ``routed_experts_start_len``): ``len(prompt + response) - 1 - start`` rows."""

    def update_weights(self, model_chunks, version: int) -> None:
        """Make the engine serve the trainer's current weights as policy ``version`` (the number
        of RL steps completed; SGLang's ``weight_version``), and flush its caches."""

    def close(self) -> None:
        ...
