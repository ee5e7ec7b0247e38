"""Partial rollouts (``rollout.partial: true``): generation keeps running across weight updates.

Why. With drain-before-sync (the ``async`` mode) a step waits for its batch's longest response;
with long-tailed lengths the tail sets the pace. Here a pool of prompt groups is always in
flight on the SGLang servers; each step takes the first ``prompts_per_step`` groups (per DP rank
its share) whose every sample is done, oldest first, and the rest keep generating. At the weight
sync the servers are paused, the new weights pushed, and generation continued: a response may
span several policy versions (as miles ``--pause-generation-mode``, slime ``--partial-rollout``,
AReaL).

Design choices:

- **Pause mode** (``rollout.partial_pause``). ``in_place`` (default): the paused requests stay in
  SGLang's running batch with their KV; the update is sent WITHOUT a flush (a flush under
  requests paused in place asserts up to 0.5.21 and answers 400 from 0.5.22). ``retract``: the
  requests go back to the queue and are re-prefilled under the new weights; the update flushes.
- **The radix cache.** Without a flush the cache would keep serving the old weights' KV and
  prefix routes to every later request sharing a prefix (a GRPO group shares its prompt, and a
  chat template's system prompt is shared by all). Decision: under ``in_place`` the servers must
  run ``--disable-radix-cache`` (checked from ``/server_info``, refused otherwise: protocol
  ``check_partial``); under ``retract`` every update flushes (the paused requests are out of the
  running batch), so the cache may stay on. Prefill of a prompt is cheap next to the long decodes
  partial rollouts exist for; a flush "once drained" would need a drain, which this mode avoids.
- **Per-token versions** from SGLang's ``meta_info.weight_versions`` spans (0.5.19+, older
  servers are refused, naming the release): token ``i``'s staleness is ``step - version_i``.
  Tokens staler than ``rollout.max_staleness`` are masked out of the loss (never trained on;
  the sample's reward still counts in its group).
- **The off-policy part** (``rollout.partial_offpolicy``). The behaviour log-probs are the
  engine's per token (``rollout_log_probs``) whatever version produced them. ``tis``: every
  token within the staleness bound is trained, corrected by the truncated importance weight
  ``min(pi_prox / pi_behav, loss.tis_cap)`` (docs/design.md, "Bounded staleness"; ``loss.tis_cap``
  is required). ``mask``: the tokens a response generated before its newest version are masked
  (slime's ``--mask-offpolicy-in-partial-rollout``); TIS still applies to the rest when set.
- **Retract and R3.** After a retract SGLang returns the re-prefill's routes for the prefix, not
  the routes the sampling forwards used (miles #3277): with routes in use, the response tokens
  before the start of the last span of a response with ``num_retractions > 0`` are masked, so
  every trained token's log-prob is paired with the routes that produced it. Under ``in_place``
  each position's routes are those of its own forward: nothing to mask.
- **Resume.** A checkpoint holds no request in flight. It stores the prompt-stream position
  before the oldest batch that still has groups in flight (on any DP rank), that batch's index,
  and the groups of that batch and later ones already trained; a resumed run redraws from there,
  skips the trained groups and regenerates the others from scratch with the resumed weights.
- Which groups a step takes depends on completion order: runs are not bitwise reproducible.
"""

from __future__ import annotations

import time

from sapo_megatron.collectives import all_reduce_values, global_max
from sapo_megatron.rollout.sglang.protocol import token_versions
from sapo_megatron.trainer.rollouts import RolloutMode, register_mode

OFFPOLICY = ("tis", "mask")
PAUSE_MODES = ("in_place", "retract")


def token_keep_mask(versions: list[int], *, step: int, max_staleness: int, offpolicy: str,
                    retracted_prefix: int = 0) -> list[bool]:
    """Which response tokens enter the loss. ``versions``: each token's weight version;
    ``step``: the policy version now; ``retracted_prefix``: tokens whose routes came from a
    re-prefill (masked). Pure: tested exhaustively in tests/test_partial.py."""
    if offpolicy not in OFFPOLICY:
        raise ValueError(f"rollout.partial_offpolicy must be one of {OFFPOLICY}, got {offpolicy!r}")
    newest = max(versions, default=step)
    keep = []
    for i, v in enumerate(versions):
        ok = step - v <= max_staleness and i >= retracted_prefix
        if offpolicy == "mask":
            ok = ok and v == newest
        keep.append(ok)
    return keep


def retracted_prefix(meta: dict, with_routes: bool) -> int:
    """Response tokens whose routes are a re-prefill's: before the last span of a retracted
    response (the last retraction is the last update it saw). 0 without routes or retraction."""
    spans = meta.get("weight_version_spans") or []
    if not with_routes or meta.get("num_retractions", 0) <= 0 or not spans:
        return 0
    return spans[-1][1]


