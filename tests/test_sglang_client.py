"""The SGLang rollout client against a local server that speaks SGLang's HTTP API.

The server is tests/sglang_mock.py; it encodes routes with the codec the client decodes with,
so a route test checks the client's bookkeeping (rows, dense layers, dtype), not the codec.

Run: ``pytest tests/test_sglang_client.py`` (single process, a few seconds).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import pytest
import torch
from tests.sglang_mock import Behaviour, ConcurrencyMeter, MockSGLang, fake_generate, fake_routes

from sapo_megatron.rollout.base import RouteSpec, SamplingParams
from sapo_megatron.rollout.sglang import SGLangConfig, SGLangEngine

SPEC = RouteSpec(num_hidden_layers=4, topk=2, num_experts=8, moe_layers=[1, 2, 3])
PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10], [11, 12], [13, 14, 15]]
PARAMS = SamplingParams(temperature=0.7, max_new_tokens=6, stop_token_ids=(3, 17, 29), seed=5)
FAST = dict(timeout_s=5.0, backoff_s=0.02, api_key_env="SAPO_TEST_SGLANG_KEY")


@pytest.fixture
def servers(request):
    """``servers(n, **behaviour)`` -> n mock servers, all stopped at teardown."""
    started = []

    def make(n=1, meter=None, **behaviour):
        for _ in range(n):
            started.append(MockSGLang(Behaviour(**behaviour), meter=meter))
        return started[-n:]

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def engines():
    made = []

    def make(urls, route_spec=SPEC, **kwargs):
        extra = {k: kwargs.pop(k) for k in ("require_routes",) if k in kwargs}
        engine = SGLangEngine(
            SGLangConfig(urls=urls, **{**FAST, **kwargs}), route_spec=route_spec, **extra
        )
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


def expected(prompt, index, params=PARAMS, behaviour=None):
    request = {
        "input_ids": prompt,
        "return_logprob": True,
        "return_routed_experts": True,
        "sampling_params": {
            "temperature": params.temperature,
            "max_new_tokens": params.max_new_tokens,
            "stop_token_ids": list(params.stop_token_ids),
            "sampling_seed": params.seed + index,
        },
    }
    return fake_generate(request, behaviour or Behaviour())


def test_generate_decodes_tokens_logprobs_and_routes(servers, engines):
    a, b = servers(2)
    results = engines([a.url, b.url]).generate(PROMPTS, PARAMS, return_routes=True)

    assert len(results) == len(PROMPTS)
    for i, (prompt, result) in enumerate(zip(PROMPTS, results, strict=True)):
        want = expected(prompt, i)
        entries = want["meta_info"]["output_token_logprobs"]
        assert result.prompt_ids == prompt
        assert result.response_ids == [e[1] for e in entries] == want["output_ids"]
        assert result.response_log_probs == [e[0] for e in entries]
        assert result.finish_reason == want["meta_info"]["finish_reason"]["type"]
        rows = len(prompt) + len(result.response_ids) - 1
        sent = fake_routes(rows, Behaviour(), _route_seed(prompt))
        assert result.routes.dtype == torch.uint8  # 8 experts: compact storage
        assert torch.equal(result.routes.long(), sent[:, SPEC.moe_layers].long())
    assert {r.finish_reason for r in results} == {"stop", "length"}  # both paths exercised
    # Round-robin: three requests each, in SGLang's schema.
    assert len(a.bodies("/generate")) == len(b.bodies("/generate")) == 3
    body = a.bodies("/generate")[0]
    assert body["return_logprob"] is True and body["return_routed_experts"] is True
    assert body["logprob_start_len"] == -1
    assert set(body["sampling_params"]) == {
        "temperature",
        "top_p",
        "max_new_tokens",
        "stop_token_ids",
        "sampling_seed",
    }


def _route_seed(prompt):
    from tests.sglang_mock import _seed

    return _seed(prompt, "r")


def test_no_routes_requested_sends_no_route_field(servers, engines):
    (server,) = servers(1, routed_experts=False)
    results = engines([server.url]).generate(PROMPTS[:2], PARAMS, return_routes=False)
    assert all(r.routes is None and r.response_ids for r in results)
    assert all("return_routed_experts" not in b for b in server.bodies("/generate"))


def test_stop_edge_row_and_trimmed_output_ids(servers, engines):
    """Older servers: one extra route row at a stop, output_ids without the stop token."""
    (server,) = servers(1, stop_edge=True, trim_stop_in_output_ids=True)
    params = dataclasses.replace(PARAMS, stop_token_ids=tuple(range(0, 50, 3)), max_new_tokens=12)
    results = engines([server.url]).generate(PROMPTS, params, return_routes=True)
    stopped = [r for r in results if r.finish_reason == "stop"]
    assert stopped, "the stop ids should end some responses"
    for r in stopped:
        assert r.response_ids[-1] in params.stop_token_ids  # the stop token is a response token
        assert r.routes.shape == (len(r.prompt_ids) + len(r.response_ids) - 1, 3, 2)


def test_server_abort_and_rejection_pass_through_without_retry(servers, engines):
    (server,) = servers(1, abort_prompts={tuple(PROMPTS[1])}, reject_prompts={tuple(PROMPTS[2])})
    results = engines([server.url]).generate(PROMPTS, PARAMS, return_routes=True)
    assert results[1].finish_reason == "abort" and results[1].response_ids == []
    assert results[1].routes is None and results[1].meta["prompt_tokens"] is None  # real abort shape
    assert "Abort in waiting queue" in results[1].meta["error"]
    assert results[2].finish_reason == "abort" and "context length" in results[2].meta["error"]
    assert all(
        r.finish_reason != "abort" and r.routes is not None
        for i, r in enumerate(results)
        if i not in (1, 2)
    )
    assert len(server.bodies("/generate")) == len(PROMPTS)  # no retries


def test_timeouts_are_retried_then_aborted_and_other_results_kept(servers, engines):
    slow = tuple(PROMPTS[0])
    (server,) = servers(1, slow_prompts={slow}, slow_delay_s=3.0)
    engine = engines([server.url], timeout_s=0.3, retries=2)
    results = engine.generate(PROMPTS, PARAMS, return_routes=True)  # each attempt gives up at 0.3 s, not 3 s
    assert results[0].finish_reason == "abort" and results[0].response_ids == []
    assert "timed out" in results[0].meta["error"] and "3 attempts" in results[0].meta["error"]
    attempts = [b for b in server.bodies("/generate") if tuple(b["input_ids"]) == slow]
    assert len(attempts) == 3
    for i, r in enumerate(results[1:], start=1):  # partial results kept
        assert r.response_ids == expected(PROMPTS[i], i)["output_ids"]


def test_a_slow_first_attempt_succeeds_on_retry(servers, engines):
    (server,) = servers(1, slow_prompts={tuple(PROMPTS[0])}, slow_delay_s=3.0, slow_times=1)
    results = engines([server.url], timeout_s=0.3).generate(PROMPTS[:2], PARAMS, return_routes=True)
    assert results[0].finish_reason != "abort" and results[0].meta["attempts"] == 2
    assert results[0].response_ids == expected(PROMPTS[0], 0)["output_ids"]


def test_server_restart_mid_rollout_completes_after_retries(servers, engines):
    (server,) = servers(1, delay_s=0.02)
    server.die_at(3, down_s=0.3)  # the 3rd request is dropped, then connections are refused
    engine = engines([server.url], retries=6, backoff_s=0.05, concurrency=2)
    prompts = PROMPTS * 2
    results = engine.generate(prompts, PARAMS, return_routes=True)
    assert server.restarted.is_set()
    assert all(r.finish_reason != "abort" for r in results), [r.meta for r in results]
    assert max(r.meta["attempts"] for r in results) > 1
    for i, r in enumerate(results):
        assert r.response_ids == expected(prompts[i], i)["output_ids"]


def test_a_dead_server_is_skipped_by_retrying_on_the_next(servers, engines):
    live, dead = servers(2)
    dead.stop()
    results = engines([live.url, dead.url]).generate(PROMPTS, PARAMS, return_routes=True)
    assert all(r.finish_reason != "abort" and r.meta["server"] == live.url for r in results)
    assert sorted(r.meta["attempts"] for r in results) == [1, 1, 1, 2, 2, 2]


def test_server_without_routed_experts_is_a_clear_error(servers, engines):
    (server,) = servers(1, routed_experts=False)
    engine = engines([server.url])
    with pytest.raises(RuntimeError, match="--enable-return-routed-experts") as err:
        engine.generate(PROMPTS, PARAMS, return_routes=True)
    assert server.url in str(err.value)
    with pytest.raises(RuntimeError, match=f"{server.url}.*--enable-return-routed-experts"):
        engines([server.url], require_routes=True)  # fail fast at start, from /server_info
    (good,) = servers(1)
    engines([good.url], require_routes=True)
    assert good.paths() == ["/server_info"]


def test_concurrency_limit_is_honoured_over_all_servers(servers, engines):
    meter = ConcurrencyMeter()
    a, b = servers(2, meter=meter, delay_s=0.3)  # long enough that requests overlap on a loaded machine
    results = engines([a.url, b.url], concurrency=3).generate(
        PROMPTS * 2, PARAMS, return_routes=False
    )
    assert len(results) == 12 and meter.now == 0
    assert 2 <= meter.peak <= 3  # requests overlap, never more than the limit


def test_api_key_is_sent_but_never_leaked(servers, engines, monkeypatch, caplog):
    secret = "sk-very-secret-7f3a"
    monkeypatch.setenv(FAST["api_key_env"], secret)
    (server,) = servers(1, api_key=secret, fail_5xx=2)  # the 500 bodies echo our headers
    engine = engines([server.url], retries=0)
    with caplog.at_level(logging.DEBUG):
        results = engine.generate(PROMPTS[:4], PARAMS, return_routes=True)
    assert all(r["authorised"] for r in server.requests)
    failed = [r for r in results if r.finish_reason == "abort"]
    assert len(failed) == 2 and all("HTTP 500" in r.meta["error"] for r in failed)
    assert "Bearer ***" in failed[0].meta["error"]  # the echo arrived, masked
    leaks = [
        repr(engine),
        repr(engine.config),
        json.dumps(dataclasses.asdict(engine.config)),
        caplog.text,
        *(json.dumps(r.meta) for r in results),
    ]
    assert not any(secret in text for text in leaks)

    monkeypatch.setenv(FAST["api_key_env"], secret + "-wrong")
    with pytest.raises(RuntimeError, match="HTTP 401.*SAPO_TEST_SGLANG_KEY") as err:
        engine.generate(PROMPTS[:1], PARAMS, return_routes=True)
    assert secret not in str(err.value)


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="rollout.sglang.urls must be a list of http"):
        SGLangConfig(urls=["localhost:30000"])
    with pytest.raises(ValueError, match="urls is empty"):
        SGLangEngine(SGLangConfig(urls=[]))
    with pytest.raises(ValueError, match="rollout.sglang.admin_api_key_env must be the NAME"):
        SGLangConfig(urls=["http://h:1"], admin_api_key_env="sk-123")
    with pytest.raises(ValueError, match="rollout.sglang.distributed.bucket_mb must be > 0"):
        SGLangConfig(urls=["http://h:1"], distributed={"bucket_mb": 0})
    with pytest.raises(ValueError, match="rollout.sglang.distributed.shared_memory must be true or false"):
        SGLangConfig(urls=["http://h:1"], distributed={"shared_memory": "auto"})
    with pytest.raises(ValueError, match="rollout.sglang.keepalive_idle_s must be > 0 seconds, below"):
        SGLangConfig(urls=["http://h:1"], keepalive_idle_s=0)


def test_sampling_params_go_out_as_integers_and_unknown_top_level_fields_pass(servers, engines):
    (server,) = servers(1)
    params = dataclasses.replace(PARAMS, max_new_tokens=6.0, seed=5.0)  # floats from a YAML, say
    engines([server.url]).generate(PROMPTS[:2], params, return_routes=False)
    sp = server.bodies("/generate")[0]["sampling_params"]
    assert type(sp["max_new_tokens"]) is int and type(sp["sampling_seed"]) is int
    # The mock, like SGLang >= 0.5.22, refuses the float and ignores unknown top-level fields.
    from sapo_megatron.rollout.sglang.transport import Transport

    t = Transport(concurrency=1, retries=0, backoff_s=0, api_key_env="X_NONE", admin_api_key_env="X_NONE")
    status, _ = t.request(server.url, "/generate", {"input_ids": [1], "sampling_params": {"max_new_tokens": 2.0}},
                          timeout=5)
    assert status == 400
    status, _ = t.request(server.url, "/generate", {"input_ids": [1], "future_field": 1,
                                                    "sampling_params": {"max_new_tokens": 2}}, timeout=5)
    assert status == 200
    status, raw = t.request(server.url, "/update_weights_from_disk", {"flush_cache": True}, timeout=5)
    assert status == 400 and b"model_path" in raw  # 0.5.23 validates itself: 400, not 422


def test_every_request_refused_with_the_same_4xx_raises_with_the_servers_message(servers, engines):
    (server,) = servers(1, reject_prompts={tuple(p) for p in PROMPTS})
    with pytest.raises(RuntimeError, match="every request.*HTTP 400.*context length"):
        engines([server.url]).generate(PROMPTS, PARAMS, return_routes=True)


def test_keep_alive_reuses_connections_within_the_concurrency_bound(servers, engines):
    a, b = servers(2)
    engine = engines([a.url, b.url], concurrency=2)
    for _ in range(3):
        engine.generate(PROMPTS, PARAMS, return_routes=False)
    # 18 requests; without keep-alive 18 connections, with it at most 2 per server.
    assert engine.transport.connections_opened <= 4
    a.restart()  # the pooled connections to a are now dead: reopened without a failed request
    results = engine.generate(PROMPTS, PARAMS, return_routes=False)
    assert all(r.meta["attempts"] == 1 for r in results)


PROMPTS16 = [[i + 1, i + 2] for i in range(16)]


def _pool_of_idle_connections(servers, engines, *, keepalive_idle_s=4.0):
    """A 16-request rollout leaves up to 16 pooled connections; the server (like uvicorn with
    SGLANG_TIMEOUT_KEEP_ALIVE, scaled down to 0.4 s) then closes them all while they sit idle."""
    (server,) = servers(1, delay_s=0.3, keepalive_timeout_s=0.4)
    engine = engines([server.url], concurrency=16, keepalive_idle_s=keepalive_idle_s)
    engine.generate(PROMPTS16, PARAMS, return_routes=False)
    pooled = engine.transport.connections_opened
    # 16 overlapping requests, one connection each (a few may finish before others start on a
    # loaded machine); 8 dead ones are enough to exhaust 4 attempts of 2 connections each.
    assert pooled >= 8
    time.sleep(0.8)  # idle past the server's keep-alive: it has closed every one of them
    return server, engine, pooled


def _push(engine, tmp_path, version):
    return engine.on_all_servers("/update_weights_from_disk",
                                 lambda u: {"model_path": str(tmp_path), "weight_version": str(version)}, "push")


def test_a_failed_reused_connection_drops_the_whole_pool_and_retries_once_on_a_fresh_one(
        servers, engines, tmp_path):
    """The defect seen against SGLang 0.5.23: after a rollout, the push after an idle gap took one
    dead pooled connection after another ("failed after 4 attempts; last error: BrokenPipeError").
    Without the idle threshold (switched off here) the first failure must drop every idle
    connection of the server (they are from the same era) and go once more on a NEW one."""
    server, engine, pooled = _pool_of_idle_connections(servers, engines)
    t = engine.transport
    t.keepalive_idle_s = float("inf")  # reuse whatever is pooled: the server's close must be survived
    _push(engine, tmp_path, 1)
    assert server.weight_version == "1"
    assert t.reuse_failures == 1 and t.retried == 0  # one dead connection tried, no retry counted
    assert t.connections_opened == pooled + 1  # the others were dropped unused, one fresh opened
    results = engine.generate(PROMPTS16[:4], PARAMS, return_routes=False)
    assert all(r.meta["attempts"] == 1 for r in results)


def test_connections_idle_past_keepalive_idle_s_are_closed_instead_of_reused(servers, engines, tmp_path):
    server, engine, pooled = _pool_of_idle_connections(servers, engines, keepalive_idle_s=0.2)
    t = engine.transport
    _push(engine, tmp_path, 1)
    results = engine.generate(PROMPTS16, PARAMS, return_routes=False)
    assert server.weight_version == "1" and all(r.meta["attempts"] == 1 for r in results)
    assert t.reuse_failures == 0 and t.retried == 0  # no dead connection was ever sent a request


def test_probing_a_dead_server_costs_one_refused_connect(servers, engines, monkeypatch):
    """Reachability probes (/server_info, /model_info) are one attempt, no backoff: a dead server
    used to cost retries x backoff (about 14 s per distributed sync with the defaults)."""
    live, dead = servers(2)
    dead.stop()
    engine = engines([live.url, dead.url], retries=3, backoff_s=1.0)
    sleeps = []
    monkeypatch.setattr(engine.transport, "backoff", sleeps.append)
    with pytest.raises(RuntimeError, match=f"SGLang server {dead.url} is not reachable"):
        engine.server_info(dead.url, refresh=True)
    assert engine.weight_version(dead.url) is None
    assert sleeps == [] and engine.transport.connections_opened == 2  # one refused connect each
    up, down = engine.reachable([live.url, dead.url])
    assert up == [live.url] and list(down) == [dead.url] and "ConnectionRefusedError" in down[dead.url]


def test_admin_key_is_used_for_weight_endpoints_only(servers, engines, monkeypatch):
    monkeypatch.setenv(FAST["api_key_env"], "user-key")
    monkeypatch.setenv("SAPO_TEST_ADMIN_KEY", "admin-key")
    (server,) = servers(1, api_key="user-key", admin_api_key="admin-key")
    engine = engines([server.url], admin_api_key_env="SAPO_TEST_ADMIN_KEY")
    engine.generate(PROMPTS[:1], PARAMS, return_routes=True)
    engine.flush_cache()
    engine.on_all_servers("/update_weights_from_disk", lambda u: {"model_path": "/", "weight_version": "3"}, "test")
    assert all(r["authorised"] for r in server.requests)
    assert server.weight_version == "3"
    monkeypatch.delenv("SAPO_TEST_ADMIN_KEY")  # the user key alone opens no admin endpoint
    with pytest.raises(RuntimeError, match="HTTP 401.*SAPO_TEST_ADMIN_KEY"):
        engine.flush_cache()


def test_flush_cache_is_retried_while_requests_run(servers, engines):
    (server,) = servers(1, slow_prompts={tuple(PROMPTS[0])}, slow_delay_s=0.4)
    engine = engines([server.url], backoff_s=0.1, retries=5)
    import threading

    worker = threading.Thread(target=engine.generate, args=(PROMPTS[:1], PARAMS), kwargs={"return_routes": False})
    worker.start()
    time.sleep(0.1)
    engine.flush_cache()  # 400 while the slow request runs, then 200
    worker.join()
    flushes = [r for r in server.requests if r["path"] == "/flush_cache"]
    assert len(flushes) >= 2 and server.flushes == 1


def test_a_response_with_another_weight_version_is_never_returned(servers, engines):
    """A server that answers with other weights is taken out of rotation; its answers are
    retried elsewhere and it is listed as stale until re-synced."""
    good, bad = servers(2)
    good.weight_version = bad.weight_version = "4"
    engine = engines([good.url, bad.url])
    engine.expect(4)
    bad.restart()  # launch weights again: version "default"
    results = engine.generate(PROMPTS, PARAMS, return_routes=True)
    assert all(r.meta["weight_version"] == "4" and r.meta["server"] == good.url for r in results)
    assert engine.stale == {bad.url}
    # Requests already in flight when the first stale answer came are discarded too; none after.
    sent_to_bad = len(bad.bodies("/generate"))
    assert 1 <= sent_to_bad <= 3 and engine.take_metrics()["sglang/stale_responses"] == sent_to_bad
    # A restart between rollouts is found by asking the versions directly.
    engine.mark_synced([bad.url])
    assert engine.stale_servers() == [bad.url]
    bad.weight_version = "4"
    engine.mark_synced([bad.url])
    assert engine.stale_servers() == []
    # Guard: with every server stale nothing is trained on: all aborts.
    good.weight_version = bad.weight_version = "3"
    results = engine.generate(PROMPTS[:2], PARAMS, return_routes=True)
    assert all(r.finish_reason == "abort" and r.response_ids == [] for r in results)


def test_retracted_responses_are_counted_and_optionally_dropped(servers, engines):
    (server,) = servers(1, retracted_prompts={tuple(PROMPTS[0])})
    kept = engines([server.url]).generate(PROMPTS[:2], PARAMS, return_routes=True)
    assert kept[0].meta["num_retractions"] == 1 and kept[0].finish_reason != "abort"
    engine = engines([server.url], drop_retracted=True)
    dropped = engine.generate(PROMPTS[:2], PARAMS, return_routes=True)
    assert dropped[0].finish_reason == "abort" and "retraction" in dropped[0].meta["error"]
    assert dropped[1].finish_reason != "abort"
    assert engine.take_metrics() == {"sglang/retracted": 1.0, "sglang/retracted_dropped": 1.0}


@pytest.mark.parametrize("version,speculative,ok", [
    ("0.5.6", None, "need sglang >= 0.5.7"),
    ("0.5.10", "EAGLE", "over-counted before sglang 0.5.15"),
    ("0.5.10", None, None),
    ("0.5.15", "EAGLE", None),
])
def test_server_version_checks_under_routes(servers, engines, version, speculative, ok):
    (server,) = servers(1, version=version, speculative_algorithm=speculative)
    if ok is None:
        engines([server.url], require_routes=True)
    else:
        with pytest.raises(RuntimeError, match=ok):
            engines([server.url], require_routes=True)


def test_seed_without_deterministic_inference_warns(servers, engines, caplog):
    (server,) = servers(1)
    with caplog.at_level(logging.WARNING):
        engines([server.url]).generate(PROMPTS[:1], PARAMS, return_routes=False)
    assert "--enable-deterministic-inference" in caplog.text
    (det,) = servers(1, deterministic=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        engines([det.url]).generate(PROMPTS[:1], PARAMS, return_routes=False)
    assert "--enable-deterministic-inference" not in caplog.text


def test_health_needs_no_key(servers):
    (server,) = servers(1, api_key="k", admin_api_key="a")
    from sapo_megatron.rollout.sglang.transport import Transport

    t = Transport(concurrency=1, retries=0, backoff_s=0, api_key_env="X_NONE", admin_api_key_env="X_NONE")
    assert t.request(server.url, "/health", None, timeout=5, method="GET")[0] == 200
    assert t.request(server.url, "/server_info", None, timeout=5, method="GET")[0] == 401


def test_one_answer_with_a_wrong_version_is_retried_elsewhere(servers, engines):
    """The guard of the never-stale rule on a single answer: prompt 0 comes back from server a
    with another weight_version; the result the caller gets is server b's, with the right one."""
    a, b = servers(2, wrong_version_prompts={tuple(PROMPTS[0])})
    b.behaviour.wrong_version_prompts = set()
    for s in (a, b):
        s.weight_version = "2"
    engine = engines([a.url, b.url])
    engine.expect(2)
    results = engine.generate(PROMPTS[:1], PARAMS, return_routes=True)
    assert results[0].meta["server"] == b.url and results[0].meta["weight_version"] == "2"
    assert results[0].meta["attempts"] == 2 and engine.stale == {a.url}
    assert a.served_versions == ["2-other"]  # a did answer: its sample was discarded


