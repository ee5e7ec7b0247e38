"""The mock (tests/sglang_mock.py) against the REAL SGLang server: the same requests to both, the
answers must agree wherever our client looks (issue 17, deliverable 4).

Compared per request: the HTTP status; for JSON, every field ``transport.py``, ``protocol.py`` and
``engine.py`` read, with its type (and its value where the server's answer is deterministic: the
weight-update session's messages, weight versions, ``success``); where the error text sits
(``{"error": {"message"}}``, ``{"error": str}``, ``{"success", "message"}``, ``{"object": "error",
"message"}``); the route layout (rows = prompt + completion - 1, x layers x top-k, int32); and the
5 s keep-alive close. The generated tokens differ (the mock's are fake), their layout does not.
Both sides get the same keys (``--api-key`` and ``--admin-api-key``).
"""

from __future__ import annotations

import base64
import http.client
import time
from dataclasses import dataclass, field

import pytest

from tests.real_sglang.conftest import ADMIN_KEY, API_KEY
from tests.real_sglang.harness import TINY_CONFIG, http_json
from tests.sglang_mock import Behaviour, MockSGLang

LAYERS, TOPK = TINY_CONFIG["num_hidden_layers"], TINY_CONFIG["num_experts_per_tok"]
GEN = {"input_ids": [5, 6, 7, 8], "sampling_params": {"max_new_tokens": 6, "temperature": 1.0},
       "return_logprob": True, "return_routed_experts": True}
DIST_UPDATE = {"names": ["lm_head.weight"], "dtypes": ["bfloat16"], "shapes": [[384, 64]], "group_name": "contract"}


@pytest.fixture(scope="module")
def mock():
    server = MockSGLang(Behaviour(num_hidden_layers=LAYERS, topk=TOPK, num_experts=TINY_CONFIG["num_experts"],
                                  dense_layers=(), vocab_size=TINY_CONFIG["vocab_size"], api_key=API_KEY,
                                  admin_api_key=ADMIN_KEY, delay_per_token_s=0.005))
    yield server
    server.stop()


@pytest.fixture
def both(servers, mock):
    real = servers.keyed("a")
    mock.weight_version = "default"
    return {"mock": mock.url, "real": real.url}


def error_slot(body) -> str:
    """Where the error text sits, in the shapes our ``transport.server_message`` reads."""
    if isinstance(body, str):
        return "text"
    if not isinstance(body, dict):
        return type(body).__name__
    if isinstance(body.get("error"), dict):
        return "error.message"
    if isinstance(body.get("error"), str):
        return "error:str"
    if "success" in body:
        return "success+message"
    if body.get("object") == "error":
        return "object:error+message"
    if "detail" in body:
        return "detail"
    return "other:" + ",".join(sorted(body))


@dataclass
class Case:
    name: str
    path: str
    body: dict | None = None
    key: str | None = API_KEY
    fields: dict = field(default_factory=dict)  # dotted path -> type (checked on both)
    values: tuple = ()  # dotted paths whose VALUES must agree


def pick(body, dotted: str):
    for part in dotted.split("."):
        if not isinstance(body, dict) or part not in body:
            return KeyError
        body = body[part]
    return body


