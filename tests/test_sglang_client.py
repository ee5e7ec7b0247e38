"""The SGLang rollout client against a local server that speaks SGLang's HTTP API.

The server is tests/sglang_mock.py; it encodes routes with the codec the client decodes with,
so a route test checks the client's bookkeeping (rows, dense layers, dtype), not the codec.

Run: ``pytest tests/test_sglang_client.py`` (single process, a few seconds).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import pytest
import torch
from tests.sglang_mock import Behaviour, ConcurrencyMeter, MockSGLang, fake_generate, fake_routes

from sapo_megatron.rollout.base import RouteSpec, SamplingParams
from sapo_megatron.rollout.sglang import DistributedSync, SGLangConfig, SGLangEngine

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
        extra = {k: kwargs.pop(k) for k in ("weight_writer", "weight_broadcaster") if k in kwargs}
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
    assert results[1].routes is None
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
    start = time.monotonic()
    results = engine.generate(PROMPTS, PARAMS, return_routes=True)
    assert time.monotonic() - start < 2.5  # 3 attempts x 0.3 s + backoff: never hangs
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
        engines([server.url], require_routes=True)  # fail fast at start, from /get_server_info
    (good,) = servers(1)
    engines([good.url], require_routes=True)
    assert good.paths() == ["/get_server_info"]


def test_concurrency_limit_is_honoured_over_all_servers(servers, engines):
    meter = ConcurrencyMeter()
    a, b = servers(2, meter=meter, delay_s=0.1)
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


def _fake_writer(model_chunks, path):
    with open(os.path.join(path, "model.safetensors"), "w") as f:
        f.write(f"weights of {model_chunks}")


def test_weight_sync_from_disk(servers, engines, tmp_path):
    a, b = servers(2)
    engine = engines([a.url, b.url], weight_dir=str(tmp_path), weight_writer=_fake_writer)
    (tmp_path / "step_1").mkdir()
    (tmp_path / "step_1" / "half-written.safetensors").write_text("left by a crashed run")
    engine.update_weights("chunks", step=1)
    assert os.listdir(tmp_path / "step_1") == ["model.safetensors"]
    engine.update_weights("chunks", step=2)
    for server in (a, b):
        assert server.paths() == ["/update_weights_from_disk", "/flush_cache"] * 2
        assert server.bodies("/update_weights_from_disk") == [
            {"model_path": str(tmp_path / f"step_{s}"), "flush_cache": True} for s in (1, 2)
        ]
    assert sorted(os.listdir(tmp_path)) == ["step_2"]  # keep_weight_dirs=1
    assert (tmp_path / "step_2" / "model.safetensors").read_text() == "weights of chunks"
    user_dir = tmp_path / "user_checkpoint"  # loaded, never deleted: the engine did not write it
    user_dir.mkdir()
    engine.load_weights(str(user_dir), step=3)
    assert sorted(os.listdir(tmp_path)) == ["user_checkpoint"]

    b.behaviour.weight_update_ok = False
    with pytest.raises(RuntimeError, match=f"{b.url}.*update_weights_from_disk.*step 4"):
        engine.update_weights("chunks", step=4)


class _FakeBroadcaster:
    def __init__(self, servers):
        self.servers, self.calls = servers, []

    def init_group(self, sync):
        self.calls.append(("init_group", sync.world_size, self._seen("/init_weights_update_group")))

    def batches(self, model_chunks):
        yield [("model.embed_tokens.weight", torch.zeros(4, 2, dtype=torch.bfloat16))]
        yield [
            ("model.layers.0.mlp.gate.weight", torch.zeros(8, 2)),
            ("lm_head.weight", torch.zeros(4, 2, dtype=torch.bfloat16)),
        ]

    def broadcast(self, batch, sync):
        self.calls.append(("broadcast", [n for n, _ in batch], sync.group_name))

    def _seen(self, path):
        deadline = time.monotonic() + 2  # the servers' requests are open while we join
        while time.monotonic() < deadline:
            if all(path in s.paths() for s in self.servers):
                return True
            time.sleep(0.01)
        return False


def test_weight_sync_distributed_request_sequence(servers, engines):
    a, b = servers(2)
    broadcaster = _FakeBroadcaster([a, b])
    sync = DistributedSync(master_address="10.0.0.1", master_port=29600, world_size=3)
    engine = engines([a.url, b.url], distributed=sync, weight_broadcaster=broadcaster)
    engine.update_weights("chunks", step=1)
    engine.update_weights("chunks", step=2)

    update = "/update_weights_from_distributed"
    for server, offset in ((a, 1), (b, 2)):
        one_step = [update, update, "/flush_cache"]
        assert server.paths() == ["/init_weights_update_group", *one_step, *one_step]
        assert server.bodies("/init_weights_update_group") == [
            {
                "master_address": "10.0.0.1",
                "master_port": 29600,
                "rank_offset": offset,
                "world_size": 3,
                "group_name": "weight_update_group",
                "backend": "nccl",
            }
        ]
        first, second = server.bodies(update)[:2]
        assert first == {
            "names": ["model.embed_tokens.weight"],
            "dtypes": ["bfloat16"],
            "shapes": [[4, 2]],
            "group_name": "weight_update_group",
            "flush_cache": False,
        }
        assert second["dtypes"] == ["float32", "bfloat16"] and second["flush_cache"] is True
    assert broadcaster.calls[0] == ("init_group", 3, True)  # once, while the servers joined
    assert [c[0] for c in broadcaster.calls] == ["init_group"] + ["broadcast"] * 4


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="not an http"):
        SGLangConfig(urls=["localhost:30000"])
    with pytest.raises(ValueError, match="empty"):
        SGLangConfig(urls=[])
    with pytest.raises(ValueError, match="does not split evenly"):
        DistributedSync("h", 1, world_size=4).offsets(2)