# --------------------------------------------------------------------------- protocol by release
# (FIELD-NOTES 2d, read from each release's source; the mock answers as Behaviour.version does)

def test_retractions_are_read_under_either_name(servers, engines):
    """0.5.7-0.5.11 say ``total_retractions``, 0.5.12+ ``num_retractions`` (AReaL pins 0.5.10.post1)."""
    for version in ("0.5.10.post1", "0.5.23"):
        (server,) = servers(1, version=version, retracted_prompts={tuple(PROMPTS[0])})
        body = fake_generate({"input_ids": PROMPTS[0]}, server.behaviour)
        name = "total_retractions" if version.startswith("0.5.10") else "num_retractions"
        assert body["meta_info"][name] == 1 and len({"total_retractions", "num_retractions"} & set(body["meta_info"])) == 1
        engine = engines([server.url], drop_retracted=True)
        dropped = engine.generate(PROMPTS[:2], PARAMS, return_routes=True)
        assert dropped[0].finish_reason == "abort" and "retraction" in dropped[0].meta["error"], version
        assert dropped[1].finish_reason != "abort"


def test_a_response_generated_across_an_update_is_stale(servers, engines):
    """From 0.5.19 ``meta_info.weight_version`` is the version of the LAST tokens; the spans in
    ``weight_versions`` show a response begun under the previous weights. Never stale means the
    OLDEST token's version must be the expected one."""
    a, b = servers(2)
    for s in (a, b):
        s.weight_version = "2"
    a.behaviour.mixed_version_prompts = {tuple(PROMPTS[0]): "1"}  # its first tokens came from version 1
    engine = engines([a.url, b.url])
    engine.expect(2)
    results = engine.generate(PROMPTS[:2], PARAMS, return_routes=True)
    spans = a.served_spans[0]
    assert [s["version"] for s in spans] == ["1", "2"]  # guard: a did answer across an update
    assert results[0].meta["server"] == b.url and results[0].meta["weight_versions"] == ["2"]
    assert engine.stale == {a.url}
    # A response entirely under one version carries one span (as 0.5.23 sends it).
    assert results[1].meta["weight_versions"] == ["2"] and results[1].meta["weight_version"] == "2"


