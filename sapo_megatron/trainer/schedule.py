"""The learning-rate schedule: Megatron-Core's ``OptimizerParamScheduler``, configured from ``optim``.

Semantics we pin (and why):

- It steps once per successful optimizer step (``train.updates_per_rollout`` per RL step;
  Megatron-LM counts samples instead, which would make warm-up depend on the batch size).
  ``optim.warmup_steps`` and ``optim.decay_steps`` therefore count optimizer steps;
  ``decay_steps: null`` is the whole run (``run.steps x train.updates_per_rollout``).
- Warm-up starts AT ``optim.init_lr``: optimizer step ``k`` (0-based) uses
  ``init_lr + (lr - init_lr) * k / warmup_steps`` for ``k <= warmup_steps``, so with the default
  ``init_lr: 0`` the first update of a warm-up does not move the weights. Then ``constant`` keeps
  ``lr``; ``linear`` / ``cosine`` decay to ``min_lr`` at step ``decay_steps`` and stay there.
- ``step()`` rewrites every param group's weight decay, so ``start_wd = end_wd =
  optim.weight_decay`` (constant).
- Megatron asserts ``lr_decay_steps > 0`` and ``warmup < decay``; :func:`schedule_problems`
  reports both as config errors before anything is built.
- On resume Megatron's ``_check_and_set`` asserts when a value differs from the checkpoint's.
  :func:`load_scheduler_state` names each changed key instead, and
  ``optim.override_scheduler_on_resume: true`` (Megatron's ``override_opt_param_scheduler``)
  takes the config's values from the checkpoint's step on. With ``decay_steps: null`` a
  decaying schedule's length follows ``run.steps``: a run meant to be stopped and extended
  pins ``optim.decay_steps`` (a constant schedule ignores it).
"""

from __future__ import annotations

from pathlib import Path


def total_decay_steps(cfg) -> int:
    """``optim.decay_steps``, or the run's optimizer steps when it is null."""
    return cfg.optim.decay_steps or cfg.run.steps * cfg.train.updates_per_rollout


def schedule_problems(cfg) -> list[str]:
    """Megatron's scheduler asserts, as config errors naming the keys."""
    decay = total_decay_steps(cfg)
    where = ("optim.decay_steps" if cfg.optim.decay_steps else
             f"the run's optimizer steps (run.steps x train.updates_per_rollout = "
             f"{cfg.run.steps} x {cfg.train.updates_per_rollout})")
    problems = []
    if decay <= 0:
        problems.append(f"the LR schedule needs decay steps > 0, got {decay} from {where}")
    elif cfg.optim.warmup_steps >= decay:
        problems.append(f"optim.warmup_steps ({cfg.optim.warmup_steps}) must be smaller than the decay "
                        f"steps ({decay}, {where}); warm-up and decay count optimizer steps")
    return problems


# OptimizerParamScheduler.state_dict() key -> the config key it comes from.
_CONFIG_KEYS = {
    "max_lr": "optim.lr",
    "min_lr": "optim.min_lr",
    "lr_warmup_steps": "optim.warmup_steps",
    "lr_decay_steps": "optim.decay_steps (null: run.steps x train.updates_per_rollout)",
    "lr_decay_style": "optim.lr_schedule",
    "start_wd": "optim.weight_decay",
}
# Values that cannot change the rates: weight decay is constant (its increment steps are unused),
# and a constant schedule never reaches its decay steps.
_INERT = ("wd_incr_steps", "wd_incr_style", "end_wd")


def _set_group_lrs(optimizer, max_lr: float, min_lr: float) -> None:
    """The scheduler reads a param group's own ``max_lr`` / ``min_lr`` before its own values:
    Megatron fills them from OptimizerConfig (``min_lr`` None unless given), and a distributed
    optimizer's load brings back the checkpoint's. Keep them this config's (groups with a
    decoupled lr keep theirs)."""
    for group in optimizer.param_groups:
        if not group.get("is_decoupled_lr", False):
            group["max_lr"], group["min_lr"] = max_lr, min_lr


def build_scheduler(optimizer, cfg):
    """The run's ``OptimizerParamScheduler``; it sets the optimizer's lr for step 0 at once."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    problems = schedule_problems(cfg)
    if problems:
        raise ValueError("; ".join(problems))
    o, decay = cfg.optim, total_decay_steps(cfg)
    _set_group_lrs(optimizer, o.lr, o.min_lr)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=o.init_lr if o.warmup_steps else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=decay,
        lr_decay_style=o.lr_schedule,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=decay,
        wd_incr_style="constant",
        # Not Megatron's default (take the checkpoint's values silently): a changed schedule is
        # reported by load_scheduler_state, or applied with the override.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=o.override_scheduler_on_resume,
    )


def load_scheduler_state(scheduler, state: dict, *, source: str | Path = "the checkpoint") -> None:
    """Restore the schedule's position; a changed value is an error naming its config key,
    unless the scheduler was built with ``optim.override_scheduler_on_resume``."""
    ours, state = scheduler.state_dict(), dict(state)
    inert = list(_INERT)
    if state.get("lr_decay_style") == ours["lr_decay_style"] == "constant":
        inert.append("lr_decay_steps")
    # Megatron's _check_and_set asserts on every difference; these change nothing.
    state.update({k: ours[k] for k in inert if k in state})
    if not scheduler.override_opt_param_scheduler:
        changed = [f"{_CONFIG_KEYS.get(k, k)}: {state[k]!r} in the checkpoint, {ours[k]!r} now"
                   for k in _CONFIG_KEYS if k in state and state[k] != ours[k]]
        if changed:
            raise ValueError(
                f"resuming from {source} with a different LR schedule: " + "; ".join(changed)
                + ". Restore the old values, or set optim.override_scheduler_on_resume=true to apply "
                f"this config's schedule from optimizer step {state.get('num_steps')} on")
    _set_group_lrs(scheduler.optimizer, scheduler.max_lr, scheduler.min_lr)
    scheduler.load_state_dict(state)
