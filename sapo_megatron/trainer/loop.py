"""The SAPO RL loop, top to bottom: rollout -> reward -> advantages -> reference log-probs ->
old log-probs -> minibatch updates -> weight sync -> checkpoint -> metrics; before the first RL
step, an optional supervised cold start (``train.cold_start_steps``, ``cold_start.py``).

Run it through the CLI (``sapo-megatron train --config configs/tiny_cpu.yaml key=value ...``),
under ``torchrun`` for several ranks (``examples/run_tiny_cpu.sh``).

How work is split. Every rank builds the same global prompt stream; data-parallel rank ``d``
takes prompts ``d::dp`` of each step, generates ``samples_per_prompt`` responses for each (so
a prompt's group, and its GRPO advantages, live on one rank) and keeps those samples for the
whole step: the old-log-prob pass, R2's recorded routes and the updates all see the same
samples on the same rank. The ranks of one model-parallel group see identical data. Each of
``updates_per_rollout`` minibatches is one optimizer step whose loss normalisation is global
across data-parallel ranks (``assign_step_weights``).

Routing (``routing.mode``): ``none`` routes live everywhere; ``R2`` records the routes of the
old-log-prob pass and replays them in the updates; ``R3`` replays the rollout engine's routes in
the old-log-prob pass and the updates. The reference model always routes live.

Hangs. Each phase (a rollout round, the log-prob passes, the updates, a weight sync, a
checkpoint, and the step around them) runs under its limit of ``run.timeouts``: a rank that
overruns one names it and exits (``trainer/watchdog.py``; the collectives of each phase are listed
in docs/design.md).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from sapo_megatron.collectives import all_reduce_values
from sapo_megatron.losses import grpo_advantages, rloo_advantages
from sapo_megatron.step import (
    Sample,
    assign_step_weights,
    build_model_chunks,
    build_optimizer,
    collect_log_probs,
    run_step,
    sync_params,
)
from sapo_megatron.models.builder import use_transformer_engine
from sapo_megatron.step.batch import sequence_multiples
from sapo_megatron.rollout import route_spec
from sapo_megatron.routing import (
    attach_routes,
    attach_routing_replay,
    recorded_sample_routes,
    replay_metrics,
    routing_action,
    routing_replay_of,
    storage_dtype,
)
from sapo_megatron.rollout.episodes import (
    EpisodeRunner,
    episode_metrics,
    reduce_episode_metrics,
    score_result,
    wrap_episodes,
)
from sapo_megatron.trainer.batching import StepBatcher, batch_metrics, collate_microbatch
from sapo_megatron.trainer.checkpoint import (
    agreed_latest_checkpoint,
    finalize_async_saves,
    is_dist_checkpoint,
    load_checkpoint,
    load_model_weights,
    register_stateful,
    save_checkpoint,
    unregister_extra_state,
)
from sapo_megatron.trainer.cold_start import ColdStart, run_cold_start
from sapo_megatron.trainer.rollouts import build_mode
from sapo_megatron.trainer.schedule import build_scheduler
from sapo_megatron.trainer.logging import MetricsLogger
from sapo_megatron.trainer import watchdog

ADVANTAGES = {
    "grpo": lambda r, n: grpo_advantages(r, n, normalize_std=True),
    "grpo_no_std": lambda r, n: grpo_advantages(r, n, normalize_std=False),
    "rloo": lambda r, n: rloo_advantages(r, n),
}


def task_options(section) -> dict:
    """``task:`` config section -> the dict ``build_task`` takes."""
    options = {"name": section.name, **section.options}
    for key in ("path", "format", "reward_fn"):
        if getattr(section, key) is not None:
            options[key] = getattr(section, key)
    return options


def group_advantages(kind: str, rewards: torch.Tensor, group_size: int, aborted: torch.Tensor) -> torch.Tensor:
    """Per-sample advantages; aborted requests (no response) get 0 and do not move their group.

    An aborted sample's reward is replaced by the mean of its group's completed samples before
    normalisation (so the others' advantages are those of the completed group), then zeroed.
    """
    rewards = rewards.clone()
    groups, done = rewards.view(-1, group_size), ~aborted.view(-1, group_size)
    means = (groups * done).sum(1) / done.sum(1).clamp_min(1)
    groups[~done] = means[:, None].expand_as(groups)[~done]
    advantages = ADVANTAGES[kind](groups.reshape(-1), group_size)
    return torch.where(aborted, torch.zeros_like(advantages), advantages)


def _build_samples(results, advantages, *, use_routes: bool,
                   route_layout: tuple[int, int, torch.dtype] | None = None) -> list[Sample]:
    """Rollout results -> training samples; old log-probs start as the engine's (replaced by
    the trainer's own pass unless ``train.use_rollout_log_probs``). An aborted request keeps
    its prompt with no loss tokens, and under R3 placeholder routes (distinct ids) of
    ``route_layout`` = (MoE layers, topk, dtype): taken from the model, not from another
    sample, because every sample of a rank's rollout may be aborted."""
    samples = []
    for res, adv in zip(results, advantages):
        aborted = res.finish_reason == "abort"
        tokens = torch.tensor(res.prompt_ids + res.response_ids, dtype=torch.long)
        if tokens.numel() < 2:  # a one-token prompt with no response: nothing to train on
            tokens = torch.cat([tokens, tokens])
            aborted = True
        n, p = tokens.numel(), len(res.prompt_ids)
        mask = torch.zeros(n - 1, dtype=torch.bool)
        if not aborted:
            # Multi-turn episodes: only the model's tokens (response_mask), not the environment's.
            mask[p - 1 :] = True if res.response_mask is None else torch.tensor(res.response_mask, dtype=torch.bool)
            keep = res.meta.get("loss_token_mask")  # partial rollouts: per-token (trainer/partial.py)
            if keep is not None:
                mask[p - 1 :] &= torch.tensor(keep, dtype=torch.bool)
        routes = res.routes
        if use_routes and routes is None:
            layers, topk, dtype = route_layout
            routes = torch.arange(topk, dtype=dtype).expand(n - 1, layers, -1).contiguous()
        rollout_lp = torch.zeros(n - 1)
        if not aborted:
            rollout_lp[p - 1 :] = torch.tensor(res.response_log_probs, dtype=torch.float32)
        samples.append(Sample(
            tokens=tokens,
            loss_mask=mask,
            old_log_probs=rollout_lp.clone(),
            advantages=torch.full((n - 1,), float(adv)),
            rollout_log_probs=rollout_lp,
            routes=routes if use_routes else None,
        ))
    return samples


class Trainer:
    """Holds the run's state; :meth:`train` is the loop."""

    def __init__(self, cfg):
        from megatron.core import parallel_state

        from sapo_megatron.config import save_resolved
        from sapo_megatron.parallel import initialize_model_parallel
        from sapo_megatron.rollout import build_engine
        from sapo_megatron.tasks import PromptStream, build_task

        self.cfg = cfg
        self.out = Path(cfg.run.output_dir)
        initialize_model_parallel(cfg.parallel, seed=cfg.run.seed, timeout_s=cfg.run.timeouts.process_group_s())
        self.rank = dist.get_rank()
        # Every phase below runs under its limit of run.timeouts (trainer/watchdog.py).
        self.watchdog = watchdog.start(rank=self.rank, heartbeat_s=cfg.run.timeouts.heartbeat_s)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.model_cfg = cfg.model.resolve()
        self.chunks = build_model_chunks(
            self.model_cfg, cfg.parallel,
            use_distributed_optimizer=bool(cfg.optim.megatron.get("use_distributed_optimizer", False)),
        )
        # Initial weights: a converted Megatron checkpoint, else HF safetensors, else random init.
        with self._phase("load initial weights", "checkpoint"):
            if cfg.model.ckpt_dir and is_dist_checkpoint(cfg.model.ckpt_dir):
                # A Megatron dist checkpoint (Megatron-Bridge's torch_dist output, or ours): model only.
                load_model_weights(self.chunks, cfg.model.ckpt_dir)
            elif cfg.model.ckpt_dir:
                from sapo_megatron.checkpoint import load_into_model

                load_into_model(self.chunks, cfg.model.ckpt_dir)
            elif cfg.model.hf_dir:
                from sapo_megatron.checkpoint import load_hf_into_model

                load_hf_into_model(self.chunks, cfg.model.hf_dir)
        self.optimizer = build_optimizer(
            self.chunks, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, clip_grad=cfg.optim.clip_grad,
            adam_beta1=cfg.optim.adam_beta1, adam_beta2=cfg.optim.adam_beta2, adam_eps=cfg.optim.adam_eps,
            megatron=cfg.optim.megatron,
        )
        # Sets the lr (and weight decay) of every optimizer step, once per step (schedule.py).
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.mode = cfg.routing.mode
        # Routing agreement without replay (routing/agreement.py) needs the engine's routes in
        # every mode; the embedded engine records them for free, SGLang sends them when R3 asks
        # (then one extra forward pass also gives the log-prob gap without R3).
        self._measure_routes = bool(self.model_cfg.num_experts) and (
            cfg.rollout.engine == "embedded" or self.mode == "R3")
        self._want_routes = self.mode == "R3" or self._measure_routes
        spec = route_spec(self.model_cfg)  # None for a dense model
        self._route_layout = None if spec is None else (len(spec.moe_layers), spec.topk, storage_dtype(spec.num_experts))
        if self.model_cfg.num_experts:
            for chunk in self.chunks:
                attach_routing_replay(chunk, self.model_cfg.moe_layer_pattern())
        self.reference = None
        if cfg.train.use_reference_model:
            # A frozen copy of the initial policy; it routes live (no replay controller).
            self.reference = build_model_chunks(self.model_cfg, cfg.parallel, wrap_ddp=False)
            for ref, chunk in zip(self.reference, self.chunks):
                ref.load_state_dict(chunk.module.state_dict())
        self.task = build_task(task_options(cfg.task))
        self.stream = PromptStream(self.task, seed=cfg.run.seed)
        self.cold_start = ColdStart(cfg, self.task)
        self.engine = build_engine(cfg, self.chunks, self.model_cfg, tokenizer=self.task.tokenizer)
        # A multi-turn task (or rollout.max_turns > 1) plays episodes on the engine (rollout/episodes.py).
        self.engine = wrap_episodes(self.engine, self.task, cfg.rollout.max_turns)
        self._episodes = isinstance(self.engine, EpisodeRunner)
        self.spec = cfg.loss
        # An engine copy's weight snapshots are this rank's shards: saved per rank with every
        # checkpoint (the extra-state hook), so a resumed run samples from the same old weights.
        if getattr(self.engine, "copy", None) is not None:
            register_stateful("engine", self.engine, per_rank=True)
        else:
            unregister_extra_state("engine")
        from sapo_megatron.step.plan import enable_variable_seq_lengths, needs_equal_shapes

        budget = cfg.train.max_tokens_per_microbatch is not None
        pipeline = cfg.parallel.pipeline_model_parallel_size > 1
        if budget and pipeline:
            enable_variable_seq_lengths(self.chunks)  # token-budget microbatches differ in shape
        pad_multiple, sample_multiple = sequence_multiples(
            tp_size=cfg.parallel.tensor_model_parallel_size, sequence_parallel=cfg.parallel.sequence_parallel,
            cp_size=cfg.parallel.context_parallel_size)
        equal_shapes = needs_equal_shapes(self.chunks)
        self.batcher = StepBatcher(cfg.train, pad_multiple=pad_multiple, sample_multiple=sample_multiple,
                                   dp_group=parallel_state.get_data_parallel_group(),
                                   equal_shapes=budget and equal_shapes,
                                   one_shape=not budget and pipeline,
                                   one_shape_over_dp=not budget and equal_shapes)
        # How each step's batch is generated and what happens around the weight sync: one
        # object per mode (sync, dynamic rounds, async, partial: trainer/rollouts.py).
        self.rollouts = build_mode(self)
        self._exact_counts = [0, 0]  # exact answers, answers judged: this step's first round
        self._topped_up_warned = False  # dynamic sampling warns once per run (see _dynamic_rollout)
        self.step = 0
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            save_resolved(cfg, self.out / "config.yaml")
        self.logger = MetricsLogger(self.out, enabled=self.rank == 0, tensorboard=cfg.run.tensorboard,
                                    progress=cfg.run.progress, total_steps=cfg.run.steps + cfg.train.cold_start_steps,
                                    wandb_project=cfg.run.wandb_project, wandb_entity=cfg.run.wandb_entity,
                                    config=cfg)
        self._maybe_resume()

    # --- checkpoints -------------------------------------------------------------------
    def _maybe_resume(self) -> None:
        path = agreed_latest_checkpoint(self.out) if self.cfg.run.resume else None  # rank 0's view, on all
        if path is None:
            return
        with self._phase(f"checkpoint load {path.name}", "checkpoint"):
            meta = load_checkpoint(path, self.chunks, self.optimizer, self.scheduler)
        self.step = meta.get("rl_step", meta["step"])
        self.stream.load_state_dict(meta["data"])
        self.rollouts.load_meta(meta)  # partial rollouts: the open batches' trained groups
        self.cold_start.load_state_dict(meta.get("cold_start"), rl_step=self.step)
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def _save(self) -> None:
        # A batch in flight is not saved: the stream position before its draw is, so a resumed
        # run draws the same prompts and regenerates them with the resumed weights.
        data, extra = self.rollouts.stream_state(), self.rollouts.checkpoint_meta()
        sync_params(self.chunks)
        save_checkpoint(self.out, self.iteration, self.chunks, self.optimizer, self.scheduler,
                        meta={"data": data, **extra, "rl_step": self.step, "cold_start": self.cold_start.state_dict(),
                              **self._model_meta()},
                        keep_last=self.cfg.run.keep_last, async_save=self.cfg.run.async_save)

    def _phase(self, name: str, limit: str):
        """A watchdog phase under ``run.timeouts.<limit>_s`` (step, rollout, checkpoint, weight_sync)."""
        key = f"{limit}_s"
        return watchdog.phase(name, getattr(self.cfg.run.timeouts, key), key=f"run.timeouts.{key}")

    @property
    def iteration(self) -> int:
        """Steps done over the whole run (cold start + RL): checkpoints and metric rows count these."""
        return self.cold_start.done + self.step

    def _model_meta(self) -> dict:
        """What ``convert mcore-to-hf`` needs to export a training checkpoint on its own."""
        from sapo_megatron.checkpoint.training_ckpt import run_hf_config

        return {"model_config": dataclasses.asdict(self.model_cfg), "hf_config": run_hf_config(self.cfg)}

    # --- one RL step ------------------------------------------------------------------
    def _collate(self, group: list[Sample], min_length: int | None = None):
        """One microbatch (trainer/batching.py: its length), with routes to replay attached."""
        cp = self.cfg.parallel.context_parallel_size
        # Transformer Engine attends packed samples through cu_seqlens (THD); the local spec
        # (CPU) gets a block-diagonal mask, built in the forward step.
        mb = collate_microbatch(group, layout=self.cfg.train.layout, pad_multiple=self.batcher.pad_multiple,
                                sample_multiple=self.batcher.sample_multiple, min_length=min_length or 0,
                                use_thd=use_transformer_engine())
        if self.mode != "none" and group[0].routes is not None:
            from megatron.core import parallel_state

            # Under CP the forward step takes the CP slice first, then replay the SP shard of
            # what is left: attach routes for the whole sequence (shard 0 of 1, on every TP rank).
            sp = self.cfg.parallel.sequence_parallel and cp == 1
            tp_rank, tp_size = ((parallel_state.get_tensor_model_parallel_rank(),
                                 self.cfg.parallel.tensor_model_parallel_size) if sp else (0, 1))
            mb = attach_routes(mb, group, tp_rank=tp_rank, tp_size=tp_size)
        return mb

    def _microbatches(self, minibatch):
        """A :class:`~sapo_megatron.trainer.batching.Minibatch`'s collated microbatches."""
        lengths = minibatch.min_lengths or [None] * len(minibatch.sizes)
        return [self._collate(g, n) for g, n in zip(minibatch.groups(), lengths)]

    def _rollout_round(self, round_: int, generate: bool = True):
        """One round of prompts (every rank draws the global batch; this DP rank's share)."""
        cfg = self.cfg.rollout
        prompts = self.stream.next_batch(cfg.prompts_per_step)[self.dp_rank :: self.dp_size]
        flat = [p for p in prompts for _ in range(cfg.samples_per_prompt)] if generate else []
        # Seeded by (seed, step, round): a resumed run samples exactly what the original did.
        params = cfg.sampling_params(stop_token_ids=(self.task.tokenizer.eos_id,),
                                     run_seed=self.cfg.run.seed, step=self.step, round_index=round_)
        # A rank with nothing to generate still calls the engine, with no prompts: an engine's
        # collectives (the SGLang replicas' stale-server re-sync spans the world) must see every
        # rank, or a dynamic-sampling round whose quota is full on one DP rank hangs the others.
        with self._phase(f"rollout round {round_}", "rollout"):
            episodes = {"episodes_of": flat} if self._episodes else {}
            results = self.engine.generate([p.ids for p in flat], params, return_routes=self._want_routes, **episodes)
            if not generate:
                return None
            return flat, results, self._score(flat, results, count_exact=round_ == 0)

    def _score(self, flat, results, *, count_exact: bool) -> torch.Tensor:
        """Rewards of a round; its exact answers are counted for ``exact_frac`` when ``count_exact``
        (the first round of a step only: later dynamic-sampling rounds refill what the filter
        dropped, which would bias the share; aborted requests are not judged)."""
        # A response is scored by the task, an episode by its environment (rollout/episodes.py).
        scores = [score_result(self.task, p, r) for p, r in zip(flat, results)]
        if count_exact:
            known = [s.exact for s, r in zip(scores, results) if s.exact is not None and r.finish_reason != "abort"]
            self._exact_counts = [sum(known), len(known)]
        return torch.tensor([s.reward for s in scores], dtype=torch.float64)

    def rollout(self):
        """This step's batch, scored: ``(prompts, results, rewards)`` (the mode's ``rollout()``)."""
        return self.rollouts.rollout()

    def train_step(self) -> dict:
        cfg, timings = self.cfg, {}
        t0 = time.perf_counter()
        with self.logger.phase("rollout", 1) as advance:
            _, results, rewards = self.rollout()
            advance()
        timings["time/rollout_s"] = time.perf_counter() - t0
        results, staleness = self.rollouts.apply_staleness(results)
        timings.update(staleness)
        aborted = torch.tensor([r.finish_reason == "abort" for r in results])
        advantages = group_advantages(cfg.train.advantage, rewards, cfg.rollout.samples_per_prompt, aborted)
        samples = _build_samples(results, advantages, use_routes=self._want_routes, route_layout=self._route_layout)
        self._token_counts, self._microbatch_count = [0, 0], 0
        # Summed over DP (the ranks of a model-parallel group hold the same samples), so every
        # rank takes the same path. A rank whose samples are all aborted still trains (on no
        # tokens) beside the others; with none completed anywhere there is nothing to train on,
        # and an optimizer step on zero gradients would still move the weights (Adam's moments).
        if all_reduce_values([int((~aborted).sum())], group=self._dp_group())[0]:
            update_metrics = self._train_on(samples, timings)
        else:
            update_metrics = []
            timings["time/old_logprob_s"] = timings["time/update_s"] = 0.0
            if self.rank == 0:
                warnings.warn(
                    f"step {self.step}: every sample of the rollout was aborted (are the rollout servers down? "
                    f"see the results' errors): nothing to train on, the step is skipped (step_skipped=1, "
                    f"no optimizer step); the weights are still synced as version {self.step + 1}", stacklevel=2)
        from megatron.core import parallel_state

        timings.update(batch_metrics(
            real_tokens=self._token_counts[0], collated_tokens=self._token_counts[1],
            response_tokens=sum(len(r.response_ids) for r in results), microbatches=self._microbatch_count,
            rollout_s=timings["time/rollout_s"],
            train_s=timings["time/update_s"], dp_group=parallel_state.get_data_parallel_group()))
        if self._episodes:  # turns, tool calls and environment tokens per episode, over DP
            timings.update(reduce_episode_metrics(all_reduce_values(episode_metrics(results), group=self._dp_group())))

        t0 = time.perf_counter()
        self.rollouts.before_sync()  # async: the next batch finishes first
        with self.logger.phase("weight sync", 1) as advance, \
                self._phase(f"weight sync to version {self.step + 1}", "weight_sync"):
            # The policy version is the number of RL steps completed (this one included).
            sync_params(self.chunks)
            self.rollouts.sync(self.chunks, self.step + 1)
            advance()
        timings["time/weight_sync_s"] = time.perf_counter() - t0
        timings.update(getattr(self.engine, "step_metrics", dict)())  # engine counters (collective)
        timings.update(self.rollouts.metrics)
        return self._step_metrics(rewards, results, update_metrics, timings)

    def _train_on(self, samples: list[Sample], timings: dict) -> list[dict]:
        """Log-prob passes then ``updates_per_rollout`` optimizer steps; each update's metrics."""
        cfg = self.cfg
        # Minibatches (one optimizer step each), balanced over DP under a token budget; the
        # log-prob passes run over all of them, in the same microbatches as the updates.
        minibatches = self.batcher.split(samples, label=f" (step {self.step})")
        samples = [s for m in minibatches for s in m.samples]
        microbatches = [mb for m in minibatches for mb in self._microbatches(m)]

        t0 = time.perf_counter()
        passes = int(self.reference is not None) + int(not cfg.train.use_rollout_log_probs)
        with self.logger.phase("log-probs", passes) as advance, self._phase("log-probs", "step"):
            samples = self._log_prob_passes(samples, microbatches, advance)
        timings["time/old_logprob_s"] = time.perf_counter() - t0
        timings.update(self._mismatch_metrics)

        t0 = time.perf_counter()
        update_metrics, start = [], 0
        with self.logger.phase("updates", cfg.train.updates_per_rollout) as advance, self._phase("updates", "step"):
            for m in minibatches:
                m = dataclasses.replace(m, samples=samples[start : start + len(m.samples)])
                start += len(m.samples)
                update_metrics.append(self._update(m))
                advance()
        timings["time/update_s"] = time.perf_counter() - t0
        return update_metrics

    def _log_prob_passes(self, samples: list[Sample], microbatches, advance) -> list[Sample]:
        """Reference log-probs (live routing), then old log-probs under the routing mode."""
        if self.reference is not None:
            ref = collect_log_probs(self.reference, microbatches, **self.spec.pass_options())
            samples = [dataclasses.replace(s, ref_log_probs=r) for s, r in zip(samples, ref)]
            advance()
        self._mismatch_metrics = {}
        if not self.cfg.train.use_rollout_log_probs:
            measure = self._measure_routes and samples[0].routes is not None
            # Live routing records its routes when measuring (a copy of the indices, no extra pass).
            action = {"none": "record" if measure else None, "R2": "record", "R3": "replay"}[self.mode]
            with routing_action(self.chunks, action, with_backward=False):
                old = collect_log_probs(self.chunks, microbatches, **self.spec.pass_options())
                if action == "record":
                    recorded = recorded_sample_routes(self.chunks, microbatches)
            if measure:
                t0 = time.perf_counter()
                self._mismatch_metrics = self._live_route_metrics(samples, microbatches, recorded if action == "record"
                                                                  else None)
                self._mismatch_metrics["time/route_metrics_s"] = time.perf_counter() - t0
            if samples[0].rollout_log_probs is not None:
                self._mismatch_metrics.update(self._gap_metrics(old, samples, ""))
            samples = [dataclasses.replace(s, old_log_probs=o) for s, o in zip(samples, old)]
            if self.mode == "R2":
                samples = [dataclasses.replace(s, routes=r) for s, r in zip(samples, recorded)]
            advance()
        return samples

    def _live_route_metrics(self, samples, microbatches, recorded) -> dict:
        """Engine routes vs the trainer's live routes (routing/agreement.py). Under R3 the replay
        pass routes from replayed inputs, so one extra forward-only pass routes live; its log-probs
        give the train/rollout gap without R3 (``train_rollout_logprob_abs_diff_live``)."""
        from sapo_megatron.routing import live_agreement_metrics

        out = {}
        if recorded is None:
            with routing_action(self.chunks, "record", with_backward=False):
                live_lp = collect_log_probs(self.chunks, microbatches, **self.spec.pass_options())
                recorded = recorded_sample_routes(self.chunks, microbatches)
            out.update(self._gap_metrics(live_lp, samples, "_live"))
        out.update(live_agreement_metrics(self.chunks, [s.routes for s in samples], recorded,
                                          [s.loss_mask for s in samples]))
        return out

    def _gap_metrics(self, train_lps, samples, suffix: str) -> dict:
        """Mean |train - rollout| log-prob and the share of tokens whose SAPO gradient weight is
        below 0.5 at r = exp(gap) (trainer/mismatch.py), token-weighted over DP."""
        from sapo_megatron.trainer.mismatch import gap_counts

        counts = [gap_counts(lp, s.rollout_log_probs, s.loss_mask, s.advantages, self.spec.tau_pos, self.spec.tau_neg)
                  for lp, s in zip(train_lps, samples)]
        total, low, count = all_reduce_values([sum(c[i] for c in counts) for i in range(3)], group=self._dp_group())
        out = {f"train_rollout_gate_low_frac{suffix}": low / max(count, 1.0)}
        if suffix:  # the old-log-prob pass's own gap is the loss metric train_rollout_logprob_abs_diff
            out[f"train_rollout_logprob_abs_diff{suffix}"] = total / max(count, 1.0)
        return out

    def _dp_group(self):
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_group()

    def _update(self, minibatch_samples) -> dict:
        """One optimizer step on a minibatch, replaying routes unless routing is live."""
        minibatch = self._microbatches(minibatch_samples)
        self._token_counts[0] += sum(int((~mb.padding_mask).sum()) for mb in minibatch)
        self._token_counts[1] += sum(mb.tokens.numel() for mb in minibatch)
        self._microbatch_count += len(minibatch)
        minibatch = assign_step_weights(minibatch, self.spec.reduction, norm_length=self.spec.norm_length)
        for controller in filter(None, map(routing_replay_of, self.chunks)):
            controller.reset_counts()
        with routing_action(self.chunks, None if self.mode == "none" else "replay", with_backward=True):
            lr = self.optimizer.param_groups[0]["lr"]
            metrics = run_step(self.chunks, minibatch, self.spec, optimizer=self.optimizer)
        metrics["lr"] = lr
        if metrics["update_successful"]:  # as Megatron-LM: a skipped update does not advance it
            self.scheduler.step(increment=1)
        metrics.update(replay_metrics(self.chunks) if self.mode != "none" else {})
        return metrics

    def _step_metrics(self, rewards, results, update_metrics, timings) -> dict:
        from megatron.core import parallel_state

        local = [float(rewards.sum()), float((rewards**2).sum()), rewards.numel(),
                 sum(r.model_tokens for r in results), sum(r.finish_reason == "abort" for r in results),
                 *self._exact_counts]
        total, sq, n, length, aborted, exact, judged = all_reduce_values(
            local, group=parallel_state.get_data_parallel_group())
        mean = total / n
        out = {
            "step": self.iteration,
            "phase": "rl",
            "rl_step": self.step,
            "reward_mean": mean,
            "reward_std": math.sqrt(max(sq / n - mean * mean, 0.0)),
            "response_len_mean": length / n,  # the model's tokens (not an episode's environment's)
            "abort_frac": aborted / n,
            **timings,
        }
        if judged:  # the task tells exact answers apart (Task.score): their share, unshaped
            out["exact_frac"] = exact / judged
        out["step_skipped"] = float(not update_metrics)  # every sample aborted: nothing trained
        # Loss statistics: the first update (ratios start at 1) and the last (most off-policy).
        if update_metrics:
            out.update(update_metrics[-1])
            out["loss_first_update"] = update_metrics[0]["loss"]
        return out

    def train(self) -> None:
        run_cold_start(self)  # the supervised steps not done yet (none unless train.cold_start_steps)
        # Engines that serve from a copy of the weights start from the trainer's (version = step).
        with self._phase(f"weight sync to version {self.step}", "weight_sync"):
            sync_params(self.chunks)
            getattr(self.engine, "begin", lambda chunks, version: None)(self.chunks, self.step)
        while self.step < self.cfg.run.steps:
            t0 = time.perf_counter()
            # The step's own limit bounds its collectives between the phases inside.
            with self._phase(f"step {self.step}", "step"):
                metrics = self.train_step()
            metrics["time/step_s"] = time.perf_counter() - t0
            self.step += 1
            self.logger.log(metrics)
            every = self.cfg.run.save_every  # 0: only the final checkpoint
            if (every and self.step % every == 0) or self.step == self.cfg.run.steps:
                with self.logger.phase("checkpoint", 1) as advance, \
                        self._phase(f"checkpoint save step {self.iteration}", "checkpoint"):
                    self._save()
                    advance()
        with self._phase("checkpoint finalize", "checkpoint"):
            finalize_async_saves()  # a pending async checkpoint is published before exit
        self.engine.close()
        self.logger.close()
        self.watchdog.stop()


def train(cfg) -> None:
    Trainer(cfg).train()
