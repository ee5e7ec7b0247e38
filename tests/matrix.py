"""The pairwise matrix of trainer runs (issue 19): the features, the combinations ``validate``
refuses and why, and a greedy all-pairs cover of the rest. ``tests/test_matrix.py`` runs it.

Every pair of values of two factors below appears together in at least one run, unless no run
can hold that pair: then every combination holding it is refused by ``validate`` (the reasons
are :data:`REFUSALS`, each shown on one representative combination). The cover is greedy and
deterministic: among all allowed combinations (the full product, minus the refused ones), take
the one that covers the most pairs not yet covered, the cheapest on a tie (:func:`cost`), the
first in product order after that; repeat until every pair is covered. A greedy cover is not the
smallest possible in general (finding that is NP-hard): the 6 layouts that run on CPU, each with
the 3 routing modes (or each with the 3 engine values), need 18 distinct runs; greedy takes 23.
The features that landed after the first matrix (delta weight sync as the engine value
``sglang_delta``, ``loss.fused_logprobs``, partial rollouts, multi-turn episodes) took it from 19
to 23: partial rollouts only run on SGLang at staleness 1 without dynamic sampling or several
turns, and multi-turn episodes not on SGLang at staleness 1, so their pairs fill fewer rows.

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
    # sglang: tests/sglang_mock.py, disk weight sync; sglang_delta: the same with delta pushes
    # (rollout.sglang.delta, the mock running sapo_sglang.delta_loader as its custom loader).
    "engine": ("embedded", "sglang", "sglang_delta"),
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
    "fused": ("on", "off"),  # loss.fused_logprobs (on: the default)
    "partial": ("off", "on"),  # rollout.partial (in_place pauses, partial_offpolicy tis)
    # rollout.max_turns: 1 is the arithmetic task; 3 the calculator's episodes, where every
    # wrong answer gets an observation and another turn (retry_on_wrong), so a random policy
    # plays 3-turn episodes with environment tokens.
    "turns": (1, 3),
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
TOKEN_BUDGET_TURNS = 32  # multi-turn episodes (token_budget)
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


def _sglang(row: dict) -> bool:
    return row["engine"] != "embedded"


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
            lambda r: _sglang(r) and r["staleness"] > 0 and r["dynamic"] != "off",
            ("rollout.max_staleness", "rollout.engine=sglang", "rollout.dynamic_sampling"),
            "background generation makes one round per step; dynamic sampling needs several"),
    Refusal("budget-padded-allgather-ep",
            lambda r: r["budget"] == "on" and r["layout"] == "padded" and _ep(r) and not cuda(),
            ("train.max_tokens_per_microbatch", "train.layout=padded", "parallel.expert_model_parallel_size"),
            "Megatron's allgather token dispatcher (the CPU's; alltoall needs CUDA) needs equal microbatch "
            "shapes on every DP rank, which only the packed layout gives under a token budget"),
    Refusal("partial-embedded", lambda r: r["partial"] == "on" and r["engine"] == "embedded",
            ("rollout.partial=true", "rollout.engine"),
            "partial rollouts keep requests running on SGLang servers across weight updates"),
    Refusal("partial-sync", lambda r: r["partial"] == "on" and r["staleness"] == 0,
            ("rollout.partial=true", "rollout.max_staleness"),
            "partial rollouts train tokens of earlier policy versions: they need max_staleness >= 1"),
    Refusal("partial-dynamic", lambda r: r["partial"] == "on" and r["dynamic"] != "off",
            ("rollout.partial=true", "rollout.dynamic_sampling"),
            "the pool takes whichever groups finish first; dynamic sampling's extra rounds do not fit it"),
    Refusal("multiturn-sglang-async",
            lambda r: r["turns"] > 1 and _sglang(r) and r["staleness"] > 0,
            ("rollout.max_turns=3", "rollout.engine=sglang", "rollout.max_staleness=1"),
            "background generation runs one turn per request, and an episode's turns wait on the environment"),
)


def refusals(row: dict) -> list[Refusal]:
    return [r for r in REFUSALS if r.applies(row)]


# The full product is ~10^5 combinations: each one's 78 pairs are the bits of one int, so the
# cover and its checks take seconds, not minutes.
@functools.cache
def _bits() -> dict:
    """(factor, value, factor, value) of every pair of two factors' values -> its bit."""
    out = {}
    for a, b in itertools.combinations(FACTORS, 2):
        for va in FACTORS[a]:
            for vb in FACTORS[b]:
                out[(a, va, b, vb)] = len(out)
    return out


