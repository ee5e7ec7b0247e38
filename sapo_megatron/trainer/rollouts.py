"""One small object per rollout mode, behind one ``rollout()`` call (the loop reads top to bottom).

A mode decides how a step's batch is generated and what happens around the weight sync; the
loop (``trainer/loop.py``) only calls, in this order, once per step::

    flat, results, rewards = mode.rollout()     # this step's batch, scored
    results, staleness = mode.apply_staleness(results)  # drop (or mask) what is too stale
    mode.before_sync()                          # e.g. wait for the background batch
    mode.sync(chunks, step + 1)                 # the engine's update_weights
    metrics: mode.metrics (rollout/*, async/*)  # filled by the calls above

and, for a checkpoint, ``mode.stream_state()``: the prompt-stream position to save (a batch in
flight is not saved; the position before its draw is, so a resumed run regenerates it).

Modes (:data:`MODES`, chosen by :func:`build_mode` from the config):

- ``sync``: one round of generation per step with the current weights.
- ``dynamic``: rounds until every data-parallel rank holds its quota of kept groups
  (``rollout.dynamic_sampling``; rollout/dynamic.py).
- ``async`` (``rollout.max_staleness > 0`` with an engine that generates in the background,
  SGLang): the next step's batch is generated while this step trains, drained before the sync.
- ``partial`` (``rollout.partial: true``): a pool of groups keeps generating across weight
  updates; each step takes the first completed groups (trainer/partial.py says why and how).

The modes hold a reference to the trainer for what every mode shares (the prompt stream, the
engine, scoring, watchdog phases); they own only their own state.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
import torch

from sapo_megatron.collectives import all_reduce_values, global_max
from sapo_megatron.rollout.dynamic import GroupCollector, keep_groups


class RolloutMode:
    """The synchronous default: one round per step, nothing around the sync."""

    name = "sync"

    def __init__(self, trainer) -> None:
        self.t = trainer
        self.metrics: dict[str, float] = {}

    def rollout(self):
        self.metrics = {}
        return self.t._rollout_round(0)

    def before_sync(self) -> None:
        pass

    def sync(self, chunks, version: int) -> None:
        """Make the engine serve ``chunks`` as policy ``version`` (the steps completed)."""
        self.t.engine.update_weights(chunks, version)

    def apply_staleness(self, results):
        """Each sample's staleness (policy version now - the version that generated it); samples
        older than ``rollout.max_staleness`` are dropped: they become aborted requests (no loss,
        their group's advantages unmoved). Metrics ``async/*``, reduced over DP."""
        t = self.t
        k = t.cfg.rollout.max_staleness
        ages = [t.step - _version(r.meta.get("weight_version"), t.step) for r in results]
        dropped = [a > k for a in ages]
        results = [dataclasses.replace(r, finish_reason="abort", response_ids=[], response_log_probs=[], routes=None)
                   if d and r.finish_reason != "abort" else r for r, d in zip(results, dropped)]
        group = t._dp_group()
        total, n, n_dropped = all_reduce_values([sum(ages), len(ages), sum(dropped)], group=group)
        peak = global_max(max(ages, default=0), group=group)
        return results, {"async/staleness_mean": total / max(n, 1.0), "async/staleness_max": float(peak),
                         "async/dropped_frac": n_dropped / max(n, 1.0)}

    def stream_state(self) -> dict:
        return self.t.stream.state_dict()

    def checkpoint_meta(self) -> dict:
        """Extra checkpoint metadata of the mode (collective over DP where a mode needs it)."""
        return {}

    def load_meta(self, meta: dict) -> None:
        pass


def _version(value, default: int) -> int:
    """A sample's weight version as an int (SGLang reports a string, "default" before any update)."""
    if isinstance(value, int):
        return value
    return int(value) if isinstance(value, str) and value.isdigit() else default


class DynamicRollout(RolloutMode):
    """Rounds of generation until every DP rank holds its quota of kept groups (rollout/dynamic.py)."""

    name = "dynamic"

    def rollout(self):
        from megatron.core import parallel_state

        t, ds = self.t, self.t.cfg.rollout.dynamic_sampling
        group = parallel_state.get_data_parallel_group()
        n = t.cfg.rollout.samples_per_prompt
        collector = GroupCollector(quota=t.cfg.rollout.prompts_per_step // t.dp_size)
        for round_ in range(ds.max_rounds):
            out = t._rollout_round(round_, generate=not collector.full)
            if out is not None:
                flat, results, rewards = out
                completed = torch.tensor([r.finish_reason != "abort" for r in results])
                keep = keep_groups(ds.filter, rewards, completed, n)
                collector.add([(flat[g * n:(g + 1) * n], results[g * n:(g + 1) * n], rewards[g * n:(g + 1) * n])
                               for g in range(len(keep))], keep)
            if all_reduce_values([int(collector.full)], op="min", group=group)[0]:
                break
        groups, topped = collector.take()
        generated, filtered, topped_all, quota = all_reduce_values(
            [collector.generated, collector.filtered, topped, collector.quota], group=group)
        # Once per run: a policy that solves most prompts tops up every step from then on, and
        # the count per step is in the metrics (rollout/topped_up_groups).
        if topped_all and t.rank == 0 and not t._topped_up_warned:
            t._topped_up_warned = True
            warnings.warn(
                f"rollout.dynamic_sampling: step {t.step} kept {int(quota - topped_all)} of the "
                f"{int(quota)} prompt groups it needs after rollout.dynamic_sampling.max_rounds={ds.max_rounds} "
                f"rounds ({int(filtered)} of {int(generated)} generated groups filtered by {ds.filter!r}); "
                f"training on them plus {int(topped_all)} filtered groups (zero advantages). Not repeated: "
                f"later steps count them in rollout/topped_up_groups", stacklevel=2)
        self.metrics = {
            "rollout/filtered_frac": filtered / max(generated, 1.0),
            "rollout/sampling_rounds": float(round_ + 1),
            "rollout/topped_up_groups": topped_all,
        }
        flat = [p for g in groups for p in g[0]]
        results = [r for g in groups for r in g[1]]
        rewards = torch.cat([g[2] for g in groups])
        return flat, results, rewards


class AsyncRollout(RolloutMode):
    """This step's batch was generated in the background during the previous step (staleness
    1); the next one starts as soon as this one is collected and is drained before the sync
    (``/flush_cache``, part of every weight update, answers 400 while requests run)."""

    name = "async"

    def __init__(self, trainer) -> None:
        super().__init__(trainer)
        self._prefetched = None  # (flat prompts, the version that generates them)
        self._stream_state = None  # the stream position before the prefetched batch's draw
        self._t0 = 0.0

    def _submit(self, step: int) -> None:
        """Draw step ``step``'s prompts and start generating them in the background."""
        t = self.t
        cfg = t.cfg.rollout
        prompts = t.stream.next_batch(cfg.prompts_per_step)[t.dp_rank :: t.dp_size]
        flat = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
        params = cfg.sampling_params(stop_token_ids=(t.task.tokenizer.eos_id,), run_seed=t.cfg.run.seed, step=step)
        with t._phase(f"rollout submit step {step}", "rollout"):  # a stale server is re-synced first
            t.engine.submit([p.ids for p in flat], params, return_routes=t._want_routes)
        # The servers hold the weights of version t.step (synced at the end of step - 1).
        self._prefetched = (flat, t.step)

    def rollout(self):
        t = self.t
        t0 = time.perf_counter()
        if self._prefetched is None:  # the first step, or the first after a resume
            self._submit(t.step)
        with t._phase(f"rollout collect step {t.step}", "rollout"):
            results = t.engine.collect()
            wait = time.perf_counter() - t0
            flat, version = self._prefetched
            results = [dataclasses.replace(r, meta={**r.meta, "weight_version": version}) for r in results]
            rewards = t._score(flat, results, count_exact=True)
        # Measured on this rank (rank 0 is a leader; the others report their wait only).
        self.metrics = {"async/wait_rollout_s": wait, "async/wait_train_s": getattr(t.engine, "idle_s", 0.0)}
        self._prefetched = None
        if t.step + 1 < t.cfg.run.steps:
            self._stream_state = t.stream.state_dict()
            self._submit(t.step + 1)
        return flat, results, rewards

    def before_sync(self) -> None:
        t0 = time.perf_counter()
        with self.t._phase("rollout drain", "rollout"):
            self.t.engine.drain()
        wait = self.metrics["async/wait_rollout_s"] = self.metrics["async/wait_rollout_s"] + (
            time.perf_counter() - t0)
        # Share of generation hidden behind training: 1 - the trainer's wait / generation time.
        generate_s = getattr(self.t.engine, "generate_s", 0.0) if self._prefetched is not None else 0.0
        self.metrics["async/overlap_frac"] = max(0.0, 1.0 - wait / generate_s) if generate_s > 0 else 0.0

    def stream_state(self) -> dict:
        # A batch generated in the background is not saved: the stream position before its draw
        # is, so a resumed run draws the same prompts and regenerates them with the resumed weights.
        return self._stream_state if self._prefetched is not None else self.t.stream.state_dict()


MODES: dict[str, type[RolloutMode]] = {m.name: m for m in (RolloutMode, DynamicRollout, AsyncRollout)}


def register_mode(cls: type[RolloutMode]) -> type[RolloutMode]:
    MODES[cls.name] = cls
    return cls


def mode_name(cfg, engine) -> str:
    """Which mode a config runs: ``partial`` > ``async`` > ``dynamic`` > ``sync``."""
    r = cfg.rollout
    if getattr(r, "partial", False):
        return "partial"
    if r.max_staleness > 0 and hasattr(engine, "submit"):
        # Bounded staleness with an engine that generates in the background (SGLang); the
        # embedded engine lags instead (rollout/engine_copy.py) and runs the sync mode.
        return "async"
    return "dynamic" if r.dynamic_sampling.filter is not None else "sync"


def build_mode(trainer) -> RolloutMode:
    name = mode_name(trainer.cfg, trainer.engine)
    if name == "partial":
        from sapo_megatron.trainer import partial  # noqa: F401  (registers the mode)
    return MODES[name](trainer)
