"""Partial rollouts (trainer/partial.py): the per-token maths, the spans' parsing, the server
checks, the client's pause / push-without-flush / continue against the mock, and the trainer
end to end against the mock. The wire is checked against the real server in
tests/real_sglang/test_partial_real.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from sapo_megatron.rollout.base import SamplingParams
from sapo_megatron.rollout.sglang import SGLangConfig, SGLangEngine
from sapo_megatron.rollout.sglang.protocol import ServerInfo, check_partial, parse_spans, token_versions
from sapo_megatron.trainer.partial import retracted_prefix, token_keep_mask
from tests.launch import torchrun
from tests.sglang_mock import Behaviour, MockSGLang


# ------------------------------------------------------------------ pure parts
def test_token_keep_mask_staleness_offpolicy_and_retract():
    versions = [3, 3, 4, 4, 5, 5]
    # tis: every token within the bound; step 5, k = 1 drops version 3's tokens only.
    assert token_keep_mask(versions, step=5, max_staleness=1, offpolicy="tis") == [False, False, True, True, True, True]
    assert token_keep_mask(versions, step=5, max_staleness=2, offpolicy="tis") == [True] * 6
    # mask: only the response's newest version is trained (slime's masking of the off-policy part).
    assert token_keep_mask(versions, step=5, max_staleness=2, offpolicy="mask") == [False] * 4 + [True] * 2
    # A retracted prefix (routes of a re-prefill) leaves the loss whatever its version.
    assert token_keep_mask(versions, step=5, max_staleness=2, offpolicy="tis", retracted_prefix=4) == [False] * 4 + [True] * 2
    # The newest tokens of an old response are still masked when staler than the bound.
    assert token_keep_mask([1, 2], step=5, max_staleness=2, offpolicy="mask") == [False, False]
    assert token_keep_mask([], step=5, max_staleness=2, offpolicy="tis") == []
    with pytest.raises(ValueError, match="rollout.partial_offpolicy"):
        token_keep_mask([1], step=1, max_staleness=1, offpolicy="drop")


def test_retracted_prefix_is_the_last_span_start_under_routes_only():
    meta = {"num_retractions": 1, "weight_version_spans": [("3", 0, 7), ("4", 7, 12)]}
    assert retracted_prefix(meta, with_routes=True) == 7
    assert retracted_prefix(meta, with_routes=False) == 0  # log-probs alone stay paired
    assert retracted_prefix({**meta, "num_retractions": 0}, with_routes=True) == 0
    assert retracted_prefix({"num_retractions": 2}, with_routes=True) == 0  # no spans: nothing known


def test_spans_parse_tile_and_give_token_versions():
    spans = parse_spans([{"version": "3", "start": 0, "end": 2}, {"version": "4", "start": 2, "end": 5}], 5, 0)
    assert spans == [("3", 0, 2), ("4", 2, 5)]
    assert token_versions({"weight_version_spans": spans}, 5, default=0) == [3, 3, 4, 4, 4]
    # Array-like spans (msgspec's array_like struct) parse the same.
    assert parse_spans([["7", 0, 4]], 4, 0) == [("7", 0, 4)]
    # Without spans (SGLang < 0.5.19, the embedded engine): the response's version for every token.
    assert token_versions({"weight_version": "2"}, 3, default=9) == [2, 2, 2]
    assert token_versions({"weight_version": "default"}, 2, default=9) == [9, 9]
    with pytest.raises(ValueError, match="starts at 3, expected 2"):
        parse_spans([{"version": "3", "start": 0, "end": 2}, {"version": "4", "start": 3, "end": 5}], 5, 1)
    with pytest.raises(ValueError, match="ends at token 4, the response has 5"):
        parse_spans([{"version": "3", "start": 0, "end": 4}], 5, 2)


def _info(version, radix_cache):
    return ServerInfo(url="http://s:1", version=version, tp_size=1, dp_size=1, pp_size=1, speculative=False,
                      deterministic=None, routed_experts=True, radix_cache=radix_cache)


def test_check_partial_names_the_release_and_the_radix_flag():
    with pytest.raises(RuntimeError, match=r"version 0\.5\.18.*added in sglang 0\.5\.19"):
        check_partial(_info((0, 5, 18), False), "in_place")
    with pytest.raises(RuntimeError, match="--disable-radix-cache"):
        check_partial(_info((0, 5, 23), True), "in_place")
    with pytest.raises(RuntimeError, match="not reported"):
        check_partial(_info((0, 5, 23), None), "in_place")
    check_partial(_info((0, 5, 23), False), "in_place")  # radix cache off: fine
    check_partial(_info((0, 5, 23), True), "retract")  # retract flushes at every update


# ------------------------------------------------------------------ the client against the mock
def test_pause_in_place_push_without_flush_continue_spans_the_update(tmp_path):
    """Requests running across an in-place update: the update goes out with flush_cache false,
    each response's spans split at the tokens generated when it landed, and the engine accepts
    them (accept_spans) where the never-stale check would refuse them."""
    server = MockSGLang(Behaviour(num_hidden_layers=2, topk=2, num_experts=4, dense_layers=(0,), vocab_size=16,
                                  delay_per_token_s=0.02, disable_radix_cache=True))
    server.weight_version = "0"  # as after the trainer's first push
    engine = SGLangEngine(SGLangConfig(urls=[server.url], retries=0, timeout_s=30))
    try:
        engine.expect(0)
        engine.accept_spans = True
        futures = engine.start([[1, 2, 3], [4, 5, 6]], SamplingParams(max_new_tokens=40), return_routes=False)
        deadline = time.monotonic() + 30
        while server.running_here < 2 and time.monotonic() < deadline:  # both decoding (a loaded machine)
            time.sleep(0.01)
        time.sleep(0.3)  # ~15 tokens each
        engine.pause_generation("in_place")
        engine.flush_on_update = False
        (tmp_path / "w").mkdir()
        engine.collect(engine.submit_all("/update_weights_from_disk",
                                         lambda url: {"model_path": str(tmp_path / "w"), "flush_cache": True,
                                                      "weight_version": "1"}), "/update_weights_from_disk", "test")
        engine.flush_on_update = True
        engine.continue_generation()
        engine.expect(1)
        results = [f.result()[0] for f in futures]
    finally:
        engine.close()
        server.stop()
    assert server.bodies("/update_weights_from_disk")[0]["flush_cache"] is False
    for r in results:
        spans = r.meta["weight_version_spans"]
        # Tokens before the pause are version 0's, the rest version 1's; both spans non-empty.
        assert [v for v, _, _ in spans] == ["0", "1"] and 0 < spans[0][2] < 40, spans
        assert token_versions(r.meta, len(r.response_ids), default=-1).count(0) == spans[0][2]
        assert len(r.response_ids) == 40


def test_flushing_update_still_refused_while_paused_in_place(tmp_path):
    server = MockSGLang(Behaviour(delay_per_token_s=0.0))
    engine = SGLangEngine(SGLangConfig(urls=[server.url], retries=0))
    try:
        engine.pause_generation("in_place")
        with pytest.raises(RuntimeError, match="paused in place"):
            engine.submit_all("/update_weights_from_disk",
                              lambda url: {"model_path": str(tmp_path), "flush_cache": True})
    finally:
        engine.continue_generation()
        engine.close()
        server.stop()


def test_every_weight_update_path_goes_out_without_flush_while_deferred(tmp_path):
    """Both syncs (disk, distributed: its last bucket asks for the flush) pass through
    ``submit_all``: paused in place with ``flush_on_update`` false, neither is refused and both
    carry ``flush_cache: false``; flushing is refused again once ``flush_on_update`` is back."""
    import torch

    from sapo_megatron.rollout.sglang.protocol import disk_update_payload, distributed_update_payload

    server = MockSGLang(Behaviour())
    engine = SGLangEngine(SGLangConfig(urls=[server.url], retries=0))
    last = distributed_update_payload(["w"], [torch.float32], [(2,)], group_name="g", load_format=None, last=True,
                                      version=3)
    assert last["flush_cache"] is True  # what the distributed sync sends with its last bucket
    try:
        engine.pause_generation("in_place")
        engine.flush_on_update = False
        for path, payload in (("/update_weights_from_disk", disk_update_payload(str(tmp_path), 3)),
                              ("/update_weights_from_distributed", last)):
            for future in engine.submit_all(path, lambda url, p=payload: p).values():
                future.exception()  # the mock may refuse the unknown group; the body is what counts
            assert server.bodies(path)[-1]["flush_cache"] is False, path
        engine.flush_on_update = True
        with pytest.raises(RuntimeError, match="paused in place"):
            engine.submit_all("/update_weights_from_distributed", lambda url: last)
    finally:
        engine.continue_generation()
        engine.close()
        server.stop()


# ------------------------------------------------------------------ the trainer against the mock
def _partial_config(tmp_path: Path, url: str, hf, *, steps: int, extra: str = "") -> Path:
    config = tmp_path / "c.yaml"
    config.write_text(f"""
