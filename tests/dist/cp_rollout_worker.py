"""torchrun worker: SGLang rollouts under context parallelism, and their routes on every rank.

Run by tests/test_cp.py against a mock SGLang server that samples anew for every request
(as SGLang does without deterministic inference, whatever the ``sampling_seed``)::

    torchrun --nproc_per_node=4 tests/dist/cp_rollout_worker.py --tp 2 --cp 2 --url URL --out F

No model runs (the local spec has no CP attention). Per rank:

1. the trainer's SGLang engine (``ReplicaSGLang``) generates for this DP rank's prompts; the rank
   reports whether it is a leader, the ranks of its group and what it holds (tokens, routes);
2. the trainer's own collate (``Trainer._collate``, on a stand-in trainer: a real one needs a
   model) attaches the routes; the forward step's CP slice (``prepare_microbatch``) and
   routing replay's SP shard follow; the routes each router would be handed are compared with
   the truth: the token at original position ``p`` (the CP-sliced ``position_ids``, cut into the
   SP shard by Megatron's own ``scatter_to_sequence_parallel_region``) replays row ``p`` of its
   sample's rollout routes, and only rows the rollout routed are replayed.
"""

from __future__ import annotations

import argparse
import json
import types
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")

NUM_HIDDEN_LAYERS, MOE_LAYERS, TOPK, NUM_EXPERTS = 3, [1, 2], 2, 4  # layer 0 dense
# Per DP rank: its prompts (each sampled twice, as a GRPO group would be).
PROMPTS = {0: [[1, 2, 3], [4, 5, 6, 7, 8]], 1: [[9, 10], [11, 12, 13, 14]]}


class _NoSync:
    """No weights to push: nothing runs a model here."""

    def push(self, model_chunks, version):
        return []

    def close(self):
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--cp", type=int, default=2)
    ap.add_argument("--url", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region

    from sapo_megatron.config.schema import TrainConfig
    from sapo_megatron.models import ParallelConfig
    from sapo_megatron.parallel import destroy, initialize_model_parallel
    from sapo_megatron.rollout.base import RouteSpec, SamplingParams
    from sapo_megatron.rollout.sglang import SGLangConfig, SGLangEngine
    from sapo_megatron.rollout.sglang.replica import ReplicaSGLang
    from sapo_megatron.routing.replay import LayerReplay, RoutingReplay
    from sapo_megatron.step.batch import Sample, sequence_multiples
    from sapo_megatron.step.run import prepare_microbatch
    from sapo_megatron.trainer.loop import Trainer

    parallel = ParallelConfig(tensor_model_parallel_size=args.tp, context_parallel_size=args.cp)
    initialize_model_parallel(parallel, seed=0)
    rank = dist.get_rank()
    dp_rank = parallel_state.get_data_parallel_rank()
    cp_rank, tp_rank = parallel_state.get_context_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()

    # 1. Rollouts through the trainer's SGLang engine.
    spec = RouteSpec(num_hidden_layers=NUM_HIDDEN_LAYERS, topk=TOPK, num_experts=NUM_EXPERTS, moe_layers=MOE_LAYERS)
    replica = ReplicaSGLang(lambda: SGLangEngine(SGLangConfig(urls=[args.url], retries=1, backoff_s=0.1),
                                                 route_spec=spec, require_routes=True),
                            lambda engine: _NoSync())
    prompts = [p for p in PROMPTS[dp_rank] for _ in range(2)]
    params = SamplingParams(max_new_tokens=6, stop_token_ids=(0,), seed=7)
    results = replica.generate(prompts, params, return_routes=True)
    checks = {"rank": rank, "dp_rank": dp_rank, "cp_rank": cp_rank, "tp_rank": tp_rank,
              "leader": replica.is_leader, "group": dist.get_process_group_ranks(replica.group),
              "tokens": [r.prompt_ids + r.response_ids for r in results],
              "routes": [r.routes.tolist() for r in results]}

    # 2. Their routes, as each router of this rank would replay them.
    cfg = TrainConfig(parallel=parallel)
    cfg.routing.mode = "R3"
    pad_multiple, sample_multiple = sequence_multiples(tp_size=args.tp, sequence_parallel=parallel.sequence_parallel,
                                                       cp_size=args.cp)
    trainer = types.SimpleNamespace(cfg=cfg, mode="R3",
                                    batcher=types.SimpleNamespace(pad_multiple=pad_multiple,
                                                                  sample_multiple=sample_multiple))
    samples = []
    for r in results:
        tokens = torch.tensor(r.prompt_ids + r.response_ids)
        n = tokens.numel()
        samples.append(Sample(tokens=tokens, loss_mask=torch.ones(n - 1, dtype=torch.bool),
                              old_log_probs=torch.zeros(n - 1), advantages=torch.zeros(n - 1), routes=r.routes))
    full = Trainer._collate(trainer, samples)
    model = types.SimpleNamespace(parameters=lambda: iter([torch.empty(0)]), buffers=lambda: iter([]))
    local = prepare_microbatch(full, model)
    controller = RoutingReplay(moe_columns=list(range(len(MOE_LAYERS))), num_moe_layers=len(MOE_LAYERS),
                               sequence_parallel=parallel.sequence_parallel, action="replay")
    controller.layers = [LayerReplay(controller, m) for m in range(len(MOE_LAYERS))]
    controller.on_microbatch(local.routes)
    # The router's tokens: [S, B] flattened sequence-major, this TP rank's SP shard under SP.
    positions_SB = local.position_ids.T.contiguous()
    if parallel.sequence_parallel:
        positions_SB = scatter_to_sequence_parallel_region(positions_SB)
    columns = torch.arange(positions_SB.shape[1]).expand_as(positions_SB)
    replayed = 0
    for m, layer in enumerate(controller.layers):
        target = layer.forward_queue.pop()
        for t, (p, b) in enumerate(zip(positions_SB.reshape(-1).tolist(), columns.reshape(-1).tolist())):
            rows = results[b].routes.shape[0]  # the rollout routed tokens 0 .. rows - 1
            assert bool(target.replay_T[t]) == (p < rows), (rank, m, t, p, b)
            assert bool(target.valid_T[t]) == (p <= rows), (rank, m, t, p, b)  # the last token routes live
            if p < rows:
                assert torch.equal(target.idx_TK[t], results[b].routes[p, m]), (rank, m, t, p, b)
                replayed += 1
    checks["replayed_rows"] = replayed
    checks["local_tokens"] = positions_SB.numel()

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, checks)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(gathered, f)
    replica.close()
    destroy()


if __name__ == "__main__":
    main()
