"""The typed configuration tree of a training run (what ``configs/*.yaml`` map onto).

Design choices:
- Megatron-Core's and our own config classes are wrapped, never re-declared: ``parallel`` IS a
  :class:`ParallelConfig`, ``loss`` subclasses :class:`PolicyLossConfig` (so its validation runs
  unchanged), ``model`` holds a preset name plus :class:`ModelConfig` field overrides, and
  ``model.megatron`` / ``optim.megatron`` pass further ``TransformerConfig`` /
  ``OptimizerConfig`` fields through by name.
- Fixed choices are ``Literal`` annotations; choices backed by a registry (loss type,
  reduction) are checked against the registry when the section is built, so a loss registered
  by user code is accepted.
- Each section checks its own ranges in ``__post_init__`` with the dotted key in the message;
  checks across sections live in ``validate.py``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from sapo_megatron.losses import POLICY_LOSSES, REDUCTIONS, PolicyLossConfig
from sapo_megatron.models.config import PRESETS, ModelConfig, ParallelConfig, preset
from sapo_megatron.step.run import PolicyLossSpec
from sapo_megatron.rollout.base import SamplingParams

RolloutEngineName = Literal["embedded", "sglang"]
AdvantageName = Literal["grpo", "grpo_no_std", "rloo"]
BatchLayout = Literal["padded", "packed"]
RoutingMode = Literal["none", "R2", "R3"]
LRSchedule = Literal["constant", "cosine"]
WeightSync = Literal["disk", "distributed"]


def _check(condition: bool, key: str, expected: str, value: Any) -> None:
    if not condition:
        raise ValueError(f"{key} must be {expected}, got {value!r}")


@dataclass
class RunConfig:
    output_dir: str = "runs/tiny-cpu"
    seed: int = 0
    steps: int = 60
    save_every: int = 20  # 0: no periodic checkpoints
    keep_last: int = 2
    resume: bool = True  # continue from output_dir's latest checkpoint when there is one
    log_every: int = 1
    progress: bool = True
    tensorboard: bool = True
    wandb_project: str | None = None  # None: no wandb
    wandb_entity: str | None = None

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "run.steps", ">= 1", self.steps)
        _check(self.save_every >= 0, "run.save_every", ">= 0 (0 disables checkpoints)", self.save_every)
        _check(self.keep_last >= 1, "run.keep_last", ">= 1", self.keep_last)
        _check(self.log_every >= 1, "run.log_every", ">= 1", self.log_every)
        _check(bool(self.output_dir), "run.output_dir", "a non-empty path", self.output_dir)


# Section keys of `model:`; every other key there is a ModelConfig field.
MODEL_SECTION_KEYS = ("preset", "hf_dir", "ckpt_dir")


@dataclass
class ModelSection:
    """Which model: a preset (or ``hf_dir``'s config.json when ``preset`` is null), with
    :class:`ModelConfig` fields on top; weights from ``ckpt_dir`` or ``hf_dir`` (None: random)."""

    preset: str | None = "tiny-moe"
    hf_dir: str | None = None
    ckpt_dir: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"model.preset must be one of {sorted(PRESETS)} or null, got {self.preset!r}")
        if self.preset is None and self.hf_dir is None and not _complete(self.overrides):
            raise ValueError("model.preset is null: set model.hf_dir (its config.json gives the "
                             "architecture) or a preset")

    def resolve(self) -> ModelConfig:
        if _complete(self.overrides):  # a resolved config saved by a run: nothing to read
            return ModelConfig(**self.overrides)
        if self.preset is not None:
            return preset(self.preset, **self.overrides)
        import json
        from pathlib import Path

        from sapo_megatron.checkpoint.mapping import model_config_from_hf

        config_json = Path(self.hf_dir) / "config.json"
        if not config_json.is_file():
            raise ValueError(f"model.hf_dir: {config_json} does not exist (model.preset is null, so "
                             f"the architecture is read from it)")
        base = model_config_from_hf(json.loads(config_json.read_text()))
        return dataclasses.replace(base, **self.overrides)


def _complete(overrides: dict[str, Any]) -> bool:
    return {f.name for f in dataclasses.fields(ModelConfig)} <= set(overrides)


@dataclass
class LossSection(PolicyLossConfig):
    """The policy loss: every :class:`PolicyLossConfig` field plus what :class:`PolicyLossSpec`
    adds around it (``type`` is the spec's ``loss_type``)."""

    type: str = PolicyLossSpec.loss_type  # a name in sapo_megatron.losses.POLICY_LOSSES
    reduction: str = PolicyLossSpec.reduction  # a name in sapo_megatron.losses.REDUCTIONS
    temperature: float = PolicyLossSpec.temperature
    logprob_chunk_size: int | None = PolicyLossSpec.logprob_chunk_size
    norm_length: int | None = PolicyLossSpec.norm_length

    def validate(self) -> None:
        try:
            super().validate()
        except ValueError as err:
            # PolicyLossConfig names its fields "PolicyLossConfig.x"; here they are "loss.x".
            raise ValueError(re.sub(r"PolicyLossConfig\.(\w+)", r"loss.\1", str(err))) from None
        # Registries are read now, so a loss registered by user code before loading is accepted.
        _check(self.type in POLICY_LOSSES, "loss.type", f"one of {sorted(POLICY_LOSSES)}", self.type)
        _check(self.reduction in REDUCTIONS, "loss.reduction", f"one of {sorted(REDUCTIONS)}", self.reduction)
        _check(self.temperature > 0, "loss.temperature", "> 0", self.temperature)
        for name in ("logprob_chunk_size", "norm_length"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"loss.{name}", ">= 1 or null", value)

    def policy_loss_config(self) -> PolicyLossConfig:
        names = [f.name for f in dataclasses.fields(PolicyLossConfig)]
        return PolicyLossConfig(**{name: getattr(self, name) for name in names})

    def to_spec(self) -> PolicyLossSpec:
        return PolicyLossSpec(
            loss_type=self.type,
            reduction=self.reduction,
            config=self.policy_loss_config(),
            temperature=self.temperature,
            logprob_chunk_size=self.logprob_chunk_size,
            norm_length=self.norm_length,
        )


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    clip_grad: float = 1.0  # 0: no clipping (Megatron-Core's convention)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: LRSchedule = "constant"
    min_lr: float = 0.0  # the cosine schedule's floor
    # Further Megatron-Core OptimizerConfig fields (use_distributed_optimizer,
    # optimizer_cpu_offload, ...), passed through verbatim.
    megatron: dict[str, Any] = field(
        default_factory=dict, metadata={"passthrough": "megatron.core.optimizer.OptimizerConfig"})

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", "> 0", self.lr)
        _check(self.weight_decay >= 0, "optim.weight_decay", ">= 0", self.weight_decay)
        _check(self.clip_grad >= 0, "optim.clip_grad", ">= 0 (0 disables clipping)", self.clip_grad)
        for name in ("adam_beta1", "adam_beta2"):
            _check(0 <= getattr(self, name) < 1, f"optim.{name}", "in [0, 1)", getattr(self, name))
        _check(self.adam_eps > 0, "optim.adam_eps", "> 0", self.adam_eps)
        _check(self.warmup_steps >= 0, "optim.warmup_steps", ">= 0", self.warmup_steps)
        _check(0 <= self.min_lr <= self.lr, "optim.min_lr", f"in [0, optim.lr={self.lr}]", self.min_lr)


@dataclass
class SGLangSection:
    urls: list[str] = field(default_factory=list)  # http://host:port of each server
    # The NAME of the environment variable holding the API key; the key never enters a config.
    api_key_env: str = "SGLANG_API_KEY"
    concurrency: int = 64  # requests in flight, all servers together
    timeout_s: float = 600.0
    retries: int = 3
    backoff_s: float = 1.0
    weight_sync: WeightSync = "disk"
    # Where `disk` sync writes HF safetensors; must be readable by every server (a shared
    # filesystem across nodes). None: <run.output_dir>/weights.
    weight_dir: str | None = None
    # The NCCL group of `distributed` sync (None: the trainer's rank-0 host / a free port).
    nccl_master_addr: str | None = None
    nccl_master_port: int | None = None

    def __post_init__(self) -> None:
        for url in self.urls:
            _check(re.match(r"^https?://[^/\s]+", url) is not None, "rollout.sglang.urls",
                   "a list of http(s)://host:port addresses", url)
        _check(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env) is not None,
               "rollout.sglang.api_key_env", "the NAME of an environment variable (never the key)",
               "<redacted>")
        _check(self.concurrency >= 1, "rollout.sglang.concurrency", ">= 1", self.concurrency)
        _check(self.timeout_s > 0, "rollout.sglang.timeout_s", "> 0", self.timeout_s)
        _check(self.retries >= 0, "rollout.sglang.retries", ">= 0", self.retries)
        _check(self.backoff_s >= 0, "rollout.sglang.backoff_s", ">= 0", self.backoff_s)
        port = self.nccl_master_port
        _check(port is None or 0 < port < 65536, "rollout.sglang.nccl_master_port", "a TCP port", port)


@dataclass
class DynamicSamplingSection:
    """Drop prompt groups the loss cannot learn from and over-sample to refill the batch.

    ``filter``: a name in :data:`sapo_megatron.rollout.dynamic.GROUP_FILTERS` (``zero_variance``:
    every completed sample of the group has the same reward, so every advantage is 0), or null
    (off). ``max_rounds``: generation rounds per step at most, the first included.
    """

    filter: str | None = None
    max_rounds: int = 3

    def __post_init__(self) -> None:
        from sapo_megatron.rollout.dynamic import GROUP_FILTERS

        _check(self.filter is None or self.filter in GROUP_FILTERS, "rollout.dynamic_sampling.filter",
               f"one of {sorted(GROUP_FILTERS)} or null", self.filter)
        _check(self.max_rounds >= 1, "rollout.dynamic_sampling.max_rounds", ">= 1", self.max_rounds)


@dataclass
class RolloutConfig:
    engine: RolloutEngineName = "embedded"
    prompts_per_step: int = 16
    samples_per_prompt: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 8
    sglang: SGLangSection = field(default_factory=SGLangSection)
    dynamic_sampling: DynamicSamplingSection = field(default_factory=DynamicSamplingSection)
    # Policy versions (RL steps) a sample may lag the trainer by; 0: the synchronous loop.
    max_staleness: int = 0

    def __post_init__(self) -> None:
        _check(self.prompts_per_step >= 1, "rollout.prompts_per_step", ">= 1", self.prompts_per_step)
        _check(self.max_staleness >= 0, "rollout.max_staleness", ">= 0 (0: synchronous rollouts)", self.max_staleness)
        _check(self.samples_per_prompt >= 1, "rollout.samples_per_prompt", ">= 1", self.samples_per_prompt)
        try:
            self.sampling_params()
        except ValueError as err:
            raise ValueError(f"rollout: {err}") from None

    def sampling_params(self, *, stop_token_ids: tuple[int, ...] = (), seed: int | None = None) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p,
                              max_new_tokens=self.max_new_tokens, stop_token_ids=stop_token_ids, seed=seed)