run: {{output_dir: {tmp_path / 'run'}, steps: {steps}, save_every: 2, tensorboard: false, progress: false}}
model: {{preset: null, hf_dir: {hf}}}
parallel: {{tensor_model_parallel_size: 2}}
rollout:
  engine: sglang
  prompts_per_step: 2
  samples_per_prompt: 2
  max_new_tokens: 24
  max_staleness: 2
  partial: true
  sglang: {{urls: ["{url}"], retries: 1, backoff_s: 0.1, timeout_s: 60, weight_dir: {tmp_path / 'w'}}}
train: {{micro_batch_size: 2, updates_per_rollout: 1}}
loss: {{tis_cap: 2.0}}
routing: {{mode: R3}}
{extra}
""")
    return config


@pytest.mark.dist
@pytest.mark.slow
def test_trainer_partial_rollouts_span_updates_and_resume(tmp_path):
    """Long-tailed lengths: short groups are taken while long ones keep generating across the
    in-place updates; tokens carry their versions, staleness is per token, the updates never
    flush; a resumed run regenerates the groups that were in flight."""
    from tests.dist.ckpt_models import make_hf_model

    hf = make_hf_model("qwen3_moe", tmp_path / "hf")
    server = MockSGLang(Behaviour(num_hidden_layers=2, topk=2, num_experts=4, dense_layers=(0,), vocab_size=16,
                                  delay_per_token_s=0.25, response_lengths=(2, 2, 2, 24), disable_radix_cache=True))
    try:
        torchrun("sapo_megatron.cli", "train", "--config", _partial_config(tmp_path, server.url, hf, steps=2),
                 nproc=2, module=True, timeout=600)
        first = server.paths()
        updates = server.bodies("/update_weights_from_disk")
        pauses, loads = server.records("/pause_generation"), server.records("/update_weights_from_disk")[1:]
        # The step-2 checkpoint holds no request: the stream position before the oldest batch
        # still open, its index, and the groups of the open batches already trained.
        saved = [json.loads(m.read_text()) for m in (tmp_path / "run").rglob("meta.json")]
        partial_meta = [m["partial"] for m in saved if "partial" in m]
        assert partial_meta and all(set(m) == {"index", "taken"} for m in partial_meta), saved
        assert all(m["data"]["position"] == 2 * m["partial"]["index"] for m in saved if "partial" in m)
        torchrun("sapo_megatron.cli", "train", "--config", _partial_config(tmp_path, server.url, hf, steps=4),
                 nproc=2, module=True, timeout=600)
        spans = list(server.served_spans)
    finally:
        server.stop()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["rl_step"] for r in rows] == [0, 1, 2, 3]
    # Every update after the initial push is in place: pause, load without a flush, continue.
    assert [u["flush_cache"] for u in updates] == [True, False, False]
    sync_calls = [p for p in first if p in ("/pause_generation", "/update_weights_from_disk", "/continue_generation")]
    assert sync_calls == ["/update_weights_from_disk"] + ["/pause_generation", "/update_weights_from_disk",
                                                          "/continue_generation"] * 2
    # The export is done before the pause (WeightSync.prepare): the pause covers the load alone,
    # while the requests keep generating under the old weights during the export.
    assert len(pauses) == len(loads) == 2
    for pause, load in zip(pauses, loads):
        assert load["config_mtime"] <= pause["wall"] <= load["wall"], (pause, load)
    # Some response spans an update (a long one: 24 tokens take 6 s, more than a step here), and
    # the trainer saw it (its metrics count responses generated by more than one version).
    assert any(len(s) > 1 for s in spans), spans
    assert max(r["async/spanning_frac"] for r in rows) > 0
    for r in rows:
        assert 0 <= r["async/staleness_mean"] <= r["async/staleness_max"] <= 2
        assert 0 <= r["async/masked_token_frac"] <= 1
    assert any(r["grad_norm"] > 0 for r in rows)  # not vacuous: the steps trained
