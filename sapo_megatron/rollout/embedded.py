"""The embedded rollout engine: the training policy samples its own responses (the CPU default).

It runs on every rank of the training job, on the trainer's own (sharded) model, so it needs no
second copy of the weights and no weight sync, unless it must differ from the trainer (older
weights, bf16, router noise): then it samples from an :class:`~.engine_copy.EngineCopy` with
the same layout, updated by ``update_weights``. Each data-parallel rank generates for its own
prompts; the ranks of one model-parallel group run the same forwards together.

Lockstep across replicas. When expert parallelism spans data-parallel replicas (EP=2, TP=1: each
rank is a replica), every MoE layer's token exchange needs a forward from every replica of the
expert group, and Megatron's allgather dispatcher (the CPU one) needs the same number of tokens
from each. A replica that stopped when its own sequences finished would leave the others
waiting in that exchange, or feed it a batch of another shape. So the replicas step together:
each decode step they agree, over the data-parallel group, on the batch rows and the longest
sequence (a max all-reduce); every replica forwards that shape, filling its batch with 2-token
pad sequences whose outputs are dropped, and all stop when no replica has a sequence left (a
replica without prompts still joins). Sampling sees only the real rows, so each replica draws
the tokens it would draw alone (``rollout.embedded.router_noise_std`` aside: that noise is drawn
over the whole batch, filler rows included). Without such EP (the usual case) nothing is
exchanged and each replica stops on its own.

Generation is token by token: each step re-runs the model on the whole right-padded batch
(no KV cache: the CPU demo's sequences are a few dozen tokens, and a full forward keeps the
Megatron model untouched). The next-token logits of each sequence are gathered over the
tensor-parallel vocabulary shards on the last pipeline stage, sampled there with the
configured temperature and top-p (seeded, reproducible), and broadcast to the other stages.

What it returns matches what SGLang returns, so the trainer treats both engines alike:
- ``response_log_probs``: log-probs of the sampled tokens after temperature, before top-p;
- ``routes``: for every token but the last, the experts the routers chose in the forward that
  first fed that token (prompt tokens: the first forward; a generated token: the next one),
  ``[len - 1, num_moe_layers, topk]`` in compact storage. Recorded with the routing-replay
  controller's ``record`` action, so the model must have one attached.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from sapo_megatron.collectives import all_reduce_values
from sapo_megatron.step.batch import Sample, collate_padded
from sapo_megatron.step.run import (
    broadcast_from_last_stage,
    model_forward,
    prepare_microbatch,
    run_schedule,
    tp_group_or_none,
)
from sapo_megatron.rollout.base import RolloutResult, SamplingParams
from sapo_megatron.routing import recorded_sample_routes, routing_action, storage_dtype


def _last_logits_loss(mb, output_tensor):
    """Loss-function slot of the forward-only schedule: the last real position's full logits."""
    last = (~mb.padding_mask).sum(1) - 1
    logits_BV = output_tensor[torch.arange(output_tensor.shape[0], device=last.device), last].float()
    group = tp_group_or_none()
    if group is not None:
        parts = [torch.empty_like(logits_BV) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, logits_BV.contiguous(), group=group)
        logits_BV = torch.cat(parts, dim=-1)
    zero = torch.zeros((), device=output_tensor.device)
    return zero, zero.to(torch.int), {"logits": logits_BV.cpu()}


def _forward_step(data_iterator, model):
    mb = prepare_microbatch(next(data_iterator), model)
    return model_forward(model, mb), partial(_last_logits_loss, mb)


