"""The LR schedule (Megatron's OptimizerParamScheduler, trainer/schedule.py) against its formula.

The reference below is written from the documented schedule, not from Megatron's code: linear
warm-up from init_lr over W optimizer steps (step k uses init + (lr - init) * k / W for k <= W),
then constant, linear or cosine decay to min_lr at step D, min_lr after.
"""

from __future__ import annotations

import math

import pytest

from sapo_megatron.config.schema import OptimConfig, RunConfig, TrainConfig, TrainSection


def reference_lr(k: int, *, lr, init_lr, min_lr, warmup, decay, style) -> float:
    if warmup and k <= warmup:
        return init_lr + (lr - init_lr) * k / warmup
    if style == "constant":
        return lr
    if k > decay:
        return min_lr
    x = (k - warmup) / (decay - warmup)
    coeff = 1 - x if style == "linear" else 0.5 * (1 + math.cos(math.pi * x))
    return min_lr + coeff * (lr - min_lr)


def _cfg(steps=5, updates=2, **optim) -> TrainConfig:
    return TrainConfig(run=RunConfig(steps=steps), optim=OptimConfig(**optim),
                       train=TrainSection(updates_per_rollout=updates))


def _optimizer():
    from sapo_megatron.models import ModelConfig, ParallelConfig
    from sapo_megatron.step import build_model_chunks, build_optimizer

    small = ModelConfig(vocab_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, intermediate_size=16, moe_intermediate_size=8)
    return build_optimizer(build_model_chunks(small, ParallelConfig()), lr=1e-3, weight_decay=0.1)


@pytest.mark.parametrize("style,warmup", [("cosine", 3), ("linear", 3), ("constant", 2), ("cosine", 0)])
def test_lr_follows_the_formula_once_per_optimizer_step(single_rank_parallel, style, warmup):
    from sapo_megatron.trainer.schedule import build_scheduler

    # 5 RL steps x 2 updates: decay over 10 optimizer steps (decay_steps null = the whole run).
    o = dict(lr=1e-3, init_lr=1e-4, min_lr=1e-5, warmup_steps=warmup, lr_schedule=style, weight_decay=0.1)
    optimizer = _optimizer()
    scheduler = build_scheduler(optimizer, _cfg(**o))
    seen = []
    for k in range(13):  # past the decay: min_lr from step 11 on
        want = reference_lr(k, lr=1e-3, init_lr=1e-4 if warmup else 1e-3, min_lr=1e-5, warmup=warmup,
                            decay=10, style=style)
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(want, rel=1e-12, abs=1e-15), f"optimizer step {k}"
            # step() rewrites weight decay; it must stay optim.weight_decay (x the group's wd_mult).
            assert group["weight_decay"] == pytest.approx(0.1 * group["wd_mult"])
        seen.append(optimizer.param_groups[0]["lr"])
        scheduler.step(increment=1)
    assert len(set(seen)) > (1 if style == "constant" else 5), "the schedule never moved"


def test_warmup_starts_at_init_lr(single_rank_parallel):
    from sapo_megatron.trainer.schedule import build_scheduler

    optimizer = _optimizer()
    build_scheduler(optimizer, _cfg(lr=1e-3, init_lr=0.0, warmup_steps=4))
    assert optimizer.param_groups[0]["lr"] == 0.0  # Megatron's semantics: step 0 runs at init_lr


@pytest.mark.parametrize("optim,needle", [
    (dict(warmup_steps=10), "optim.warmup_steps (10) must be smaller than the decay steps (10"),
    (dict(warmup_steps=5, decay_steps=5), "optim.warmup_steps (5) must be smaller than the decay steps (5, optim.decay_steps)"),
])
def test_megatron_asserts_are_config_errors(optim, needle):
    from sapo_megatron.config import ConfigError
    from sapo_megatron.config.validate import validate

    with pytest.raises(ConfigError) as err:
        validate(_cfg(**optim))
    assert needle in str(err.value)


def test_decay_steps_must_be_positive():
    with pytest.raises(ValueError, match="optim.decay_steps must be >= 1"):
        OptimConfig(decay_steps=0)


def test_resume_with_a_changed_schedule_is_refused_or_overridden(single_rank_parallel):
    from sapo_megatron.trainer.schedule import build_scheduler, load_scheduler_state

    old = build_scheduler(_optimizer(), _cfg(lr=1e-3, warmup_steps=2, lr_schedule="cosine"))
    for _ in range(4):
        old.step(increment=1)
    state = old.state_dict()

    same = build_scheduler(_optimizer(), _cfg(lr=1e-3, warmup_steps=2, lr_schedule="cosine"))
    load_scheduler_state(same, dict(state))
    assert same.num_steps == 4

    changed = _cfg(lr=2e-3, warmup_steps=2, lr_schedule="cosine")
    with pytest.raises(ValueError) as err:
        load_scheduler_state(build_scheduler(_optimizer(), changed), dict(state), source="ckpt/iter_0000002")
    assert "optim.lr: 0.001 in the checkpoint, 0.002 now" in str(err.value)
    assert "optim.override_scheduler_on_resume=true" in str(err.value) and "step 4" in str(err.value)

    # A constant schedule's decay length is inert: extending run.steps resumes without a word.
    const = build_scheduler(_optimizer(), _cfg(steps=5, lr=1e-3))
    for _ in range(4):
        const.step(increment=1)
    load_scheduler_state(build_scheduler(_optimizer(), _cfg(steps=9, lr=1e-3)), const.state_dict())
    decaying = _cfg(steps=9, lr=1e-3, warmup_steps=2, lr_schedule="cosine")
    with pytest.raises(ValueError, match=r"optim.decay_steps \(null: run.steps x train.updates_per_rollout\): 10 in the checkpoint, 18 now"):
        load_scheduler_state(build_scheduler(_optimizer(), decaying), dict(state))

    changed.optim.override_scheduler_on_resume = True
    optimizer = _optimizer()
    new = build_scheduler(optimizer, changed)
    load_scheduler_state(new, dict(state))
    # The checkpoint's position, the config's values.
    assert new.num_steps == 4
    want = reference_lr(4, lr=2e-3, init_lr=0.0, min_lr=0.0, warmup=2, decay=10, style="cosine")
    assert optimizer.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12)