@functools.cache
def _table() -> tuple:
    """Every combination in product order, with its pair mask and its refusals (names). Built
    depth-first, each prefix's pairs once: the last factor adds only its own 12 pairs per row."""
    names, values = list(FACTORS), list(FACTORS.values())
    bit = {key: 1 << b for key, b in _bits().items()}
    rows, masks, refused = [], [], []

    def walk(depth: int, prefix: tuple, mask: int) -> None:
        if depth == len(names):
            row = dict(zip(names, prefix))
            rows.append(row)
            masks.append(mask)
            refused.append(tuple(r.name for r in refusals(row)))
            return
        for v in values[depth]:
            m = mask
            for i in range(depth):
                m |= bit[(names[i], prefix[i], names[depth], v)]
            walk(depth + 1, prefix + (v,), m)

    walk(0, (), 0)
    return rows, masks, refused


def _all_rows() -> list[dict]:
    return [dict(r) for r in _table()[0]]


def _pairs(row: dict) -> frozenset:
    return frozenset(((a, row[a]), (b, row[b])) for a, b in itertools.combinations(FACTORS, 2))


def every_pair() -> frozenset:
    """Every pair of values of two factors (the full product holds each)."""
    return frozenset(((a, va), (b, vb)) for a, va, b, vb in _bits())


def _pair_of(bit: int) -> tuple:
    a, va, b, vb = list(_bits())[bit]
    return (a, va), (b, vb)


def cost(row: dict) -> float:
    """Rough seconds of one run on 2 shared cores (tests/test_matrix.py's durations: 11-20 s on
    2 ranks, most of it starting the processes and the final checkpoint; 20-35 s on 4)."""
    return (4.0 + 5.5 * world_size(row) + 1.0 * _sglang(row) + 0.5 * (row["engine"] == "sglang_delta")
            + 1.0 * (row["cold_start"] > 0) + 0.5 * (row["dynamic"] != "off") + 1.0 * (row["partial"] == "on")
            + 2.0 * (row["turns"] > 1))


def _greedy(indices: list[int], todo: int) -> list[dict]:
    """Combinations (indices into the product) that together hold every pair of ``todo`` (a
    mask): each time the one holding the most pairs not yet held, the cheapest on a tie, the
    first in product order after that."""
    rows, masks, _ = _table()
    costs = {i: cost(rows[i]) for i in indices}
    out = []
    while todo:
        best = max(indices, key=lambda i: ((masks[i] & todo).bit_count(), -costs[i], -i))
        out.append(dict(rows[best]))
        todo &= ~masks[best]
    return out


def cover() -> tuple[list[dict], dict]:
    """The runs (a greedy all-pairs cover of the allowed combinations), and each pair that no
    allowed combination holds -> the refusals of the first combination holding it."""
    rows, masks, names = _table()
    allowed = [i for i in range(len(rows)) if not names[i]]
    coverable = 0
    for i in allowed:
        coverable |= masks[i]
    refused: dict = {}
    left = ((1 << len(_bits())) - 1) & ~coverable
    for i in range(len(rows)):
        if not left:
            break
        hit = masks[i] & left
        while hit:
            bit = hit.bit_length() - 1
            refused[_pair_of(bit)] = list(names[i])
            hit &= ~(1 << bit)
        left &= ~masks[i]
    return _greedy(allowed, coverable), refused


def refused_cover(refused: dict) -> list[dict]:
    """A few combinations that together hold every refused pair (each of them refused)."""
    bits = _bits()
    todo = 0
    for (a, va), (b, vb) in refused:
        todo |= 1 << bits[(a, va, b, vb)]
    return _greedy(list(range(len(_table()[0]))), todo)


