"""Supervised cold start: a few NLL steps on the task's reference answers before RL.

RL from a random policy spends most of its samples learning the output *format* (here: one
number, then EOS), and a shaped reward that pays for the format lets the policy collapse onto
well-formed wrong answers. The SAPO paper, like most RL recipes, starts from a supervised model.
``train.cold_start_steps: N`` gives the CPU demo the same start: N optimizer steps of
cross-entropy on ``rollout.prompts_per_step`` prompts of the task each, with the task's reference
responses (:func:`sapo_megatron.tasks.reference_response_ids`), before the first RL step.

Design choices:
- The same Megatron step as RL: samples become :class:`~sapo_megatron.step.Sample` s with
  advantage 1 on the response tokens and go through :func:`~sapo_megatron.step.run_step` with the
  registered ``nll`` loss (``loss = -A log p``) and the run's reduction, so TP/PP/SP/DP, the
  step-global normalisation and the metrics are those of the RL updates. Routing is live (there
  are no rollout routes to replay).
- Its own prompt stream (the task's train split from position 0, seeded by ``run.seed``), apart
  from the RL stream, so the RL prompts do not depend on the length of the cold start.
- Its learning rate ``train.cold_start_lr`` (null: ``optim.lr``) is constant and set directly on
  the optimizer: the LR schedule (warm-up, decay) belongs to the RL steps and does not advance
  here; it is re-applied when the cold start ends. The Adam moments carry over into RL.
- One step counter for the whole run: checkpoints and ``metrics.jsonl`` rows are numbered by
  iteration = cold-start steps done + RL steps done; a row has ``phase`` (``cold_start`` or
  ``rl``), cold-start rows ``cold_start_step``, ``sft_loss`` (token-weighted mean NLL of the
  reference tokens, by the run's reduction), ``entropy``, ``grad_norm``, ``lr``.
- Checkpoints every ``run.save_every`` cold-start steps and at its end; ``meta.json`` holds
  ``cold_start`` (steps done, stream position), so a run killed in or after the cold start resumes
  exactly. A checkpoint written by RL (``rl_step > 0``) never restarts the cold start.

Run it as part of training (``train.cold_start_steps=20`` on any config), e.g. the CPU demo:
``bash examples/run_tiny_cpu.sh`` (``configs/tiny_cpu.yaml``).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from sapo_megatron.step import Sample, assign_step_weights, run_step

LOSS = "nll"  # sapo_megatron.losses.policy.nll_loss


def reference_samples(task, prompts) -> list[Sample]:
    """Prompt + reference response as training samples: loss on the response, advantage 1."""
    from sapo_megatron.tasks import reference_response_ids

    samples = []
    for prompt in prompts:
        response = reference_response_ids(task, prompt)
        if not response:
            raise ValueError(f"task {task.name!r}: the reference response of prompt {prompt.uid!r} is empty")
        tokens = torch.tensor(list(prompt.ids) + response, dtype=torch.long)
        n, p = tokens.numel(), len(prompt.ids)
        mask = torch.zeros(n - 1, dtype=torch.bool)
        mask[p - 1:] = True  # targets p .. n-1: the response tokens
        samples.append(Sample(tokens=tokens, loss_mask=mask, old_log_probs=torch.zeros(n - 1),
                              advantages=mask.to(torch.float32)))
    return samples


class ColdStart:
    """The cold start's position (steps done, prompt stream) and its step; see the module docstring."""

    def __init__(self, cfg, task):
        from sapo_megatron.tasks import PromptStream

        self.steps = cfg.train.cold_start_steps
        self.lr = cfg.train.cold_start_lr if cfg.train.cold_start_lr is not None else cfg.optim.lr
        self.prompts_per_step = cfg.rollout.prompts_per_step
        self.stream = PromptStream(task, seed=cfg.run.seed)
        self.done = 0
        self.closed = False  # RL has started: the cold start is over whatever the config says now
        self.spec = dataclasses.replace(cfg.loss, type=LOSS, entropy_coef=0.0, kl_coef=0.0, tis_cap=None)

    @property
    def finished(self) -> bool:
        return self.closed or self.done >= self.steps

    def state_dict(self) -> dict:
        return {"steps_done": self.done, "data": self.stream.state_dict()}

    def load_state_dict(self, state: dict | None, *, rl_step: int) -> None:
        """Restore from a checkpoint's ``cold_start`` entry. None (a checkpoint written before cold
        starts existed) or any RL step done: the cold start is over, whatever it was."""
        self.done = int(state["steps_done"]) if state is not None else 0
        if state is None or rl_step > 0:
            self.closed = True
            return
        self.stream.load_state_dict(state["data"])

    def step(self, trainer) -> dict:
        """One optimizer step of NLL on this DP rank's share of the next prompts."""
        from sapo_megatron.routing import routing_action, routing_replay_of

        t0 = time.perf_counter()
        prompts = self.stream.next_batch(self.prompts_per_step)[trainer.dp_rank :: trainer.dp_size]
        samples = reference_samples(trainer.task, prompts)
        # One minibatch (one optimizer step), cut into microbatches as an RL update is.
        batcher = trainer.batcher.with_updates(1)
        (minibatch,) = batcher.split(samples, label=f" (cold-start step {self.done})")
        microbatches = assign_step_weights(trainer._microbatches(minibatch), self.spec.reduction,
                                           norm_length=self.spec.norm_length)
        for group in trainer.optimizer.param_groups:
            group["lr"] = self.lr
        for controller in filter(None, map(routing_replay_of, trainer.chunks)):
            controller.reset_counts()
        with routing_action(trainer.chunks, None, with_backward=True):
            metrics = run_step(trainer.chunks, microbatches, self.spec, optimizer=trainer.optimizer)
        self.done += 1
        if self.finished:  # hand the optimizer back to the RL schedule (it did not advance)
            trainer.scheduler.step(increment=0)
        return {
            "phase": "cold_start",
            "cold_start_step": self.done - 1,
            "sft_loss": metrics["loss"],
            "entropy": metrics.get("entropy"),
            "grad_norm": metrics.get("grad_norm"),
            "update_successful": metrics.get("update_successful"),
            "lr": self.lr,
            "time/step_s": time.perf_counter() - t0,
        }


def run_cold_start(trainer) -> None:
    """The cold-start steps not done yet: log each, checkpoint every ``run.save_every`` and at the end."""
    cold = trainer.cold_start
    every = trainer.cfg.run.save_every
    while not cold.finished:
        with trainer.logger.phase("cold start", 1) as advance, trainer._phase(f"cold-start step {cold.done}", "step"):
            metrics = cold.step(trainer)
            advance()
        trainer.logger.log({"step": cold.done - 1, **metrics})
        if every and (cold.done % every == 0 or cold.finished):
            with trainer.logger.phase("checkpoint", 1) as advance, \
                    trainer._phase(f"checkpoint save step {trainer.iteration}", "checkpoint"):
                trainer._save()
                advance()
