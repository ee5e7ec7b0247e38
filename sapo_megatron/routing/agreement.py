"""Routing agreement WITHOUT replay: the rollout engine's routes against the trainer's live ones.

The R3 paper's headline mismatch figures: the share of router decisions (token x MoE layer)
on which inference and training pick different experts (~10% there), and the share of tokens
whose experts differ in at least one layer (~94%). We measure both every step, in every routing
mode: the engine's reported routes (what R3 would replay) against the routes the trainer's
routers choose live on the same tokens (R2's recorded routes; under R3 an extra forward-only
pass with live routing, since the replay pass's own routers see replayed inputs).

A decision agrees when both pick the same SET of experts (order ignored, as
``replay.same_topk_set``). Counted over response positions only (the rows the loss sees:
``loss_mask``), which skips aborted samples and their placeholder routes.

Metrics: ``routing/live_agreement_moe{m}`` (per MoE layer, MoE-only index as
``routing/agreement_moe{m}``), ``routing/live_agreement_mean`` (over all decisions) and
``routing/live_token_differ_frac`` (tokens differing in >= 1 MoE layer).
"""

from __future__ import annotations

import torch


def agreement_counts(engine_routes, live_routes, masks, columns) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure counts over samples: ``(agree_M, tokens_M, differ_T)``.

    ``engine_routes[i]``, ``live_routes[i]``: ``[R_i, M, K]`` routes of sample ``i``;
    ``masks[i]``: ``[R_i]`` bool, the rows to count; ``columns``: the MoE columns this rank's
    layers fill (a pipeline stage records its own layers only; the others count 0).
    ``differ_T``: per counted token, whether any of ``columns`` differs (bool, samples concatenated).
    """
    num = engine_routes[0].shape[1] if engine_routes else 0
    agree = torch.zeros(num, dtype=torch.float64)
    tokens = torch.zeros(num, dtype=torch.float64)
    differ = []
    cols = torch.tensor(sorted(columns), dtype=torch.long)
    for eng, live, mask in zip(engine_routes, live_routes, masks):
        e = eng[mask][:, cols].long().sort(dim=-1).values
        l_ = live[mask][:, cols].long().sort(dim=-1).values
        same_TM = (e == l_).all(dim=-1)
        agree[cols] += same_TM.sum(0).double()
        tokens[cols] += float(same_TM.shape[0])
        differ.append(~same_TM.all(dim=-1))
    return agree, tokens, torch.cat(differ) if differ else torch.zeros(0, dtype=torch.bool)


def counts_to_metrics(agree_M: torch.Tensor, tokens_M: torch.Tensor, differ: float, counted: float) -> dict[str, float]:
    out = {}
    for m in range(agree_M.numel()):
        if tokens_M[m] > 0:
            out[f"routing/live_agreement_moe{m}"] = float(agree_M[m] / tokens_M[m])
    if tokens_M.sum() > 0:
        out["routing/live_agreement_mean"] = float(agree_M.sum() / tokens_M.sum())
    if counted > 0:
        out["routing/live_token_differ_frac"] = differ / counted
    return out


def live_agreement_metrics(model_chunks, engine_routes, live_routes, masks) -> dict[str, float]:
    """:func:`agreement_counts` of this rank, reduced over the job (collective over all ranks).

    Data-parallel ranks hold other samples (summed); pipeline stages other layers of the same
    tokens (layer counts summed, a token's "differs somewhere" OR-ed = max over the stages);
    tensor-parallel ranks hold the same full routes (after SP's gather), so only DP and PP reduce.
    """
    from megatron.core import parallel_state

    from sapo_megatron.collectives import all_reduce_tensor, all_reduce_values
    from sapo_megatron.routing.replay import routing_replay_of

    columns = sorted({c for ch in model_chunks if (ctl := routing_replay_of(ch)) for c in ctl.moe_columns})
    agree, tokens, differ_T = agreement_counts(engine_routes, live_routes, masks, columns)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        pp = parallel_state.get_pipeline_model_parallel_group()
        agree = all_reduce_tensor(agree, group=pp)
        tokens = all_reduce_tensor(tokens, group=pp)
        differ_T = all_reduce_tensor(differ_T.to(torch.int32), op="max", group=pp).bool()
    dp = parallel_state.get_data_parallel_group()
    table = all_reduce_tensor(torch.cat([agree, tokens]), group=dp)
    differ, counted = all_reduce_values([int(differ_T.sum()), differ_T.numel()], group=dp)
    num = agree.numel()
    return counts_to_metrics(table[:num], table[num:], differ, counted)
