"""The typed configuration tree of a training run (what ``configs/*.yaml`` map onto).

Design choices:
- Megatron-Core's and our own config classes are wrapped, never re-declared: ``parallel`` IS a
  :class:`ParallelConfig`, ``loss`` IS the step's :class:`PolicyLossSpec`, ``rollout``
  subclasses the engines' :class:`SamplingParams`, ``model`` is a preset name plus every
  :class:`ModelConfig` field as an optional override (generated from ModelConfig, so a field
  added there is accepted here), and ``model.megatron`` / ``optim.megatron`` pass further
  ``TransformerConfig`` / ``OptimizerConfig`` fields through by name.
- The tree is an OmegaConf structured-config schema (``io.py`` loads onto it), so every field
  needs a type OmegaConf understands: ``int``, ``float``, ``bool``, ``str``, ``Literal[...]``,
  ``X | None``, ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]``, ``Any`` or another such
  dataclass; a default (``field(default_factory=...)`` for containers); no ``InitVar``.
- Fixed choices are ``Literal`` annotations; choices backed by a registry (loss type,
  reduction) are checked against the registry when the section is built, so a loss registered
  by user code is accepted.
- Each section checks its own ranges in ``__post_init__`` with the dotted key in the message
  (``OmegaConf.to_object`` runs them); checks across sections live in ``validate.py``.
- A pass-through ``dict`` field names its upstream dataclass in ``metadata={"passthrough":
  "module.Class"}``; its keys are checked against that class's fields when a config is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

from sapo_megatron.models.config import PRESETS, ModelConfig, ParallelConfig, preset
from sapo_megatron.step.run import PolicyLossSpec
from sapo_megatron.rollout.base import SamplingParams
# The SGLang section is the client's own config class (validated once, in one place).
from sapo_megatron.rollout.sglang.config import SGLangConfig as SGLangSection

RolloutEngineName = Literal["embedded", "sglang", "recorded"]
AdvantageName = Literal["grpo", "grpo_no_std", "rloo"]
BatchLayout = Literal["padded", "packed"]
RoutingMode = Literal["none", "R2", "R3"]
LRSchedule = Literal["constant", "linear", "cosine"]  # Megatron's lr_decay_style names


def _check(condition: bool, key: str, expected: str, value: Any) -> None:
    if not condition:
        raise ValueError(f"{key} must be {expected}, got {value!r}")


_PROCESS_GROUP_DEFAULT_S = 1800.0  # torch's and Megatron's collective timeout
_PROCESS_GROUP_MARGIN_S = 300.0  # what a collective may wait beyond the longest phase limit


@dataclass
class TimeoutsSection:
    """The hang guard (``trainer/watchdog.py``): how long each phase of the loop may go without
    progress before its rank reports the phase and exits, and a heartbeat; null turns one off.

    ``step_s``: the step's collectives (log-prob passes, updates, metrics, the reductions between
    phases; one cold-start step). ``rollout_s``: one rollout round, scoring included (an async
    collect, submit or drain). ``checkpoint_s``: a save, a resume, the initial weights.
    ``weight_sync_s``: one sync of the weights to the rollout engine. ``heartbeat_s``: every rank
    logs its phase this often (null: never). A torch process group's own timeout is raised to
    outlast them (:meth:`process_group_s`), so the guard, which names the phase, answers first.
    """

    step_s: float | None = 600.0
    rollout_s: float | None = 1800.0
    checkpoint_s: float | None = 1800.0
    weight_sync_s: float | None = 2400.0  # above rollout.sglang.weight_timeout_s: its error comes first
    heartbeat_s: float | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _check(value is None or (isinstance(value, (int, float)) and math.isfinite(value) and value > 0),
                   f"run.timeouts.{f.name}", "a number of seconds > 0, or null (off)", value)

    def process_group_s(self) -> float:
        """The torch / Megatron process-group timeout: never below their 30-minute default, and
        a margin above the longest phase limit, so that a peer waiting in a collective while a
        rank spends its allowed time in a phase is not stopped by torch first."""
        limits = [v for v in (self.step_s, self.rollout_s, self.checkpoint_s, self.weight_sync_s) if v is not None]
        return max([_PROCESS_GROUP_DEFAULT_S] + [v + _PROCESS_GROUP_MARGIN_S for v in limits])


@dataclass
class RunConfig:
    output_dir: str = "runs/tiny-cpu"
    seed: int = 0
    steps: int = 60
    save_every: int = 20  # 0: no periodic checkpoints (the final one is still written)
    keep_last: int = 2
    resume: bool = True  # continue from output_dir's latest checkpoint when there is one
    # Write checkpoint tensors in a background process; published when the write completes.
    async_save: bool = False
    progress: bool = True
    tensorboard: bool = True
    wandb_project: str | None = None  # None: no wandb
    wandb_entity: str | None = None
    timeouts: TimeoutsSection = field(default_factory=TimeoutsSection)

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "run.steps", ">= 1", self.steps)
        _check(self.save_every >= 0, "run.save_every", ">= 0 (0: only the final checkpoint)", self.save_every)
        _check(self.keep_last >= 1, "run.keep_last", ">= 1", self.keep_last)
        _check(bool(self.output_dir), "run.output_dir", "a non-empty path", self.output_dir)


# Section keys of `model:`; every other key there is a ModelConfig field.
MODEL_SECTION_KEYS = ("preset", "hf_dir", "ckpt_dir")
TRANSFORMER_CONFIG = "megatron.core.transformer.TransformerConfig"


@dataclass
class _ModelSource:
    preset: str | None = "tiny-moe"
    hf_dir: str | None = None
    ckpt_dir: str | None = None

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"model.preset must be one of {sorted(PRESETS)} or null, got {self.preset!r}")
        if self.preset is None and self.hf_dir is None and not _complete(self.overrides):
            raise ValueError("model.preset is null: set model.hf_dir (its config.json gives the "
                             "architecture) or a preset")

    @property
    def overrides(self) -> dict[str, Any]:
        """The :class:`ModelConfig` fields this section sets (null: from the preset / hf_dir)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)
                if getattr(self, f.name) is not None}

    def resolve(self) -> ModelConfig:
        overrides = self.overrides
        if _complete(overrides):  # a resolved config saved by a run: nothing to read
            return ModelConfig(**overrides)
        if self.preset is not None:
            return preset(self.preset, **overrides)
        import json
        from pathlib import Path

        from sapo_megatron.checkpoint.mapping import model_config_from_hf

        config_json = Path(self.hf_dir) / "config.json"
        if not config_json.is_file():
            raise ValueError(f"model.hf_dir: {config_json} does not exist (model.preset is null, so "
                             f"the architecture is read from it)")
        base = model_config_from_hf(json.loads(config_json.read_text()))
        return dataclasses.replace(base, **overrides)