def _top_p_filter(probs_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return probs_BV
    sorted_p, order = probs_BV.sort(dim=-1, descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
    filtered = torch.zeros_like(probs_BV).scatter(-1, order, sorted_p * keep)
    return filtered / filtered.sum(-1, keepdim=True)


class EmbeddedEngine:
    """Samples from the trainer's own model chunks (see module docstring)."""

    def __init__(self, model_chunks, *, num_experts: int | None, pad_multiple: int = 1, pad_id: int = 0, seed: int = 0,
                 copy=None, router_noise=()):
        # ``copy``: a rollout.engine_copy.EngineCopy owning the model to sample from (lag, bf16,
        # noise); ``router_noise``: the RouterLogitNoise hooks on that copy's routers.
        self.copy = copy
        self.router_noise = list(router_noise)
        self.model_chunks = copy.chunks if copy is not None else model_chunks
        self.pad_multiple = pad_multiple
        self.pad_id = pad_id
        self.seed = seed
        self.route_dtype = storage_dtype(num_experts) if num_experts else None
        self.calls = 0
        self.lockstep_group = _lockstep_group()  # collective: every rank builds its engine

    @torch.no_grad()
    def _next_logits(self, sequences: list[torch.Tensor], min_length: int = 0):
        """The batch's microbatch and each sequence's next-token logits ``[B, V]`` (every rank)."""
        from megatron.core import parallel_state

        mb = collate_padded([_bare_sample(s) for s in sequences], pad_multiple=self.pad_multiple, pad_id=self.pad_id,
                            min_length=min_length)
        outputs = run_schedule(self.model_chunks, [mb], _forward_step, forward_only=True)
        logits = outputs[0]["logits"] if parallel_state.is_pipeline_last_stage(ignore_virtual=True) else None
        return mb, broadcast_from_last_stage(logits)

    def generate(self, prompts: list[list[int]], params: SamplingParams, *, return_routes: bool,
                 routes_start: list[int] | None = None) -> list[RolloutResult]:
        """Generate for this data-parallel rank's ``prompts`` (a collective over its model-parallel
        group; over every rank when the replicas step together, even for no ``prompts``).
        ``routes_start[i]``: return prompt ``i``'s route rows from that token on (a multi-turn
        episode's later turn, rollout/episodes.py), as SGLang's ``routed_experts_start_len``."""
        starts = list(routes_start) if routes_start is not None else [0] * len(prompts)
        bad = [i for i, (s, p) in enumerate(zip(starts, prompts)) if not 0 <= s <= len(p)]
        if len(starts) != len(prompts) or bad:
            raise ValueError(f"routes_start must give one start in [0, len(prompt)] per prompt; got {len(starts)} "
                             f"for {len(prompts)} prompts (out of range: prompts {bad})")
        short = [i for i, p in enumerate(prompts) if len(p) < 2]
        if short:
            raise ValueError(f"the embedded engine needs prompts of at least 2 tokens; prompts {short} are shorter")
        for chunk in self.model_chunks:
            chunk.eval()
        # An explicit params.seed reproduces a rollout; otherwise every call draws anew.
        key = (params.seed,) if params.seed is not None else (self.seed, self.calls)
        gen = torch.Generator().manual_seed(hash((*key, _dp_rank())) % (2**63))
        for noise in self.router_noise:  # the same (seed, step) draws the same router noise
            noise.reseed(hash(key) % (2**63))
        self.calls += 1
        sequences = [torch.tensor(p, dtype=torch.long) for p in prompts]
        prompt_lens = [len(p) for p in prompts]
        log_probs: list[list[float]] = [[] for _ in prompts]
        rows: list[list[torch.Tensor]] = [[] for _ in prompts]
        fed = [0] * len(prompts)
        done = [False] * len(prompts)
        finish = ["length"] * len(prompts)
        stop = set(params.stop_token_ids)
        step = 0
        while True:
            active = [i for i, d in enumerate(done) if not d] if step < params.max_new_tokens else []
            batch = [sequences[i] for i in active]
            min_length = 0
            if self.lockstep_group is not None:  # one shape on every replica (module docstring)
                width, min_length = (int(v) for v in all_reduce_values(
                    [len(batch), max((s.numel() for s in batch), default=0)], op="max", group=self.lockstep_group))
                batch += [torch.full((2,), self.pad_id, dtype=torch.long)] * (width - len(batch))
            if not batch:
                break
            step += 1
            if return_routes:
                with routing_action(self.model_chunks, "record", with_backward=False):
                    mb, logits = self._next_logits(batch, min_length)
                    recorded = recorded_sample_routes(self.model_chunks, [mb], include_last=True)
                for j, i in enumerate(active):
                    n = sequences[i].numel()
                    rows[i].append(recorded[j][fed[i] : n].to(self.route_dtype))
                    fed[i] = n
            else:
                mb, logits = self._next_logits(batch, min_length)
            if not active:
                continue
            logits = logits[: len(active)]  # the filler rows' logits are dropped
            logp = torch.log_softmax(logits.double() / params.temperature, dim=-1)
            probs = _top_p_filter(logp.exp(), params.top_p)
            tokens = torch.multinomial(probs, 1, generator=gen)[:, 0]
            for j, i in enumerate(active):
                tok = int(tokens[j])
                sequences[i] = torch.cat([sequences[i], tokens[j : j + 1]])
                log_probs[i].append(float(logp[j, tok]))
                if tok in stop:
                    done[i], finish[i] = True, "stop"
        for chunk in self.model_chunks:
            chunk.train()
        results = []
        for i, seq in enumerate(sequences):
            routes = torch.cat(rows[i])[starts[i]:] if return_routes else None
            results.append(RolloutResult(
                prompt_ids=list(prompts[i]),
                response_ids=seq[prompt_lens[i]:].tolist(),
                response_log_probs=log_probs[i],
                finish_reason=finish[i],
                routes=routes,
                meta={"weight_version": self.copy.version} if self.copy is not None else {},
            ))
        return results

    def begin(self, model_chunks, version: int) -> None:
        """The RL loop starts (or resumes) at policy ``version``: a copy takes the trainer's
        weights as that version's snapshot. Without this, a copy built before a supervised cold
        start would sample its first RL steps from the weights the cold start replaced (on a
        resume the snapshot equals the saved one, so nothing changes)."""
        self.update_weights(model_chunks, version)

    def update_weights(self, model_chunks, version: int) -> None:
        """Live weights: nothing to sync. A copy: the trainer now holds policy ``version`` (RL
        steps completed); the copy samples with version ``max(0, version - lag)``, in its dtype."""
        if self.copy is not None:
            self.copy.update_weights(model_chunks, version)

    def state_dict(self) -> dict:
        return {"copy": self.copy.state_dict()} if self.copy is not None else {}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("copy", state.get("lagged"))  # "lagged": checkpoints before EngineCopy
        if self.copy is not None and saved is not None:
            self.copy.load_state_dict(saved)

    def close(self) -> None:
        pass


def _bare_sample(tokens: torch.Tensor) -> Sample:
    """A sample carrying only tokens: the generation forward needs no loss fields."""
    n = tokens.numel()
    zeros = torch.zeros(n - 1)
    return Sample(tokens=tokens, loss_mask=torch.zeros(n - 1, dtype=torch.bool), old_log_probs=zeros, advantages=zeros)


def _lockstep_group():
    """The data-parallel group when the replicas must step together (module docstring), else None."""
    from megatron.core import parallel_state

    from sapo_megatron.parallel import expert_exchange_spans_replicas

    return parallel_state.get_data_parallel_group() if expert_exchange_spans_replicas() else None


def _dp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank() if dist.is_initialized() else 0