def test_model_info_is_the_only_weight_version_probe(servers, engines):
    """``/get_weight_version`` answers 404 from 0.5.8 and is gone in 0.5.21; ``/model_info`` has
    the version since 0.5.7."""
    (server,) = servers(1)
    from sapo_megatron.rollout.sglang.transport import Transport

    t = Transport(concurrency=1, retries=0, backoff_s=0, api_key_env="X_NONE", admin_api_key_env="X_NONE")
    assert t.request(server.url, "/get_weight_version", None, timeout=5, method="GET")[0] == 404
    engine = engines([server.url])
    assert engine.weight_version(server.url) == "default"
    assert server.paths()[-1] == "/model_info" and "/get_weight_version" not in server.paths()[1:]


def test_no_flush_while_generation_is_paused_in_place(servers, engines, tmp_path):
    """Requests paused in place stay in the running batch: SGLang's flush then asserts (<= 0.5.21)
    or answers 400 although a weight update did change the weights (0.5.22+). The client refuses
    such a flush before sending it."""
    (server,) = servers(1)
    engine = engines([server.url])
    engine.pause_generation("in_place")
    with pytest.raises(RuntimeError, match="paused in place.*continue_generation"):
        engine.flush_cache()
    with pytest.raises(RuntimeError, match="paused in place"):
        _push(engine, tmp_path, 1)
    # Without a flush the update is what in-place pausing is for.
    engine.on_all_servers("/update_weights_from_disk", lambda u: {"model_path": str(tmp_path), "flush_cache": False,
                                                                  "weight_version": "1"}, "push")
    assert "/flush_cache" not in server.paths() and server.weight_version == "1"
    assert [b.get("flush_cache") for b in server.bodies("/update_weights_from_disk")] == [False]
    engine.continue_generation()
    engine.flush_cache()
    engine.pause_generation("retract")  # retracted requests leave the running batch: flushing is fine
    engine.flush_cache()
    assert server.flushes == 2


