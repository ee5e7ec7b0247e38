"""torchrun worker: one SAPO training step of a tiny MoE GPTModel; saves full gradients.

Run by tests/test_dist_step.py, e.g.::

    torchrun --nproc_per_node=2 tests/dist/step_worker.py --tp 2 --weights W.pt --out G.pt

Without ``--weights`` (single rank) it initialises the model, saves its full weights to
``--save-weights`` and its gradients to ``--out``: the reference. With ``--weights`` it loads
those full weights into its sharded layout, so every layout starts from the same network, and
rank 0 writes the gathered full gradients and the step metrics.
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")

from sapo_megatron.step import (  # noqa: E402
    PolicyLossSpec,
    assign_step_weights,
    build_model_chunks,
    collate_packed,
    collate_padded,
    collect_log_probs,
    run_step,
)
from sapo_megatron.step.batch import packed_row_length  # noqa: E402
from sapo_megatron.step.sharding import unwrap  # noqa: E402
from sapo_megatron.step.synthetic import synthetic_samples  # noqa: E402
from sapo_megatron.models import ModelConfig  # noqa: E402
from sapo_megatron.parallel import destroy  # noqa: E402
from tests.helpers import (  # noqa: E402
    add_layout_args,
    gather_full,
    init_layout,
    load_full_state_dict,
    merge_over_ranks,
    this_rank_microbatches,
)

# Tiny Qwen3-MoE shape: 4 layers (layer 0 dense) so that PP=2 puts MoE layers on both stages,
# GQA 2:1, 4 experts top-2, an untied output layer.
MODEL = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_experts=4,
    num_experts_per_tok=2,
    first_k_dense=1,
)
GLOBAL_BATCH = 8
MAX_LEN = 14


def main() -> None:
    ap = argparse.ArgumentParser()
    add_layout_args(ap)
    ap.add_argument("--microbatches", type=int, default=1)
    ap.add_argument("--loss", default="sapo")
    ap.add_argument("--reduction", default="seq_mean_token_mean")
    ap.add_argument("--layout", choices=["padded", "packed"], default="padded")
    ap.add_argument("--weights", help="full weights to load (parallel runs)")
    ap.add_argument("--save-weights", help="where the reference run saves its full weights")
    ap.add_argument("--unfused", action="store_true", help="loss.fused_logprobs=false: logits, then log-probs")
    ap.add_argument("--log-probs", action="store_true", help="also save a forward-only log-prob pass")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    parallel = init_layout(args, seed=1234)
    chunks = build_model_chunks(MODEL, parallel)
    model = chunks[0]
    if args.weights:
        load_full_state_dict(model, torch.load(args.weights))
    elif args.save_weights:
        full = gather_full(model, {n: p.detach() for n, p in unwrap(model).named_parameters()})
        full = merge_over_ranks(full)
        if dist.get_rank() == 0:
            torch.save(full, args.save_weights)

    samples = synthetic_samples(GLOBAL_BATCH, vocab_size=MODEL.vocab_size, seed=7, max_length=MAX_LEN)
    groups = this_rank_microbatches(samples, args.microbatches)
    collate = collate_padded if args.layout == "padded" else collate_packed
    # One shape for every microbatch (pipeline p2p buffers are sized once per step): the longest
    # sample, or the longest packed row (the sum of its samples' lengths, not longest x count).
    min_length = MAX_LEN if args.layout == "padded" else max(
        packed_row_length([s.tokens.numel() for s in g], args.tp) for g in groups)
    microbatches = [collate(g, pad_multiple=args.tp, min_length=min_length) for g in groups]
    microbatches = assign_step_weights(microbatches, args.reduction)

    spec = PolicyLossSpec(
        type=args.loss,
        reduction=args.reduction,
        tau_pos=1.0,
        tau_neg=1.05,
        logprob_chunk_size=5,
        fused_logprobs=not args.unfused,
    )
    log_probs = None
    if args.log_probs:
        log_probs = collect_log_probs(chunks, microbatches, chunk_size=5, fused=not args.unfused)
    metrics = run_step(chunks, microbatches, spec)

    grads = {n: p.main_grad.detach() for n, p in unwrap(model).named_parameters()}
    full_grads = merge_over_ranks(gather_full(model, grads))
    if dist.get_rank() == 0:
        torch.save({"grads": full_grads, "metrics": metrics, "log_probs": log_probs}, args.out)
    destroy()


if __name__ == "__main__":
    main()
