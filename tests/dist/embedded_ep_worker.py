"""torchrun worker: the embedded engine generating when expert parallelism spans DP replicas.

Run by tests/test_embedded_engine_ep.py::

    torchrun --nproc_per_node=1 tests/dist/embedded_ep_worker.py --save-weights W.pt --out REF.pt
    torchrun --nproc_per_node=2 tests/dist/embedded_ep_worker.py --ep 2 --weights W.pt --out EP.pt

At EP=2, TP=1 on two ranks each rank is its own data-parallel replica, and the MoE token
exchange (Megatron's allgather dispatcher on CPU) runs over both: every forward on one rank
needs one on the other, with the same number of tokens. In every call DP rank 0 stops at its
first token (every token is a stop token) while DP rank 1 runs to ``MAX_NEW``; the calls
(``CALLS``) add, one at a time, what else differs between DP ranks:

- ``early_stop``: prompts of the same shape on both ranks (only the stop differs);
- ``uneven``: other prompt counts and lengths;
- ``empty``: DP rank 0 has no prompts at all (a dynamic-sampling round whose quota is full).

The reference (one rank, EP=1, the same weights) generates each DP rank's prompts alone.
Decoding is greedy (top-p ~ 0), so what each rank generates is well defined without the
rank's random stream.
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")

from sapo_megatron.models import ModelConfig  # noqa: E402
from sapo_megatron.parallel import destroy  # noqa: E402
from sapo_megatron.rollout.base import SamplingParams  # noqa: E402
from sapo_megatron.rollout.embedded import EmbeddedEngine  # noqa: E402
from sapo_megatron.routing import attach_routing_replay  # noqa: E402
from sapo_megatron.step import build_model_chunks  # noqa: E402
from sapo_megatron.step.sharding import unwrap  # noqa: E402
from tests.helpers import (  # noqa: E402
    add_layout_args,
    gather_full,
    init_layout,
    load_full_state_dict,
    merge_over_ranks,
)

MODEL = ModelConfig(vocab_size=24, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=64, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                    first_k_dense=1)
MAX_NEW = 6
# Per call, each DP rank's prompts.
CALLS = {
    "early_stop": {0: [[3, 4, 5], [6, 7, 8]], 1: [[9, 10, 11], [12, 13, 14]]},
    "uneven": {0: [[3, 4], [5, 6, 7], [8, 9, 10, 11, 12]], 1: [[13, 14, 15, 16], [1, 2, 3, 4, 5, 6, 7]]},
    "empty": {0: [], 1: [[13, 14, 15, 16], [1, 2, 3, 4, 5, 6, 7]]},
}


def params(dp_rank: int) -> SamplingParams:
    stop = tuple(range(MODEL.vocab_size)) if dp_rank == 0 else ()
    return SamplingParams(top_p=1e-6, max_new_tokens=MAX_NEW, stop_token_ids=stop, seed=5)


def _plain(results) -> list[dict]:
    return [{"prompt": r.prompt_ids, "response": r.response_ids, "log_probs": r.response_log_probs,
             "finish": r.finish_reason, "routes": r.routes} for r in results]


def main() -> None:
    ap = argparse.ArgumentParser()
    add_layout_args(ap)
    ap.add_argument("--weights", help="full weights to load (the EP run)")
    ap.add_argument("--save-weights", help="where the reference run saves its full weights")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    parallel = init_layout(args, seed=1234)
    chunks = build_model_chunks(MODEL, parallel, wrap_ddp=False)
    model = chunks[0]
    if args.weights:
        load_full_state_dict(model, torch.load(args.weights))
    else:
        full = merge_over_ranks(gather_full(model, {n: p.detach() for n, p in unwrap(model).named_parameters()}))
        if dist.get_rank() == 0:
            torch.save(full, args.save_weights)
    attach_routing_replay(model, MODEL.moe_layer_pattern())
    engine = EmbeddedEngine(chunks, num_experts=MODEL.num_experts, seed=0)
    assert (engine.lockstep_group is not None) == (args.ep > 1), "EP=2 at TP=1 spans the two DP replicas"

    from megatron.core import parallel_state

    # {dp_rank: {call: results}}; the reference generates each DP rank's prompts alone.
    ranks = [parallel_state.get_data_parallel_rank()] if dist.get_world_size() > 1 else sorted(CALLS["uneven"])
    out = {rank: {call: _plain(engine.generate(prompts[rank], params(rank), return_routes=True))
                  for call, prompts in CALLS.items()} for rank in ranks}
    if dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, out)
        out = {rank: calls for part in parts for rank, calls in part.items()}
    if dist.get_rank() == 0:
        torch.save(out, args.out)
    destroy()


if __name__ == "__main__":
    main()
