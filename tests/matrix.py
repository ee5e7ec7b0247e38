"""The pairwise matrix of trainer runs (issue 19): the features, the combinations ``validate``
refuses and why, and a greedy all-pairs cover of the rest. ``tests/test_matrix.py`` runs it.

Every pair of values of two factors below appears together in at least one run, unless no run
can hold that pair: then every combination holding it is refused by ``validate`` (the reasons
are :data:`REFUSALS`, each shown on one representative combination). The cover is greedy and
deterministic: among all allowed combinations (the full product, minus the refused ones), take
the one that covers the most pairs not yet covered, the cheapest on a tie (:func:`cost`), the
first in product order after that; repeat until every pair is covered. A greedy cover is not the
smallest possible in general (finding that is NP-hard), but here it is within one run of it: the
6 layouts that run, each with the 3 routing modes, need 18 distinct runs; greedy takes 19.

    python -m tests.matrix          # the runs, the refusals and the pairs no run can hold

This module is imported by the torchrun workers too (``task.reward_fn=tests.matrix:reward``), so
it imports nothing heavy at module level.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Callable

# Factor -> values, in a fixed order (the product order the cover breaks ties by).
FACTORS: dict[str, tuple] = {
    "engine": ("embedded", "sglang"),  # sglang: tests/sglang_mock.py, disk weight sync
    # 2 ranks: DP, TP (+SP), PP, EP (spanning both DP replicas); 4 ranks: EP across DP replicas
    # of TP=2, EP=2 over 4 DP replicas (expert data parallelism 2), and context parallelism
    # beside TP and beside EP.
    "parallel": ("dp2", "tp2", "pp2", "ep2", "tp2_ep2", "ep2_dp4", "tp2_cp2", "ep2_cp2"),
    "layout": ("padded", "packed"),
    "routing": ("none", "R2", "R3"),
    "dynamic": ("off", "zero_variance"),
    "staleness": (0, 1),
    "budget": ("off", "on"),
    "dist_opt": ("off", "on"),
    "recompute": ("none", "full", "selective"),
    "cold_start": (0, 2),
}

# parallel value -> (world size, parallel.* sizes)
PARALLEL: dict[str, tuple[int, dict[str, int]]] = {
    "dp2": (2, {}),
    "tp2": (2, {"tensor_model_parallel_size": 2}),
    "pp2": (2, {"pipeline_model_parallel_size": 2}),
    "ep2": (2, {"expert_model_parallel_size": 2}),
    "tp2_ep2": (4, {"tensor_model_parallel_size": 2, "expert_model_parallel_size": 2}),
    "ep2_dp4": (4, {"expert_model_parallel_size": 2}),
    "tp2_cp2": (4, {"tensor_model_parallel_size": 2, "context_parallel_size": 2}),
    "ep2_cp2": (4, {"expert_model_parallel_size": 2, "context_parallel_size": 2}),
}

RECOMPUTE: dict[str, dict] = {
    "none": {},
    # Every layer's block is recomputed: its router runs again in backward (replay's second queue).
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    # Megatron's default modules (core_attn): the routers do not run again.
    "selective": {"recompute_granularity": "selective"},
}

STEPS = 2  # RL steps per run: step 1 is the first that can be stale
PROMPTS, SAMPLES = 4, 4  # per step; 16 samples: 8 per DP rank at DP=2
MICRO_BATCH = 4
# Tokens per microbatch: a sample holds 5 to 8 (a prompt of 4, a response of 1 to 4), a DP rank's
# share at DP=4 at least 4 x 5 = 20, so every share needs 2 microbatches or more.
TOKEN_BUDGET = 16
MAX_ROUNDS = 3  # dynamic sampling


def world_size(row: dict) -> int:
    return PARALLEL[row["parallel"]][0]


def _sizes(row: dict) -> dict[str, int]:
    return PARALLEL[row["parallel"]][1]


@functools.cache
def transformer_engine() -> bool:
    """Whether this machine can run context parallelism (Transformer Engine's attention on CUDA)."""
    from sapo_megatron.models.builder import use_transformer_engine

    return use_transformer_engine()


@functools.cache
def cuda() -> bool:
    """Whether Megatron gets the alltoall token dispatcher (models/config.py: allgather on CPU)."""
    import torch

    return torch.cuda.is_available()


@dataclass(frozen=True)
class Refusal:
    """Combinations ``validate`` refuses: ``applies(row)``; its message names each of ``keys``."""

    name: str
    applies: Callable[[dict], bool]
    keys: tuple[str, ...]
    reason: str  # why, in a few words (docs/trainer.md lists them)


def _cp(row: dict) -> bool:
    return _sizes(row).get("context_parallel_size", 1) > 1


def _ep(row: dict) -> bool:
    return _sizes(row).get("expert_model_parallel_size", 1) > 1


REFUSALS: tuple[Refusal, ...] = (
    Refusal("cp-without-te", lambda r: _cp(r) and not transformer_engine(),
            ("parallel.context_parallel_size",),
            "context parallelism needs Transformer Engine's attention on CUDA; the local spec (CPU) has none"),
    Refusal("cp-embedded", lambda r: _cp(r) and r["engine"] == "embedded",
            ("rollout.engine=embedded", "parallel.context_parallel_size"),
            "the embedded engine samples whole sequences and does not run under CP"),
    Refusal("cp-r2", lambda r: _cp(r) and r["routing"] == "R2",
            ("routing.mode=R2", "parallel.context_parallel_size"),
            "R2 records routes of the whole sequence, which CP splits over ranks"),
    Refusal("sglang-async-dynamic",
            lambda r: r["engine"] == "sglang" and r["staleness"] > 0 and r["dynamic"] != "off",
            ("rollout.max_staleness", "rollout.engine=sglang", "rollout.dynamic_sampling"),
            "background generation makes one round per step; dynamic sampling needs several"),
    Refusal("budget-padded-allgather-ep",
            lambda r: r["budget"] == "on" and r["layout"] == "padded" and _ep(r) and not cuda(),
            ("train.max_tokens_per_microbatch", "train.layout=padded", "parallel.expert_model_parallel_size"),
            "Megatron's allgather token dispatcher (the CPU's; alltoall needs CUDA) needs equal microbatch "
            "shapes on every DP rank, which only the packed layout gives under a token budget"),
)


def refusals(row: dict) -> list[Refusal]:
    return [r for r in REFUSALS if r.applies(row)]


def _all_rows() -> list[dict]:
    return [dict(zip(FACTORS, values)) for values in itertools.product(*FACTORS.values())]


def _pairs(row: dict) -> frozenset:
    return frozenset(((a, row[a]), (b, row[b])) for a, b in itertools.combinations(FACTORS, 2))


def cost(row: dict) -> float:
    """Rough seconds of one run on 2 shared cores (tests/test_matrix.py's durations: 11-20 s on
    2 ranks, most of it starting the processes and the final checkpoint; 20-35 s on 4)."""
    return (4.0 + 5.5 * world_size(row) + 1.0 * (row["engine"] == "sglang") + 1.0 * (row["cold_start"] > 0)
            + 0.5 * (row["dynamic"] != "off"))


def _greedy(rows: list[dict], todo: set) -> list[dict]:
    """Rows that together hold every pair of ``todo``: each time the one holding the most pairs
    not yet held, the cheapest on a tie, the first in order after that."""
    pairs, todo, out = [_pairs(r) for r in rows], set(todo), []
    while todo:
        best = max(range(len(rows)), key=lambda i: (len(pairs[i] & todo), -cost(rows[i]), -i))
        out.append(rows[best])
        todo -= pairs[best]
    return out


def cover() -> tuple[list[dict], dict]:
    """The runs (a greedy all-pairs cover of the allowed combinations), and each pair that no
    allowed combination holds -> the refusals of the first combination holding it."""
    rows = _all_rows()
    allowed = [r for r in rows if not refusals(r)]
    coverable = set().union(*map(_pairs, allowed))
    refused: dict = {}
    for row in rows:
        for pair in _pairs(row) - coverable:
            refused.setdefault(pair, [r.name for r in refusals(row)])
    return _greedy(allowed, coverable), refused


def refused_cover(refused: dict) -> list[dict]:
    """A few combinations that together hold every refused pair (each of them refused)."""
    return _greedy(_all_rows(), set(refused))


def representative(refusal: Refusal) -> dict:
    """The first combination in product order that ``refusal`` alone applies to (else the first
    it applies to): the one on which the test shows ``validate``'s message."""
    hits = [r for r in _all_rows() if refusal.applies(r)]
    alone = [r for r in hits if refusals(r) == [refusal]]
    return (alone or hits)[0]


def run_id(index: int, row: dict) -> str:
    parts = [f"r{index:02d}", row["engine"], row["parallel"], row["layout"], row["routing"],
             "ds" if row["dynamic"] != "off" else "", f"stale{row['staleness']}" if row["staleness"] else "",
             "budget" if row["budget"] == "on" else "", "distopt" if row["dist_opt"] == "on" else "",
             f"rc-{row['recompute']}" if row["recompute"] != "none" else "",
             f"cold{row['cold_start']}" if row["cold_start"] else ""]
    return "-".join(p for p in parts if p)


def overrides(row: dict, *, out: str, hf_dir: str | None, url: str | None = None,
              weight_dir: str | None = None) -> list[str]:
    """The ``key=value`` overrides of one run, on top of the schema's defaults. ``hf_dir=None``:
    the ``tiny-moe`` preset instead of the HF model, for ``validate`` alone (no model is built)."""
    o = [f"run.output_dir={out}", f"run.steps={STEPS}", "run.save_every=0", "run.tensorboard=false",
         "run.progress=false",
         # A hang is reported by the watchdog, naming the phase, long before the test's own limit.
         "run.timeouts.step_s=90", "run.timeouts.rollout_s=90", "run.timeouts.weight_sync_s=90",
         "run.timeouts.checkpoint_s=90",
         *(["model.preset=null", f"model.hf_dir={hf_dir}"] if hf_dir else ["model.preset=tiny-moe",
                                                                           "model.vocab_size=16"]),
         "optim.lr=1e-3",
         f"rollout.prompts_per_step={PROMPTS}", f"rollout.samples_per_prompt={SAMPLES}", "rollout.max_new_tokens=4",
         f"rollout.engine={row['engine']}", f"rollout.max_staleness={row['staleness']}",
         # One optimizer step per RL step: the logged update is the step's first, whose routes
         # (R2's recorded, R3's from an engine with the trainer's weights) are the live ones.
         "train.updates_per_rollout=1", f"train.layout={row['layout']}",
         f"train.cold_start_steps={row['cold_start']}",
         f"routing.mode={row['routing']}",
         "task.name=arithmetic", "task.reward_fn=tests.matrix:reward"]
    o += [f"parallel.{k}={v}" for k, v in _sizes(row).items()]
    o += [f"model.megatron.{k}={v}" for k, v in RECOMPUTE[row["recompute"]].items()]
    if row["dynamic"] != "off":
        o += [f"rollout.dynamic_sampling.filter={row['dynamic']}", f"rollout.dynamic_sampling.max_rounds={MAX_ROUNDS}"]
    if row["budget"] == "on":
        o += ["train.micro_batch_size=null", f"train.max_tokens_per_microbatch={TOKEN_BUDGET}"]
    else:
        o += [f"train.micro_batch_size={MICRO_BATCH}"]
    if row["dist_opt"] == "on":
        o += ["optim.megatron.use_distributed_optimizer=true"]
    if row["engine"] == "sglang":
        o += [f"rollout.sglang.urls=[{url or 'http://127.0.0.1:1'}]", "rollout.sglang.weight_sync=disk",
              f"rollout.sglang.weight_dir={weight_dir or out + '/weights'}", "rollout.sglang.retries=1",
              "rollout.sglang.backoff_s=0.1", "rollout.sglang.timeout_s=60"]
    return o


_calls = [0]


def reward(prompt_text: str, response_text: str, answer, meta) -> float:
    """Every other prompt group of a DP rank scores 0.5 on each sample (zero variance: dynamic
    sampling drops it), starting with the first group on even DP ranks and the second on odd
    ones; the other groups score 0, 1/3, 2/3, 1 by sample. So at any DP size some rank has
    advantages, hence a gradient, in every step, and with dynamic sampling some rank filters a
    group and every step takes exactly 2 rounds. Counted per process: every rank of a replica
    scores the same results in the same order, and a group is SAMPLES consecutive calls."""
    from megatron.core import parallel_state

    group, k = divmod(_calls[0], SAMPLES)
    _calls[0] += 1
    constant = (group + parallel_state.get_data_parallel_rank()) % 2 == 0
    return 0.5 if constant else k / (SAMPLES - 1)


def main() -> None:
    runs, refused = cover()
    print(f"{len(runs)} runs ({sum(world_size(r) == 4 for r in runs)} on 4 ranks), "
          f"estimated {sum(cost(r) for r in runs):.0f} s:")
    for i, row in enumerate(runs):
        print(f"  {run_id(i, row)}")
    print("refused (validate):")
    for refusal in REFUSALS:
        print(f"  {refusal.name}: {refusal.reason}; e.g. {run_id(0, representative(refusal))[4:]}")
    print(f"{len(refused)} pairs no run can hold:")
    # Values no run can hold at all, with the refusals every one of their pairs meets.
    whole = {}
    for f, values in FACTORS.items():
        for v in values:
            mine = [names for pair, names in refused.items() if (f, v) in pair]
            if len(mine) == sum(len(w) for g, w in FACTORS.items() if g != f):
                whole[(f, v)] = set.intersection(*map(set, mine))
    for (f, v), names in whole.items():
        print(f"  {f}={v} with anything: {', '.join(sorted(names))}")
    for ((a, va), (b, vb)), names in sorted(refused.items(), key=str):
        if (a, va) not in whole and (b, vb) not in whole:
            print(f"  {a}={va} x {b}={vb}: {', '.join(names)}")

if __name__ == "__main__":
    main()
