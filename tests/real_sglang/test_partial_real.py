"""Partial rollouts against the REAL SGLang 0.5.23 server (issue 21, deliverable 1).

One server runs ``--disable-radix-cache`` (what ``rollout.partial`` with ``in_place`` requires);
two tiny models of the same shape with different weights, A (the launch weights) and B, stand
for two policy versions. A request is streamed so that the test knows exactly how many tokens
it had when generation was paused; our client then pushes B without a flush and continues.

- ``in_place``: the response spans the update; its spans split exactly at the streamed count
  (per-token versions checked against the push), our parser gives each token that version, and
  the routes and log-probs are paired token by token: a re-prefill of the whole response under A
  reproduces the prefix's routes (>= 0.999 of rows: prefill and decode numerics differ in bf16)
  and log-probs (|diff| < 0.05), and NOT the suffix's (the guard that B changed something).
- ``retract``: the update flushes; the response has ``num_retractions > 0`` and its prefix routes
  are B's re-prefill's (they match a re-prefill under B, not under A): exactly the tokens that
  ``trainer.partial.retracted_prefix`` masks.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from urllib.parse import urlsplit

import pytest
import torch

from sapo_megatron.rollout.base import RouteSpec
from sapo_megatron.rollout.sglang import SGLangConfig, SGLangEngine
from sapo_megatron.rollout.sglang.protocol import parse_generate, token_versions
from sapo_megatron.trainer.partial import retracted_prefix, token_keep_mask
from tests.real_sglang.harness import TINY_CONFIG, http_json, make_tiny_model

pytestmark = [pytest.mark.real_sglang, pytest.mark.slow]

SPEC = RouteSpec(num_hidden_layers=TINY_CONFIG["num_hidden_layers"], topk=TINY_CONFIG["num_experts_per_tok"],
                 num_experts=TINY_CONFIG["num_experts"], moe_layers=list(range(TINY_CONFIG["num_hidden_layers"])))
PROMPT = [5, 6, 7, 8, 9]
NEW_TOKENS = 600


def _request(**extra) -> dict:
    return {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": NEW_TOKENS, "temperature": 1.0,
                                                     "ignore_eos": True},
            "return_logprob": True, "logprob_start_len": -1, "return_routed_experts": True, **extra}


class Stream(threading.Thread):
    """One streamed /generate: ``count`` is the completion tokens received so far, ``final``
    the last chunk (with the spans)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.count, self.final = url, 0, None

    def run(self) -> None:
        parts = urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
        conn.request("POST", "/generate", json.dumps(_request(stream=True)), {"Content-Type": "application/json"})
        response = conn.getresponse()
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            self.count = chunk["meta_info"]["completion_tokens"]
            self.final = chunk
        conn.close()



def _generate_in_background(url: str):
    """One non-streamed ``/generate`` of :func:`_request` in a thread; the returned call waits for
    it and parses the answer as the client does."""
    box = {}
    worker = threading.Thread(target=lambda: box.update(answer=http_json(url, "/generate", _request(),
                                                                        timeout=300)[1]))
    worker.start()

    def finish():
        worker.join(300)
        return parse_generate(box["answer"], PROMPT, 0, url, True, SPEC)

    return finish

def _settled(stream: Stream) -> int:
    """The streamed count once paused (the last tokens before the pause still arrive)."""
    last, since = stream.count, time.monotonic()
    while time.monotonic() - since < 1.0:
        time.sleep(0.05)
        if stream.count != last:
            last, since = stream.count, time.monotonic()
    return last


def _prefill(url: str, ids: list[int]):
    """Routes and log-probs of a single forward over ``ids`` (the re-prefill reference)."""
    status, answer = http_json(url, "/generate", {
        "input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 1.0},
        "return_logprob": True, "logprob_start_len": 0, "return_routed_experts": True}, timeout=120)
    assert status == 200, answer
    result = parse_generate(answer, ids, 0, url, True, SPEC)
    logprobs = [e[0] for e in answer["meta_info"]["input_token_logprobs"]][1:]  # token i+1 given 0..i
    return result.routes[: len(ids) - 1], torch.tensor(logprobs)


def _span_update(url: str, engine: SGLangEngine, model_b, mode: str):
    stream = Stream(url)
    stream.start()
    while stream.count < 40:
        time.sleep(0.02)
    engine.pause_generation(mode)
    paused_at = _settled(stream)
    engine.flush_on_update = mode != "in_place"
    engine.collect(engine.submit_all("/update_weights_from_disk", lambda u: {
        "model_path": str(model_b), "flush_cache": True, "weight_version": "1"}), "/update_weights_from_disk", "test")
    engine.flush_on_update = True
    engine.continue_generation()
    stream.join(300)
    return paused_at, stream.final["meta_info"]  # the last chunk carries the spans


@pytest.fixture
def partial_server(servers, tiny_model):
    return servers.get("partial", args=("--disable-radix-cache",))