def _required_model_fields() -> set[str]:
    hints = typing.get_type_hints(ModelConfig)
    return {name for name, hint in hints.items() if type(None) not in typing.get_args(hint)}


def _complete(overrides: dict[str, Any]) -> bool:
    # Every field that cannot be null is set: the section is a whole ModelConfig.
    return _required_model_fields() <= set(overrides)


def _model_section() -> type:
    """``model:``: the source keys plus every :class:`ModelConfig` field as ``X | None = None``
    (None: the preset's / hf_dir's value). Generated, so it follows ModelConfig's fields."""
    hints = typing.get_type_hints(ModelConfig)
    fields = []
    for f in dataclasses.fields(ModelConfig):
        metadata = {"passthrough": TRANSFORMER_CONFIG} if f.name == "megatron" else f.metadata
        fields.append((f.name, Optional[hints[f.name]], field(default=None, metadata=metadata)))
    cls = dataclasses.make_dataclass("ModelSection", fields, bases=(_ModelSource,))
    cls.__module__, cls.__qualname__ = __name__, "ModelSection"
    cls.__doc__ = ("Which model: a preset (or ``hf_dir``'s config.json when ``preset`` is null), "
                   "with :class:`ModelConfig` fields on top; weights from ``ckpt_dir`` or ``hf_dir`` "
                   "(None: random).")
    return cls


ModelSection = _model_section()


# The policy loss: the step's own spec (PolicyLossConfig's fields plus type, reduction,
# temperature, ...), validated once, in its __post_init__, with "loss.x" in its messages.
LossSection = PolicyLossSpec


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    clip_grad: float = 1.0  # 0: no clipping (Megatron-Core's convention)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    # Megatron's OptimizerParamScheduler, stepped once per optimizer step (train.updates_per_rollout
    # per RL step); warm-up and decay lengths count optimizer steps (docs/trainer.md).
    warmup_steps: int = 0  # linear warm-up from init_lr to lr over this many optimizer steps
    init_lr: float = 0.0  # the warm-up's first value (Megatron's lr_warmup_init)
    lr_schedule: LRSchedule = "constant"
    min_lr: float = 0.0  # the decay's floor (linear / cosine)
    decay_steps: int | None = None  # optimizer steps to reach min_lr; None: the whole run
    # Resuming with changed lr / min_lr / warmup / decay / schedule / weight decay is refused
    # unless this is true; then the config's schedule applies from the checkpoint's step on.
    override_scheduler_on_resume: bool = False
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
        _check(0 <= self.init_lr <= self.lr, "optim.init_lr", f"in [0, optim.lr={self.lr}]", self.init_lr)
        _check(self.decay_steps is None or self.decay_steps >= 1, "optim.decay_steps",
               ">= 1 or null (null: the run's optimizer steps)", self.decay_steps)


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
class EmbeddedSection:
    """How the embedded engine differs from the trainer (rollout/engine_copy.py says why).

    ``dtype``: the precision the engine's model copy computes in (``fp32``: as the trainer;
    ``bf16``: weights and activations, as a bf16 inference engine). ``router_noise_std``:
    the standard deviation of gaussian noise added to the engine copy's MoE router logits
    (never the trainer's), a stand-in for kernel and batch-shape differences; 0: off.
    """

    dtype: str = "fp32"
    router_noise_std: float = 0.0

    def __post_init__(self) -> None:
        from sapo_megatron.rollout.engine_copy import ENGINE_DTYPES

        _check(self.dtype in ENGINE_DTYPES, "rollout.embedded.dtype", f"one of {sorted(ENGINE_DTYPES)}", self.dtype)
        _check(isinstance(self.router_noise_std, (int, float)) and math.isfinite(self.router_noise_std)
               and self.router_noise_std >= 0, "rollout.embedded.router_noise_std", "a finite float >= 0 (0: off)",
               self.router_noise_std)


