"""The doctor's measurement: the trainer's own step-0 rollout and log-prob passes, kept per token.

Why the trainer itself: the question is how far THIS trainer and THIS engine disagree, so the
model is built, loaded, batched and run exactly as ``sapo-megatron train`` does (a
:class:`~sapo_megatron.trainer.loop.Trainer` from the run's config: its TP/PP/EP/SP layout, its
converter for ``model.hf_dir`` / ``model.ckpt_dir``, its collation and routing replay). Nothing is
pushed to the server (the trainer's ``begin`` / weight sync never run): the server is measured
as it is, against the weights given.

The trainer's first step draws the same prompts with the same seeded sampling parameters, and the
passes here are the trainer's (``Trainer._log_prob_passes`` / ``_live_route_metrics``): one forward
replaying the engine's routes, one routing live (recording its routes). The difference is that
every token's gap is kept (gathered over data-parallel ranks to rank 0) for quantiles and
position buckets, where the trainer keeps sums. Run under torchrun for a model-parallel layout;
every rank calls :func:`measure`, rank 0 gets the report.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sapo_megatron.doctor.report import TokenGaps, build_report, routing_figures


def measure(trainer, *, routing_mode: str, record_to=None) -> dict | None:
    """Step 0's rollout through ``trainer``'s engine, both log-prob passes, the report (rank 0; None elsewhere).

    ``routing_mode``: the mode the run trains with (its pass gives the headline figures; the
    trainer here runs R3 to get the routes). ``record_to``: a path where rank 0 saves the rollouts it measured (``rollout.engine=recorded``
    replays them)."""
    from megatron.core import parallel_state

    from sapo_megatron.rollout.recorded import save_rollouts
    from sapo_megatron.routing import recorded_sample_routes, routing_action
    from sapo_megatron.routing.agreement import agreement_counts
    from sapo_megatron.collectives import all_reduce_tensor, all_reduce_values
    from sapo_megatron.routing.replay import routing_replay_of
    from sapo_megatron.step import collect_log_probs
    from sapo_megatron.trainer.loop import _build_samples, group_advantages

    cfg, chunks, spec = trainer.cfg, trainer.chunks, trainer.spec
    if not trainer.model_cfg.num_experts:
        raise ValueError("sapo-megatron doctor measures MoE routing; the model has no experts")
    _, results, rewards = trainer.rollout()
    aborted = torch.tensor([r.finish_reason == "abort" for r in results])
    advantages = group_advantages(cfg.train.advantage, rewards, cfg.rollout.samples_per_prompt, aborted)
    samples = _build_samples(results, advantages, use_routes=True, route_layout=trainer._route_layout)
    minibatches = trainer.batcher.split(samples, label=" (doctor)")
    samples = [s for m in minibatches for s in m.samples]
    microbatches = [mb for m in minibatches for mb in trainer._microbatches(m)]
    with routing_action(chunks, "replay", with_backward=False):
        replay = collect_log_probs(chunks, microbatches, **spec.pass_options())
    with routing_action(chunks, "record", with_backward=False):
        live = collect_log_probs(chunks, microbatches, **spec.pass_options())
        live_routes = recorded_sample_routes(chunks, microbatches)

    # Routing counts as routing/agreement.live_agreement_metrics reduces them (PP: layers; DP: samples).
    columns = sorted({c for ch in chunks if (ctl := routing_replay_of(ch)) for c in ctl.moe_columns})
    agree, tokens, differ_T = agreement_counts([s.routes for s in samples], live_routes,
                                               [s.loss_mask for s in samples], columns)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        pp = parallel_state.get_pipeline_model_parallel_group()
        agree, tokens = all_reduce_tensor(agree, group=pp), all_reduce_tensor(tokens, group=pp)
        differ_T = all_reduce_tensor(differ_T.to(torch.int32), op="max", group=pp).bool()
    dp = parallel_state.get_data_parallel_group()
    table = all_reduce_tensor(torch.cat([agree, tokens]), group=dp)
    differ, counted = all_reduce_values([int(differ_T.sum()), differ_T.numel()], group=dp)

    local = _token_gaps(samples, replay, live)
    gathered = [None] * dist.get_world_size(dp)
    dist.all_gather_object(gathered, (local, results), group=dp)
    if dist.get_rank() != 0:
        return None
    gaps = TokenGaps(*(torch.cat([g[0][i] for g in gathered]) for i in range(4)))
    if record_to is not None:
        save_rollouts([r for g in gathered for r in g[1]], record_to)
    num = agree.numel()
    routing = routing_figures(table[:num], table[num:], differ, counted)
    return build_report(gaps, routing, routing_mode=routing_mode, tau_pos=spec.tau_pos, tau_neg=spec.tau_neg)


def _token_gaps(samples, replay, live) -> tuple[torch.Tensor, ...]:
    """(replay gap, live gap, position in response, advantage) of this rank's loss tokens."""
    parts = [[], [], [], []]
    for s, r, l_ in zip(samples, replay, live):
        mask = s.loss_mask.bool()
        rollout = s.rollout_log_probs.double()
        parts[0].append((r.double() - rollout)[mask])
        parts[1].append((l_.double() - rollout)[mask])
        parts[2].append(torch.arange(int(mask.sum())))
        parts[3].append(s.advantages.double()[mask])
    return tuple(torch.cat(p) if p else torch.zeros(0) for p in parts)
