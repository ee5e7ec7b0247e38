"""The SAPO RL loop, top to bottom: rollout -> reward -> advantages -> reference log-probs ->
old log-probs -> minibatch updates -> weight sync -> checkpoint -> metrics.

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
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sapo_megatron.collectives import all_reduce_values, global_max
from sapo_megatron.losses import grpo_advantages, rloo_advantages
from sapo_megatron.step import (
    Sample,
    assign_step_weights,
    build_model_chunks,
    build_optimizer,
    collate_packed,
    collate_padded,
    collect_log_probs,
    run_step,
)
from sapo_megatron.models.builder import use_transformer_engine
from sapo_megatron.routing import (
    attach_routes,
    attach_routing_replay,
    recorded_sample_routes,
    replay_metrics,
    routing_action,
    routing_replay_of,
)
from sapo_megatron.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from sapo_megatron.trainer.logging import MetricsLogger

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


def learning_rate(cfg, step: int) -> float:
    """Warm-up then constant or cosine decay to ``min_lr``."""
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.lr_schedule == "cosine":
        span = max(1, cfg.run.steps - o.warmup_steps)
        progress = min(1.0, (step - o.warmup_steps) / span)
        return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * progress))
    return o.lr


def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


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


def _build_samples(results, advantages, *, use_routes: bool) -> list[Sample]:
    """Rollout results -> training samples; old log-probs start as the engine's (replaced by
    the trainer's own pass unless ``train.use_rollout_log_probs``). An aborted request keeps
    its prompt with no loss tokens (and placeholder routes, distinct ids, under R3)."""
    like = next((r.routes for r in results if r.routes is not None), None)
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
            mask[p - 1 :] = True
        routes = res.routes
        if use_routes and routes is None and like is not None:
            routes = torch.arange(like.shape[-1], dtype=like.dtype).expand(n - 1, like.shape[1], -1).contiguous()
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
        initialize_model_parallel(cfg.parallel, seed=cfg.run.seed)
        self.rank = dist.get_rank()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.model_cfg = cfg.model.resolve()
        self.chunks = build_model_chunks(
            self.model_cfg, cfg.parallel,
            use_distributed_optimizer=bool(cfg.optim.megatron.get("use_distributed_optimizer", False)),
        )
        # Initial weights: a converted Megatron checkpoint, else HF safetensors, else random init.
        if cfg.model.ckpt_dir:
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
        self.mode = cfg.routing.mode
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
        self.engine = build_engine(cfg, self.chunks, self.model_cfg, tokenizer=self.task.tokenizer)
        self.spec = cfg.loss.to_spec()
        self.step = 0
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            save_resolved(cfg, self.out / "config.yaml")
        self.logger = MetricsLogger(self.out, enabled=self.rank == 0, tensorboard=cfg.run.tensorboard,
                                    progress=cfg.run.progress, total_steps=cfg.run.steps,
                                    wandb_project=cfg.run.wandb_project, wandb_entity=cfg.run.wandb_entity)
        self._maybe_resume()

    # --- checkpoints -------------------------------------------------------------------
    def _maybe_resume(self) -> None:
        path = latest_checkpoint(self.out) if self.cfg.run.resume else None
        if path is None:
            return
        meta = load_checkpoint(path, self.chunks, self.optimizer)
        self.step = meta["step"]
        self.stream.load_state_dict(meta["data"])
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def _save(self) -> None:
        save_checkpoint(self.out, self.step, self.chunks, self.optimizer,
                        extra={"data": self.stream.state_dict()}, keep_last=self.cfg.run.keep_last)

    # --- one RL step ------------------------------------------------------------------
    def _collate(self, group: list[Sample]):
        tp = self.cfg.parallel.tensor_model_parallel_size
        collate = collate_padded if self.cfg.train.layout == "padded" else collate_packed
        longest = max(s.tokens.numel() for s in group)
        # Pipeline parallelism needs one shape per step: pad to the step's longest sample.
        length = self._step_max_len if self.cfg.parallel.pipeline_model_parallel_size > 1 else longest
        kwargs = {}
        cp = self.cfg.parallel.context_parallel_size
        # Context parallelism cuts the sequence into 2 x CP chunks, each a multiple of the
        # SP shard: pad to 2 x CP x TP (packed: every sample to 2 x CP, the row to that x TP).
        multiple = tp * 2 * cp if cp > 1 else tp
        if self.cfg.train.layout == "packed":
            length = length * len(group)
            # Transformer Engine attends packed samples through cu_seqlens (THD); the local
            # spec (CPU) gets the equivalent block-diagonal mask.
            kwargs["use_thd"] = use_transformer_engine()
            if cp > 1:
                kwargs["sample_multiple"] = 2 * cp
                length = -(-length // (2 * cp)) * 2 * cp + 2 * cp * len(group)
        mb = collate(group, pad_multiple=multiple, min_length=length, **kwargs)
        if self.mode != "none" and group[0].routes is not None:
            from megatron.core import parallel_state

            # Under CP the forward step takes the CP slice first, then replay the SP shard of
            # what is left: attach routes for the whole sequence.
            sp = self.cfg.parallel.sequence_parallel and cp == 1
            mb = attach_routes(mb, group, tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                               tp_size=tp if sp else 1)
        return mb

    def _microbatches(self, samples: list[Sample]):
        size = self.cfg.train.micro_batch_size
        return [self._collate(samples[i : i + size]) for i in range(0, len(samples), size)]

    def rollout(self):
        cfg = self.cfg.rollout
        prompts = self.stream.next_batch(cfg.prompts_per_step)[self.dp_rank :: self.dp_size]
        flat = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
        # Seeded by (run seed, step): a resumed run samples exactly what the original did.
        params = cfg.sampling_params(stop_token_ids=(self.task.tokenizer.eos_id,),
                                     seed=self.cfg.run.seed * 1_000_003 + self.step)
        results = self.engine.generate([p.ids for p in flat], params, return_routes=self.mode == "R3")
        rewards = torch.tensor([
            self.task.reward(p, r.response_ids, self.task.tokenizer.decode(r.response_ids)) for p, r in zip(flat, results)
        ], dtype=torch.float64)
        return flat, results, rewards

    def train_step(self) -> dict:
        cfg, timings = self.cfg, {}
        t0 = time.perf_counter()
        with self.logger.phase("rollout", 1) as advance:
            _, results, rewards = self.rollout()
            advance()
        timings["time/rollout_s"] = time.perf_counter() - t0
        aborted = torch.tensor([r.finish_reason == "abort" for r in results])
        advantages = group_advantages(cfg.train.advantage, rewards, cfg.rollout.samples_per_prompt, aborted)
        samples = _build_samples(results, advantages, use_routes=self.mode == "R3")
        self._step_max_len = self._global_max(max(s.tokens.numel() for s in samples))
        microbatches = self._microbatches(samples)

        t0 = time.perf_counter()
        passes = int(self.reference is not None) + int(not cfg.train.use_rollout_log_probs)
        with self.logger.phase("log-probs", passes) as advance:
            samples = self._log_prob_passes(samples, microbatches, advance)
        timings["time/old_logprob_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        _set_lr(self.optimizer, learning_rate(cfg, self.step))
        per_update = len(samples) // cfg.train.updates_per_rollout
        update_metrics = []
        with self.logger.phase("updates", cfg.train.updates_per_rollout) as advance:
            for u in range(cfg.train.updates_per_rollout):
                update_metrics.append(self._update(samples[u * per_update : (u + 1) * per_update]))
                advance()
        timings["time/update_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with self.logger.phase("weight sync", 1) as advance:
            self.engine.update_weights(self.chunks, self.step)
            advance()
        timings["time/weight_sync_s"] = time.perf_counter() - t0
        return self._step_metrics(rewards, results, update_metrics, timings)

    def _log_prob_passes(self, samples: list[Sample], microbatches, advance) -> list[Sample]:
        """Reference log-probs (live routing), then old log-probs under the routing mode."""
        if self.reference is not None:
            ref = collect_log_probs(self.reference, microbatches, temperature=self.spec.temperature)
            samples = [dataclasses.replace(s, ref_log_probs=r) for s, r in zip(samples, ref)]
            advance()
        if not self.cfg.train.use_rollout_log_probs:
            action = {"none": None, "R2": "record", "R3": "replay"}[self.mode]
            with routing_action(self.chunks, action, with_backward=False):
                old = collect_log_probs(self.chunks, microbatches, temperature=self.spec.temperature)
                if self.mode == "R2":
                    recorded = recorded_sample_routes(self.chunks, microbatches)
            samples = [dataclasses.replace(s, old_log_probs=o) for s, o in zip(samples, old)]
            if self.mode == "R2":
                samples = [dataclasses.replace(s, routes=r) for s, r in zip(samples, recorded)]
            advance()
        return samples

    def _update(self, minibatch_samples: list[Sample]) -> dict:
        """One optimizer step on a minibatch, replaying routes unless routing is live."""
        minibatch = self._microbatches(minibatch_samples)
        minibatch = assign_step_weights(minibatch, self.spec.reduction, norm_length=self.spec.norm_length)
        for controller in filter(None, map(routing_replay_of, self.chunks)):
            controller.reset_counts()
        with routing_action(self.chunks, None if self.mode == "none" else "replay", with_backward=True):
            metrics = run_step(self.chunks, minibatch, self.spec, optimizer=self.optimizer)
        metrics.update(replay_metrics(self.chunks) if self.mode != "none" else {})
        return metrics

    def _global_max(self, value: int) -> int:
        return int(global_max(value))

    def _step_metrics(self, rewards, results, update_metrics, timings) -> dict:
        from megatron.core import parallel_state

        local = [float(rewards.sum()), float((rewards**2).sum()), rewards.numel(),
                 sum(len(r.response_ids) for r in results), sum(r.finish_reason == "abort" for r in results)]
        total, sq, n, length, aborted = all_reduce_values(local, group=parallel_state.get_data_parallel_group())
        mean = total / n
        out = {
            "step": self.step,
            "reward_mean": mean,
            "reward_std": math.sqrt(max(sq / n - mean * mean, 0.0)),
            "response_len_mean": length / n,
            "abort_frac": aborted / n,
            "lr": learning_rate(self.cfg, self.step),
            **timings,
        }
        # Loss statistics: the first update (ratios start at 1) and the last (most off-policy).
        for key, value in update_metrics[-1].items():
            out[key] = value
        out["loss_first_update"] = update_metrics[0]["loss"]
        return out

    def train(self) -> None:
        while self.step < self.cfg.run.steps:
            metrics = self.train_step()
            self.step += 1
            self.logger.log(metrics)
            if self.step % self.cfg.run.save_every == 0 or self.step == self.cfg.run.steps:
                with self.logger.phase("checkpoint", 1) as advance:
                    self._save()
                    advance()
        self.engine.close()
        self.logger.close()


def train(cfg) -> None:
    Trainer(cfg).train()