CASES = [
    Case("health without a key", "/health", key=None),
    Case("server_info", "/server_info", fields={"version": str, "tp_size": int, "dp_size": int, "pp_size": int,
                                                 "enable_return_routed_experts": bool,
                                                 "enable_deterministic_inference": bool,
                                                 "custom_weight_loader": list},
         values=("version", "tp_size", "dp_size", "pp_size", "enable_return_routed_experts")),
    Case("server_info, older name", "/get_server_info", fields={"version": str}),
    Case("server_info without a key", "/server_info", key=None, values=("error",)),
    Case("model_info", "/model_info", fields={"weight_version": str}, values=("weight_version",)),
    Case("get_weight_version (removed in 0.5.21)", "/get_weight_version"),
    Case("generate", "/generate", GEN, fields={"output_ids": list, "meta_info.finish_reason.type": str,
                                               "meta_info.weight_version": str, "meta_info.weight_versions": list,
                                               "meta_info.num_retractions": int, "meta_info.completion_tokens": int,
                                               "meta_info.prompt_tokens": int, "meta_info.output_token_logprobs": list,
                                               "meta_info.routed_experts": str},
         values=("meta_info.weight_version", "meta_info.weight_versions", "meta_info.finish_reason.type",
                 "meta_info.num_retractions", "meta_info.completion_tokens")),
    Case("generate with the admin key", "/generate", GEN, key=ADMIN_KEY, values=("error",)),
    Case("generate without input", "/generate", {"sampling_params": {"max_new_tokens": 2}}),
    Case("generate, float max_new_tokens", "/generate", {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2.0}}),
    Case("generate, unknown top-level field", "/generate",
         {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}, "no_such_field": 1}),
    Case("flush_cache with the API key", "/flush_cache", {}, values=("error",)),
    Case("flush_cache", "/flush_cache", {}, key=ADMIN_KEY),
    Case("update_weights_from_disk without model_path", "/update_weights_from_disk", {}, key=ADMIN_KEY),
    Case("update_weights_from_disk, missing directory", "/update_weights_from_disk",
         {"model_path": "/nonexistent/checkpoint"}, key=ADMIN_KEY, fields={"success": bool, "message": str},
         values=("success",)),
    Case("init_weights_update_group without fields", "/init_weights_update_group", {}, key=ADMIN_KEY),
    Case("destroy an unknown group", "/destroy_weights_update_group", {"group_name": "never-made"}, key=ADMIN_KEY,
         fields={"success": bool, "message": str}, values=("success", "message")),
    Case("distributed update outside a session", "/update_weights_from_distributed", DIST_UPDATE, key=ADMIN_KEY,
         fields={"success": bool, "message": str}, values=("success", "message")),
    Case("pause_generation, bad mode", "/pause_generation", {"mode": "sideways"}, key=ADMIN_KEY),
    Case("continue_generation", "/continue_generation", {}, key=ADMIN_KEY, fields={"message": str}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_same_answer(both, case):
    answers = {side: http_json(url, case.path, case.body, key=case.key) for side, url in both.items()}
    (mock_status, mock_body), (real_status, real_body) = answers["mock"], answers["real"]
    assert mock_status == real_status, f"status: mock {mock_status}, real {real_status}: {real_body!r:.300}"
    if real_status != 200:
        assert error_slot(mock_body) == error_slot(real_body), (mock_body, real_body)
    for dotted, kind in case.fields.items():
        for side, (_, body) in answers.items():
            value = pick(body, dotted)
            assert value is not KeyError, f"{side} has no {dotted}: {body!r:.300}"
            assert isinstance(value, kind), f"{side}: {dotted} is {type(value).__name__}, not {kind.__name__}"
    for dotted in case.values:
        assert pick(mock_body, dotted) == pick(real_body, dotted), dotted


def _generate(url: str) -> dict:
    status, body = http_json(url, "/generate", GEN, key=API_KEY)
    assert status == 200, body
    return body


def test_routes_and_log_probs_have_the_same_layout(both):
    for side, url in both.items():
        meta = _generate(url)["meta_info"]
        rows = meta["prompt_tokens"] + meta["completion_tokens"] - 1
        raw = base64.b64decode(meta["routed_experts"])
        assert len(raw) == rows * LAYERS * TOPK * 4, f"{side}: {len(raw)} bytes of routes for {rows} rows"
        entries = meta["output_token_logprobs"]
        assert len(entries) == meta["completion_tokens"]
        assert all(isinstance(lp, float) and isinstance(tok, int) and extra is None for lp, tok, extra in entries), side
        assert meta["weight_versions"] == [{"version": meta["weight_version"], "start": 0,
                                           "end": meta["completion_tokens"]}], side


def test_routes_from_a_start_length_have_the_same_layout(both):
    """``routed_experts_start_len`` (multi-turn turns, rollout/episodes.py): rows from there on."""
    for side, url in both.items():
        status, body = http_json(url, "/generate", {**GEN, "routed_experts_start_len": 3}, key=API_KEY)
        assert status == 200, (side, body)
        meta = body["meta_info"]
        rows = meta["prompt_tokens"] + meta["completion_tokens"] - 1 - 3
        assert len(base64.b64decode(meta["routed_experts"])) == rows * LAYERS * TOPK * 4, side


def test_weight_versions_move_with_a_disk_update(both, tiny_model):
    for side, url in both.items():
        status, answer = http_json(url, "/update_weights_from_disk",
                                   {"model_path": str(tiny_model), "weight_version": "7", "flush_cache": True},
                                   key=ADMIN_KEY)
        assert status == 200 and answer["success"], (side, answer)
        assert http_json(url, "/model_info", key=API_KEY)[1]["weight_version"] == "7", side
        assert _generate(url)["meta_info"]["weight_version"] == "7", side


def test_weight_update_session(both):
    """begin / begin again / distributed update inside (unknown group) / end / end again."""
    steps = [("/begin_weight_update", {}), ("/begin_weight_update", {}), ("/update_weights_from_distributed", DIST_UPDATE),
             ("/end_weight_update", {}), ("/end_weight_update", {})]
    seen = {}
    for side, url in both.items():
        seen[side] = [http_json(url, path, body, key=ADMIN_KEY) for path, body in steps]
    for (path, _), (ms, mb), (rs, rb) in zip(steps, seen["mock"], seen["real"]):
        assert ms == rs, (path, mb, rb)
        assert mb["success"] == rb["success"], (path, mb, rb)
        if path != "/update_weights_from_distributed":  # its text names the group set
            assert mb["message"] == rb["message"], (path, mb, rb)


def test_aborted_request_body(both):
    """An abort the client did not cause (``/pause_generation`` mode ``abort`` while a long
    request runs): HTTP 200, ``finish_reason.type == "abort"`` with a message, and the fields
    the client reads."""
    import threading

    for side, url in both.items():
        box = {}
        long = {**GEN, "sampling_params": {"max_new_tokens": 600, "ignore_eos": True}}
        worker = threading.Thread(target=lambda: box.update(r=http_json(url, "/generate", long, key=API_KEY)))
        worker.start()
        time.sleep(0.5)
        assert http_json(url, "/pause_generation", {"mode": "abort"}, key=ADMIN_KEY)[0] == 200
        worker.join(60)
        http_json(url, "/continue_generation", {}, key=ADMIN_KEY)
        status, body = box["r"]
        assert status == 200, (side, body)
        finish = body["meta_info"]["finish_reason"]
        assert finish["type"] == "abort" and isinstance(finish.get("message"), str), (side, finish)
        assert isinstance(body["meta_info"]["weight_version"], str), side


def test_idle_connections_close_after_five_seconds(both):
    """SGLang's uvicorn closes a keep-alive connection idle for 5 s (SGLANG_TIMEOUT_KEEP_ALIVE);
    one idle for 3 s still answers. Each connection idles in its own thread, timed from its own
    last answer, so a slow answer on one connection cannot lengthen another's idle (one ~6 s wait
    for all four)."""
    import threading

    outcomes: dict = {}

    def probe(side, port, idle):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/health")
        conn.getresponse().read()
        last_answer = time.monotonic()
        time.sleep(idle)
        idled = time.monotonic() - last_answer
        try:
            conn.request("GET", "/health")
            conn.getresponse().read()
            outcomes[side, idle] = ("answered", round(idled, 2))
        except (OSError, http.client.HTTPException):
            outcomes[side, idle] = ("closed", round(idled, 2))
        finally:
            conn.close()

    threads = [threading.Thread(target=probe, args=(side, int(url.rsplit(":", 1)[1]), idle))
               for side, url in both.items() for idle in (3.0, 5.8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for side in both:
        seen = [outcomes.get((side, idle)) for idle in (3.0, 5.8)]
        assert [s and s[0] for s in seen] == ["answered", "closed"], (side, "(outcome, seconds idle):", seen)


def test_in_place_and_retract_updates_span_versions(both, tiny_model):
    """Partial rollouts (trainer/partial.py) rely on: ``disable_radix_cache`` in /server_info; a
    flushing update refused (400) under a request paused in place, a non-flushing one accepted;
    the response then spans two versions (spans tiling it, ``weight_version`` the last); under
    ``retract`` the flushing update succeeds and the response counts a retraction."""
    import threading

    for side, url in both.items():
        info = http_json(url, "/server_info", key=API_KEY)[1]
        assert isinstance(info.get("disable_radix_cache"), bool), (side, info.get("disable_radix_cache"))
        for mode, version in (("in_place", "7"), ("retract", "8")):
            box = {}
            long = {**GEN, "sampling_params": {"max_new_tokens": 600, "ignore_eos": True}}
            worker = threading.Thread(target=lambda: box.update(r=http_json(url, "/generate", long, key=API_KEY,
                                                                            timeout=120)))
            worker.start()
            time.sleep(0.5)
            assert http_json(url, "/pause_generation", {"mode": mode}, key=ADMIN_KEY)[0] == 200
            update = {"model_path": str(tiny_model), "weight_version": version}
            if mode == "in_place":
                status, answer = http_json(url, "/update_weights_from_disk", {**update, "flush_cache": True},
                                           key=ADMIN_KEY, timeout=120)
                assert status == 400 and answer["success"] is False, (side, status, answer)
            flush = mode == "retract"
            status, answer = http_json(url, "/update_weights_from_disk", {**update, "flush_cache": flush},
                                       key=ADMIN_KEY, timeout=120)
            assert status == 200 and answer["success"], (side, mode, answer)
            assert http_json(url, "/continue_generation", {}, key=ADMIN_KEY)[0] == 200
            worker.join(120)
            status, body = box["r"]
            assert status == 200, (side, body)
            meta = body["meta_info"]
            spans = meta["weight_versions"]
            assert [s["version"] for s in spans][-1] == version and len(spans) == 2, (side, mode, spans)
            assert spans[0]["start"] == 0 and spans[0]["end"] == spans[1]["start"] and spans[1]["end"] == 600, spans
            assert meta["weight_version"] == version, (side, meta["weight_version"])
            assert (meta["num_retractions"] >= 1) == (mode == "retract"), (side, mode, meta["num_retractions"])