def test_admin_key_against_0_5_7_is_refused_clearly(servers, engines, monkeypatch):
    """0.5.7 has no --admin-api-key: its weight endpoints take the API key, so an admin key set
    for the trainer would be sent where it means nothing."""
    monkeypatch.setenv("SAPO_TEST_ADMIN_KEY", "admin-key")
    (old,) = servers(1, version="0.5.7")
    engine = engines([old.url], admin_api_key_env="SAPO_TEST_ADMIN_KEY")
    with pytest.raises(RuntimeError, match=r"0\.5\.7.*no --admin-api-key.*SAPO_TEST_ADMIN_KEY.*>= 0\.5\.8"):
        engine.flush_cache()
    assert "/flush_cache" not in old.paths()
    (new,) = servers(1, version="0.5.8")
    engines([new.url], admin_api_key_env="SAPO_TEST_ADMIN_KEY").flush_cache()
    monkeypatch.delenv("SAPO_TEST_ADMIN_KEY")
    engines([old.url], admin_api_key_env="SAPO_TEST_ADMIN_KEY").flush_cache()  # no admin key: fine


def test_a_collective_request_goes_once_on_a_new_connection():
    """A server that reads a request and drops the connection without answering (it died inside
    the collective, say): a normal request on a pooled connection is resent once on a fresh one,
    but a collective one (``once``: joining a group, a bucket) is sent exactly once, on a new
    connection, and fails: resending it would make the server join or receive twice."""
    import socket
    import threading

    from sapo_megatron.rollout.sglang.transport import Retryable, Transport

    listener = socket.create_server(("127.0.0.1", 0))
    port, received = listener.getsockname()[1], []
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"

    def handle(conn) -> None:
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                path = data.split(b" ", 2)[1].decode()
                received.append(path)
                if path != "/health":
                    return  # dropped unanswered
                conn.sendall(answer)  # kept alive: the connection goes back to the pool

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    t = Transport(concurrency=2, retries=0, backoff_s=0.0, api_key_env="NO_SUCH_KEY_VAR",
                  admin_api_key_env="NO_SUCH_ADMIN_VAR")
    url = f"http://127.0.0.1:{port}"
    try:
        assert t.request(url, "/health", None, timeout=5, method="GET")[0] == 200
        opened = t.connections_opened
        with pytest.raises(Retryable):
            t.request(url, "/update_weights_from_distributed", {}, timeout=5, once=True)
        assert received.count("/update_weights_from_distributed") == 1, received
        assert t.connections_opened == opened + 1, "a new connection, not the pooled one"
        assert t.request(url, "/health", None, timeout=5, method="GET")[0] == 200
        with pytest.raises(Retryable):
            t.request(url, "/init_weights_update_group", {}, timeout=5)
        # Without once: the pooled connection's failure is taken for an idle close and resent.
        assert received.count("/init_weights_update_group") == 2, received
    finally:
        listener.close()
        t.close()