@register_mode
class PartialRollout(RolloutMode):
    name = "partial"

    def __init__(self, trainer) -> None:
        super().__init__(trainer)
        r = trainer.cfg.rollout
        self.k, self.n = r.max_staleness, r.samples_per_prompt
        self.pause, self.offpolicy = r.partial_pause, r.partial_offpolicy
        self.quota = r.prompts_per_step // trainer.dp_size  # groups per rank per step
        self.batches: list[dict] = []  # drawn batches with groups in flight here: index, state, keys
        self.next_index = 0  # the next batch's index (its seed; checkpoints count them)
        self.taken: set[tuple[int, int]] = set()  # (batch, group) trained from batches still open
        self.prompts: dict[tuple[int, int], list] = {}  # key -> the group's flat prompts

    # -------------------------------------------------------------- the pool
    def _in_flight(self) -> list[tuple[int, int]]:
        return [k for b in self.batches for k in b["keys"]]

    def _top_up(self, batches: int) -> None:
        """Draw and submit batches until ``batches`` batches' worth of groups are in flight on
        every rank (the same number of draws on all ranks: the stream is global)."""
        t, r = self.t, self.t.cfg.rollout
        group = t._dp_group()
        while all_reduce_values([len(self._in_flight())], op="min", group=group)[0] < batches * self.quota:
            index, state = self.next_index, t.stream.state_dict()
            prompts = t.stream.next_batch(r.prompts_per_step)
            self.next_index += 1
            mine = [(index, g) for g in range(t.dp_rank, r.prompts_per_step, t.dp_size)
                    if (index, g) not in self.taken]
            for key in mine:
                self.prompts[key] = [prompts[key[1]]] * self.n
            self.batches.append({"index": index, "state": state, "keys": mine})
            params = r.sampling_params(stop_token_ids=(t.task.tokenizer.eos_id,), run_seed=t.cfg.run.seed, step=index)
            with t._phase(f"rollout submit batch {index}", "rollout"):
                t.engine.submit_groups([(k, [p.ids for p in self.prompts[k]]) for k in mine], params,
                                       return_routes=t._want_routes)

    def rollout(self):
        t = self.t
        t0 = time.perf_counter()
        # k + 1 batches' worth before the take (the first step fills the pool), k after it: a
        # batch submitted at the start of step s is taken by step s + k at the latest if its
        # groups are done, so only tokens of groups that ran longer can exceed the bound.
        self._top_up(self.k + 1)
        with t._phase(f"rollout take step {t.step}", "rollout"):
            taken = t.engine.take_groups(self._in_flight(), self.quota)
        wait = time.perf_counter() - t0
        flat, results = [], []
        for key, group_results in taken:
            flat += self.prompts.pop(key)
            results += group_results
            self.taken.add(key)
            for b in self.batches:
                if key in b["keys"]:
                    b["keys"].remove(key)
        self._close_batches()
        if t.step + 1 < t.cfg.run.steps:
            self._top_up(self.k)  # the next groups generate while this step trains (none after the last)
        rewards = t._score(flat, results, count_exact=True)
        self.metrics = {"async/wait_rollout_s": wait}
        return flat, results, rewards

    def _close_batches(self) -> None:
        """Forget batches with nothing in flight on ANY rank (their trained keys too)."""
        t = self.t
        while self.batches:
            open_here = int(bool(self.batches[0]["keys"]))
            if all_reduce_values([open_here], op="max", group=t._dp_group())[0]:
                break
            closed = self.batches.pop(0)["index"]
            self.taken = {k for k in self.taken if k[0] != closed}

    def sync(self, chunks, version: int) -> None:
        self.t.engine.update_weights(chunks, version, pause=self.pause)

    # -------------------------------------------------------------- per-token staleness
    def apply_staleness(self, results):
        """Each token's version from the spans; the loss mask of each response (``meta
        ["loss_token_mask"]``: staleness, the off-policy policy, retracted prefixes). Metrics per
        token, reduced over DP: ``async/staleness_mean|max``, ``async/masked_token_frac``,
        ``async/spanning_frac`` (responses generated by more than one version)."""
        t = self.t
        total = count = masked = spanning = done = 0
        peak = 0
        for r in results:
            if r.finish_reason == "abort":
                continue
            versions = token_versions(r.meta, len(r.response_ids), default=t.step)
            keep = token_keep_mask(versions, step=t.step, max_staleness=self.k, offpolicy=self.offpolicy,
                                   retracted_prefix=retracted_prefix(r.meta, t._want_routes))
            r.meta["token_versions"], r.meta["loss_token_mask"] = versions, keep
            ages = [t.step - v for v in versions]
            total, count = total + sum(ages), count + len(ages)
            masked += keep.count(False)
            peak = max([peak, *ages])
            spanning, done = spanning + (len(set(versions)) > 1), done + 1
        group = t._dp_group()
        total, count, masked, spanning, done = all_reduce_values([total, count, masked, spanning, done], group=group)
        return results, {"async/staleness_mean": total / max(count, 1.0),
                         "async/staleness_max": float(global_max(peak, group=group)),
                         "async/masked_token_frac": masked / max(count, 1.0),
                         "async/spanning_frac": spanning / max(done, 1.0)}

    # -------------------------------------------------------------- checkpoints
    def checkpoint_meta(self) -> dict:
        """Collective over DP: the stream position before the oldest open batch, its index, and
        every rank's trained groups of the open batches (a resumed run skips those)."""
        import torch.distributed as dist

        t = self.t
        if not self.batches:
            return {"partial": {"index": self.next_index, "taken": []}}
        everyone: list = [None] * t.dp_size
        dist.all_gather_object(everyone, sorted(self.taken), group=t._dp_group())
        taken = sorted({tuple(k) for part in everyone for k in part})
        return {"partial": {"index": self.batches[0]["index"], "taken": [list(k) for k in taken]}}

    def stream_state(self) -> dict:
        return self.batches[0]["state"] if self.batches else self.t.stream.state_dict()

    def load_meta(self, meta: dict) -> None:
        saved = meta.get("partial")
        if saved:
            self.next_index = int(saved["index"])
            self.taken = {tuple(k) for k in saved["taken"]}