def representative(refusal: Refusal) -> dict:
    """The first combination in product order that ``refusal`` alone applies to (else the first
    it applies to): the one on which the test shows ``validate``'s message."""
    rows, _, names = _table()
    hits = [i for i in range(len(rows)) if refusal.name in names[i]]
    alone = [i for i in hits if names[i] == (refusal.name,)]
    return dict(rows[(alone or hits)[0]])


def run_id(index: int, row: dict) -> str:
    parts = [f"r{index:02d}", row["engine"], row["parallel"], row["layout"], row["routing"],
             "ds" if row["dynamic"] != "off" else "", f"stale{row['staleness']}" if row["staleness"] else "",
             "budget" if row["budget"] == "on" else "", "distopt" if row["dist_opt"] == "on" else "",
             f"rc-{row['recompute']}" if row["recompute"] != "none" else "",
             f"cold{row['cold_start']}" if row["cold_start"] else "",
             "unfused" if row["fused"] == "off" else "", "partial" if row["partial"] == "on" else "",
             f"turns{row['turns']}" if row["turns"] > 1 else ""]
    return "-".join(p for p in parts if p)


def vocab_size(row: dict) -> int:
    """The task's character vocabulary: arithmetic's 16, the calculator's 20."""
    return 20 if row["turns"] > 1 else 16


def token_budget(row: dict) -> int:
    # A calculator episode holds 15 to 24 tokens (a prompt of 6; 3 turns of 1 to 4 with 2
    # observations ">?;" between them), a reference episode of the cold start up to 20: every
    # one fits 32, and a DP rank's share (4 or more episodes) does not.
    return TOKEN_BUDGET_TURNS if row["turns"] > 1 else TOKEN_BUDGET


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
                                                                           f"model.vocab_size={vocab_size(row)}"]),
         "optim.lr=1e-3",
         f"rollout.prompts_per_step={PROMPTS}", f"rollout.samples_per_prompt={SAMPLES}", "rollout.max_new_tokens=4",
         f"rollout.engine={'embedded' if row['engine'] == 'embedded' else 'sglang'}",
         f"rollout.max_staleness={row['staleness']}",
         # One optimizer step per RL step: the logged update is the step's first, whose routes
         # (R2's recorded, R3's from an engine with the trainer's weights) are the live ones.
         "train.updates_per_rollout=1", f"train.layout={row['layout']}",
         f"train.cold_start_steps={row['cold_start']}",
         f"routing.mode={row['routing']}",
         f"loss.fused_logprobs={'true' if row['fused'] == 'on' else 'false'}",
         "task.reward_fn=tests.matrix:reward"]
    if row["turns"] > 1:
        o += ["task.name=calculator", "task.options.retry_on_wrong=true", f"rollout.max_turns={row['turns']}"]
    else:
        o += ["task.name=arithmetic"]
    o += [f"parallel.{k}={v}" for k, v in _sizes(row).items()]
    o += [f"model.megatron.{k}={v}" for k, v in RECOMPUTE[row["recompute"]].items()]
    if row["dynamic"] != "off":
        o += [f"rollout.dynamic_sampling.filter={row['dynamic']}", f"rollout.dynamic_sampling.max_rounds={MAX_ROUNDS}"]
    if row["budget"] == "on":
        o += ["train.micro_batch_size=null", f"train.max_tokens_per_microbatch={token_budget(row)}"]
    else:
        o += [f"train.micro_batch_size={MICRO_BATCH}"]
    if row["dist_opt"] == "on":
        o += ["optim.megatron.use_distributed_optimizer=true"]
    if row["partial"] == "on":
        # partial_offpolicy: tis (the default) corrects earlier versions' tokens with loss.tis_cap.
        o += ["rollout.partial=true", "loss.tis_cap=2.0"]
    if _sglang(row):
        o += [f"rollout.sglang.urls=[{url or 'http://127.0.0.1:1'}]", "rollout.sglang.weight_sync=disk",
              f"rollout.sglang.weight_dir={weight_dir or out + '/weights'}", "rollout.sglang.retries=1",
              "rollout.sglang.backoff_s=0.1", "rollout.sglang.timeout_s=60"]
    if row["engine"] == "sglang_delta":
        # Every delta push is checksummed: the mock's loader copy must equal the trainer's tensors.
        o += ["rollout.sglang.delta=true", "rollout.sglang.delta_checksum_every=1"]
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