@dataclass
class TrainSection:
    # Samples per microbatch (packed layout: per packed row group); null with a token budget.
    micro_batch_size: int | None = 8
    # The alternative: microbatches packed under this many tokens each (padding included in the
    # padded layout), samples balanced over DP ranks by tokens. Exactly one of the two is set.
    max_tokens_per_microbatch: int | None = None
    # Balancing cost of a sample of L tokens: L + balance_quadratic_coef * L^2 (attention).
    balance_quadratic_coef: float = 0.0
    updates_per_rollout: int = 2  # optimizer steps (minibatches) per rollout batch
    layout: BatchLayout = "padded"
    advantage: AdvantageName = "grpo"
    use_reference_model: bool = False
    # Old log-probs from the rollout engine instead of the trainer's own forward pass.
    use_rollout_log_probs: bool = False

    def __post_init__(self) -> None:
        if (self.micro_batch_size is None) == (self.max_tokens_per_microbatch is None):
            raise ValueError(
                f"exactly one of train.micro_batch_size and train.max_tokens_per_microbatch must be set, got "
                f"{self.micro_batch_size!r} and {self.max_tokens_per_microbatch!r} (with a token budget, set "
                f"train.micro_batch_size=null)")
        _check(self.micro_batch_size is None or self.micro_batch_size >= 1, "train.micro_batch_size", ">= 1",
               self.micro_batch_size)
        _check(self.max_tokens_per_microbatch is None or self.max_tokens_per_microbatch >= 1,
               "train.max_tokens_per_microbatch", ">= 1", self.max_tokens_per_microbatch)
        _check(self.balance_quadratic_coef >= 0, "train.balance_quadratic_coef", ">= 0", self.balance_quadratic_coef)
        _check(self.updates_per_rollout >= 1, "train.updates_per_rollout", ">= 1", self.updates_per_rollout)


@dataclass
class RoutingConfig:
    # R2: replay the trainer's own old-policy routes; R3: replay the rollout engine's routes.
    mode: RoutingMode = "none"


@dataclass
class TaskSection:
    name: str = "arithmetic"
    path: str | None = None  # prompt set (JSONL / Parquet) for file-backed tasks
    format: str | None = None  # e.g. gsm8k, dapo_math, aime; None: inferred by the task
    reward_fn: str | None = None  # "package.module:function" replacing the task's reward
    options: dict[str, Any] = field(default_factory=dict)  # task-specific, passed through

    def __post_init__(self) -> None:
        if self.reward_fn is not None:
            _check(re.fullmatch(r"[\w.]+:[\w.]+", self.reward_fn) is not None, "task.reward_fn",
                   "an import path 'package.module:function'", self.reward_fn)


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainSection = field(default_factory=TrainSection)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    task: TaskSection = field(default_factory=TaskSection)