def test_in_place_update_spans_split_at_the_push_and_routes_pair_with_log_probs(partial_server, tiny_model,
                                                                                tmp_path):
    url = partial_server.url
    model_b = make_tiny_model(tmp_path / "b", seed=1)
    assert http_json(url, "/server_info")[1]["disable_radix_cache"] is True
    engine = SGLangEngine(SGLangConfig(urls=[url], retries=0, timeout_s=300))
    try:
        # 1. Streamed: the spans split exactly at the tokens the request had at the pause.
        paused_at, meta = _span_update(url, engine, model_b, "in_place")
        assert 40 <= paused_at < NEW_TOKENS
        assert meta["weight_versions"] == [{"version": "default", "start": 0, "end": paused_at},
                                           {"version": "1", "start": paused_at, "end": NEW_TOKENS}]
        partial_server.reset()  # A again, version "default"

        # 2. Not streamed, through our parser: pause after ~1/3 of the tokens, push B, continue.
        finish = _generate_in_background(url)
        time.sleep(1.0)
        engine.pause_generation("in_place")
        engine.flush_on_update = False
        engine.collect(engine.submit_all("/update_weights_from_disk", lambda u: {
            "model_path": str(model_b), "flush_cache": True, "weight_version": "1"}), "/update_weights_from_disk",
            "test")
        engine.flush_on_update = True
        engine.continue_generation()
        result = finish()
        spans = result.meta["weight_version_spans"]
        assert [v for v, _, _ in spans] == ["default", "1"], spans
        n = spans[0][2]
        versions = token_versions(result.meta, len(result.response_ids), default=0)
        assert versions == [0] * n + [1] * (NEW_TOKENS - n)
        assert result.routes.shape[0] == len(PROMPT) + NEW_TOKENS - 1

        # Pairing: under A (reloaded) a single prefill of the whole sequence reproduces the
        # routes and log-probs of the tokens generated under A, not those generated under B.
        partial_server.reset()
        ids = PROMPT + result.response_ids
        routes_a, logprobs_a = _prefill(url, ids)
        p = len(PROMPT)
        engine_lp = torch.tensor(result.response_log_probs)
        before = slice(p - 1, p - 1 + n)  # rows predicting the tokens generated under A
        after = slice(p - 1 + n, None)
        agree = (routes_a.sort(-1).values == result.routes.sort(-1).values).all(-1).all(-1).float()
        # bf16: prefill and decode kernels differ slightly, and now and then a near-tie router
        # score flips one row (1 of ~330 rows in a CI run here; 1 of 1508 in the multi-turn bf16
        # test): >= 0.99 of A's rows agree exactly. The guard below is what makes this pairing
        # test able to fail: B's rows agree far less.
        prefix = agree[: p - 1 + n]
        assert prefix.mean() >= 0.99, (int((prefix < 1).sum()), prefix.numel())
        # Log-probs of A's tokens: bf16 noise only (measured ~1e-2 at most on this model).
        assert (logprobs_a[before] - engine_lp[:n]).abs().max() < 0.05
        # Guard (not vacuous): under A, B's tokens are NOT reproduced, so the pairing test can fail.
        assert agree[after].mean() < 0.9 or (logprobs_a[after] - engine_lp[n:]).abs().mean() > 0.05
    finally:
        engine.close()


def test_retract_update_returns_the_reprefill_routes_which_are_masked(partial_server, tiny_model, tmp_path):
    url = partial_server.url
    model_b = make_tiny_model(tmp_path / "b", seed=1)
    engine = SGLangEngine(SGLangConfig(urls=[url], retries=0, timeout_s=300))
    try:
        finish = _generate_in_background(url)
        time.sleep(1.0)
        engine.pause_generation("retract")
        # Retracted requests left the running batch: the flushing update is allowed and succeeds.
        engine.collect(engine.submit_all("/update_weights_from_disk", lambda u: {
            "model_path": str(model_b), "flush_cache": True, "weight_version": "1"}), "/update_weights_from_disk",
            "test")
        engine.continue_generation()
        result = finish()
        assert result.meta["num_retractions"] >= 1
        spans = result.meta["weight_version_spans"]
        assert [v for v, _, _ in spans] == ["default", "1"], spans
        n = retracted_prefix(result.meta, with_routes=True)
        assert n == spans[1][1] > 0
        keep = token_keep_mask(token_versions(result.meta, NEW_TOKENS, default=0), step=1, max_staleness=1,
                               offpolicy="tis", retracted_prefix=n)
        assert keep == [False] * n + [True] * (NEW_TOKENS - n)
        # The prefix's routes are B's re-prefill's: a prefill under B (now served) reproduces them.
        ids = PROMPT + result.response_ids
        routes_b, _ = _prefill(url, ids)
        p = len(PROMPT)
        agree_b = (routes_b.sort(-1).values == result.routes.sort(-1).values).all(-1).all(-1).float()
        assert agree_b[: p - 1 + n].mean() >= 0.999, agree_b[: p - 1 + n].mean()
        partial_server.reset()
        routes_a, _ = _prefill(url, ids)
        agree_a = (routes_a.sort(-1).values == result.routes.sort(-1).values).all(-1).all(-1).float()
        # Guard: A would have routed the prefix differently, so the masked routes are not A's.
        assert agree_a[: p - 1 + n].mean() < 0.9, agree_a[: p - 1 + n].mean()
    finally:
        engine.close()
