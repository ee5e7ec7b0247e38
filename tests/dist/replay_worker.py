"""torchrun worker: routing replay (R3) of rollout routes in a parallel training forward/step.

Two roles, run by tests/test_dist_replay.py:

``--generate`` (one rank): build the tiny MoE, save its weights, then act as the rollout
engine with a *perturbed* copy (as after a few updates, so live routing visibly differs):
sample responses token by token, re-running the model on the growing prefix, recording each
new token's routes; write the samples with SGLang's wire format (``meta_info`` with base64
``routed_experts`` over all hidden layers, rows = prompt + response - 1).

default (any layout): load the weights, decode the rollout routes, then
  1. ``compare`` pass: live routing, agreement with the rollout routes measured;
  2. ``replay`` pass: log-probs under the rollout routes, and the routes each router really
     used, mapped back to samples;
  3. one SAPO training step with the routes replayed (forward and, with recomputation, the
     recomputed forward in backward); the full gradients are gathered.
Rank 0 saves everything for the test to compare with the single-rank run.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")

from sapo_megatron.step import (  # noqa: E402
    PolicyLossSpec,
    Sample,
    assign_step_weights,
    build_model_chunks,
    collate_padded,
    collect_log_probs,
    run_step,
)
from sapo_megatron.step.sharding import unwrap  # noqa: E402
from tests.helpers import (  # noqa: E402
    add_layout_args,
    gather_full,
    init_layout,
    load_full_state_dict,
    merge_over_ranks,
    this_rank_microbatches,
)
from sapo_megatron.models import ModelConfig, ParallelConfig  # noqa: E402
from sapo_megatron.parallel import destroy, initialize_model_parallel  # noqa: E402
from sapo_megatron.routing import (  # noqa: E402
    attach_routes,
    attach_routing_replay,
    decode_routed_experts,
    encode_routed_experts,
    replay_metrics,
    routing_action,
    moe_layer_indices,
    storage_dtype,
)
from sapo_megatron.routing.replay import recorded_sample_routes  # noqa: E402

MODEL = ModelConfig(
    vocab_size=48,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_experts=8,
    num_experts_per_tok=2,
    first_k_dense=1,
)
NUM_SAMPLES = 8
SEQ = 16  # padded length of every microbatch (prompt <= 6, response <= 9)


def _generate(weights_out: str, samples_out: str, perturb: float) -> None:
    parallel = ParallelConfig()
    initialize_model_parallel(parallel, seed=11)
    policy = build_model_chunks(MODEL, parallel, wrap_ddp=False)[0]
    full = {n: p.detach().clone() for n, p in policy.named_parameters()}
    torch.save(full, weights_out)
    gen = torch.Generator().manual_seed(5)
    rollout = build_model_chunks(MODEL, parallel, wrap_ddp=False)[0]
    # The rollout engine serves a slightly different network (a policy a few updates old).
    load_full_state_dict(rollout, {
        n: t + perturb * t.std() * torch.randn(t.shape, generator=gen) if t.dim() > 1 else t
        for n, t in full.items()})
    rollout.eval()
    replay = attach_routing_replay(rollout, MODEL.moe_layer_pattern())
    moe = [i for i, m in enumerate(MODEL.moe_layer_pattern()) if m]
    records = []
    for i in range(NUM_SAMPLES):
        prompt_len = int(torch.randint(2, 7, (), generator=gen))
        response_len = int(torch.randint(3, 10, (), generator=gen))
        tokens = torch.randint(0, MODEL.vocab_size, (prompt_len,), generator=gen)
        rows = []  # [layers(all hidden), topk] per fed token
        logps = []
        fed = 0
        for _ in range(response_len):
            n = tokens.numel()
            mask = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)[None, None]
            replay.begin("record", with_backward=False)
            with torch.no_grad():
                logits = rollout(tokens[None], torch.arange(n)[None], mask)[0, -1]
            replay.finish()
            # Rows for the tokens this forward fed for the first time (prefill: the prompt).
            for pos in range(fed, n):
                row = torch.zeros(MODEL.num_hidden_layers, MODEL.num_experts_per_tok, dtype=torch.int32)
                for layer in replay.layers:
                    row[layer.moe_index] = layer.recorded[-1][pos].to(torch.int32)
                rows.append(row)
            fed = n
            probs = torch.softmax(logits.double(), -1)
            nxt = torch.multinomial(probs, 1, generator=gen)
            logps.append(float(torch.log(probs[nxt])))
            tokens = torch.cat([tokens, nxt])
        routes = torch.stack(rows)
        assert routes.shape[0] == prompt_len + response_len - 1
        records.append({
            "tokens": tokens,
            "prompt_len": prompt_len,
            "response_len": response_len,
            "meta_info": {"routed_experts": encode_routed_experts(routes), "output_token_logprobs": logps},
        })
    assert all(set(moe) == {lay.moe_index for lay in replay.layers} for _ in [0])
    torch.save(records, samples_out)
    destroy()


def _samples(records) -> list[Sample]:
    out = []
    for i, rec in enumerate(records):
        routes = decode_routed_experts(
            rec["meta_info"],
            num_layers=MODEL.num_hidden_layers,
            topk=MODEL.num_experts_per_tok,
            prompt_len=rec["prompt_len"],
            response_len=rec["response_len"],
            num_experts=MODEL.num_experts,
            sample_id=i,
            moe_layers=moe_layer_indices(MODEL.moe_layer_pattern()),
            out_dtype=storage_dtype(MODEL.num_experts),
        )
        n = rec["tokens"].numel()
        mask = torch.zeros(n - 1, dtype=torch.bool)
        mask[rec["prompt_len"] - 1 :] = True
        old = torch.zeros(n - 1)
        old[rec["prompt_len"] - 1 :] = torch.tensor(rec["meta_info"]["output_token_logprobs"], dtype=torch.float32)
        out.append(Sample(
            tokens=rec["tokens"],
            loss_mask=mask,
            old_log_probs=old,
            advantages=torch.full((n - 1,), 1.0 if i % 2 else -0.5),
            routes=routes,
        ))
    return out


# Which routers run twice differs: every one (full, uniform), the first layer's only (full,
# block of 1), every MoE layer's (selective "moe"), none (selective "core_attn"; "moe_act" too,
# but upstream allows it only with grouped-GEMM experts, i.e. Transformer Engine).
RECOMPUTE = {
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    "block1": {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1},
    "moe": {"recompute_granularity": "selective", "recompute_modules": ["moe"]},
    "core_attn": {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
}


def main() -> None:
    global MODEL
    ap = argparse.ArgumentParser()
    ap.add_argument("--generate", action="store_true")
    add_layout_args(ap)
    ap.add_argument("--microbatches", type=int, default=1)
    ap.add_argument("--recompute", choices=sorted(RECOMPUTE), help="activation recomputation settings")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--samples", required=True)
    ap.add_argument("--out")
    ap.add_argument("--perturb", type=float, default=0.1, help="relative weight noise of the rollout policy")
    ap.add_argument("--num-layers", type=int, default=MODEL.num_hidden_layers,
                    help="hidden layers (layer 0 dense, the rest MoE); odd counts for uneven stages")
    args = ap.parse_args()
    MODEL = dataclasses.replace(MODEL, num_hidden_layers=args.num_layers)
    if args.generate:
        _generate(args.weights, args.samples, args.perturb)
        return

    model_cfg = MODEL
    if args.recompute:
        model_cfg = dataclasses.replace(MODEL, megatron=RECOMPUTE[args.recompute])
    parallel = init_layout(args, seed=11)
    chunks = build_model_chunks(model_cfg, parallel)
    load_full_state_dict(chunks[0], torch.load(args.weights))
    for chunk in chunks:
        attach_routing_replay(chunk, MODEL.moe_layer_pattern())

    samples = _samples(torch.load(args.samples))
    groups = this_rank_microbatches(samples, args.microbatches)
    # Alternate between aligning the whole sequence (sliced by the controller) and building
    # only this rank's sequence-parallel shard: both paths must replay the same routes.
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    microbatches = [
        attach_routes(collate_padded(g, pad_multiple=args.tp, min_length=SEQ), g,
                      **({"tp_rank": tp_rank, "tp_size": args.tp} if i % 2 else {}))
        for i, g in enumerate(groups)
    ]
    mine = [s for g in groups for s in g]

    # 1. Live routing, agreement with the rollout's routes measured.
    with routing_action(chunks, "compare", with_backward=False):
        live_lp = collect_log_probs(chunks, microbatches)
    agreement = replay_metrics(chunks)
    for chunk in chunks:
        unwrap(chunk)._sapo_routing_replay.reset_counts()

    # 2. R3 replay: log-probs under the rollout routes, and the routes the routers used.
    with routing_action(chunks, "replay", with_backward=False) as controllers:
        for c in controllers:
            c.keep_used = True
        replay_lp = collect_log_probs(chunks, microbatches)
        used = recorded_sample_routes(chunks, microbatches)
    replay_stats = replay_metrics(chunks)

    # 3. One SAPO step with replay (and recomputation when asked).
    weighted = assign_step_weights(microbatches, "seq_mean_token_mean")
    with routing_action(chunks, "replay", with_backward=True):
        metrics = run_step(chunks, weighted, PolicyLossSpec(type="sapo"))
    grads = {n: p.main_grad.detach() for n, p in unwrap(chunks[0]).named_parameters()}
    full_grads = merge_over_ranks(gather_full(chunks[0], grads))

    # Per-sample results from every DP rank (pipeline stages each hold their own layers).
    mine_ids = [i for i, s in enumerate(samples) if any(s is m for m in mine)]
    local_layers = sorted({lay.moe_index for c in (unwrap(m)._sapo_routing_replay for m in chunks) for lay in c.layers})
    stage_layers = [layer.layer_number - 1 for chunk in chunks for layer in unwrap(chunk).decoder.layers]
    result = {
        "stage_layers": stage_layers,
        "ids": mine_ids,
        "live_lp": live_lp,
        "replay_lp": replay_lp,
        "used": used,
        "layers": local_layers,
        "rank": dist.get_rank(),
    }
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        torch.save({
            "per_rank": gathered,
            "agreement_live": agreement,
            "replay_stats": replay_stats,
            "metrics": metrics,
            "grads": full_grads,
            "rollout_routes": [s.routes for s in samples],
        }, args.out)
    destroy()


if __name__ == "__main__":
    main()