@dataclass
class RolloutConfig(SamplingParams):
    """The rollout engine and batch, plus the engines' :class:`SamplingParams` (temperature,
    top_p, max_new_tokens, stop_token_ids, seed) as fields of this section: declared and
    checked once, there."""

    key_prefix: ClassVar[str] = "rollout"
    max_new_tokens: int = 8
    engine: RolloutEngineName = "embedded"
    prompts_per_step: int = 16
    samples_per_prompt: int = 8
    sglang: SGLangSection = field(default_factory=SGLangSection)
    dynamic_sampling: DynamicSamplingSection = field(default_factory=DynamicSamplingSection)
    embedded: EmbeddedSection = field(default_factory=EmbeddedSection)
    # Policy versions (RL steps) a sample may lag the trainer by; 0: the synchronous loop.
    max_staleness: int = 0
    # Model turns per episode of a multi-turn task (task.name: calculator; rollout/episodes.py).
    # max_new_tokens bounds each turn. 1 with a single-turn task: one response per prompt.
    max_turns: int = 1
    # engine=recorded: rollouts saved earlier (sapo-megatron doctor --out D writes D/rollouts.pt).
    recorded_path: str | None = None
    # Partial rollouts (trainer/partial.py, SGLang >= 0.5.19, max_staleness >= 1): generation runs
    # across weight updates, each token's version from SGLang's spans. partial_pause: in_place
    # (servers need --disable-radix-cache) | retract (prefix tokens of retracted responses are
    # masked under R3); partial_offpolicy: tis (needs loss.tis_cap) | mask (tokens before a
    # response's newest version leave the loss).
    partial: bool = False
    partial_pause: Literal["in_place", "retract"] = "in_place"
    partial_offpolicy: Literal["tis", "mask"] = "tis"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.engine != "recorded" or bool(self.recorded_path), "rollout.recorded_path",
               "a rollout recording (rollout.engine=recorded)", self.recorded_path)
        _check(self.prompts_per_step >= 1, "rollout.prompts_per_step", ">= 1", self.prompts_per_step)
        _check(self.max_staleness >= 0, "rollout.max_staleness", ">= 0 (0: synchronous rollouts)", self.max_staleness)
        _check(self.max_turns >= 1, "rollout.max_turns", ">= 1", self.max_turns)
        _check(self.samples_per_prompt >= 1, "rollout.samples_per_prompt", ">= 1", self.samples_per_prompt)
        _check(self.partial_pause in ("in_place", "retract"), "rollout.partial_pause", "in_place or retract",
               self.partial_pause)
        _check(self.partial_offpolicy in ("tis", "mask"), "rollout.partial_offpolicy", "tis or mask",
               self.partial_offpolicy)

    def sampling_params(self, *, stop_token_ids: tuple[int, ...] = (), run_seed: int = 0,
                        step: int | None = None, round_index: int = 0) -> SamplingParams:
        """One step's request parameters: this section's, plus the task's stop tokens, seeded by
        (``rollout.seed``, or ``run.seed`` when that is null; step; the dynamic-sampling round) so
        that a resumed run samples exactly what the original did. ``step=None``: unseeded."""
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(SamplingParams)}
        stops = tuple(dict.fromkeys((*self.stop_token_ids, *stop_token_ids)))
        root = self.seed if self.seed is not None else run_seed
        seed = None if step is None else root * 1_000_003 + step + round_index * 1_000_000_007
        return SamplingParams(**{**base, "stop_token_ids": stops, "seed": seed})


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
    # Supervised cold start before the RL steps (trainer/cold_start.py): this many optimizer
    # steps of NLL on the task's reference answers, rollout.prompts_per_step prompts each, at
    # cold_start_lr (null: optim.lr), constant, outside the LR schedule. Not counted in run.steps.
    cold_start_steps: int = 0
    cold_start_lr: float | None = None

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
        _check(self.cold_start_steps >= 0, "train.cold_start_steps", ">= 0 (0: no cold start)", self.cold_start_steps)
        _check(self.cold_start_lr is None or self.cold_start_lr > 0, "train.cold_start_lr",
               "> 0 or null (null: optim.lr)", self.cold_start_lr)


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
