"""A local stand-in for an SGLang server, speaking its native HTTP API (FIELD-NOTES section 2).

``MockSGLang`` is a ``ThreadingHTTPServer`` on 127.0.0.1 (port 0 = any free port). Generation is
fake but deterministic: :func:`fake_generate` derives tokens, log-probs and routes from the
request alone, so a test can compute what the client must return. Like SGLang 0.5.23 it reports
``weight_version`` in every response (with the ``weight_versions`` spans of 0.5.19+) and in
``/model_info`` (``/get_weight_version`` answers 404, as from 0.5.8), moves it with successful
weight updates, refuses a flushing weight update while requests are paused in place, refuses a
float ``max_new_tokens``, ignores unknown top-level fields, answers ``/flush_cache`` with 400
while requests run and missing required fields with 400 (as 0.5.23 does), applies its key levels (``/health``
open, admin key for the weight endpoints) and closes a keep-alive connection left idle for
``Behaviour.keepalive_timeout_s`` (uvicorn's ``timeout_keep_alive``, which SGLang sets from
``SGLANG_TIMEOUT_KEEP_ALIVE``, default 5 s). With ``Behaviour(receiver=True)`` it joins the
distributed weight-update group as SGLang does (tests/dist/sglang_receiver.py). Behaviours that
tests switch on: no routed experts (a server started without ``--enable-return-routed-experts``),
aborts, delays (to trigger client timeouts), dropped connections and a restart on the same port
(a stopped server closes its open connections too, as a killed one does), the stop-edge extra
route row, a required API key, failing weight updates, a response generated across an update.
Every request is recorded (``server.requests``) with its path, JSON body, whether it was
authorised and the status it was answered with.

``Behaviour.version`` shapes the answers as that release does (retraction counts named
``total_retractions`` before 0.5.12, no spans before 0.5.19, ``/get_weight_version`` before
0.5.8, no admin key in 0.5.7).

Mock-vs-real differences fixed after running the real 0.5.23 server and reading each release's
source (the mock used to agree with our client instead): idle keep-alive connections are closed
after 5 s; the listen backlog is uvicorn's 2048 (socketserver's 5 reset connections); a stopped
server's connections die with it; the spans; ``/get_weight_version`` 404; the retraction count's
old name; no admin key in 0.5.7; a flushing update refused while requests are paused in place.

The weight-update session, by the version it reports (read from 0.5.20, 0.5.21 and 0.5.23:
``managers/scheduler_components/weight_updater.py``, ``entrypoints/http_server.py``): from
0.5.21, ``/update_weights_from_distributed`` and ``/update_weights_from_tensor`` outside a session
get 400 ``{"success": false, "message": "... must run between begin_weight_update() and
end_weight_update()"}`` (``weight_updater.py:192`` / ``:234`` in 0.5.23, ``:179`` / ``:219`` in
0.5.21); ``/begin_weight_update`` on an open session and ``/end_weight_update`` without one get
400 (``:311-316``, ``:325-329``); both answer 200 ``{"success": true, "message": "Success"}``
otherwise. Before 0.5.21 neither endpoint exists (404) and nothing is gated. Disk updates never
need a session. Group names follow SGLang too: an existing name is refused ("The specified group
name has already been created", torch's own check, which the receiver hits for real), destroying
an unknown one answers 400 "The group to be destroyed does not exist.".

Use as a context manager (or call ``stop()``): the server and every waiting handler end at
teardown.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from sapo_megatron.rollout.sglang.protocol import parse_version
from sapo_megatron.routing import encode_routed_experts


@dataclass
class Behaviour:
    num_hidden_layers: int = 4
    topk: int = 2
    num_experts: int = 8
    dense_layers: tuple[int, ...] = (0,)
    vocab_size: int = 50
    routed_experts: bool = True  # the server flag --enable-return-routed-experts
    stop_edge: bool = False  # one extra route row when a request stops on a stop token
    trim_stop_in_output_ids: bool = False  # output_ids without the matched stop token
    abort_prompts: set = field(default_factory=set)  # tuple(input_ids) answered with an abort
    reject_prompts: set = field(default_factory=set)  # tuple(input_ids) answered with HTTP 400
    delay_s: float = 0.0  # every /generate waits this long before answering
    delay_per_token_s: float = 0.0  # ... plus this per generated token (bench_async's decode latency)
    slow_prompts: set = field(default_factory=set)  # tuple(input_ids): wait slow_delay_s
    slow_delay_s: float = 0.0
    slow_times: int | None = None  # only the first N requests of slow prompts are slow
    fail_5xx: int = 0  # the first N /generate requests get HTTP 500 (body echoes headers)
    api_key: str | None = None  # required as "Authorization: Bearer <key>" when set
    admin_api_key: str | None = None  # --admin-api-key: then the ONLY key of the admin endpoints
    weight_update_ok: bool = True
    refuse_update_at: int | None = None  # the N-th /update_weights_from_distributed gets 400, never receives
    refusal_delay_s: float = 0.0  # ... answered after this long
    version: str = "0.5.23"  # what /server_info reports
    tp_size: int = 1
    dp_size: int = 1
    pp_size: int = 1
    speculative_algorithm: str | None = None
    deterministic: bool = False  # --enable-deterministic-inference
    receiver: bool = False  # join the distributed weight-update group (tests/dist/sglang_receiver.py)
    keep_weights: bool = True  # the receiver keeps what it received (mock.receiver.weights)
    # --custom-weight-loader: /update_weights_from_tensor with one of these as load_format calls it
    # with model=None (the host-side work of sapo_sglang.delta_loader; no served model here).
    custom_weight_loaders: tuple[str, ...] = ()
    retracted_prompts: set = field(default_factory=set)  # tuple(input_ids): num_retractions = 1
    wrong_version_prompts: set = field(default_factory=set)  # tuple(input_ids): served by other weights
    # tuple(input_ids) -> an earlier weight_version: the first half of the response was generated
    # under it, as when an update lands mid-request (spans in meta_info.weight_versions, 0.5.19+)
    mixed_version_prompts: dict = field(default_factory=dict)
    # A keep-alive connection idle this long is closed by the server (SGLANG_TIMEOUT_KEEP_ALIVE).
    keepalive_timeout_s: float = 5.0
    # Partial rollouts. With delay_per_token_s, decoding is token by token: /pause_generation
    # (in_place or retract) stops it until /continue_generation, a weight update in between moves
    # the version of the tokens after it (spans as SGLang's record_weight_version_events), and a
    # retract counts in num_retractions. response_lengths: each request's length is drawn from it
    # (seeded by the request), ending on the first stop token ("stop") or "length".
    response_lengths: tuple[int, ...] | None = None
    disable_radix_cache: bool = False  # --disable-radix-cache, reported in /server_info


# Fields SGLang's GenerateReqInput accepts (a subset); since 0.5.22 unknown TOP-LEVEL fields are
# ignored and unknown sampling_params keys (or a float max_new_tokens) get HTTP 400.
GENERATE_FIELDS = {
    "text",
    "input_ids",
    "sampling_params",
    "return_logprob",
    "logprob_start_len",
    "top_logprobs_num",
    "return_text_in_logprobs",
    "stream",
    "rid",
    "return_routed_experts",
    "routed_experts_start_len",
}
SAMPLING_FIELDS = {
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "max_new_tokens",
    "min_new_tokens",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "skip_special_tokens",
    "no_stop_trim",
    "sampling_seed",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "n",
}


INT_SAMPLING_FIELDS = {"max_new_tokens", "min_new_tokens", "top_k", "n", "sampling_seed"}
PAUSE_MODES = ("abort", "retract", "in_place")
# 0.5.23's finish_reason for a request aborted by /pause_generation {"mode": "abort"} (HTTP 200).
ABORTED_BY_PAUSE = {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}
# Admin-optional endpoints of SGLang's HTTP server (auth_level ADMIN_OPTIONAL).
ADMIN_PATHS = {"/flush_cache", "/update_weights_from_disk", "/init_weights_update_group",
               "/destroy_weights_update_group", "/update_weights_from_distributed", "/pause_generation",
               "/continue_generation", "/update_weights_from_tensor", "/begin_weight_update",
               "/end_weight_update"}
SESSION_SINCE = (0, 5, 21)  # /begin_weight_update and /end_weight_update exist and gate the updates
SESSION_PATHS = {"/begin_weight_update", "/end_weight_update"}
# Required fields of the request dataclasses (io_struct.py). 0.5.23 validates bodies itself and
# answers 400 {"object": "error", "message": "N validation errors: ..."} without them (measured
# against the real server; FastAPI's own 422 never reaches a client of these endpoints).
REQUIRED = {
    "/update_weights_from_disk": ("model_path",),
    "/init_weights_update_group": ("master_address", "master_port", "rank_offset", "world_size"),
    "/update_weights_from_distributed": ("names", "dtypes", "shapes"),
    "/update_weights_from_tensor": ("serialized_named_tensors",),
    "/generate": (),
}


def release(version: str) -> tuple[int, int, int]:
    """``"0.5.10.post1"`` -> ``(0, 5, 10)``: what the mock gates its answers on."""
    return tuple(int(x) for x in version.split(".")[:3] if x.isdigit())  # type: ignore[return-value]


# Protocol by release (FIELD-NOTES 2d, read from the wheels 0.5.7 ... 0.5.23).
NUM_RETRACTIONS_SINCE = (0, 5, 12)  # total_retractions before
WEIGHT_SPANS_SINCE = (0, 5, 19)  # meta_info.weight_versions; weight_version = the last tokens'
GET_WEIGHT_VERSION_404_SINCE = (0, 5, 8)  # removed in 0.5.21; /model_info has it since 0.5.7
ADMIN_KEY_SINCE = (0, 5, 8)


def weight_version_spans(changes: list[tuple[str, int]], num_output_tokens: int) -> list[dict]:
    """SGLang 0.5.23's spans (``srt/utils/weight_versions.py``: ``compute_weight_version_spans``
    then ``add_weight_versions_to_meta_info``): ``changes`` = (version, output tokens generated
    when it was replaced), the current version last."""
    spans: list[dict] = []
    for version, end in changes:
        end = min(end, num_output_tokens)
        if spans and end <= spans[-1]["end"]:
            continue
        if spans and version == spans[-1]["version"]:
            spans[-1]["end"] = end
            continue
        spans.append({"version": version, "start": spans[-1]["end"] if spans else 0, "end": end})
    return [s for s in spans if s["start"] < num_output_tokens or s["start"] == 0]


# torch's own refusal (distributed_c10d._new_process_group_helper), which SGLang passes on.
NAME_TAKEN = "The specified group name has already been created, please use a different group name"


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def fake_routes(num_tokens: int, b: Behaviour, seed: int) -> torch.Tensor:
    """``[num_tokens, num_hidden_layers, topk]`` int32: distinct experts on MoE layers, zeros on
    dense ones (as SGLang sends them)."""
    gen = torch.Generator().manual_seed(seed % 2**63)
    scores = torch.rand(num_tokens, b.num_hidden_layers, b.num_experts, generator=gen)
    routes = scores.topk(b.topk, dim=-1).indices.to(torch.int32)  # kernel order: not sorted
    routes[:, list(b.dense_layers)] = 0
    return routes


def fake_generate(request: dict, b: Behaviour, weight_version: str = "default", earlier_version: str | None = None
                  ) -> dict:
    """The /generate response SGLang would send for ``request`` (deterministic), as release
    ``b.version`` shapes it; ``earlier_version``: the weights were updated half-way through."""
    prompt = list(request["input_ids"])
    sp = request.get("sampling_params", {})
    rng = random.Random(_seed(prompt, sp.get("sampling_seed"), sp.get("temperature")))
    stops = set(sp.get("stop_token_ids") or [])
    max_new = int(sp.get("max_new_tokens", 16))
    output, finish = [], {"type": "length", "length": max_new}
    if tuple(prompt) in b.abort_prompts:
        # A 200 abort: no status_code (an abort with one is an HTTP error instead).
        finish = {"type": "abort", "message": "Abort in waiting queue"}
    elif b.response_lengths:
        length = min(max_new, b.response_lengths[rng.randrange(len(b.response_lengths))])
        plain = [t for t in range(b.vocab_size) if t not in stops]
        output = [rng.choice(plain) for _ in range(length)]
        if length < max_new and stops:
            output[-1] = min(stops)
            finish = {"type": "stop", "matched": output[-1]}
    else:
        while len(output) < max_new:
            token = rng.randrange(b.vocab_size)
            output.append(token)
            if token in stops:
                finish = {"type": "stop", "matched": token}
                break
    logprobs = [[-round(rng.uniform(0.01, 5.0), 4), t, None] for t in output]
    retractions = "num_retractions" if release(b.version) >= NUM_RETRACTIONS_SINCE else "total_retractions"
    meta = {
        "id": hashlib.md5(repr(prompt).encode()).hexdigest(),
        "finish_reason": finish,
        "completion_tokens": len(output),
        "weight_version": weight_version,
        retractions: 1 if tuple(prompt) in b.retracted_prompts else 0,
    }
    if release(b.version) >= WEIGHT_SPANS_SINCE and finish["type"] != "abort":
        # Every finished request carries its spans: one when a single version served it.
        changes = [(earlier_version, len(output) // 2)] if earlier_version is not None else []
        meta["weight_versions"] = weight_version_spans(changes + [(weight_version, len(output))], len(output))
        meta["weight_version"] = meta["weight_versions"][-1]["version"]
    if finish["type"] != "abort":  # real aborts carry no prompt/cached token counts
        meta.update(prompt_tokens=len(prompt), cached_tokens=0)
    if request.get("return_logprob"):
        meta["output_token_logprobs"] = logprobs
        meta["input_token_logprobs"] = [[None, prompt[-1], None]]  # logprob_start_len -1
    if request.get("return_routed_experts") and b.routed_experts and output:
        start = int(request.get("routed_experts_start_len", 0))
        rows = len(prompt) + len(output) - 1 - start
        if b.stop_edge and finish["type"] == "stop":
            rows += 1
        meta["routed_experts"] = encode_routed_experts(fake_routes(rows, b, _seed(prompt, "r")))
    output_ids = output[:-1] if b.trim_stop_in_output_ids and finish["type"] == "stop" else output
    return {"text": " ".join(map(str, output_ids)), "output_ids": output_ids, "meta_info": meta}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY, as SGLang's uvicorn sets it: the headers and the body go out in two writes,
    # and without it Nagle holds the body until the client's delayed ACK (~40 ms per request).
    disable_nagle_algorithm = True
    server: "_Server"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def setup(self) -> None:
        # The socket timeout ends the wait for the next request line of an idle keep-alive
        # connection (the handler then closes it), as uvicorn's keep-alive timer does.
        self.timeout = self.server.mock.behaviour.keepalive_timeout_s
        super().setup()
        with self.server.mock.lock:
            self.server.mock.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.mock.lock:
            self.server.mock.connections.discard(self.connection)
        super().finish()

    def _leave_meter(self) -> None:
        """A /generate request stops counting as in flight once its answer is decided, before
        the bytes go out: the client may send its next request the moment it has read them,
        possibly before this handler thread runs again."""
        if getattr(self, "_metered", False):
            self._metered = False
            with self.server.mock.lock:
                self.server.mock.meter.leave()
                self.server.mock.running_here -= 1

    def _send(self, status: int, body, content_type: str = "application/json") -> None:
        self._leave_meter()
        if getattr(self, "_record", None) is not None:
            self._record["status"] = status
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _drop(self) -> None:
        """A dying server: close the connection without an answer."""
        self.close_connection = True
        try:
            self.connection.shutdown(2)
        except OSError:
            pass

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        mock = self.server.mock
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        b = mock.behaviour
        path = self.path.split("?")[0]
        # SGLang's auth levels (utils/auth.py): /health* needs no key; admin endpoints take only
        # the admin key when one is set, else the API key; the others take the API key. 0.5.7
        # has no admin key.
        admin_key = b.admin_api_key if release(b.version) >= ADMIN_KEY_SINCE else None
        key = admin_key or b.api_key if path in ADMIN_PATHS else b.api_key
        authorised = path.startswith("/health") or key is None or self.headers.get("Authorization") == f"Bearer {key}"
        self._record = {"path": self.path, "method": self.command, "body": body, "authorised": authorised,
                        "time": time.monotonic(), "wall": time.time(), "status": None}
        with mock.lock:
            mock.requests.append(self._record)
        if not authorised:
            return self._send(401, {"error": "Unauthorized"})
        handler = {
            "/generate": self._generate,
            "/get_server_info": self._server_info,
            "/server_info": self._server_info,
            "/model_info": lambda _: self._send(200, {"model_path": "mock/Qwen3-MoE", "weight_version": mock.weight_version}),
            "/get_weight_version": (lambda _: self._send(200, {"weight_version": mock.weight_version}))
            if release(b.version) < GET_WEIGHT_VERSION_404_SINCE else None,
            "/health": lambda _: self._send(200, ""),
            "/flush_cache": self._flush_cache,
            "/update_weights_from_disk": self._update_from_disk,
            "/init_weights_update_group": self._init_group,
            "/destroy_weights_update_group": self._destroy_group,
            "/update_weights_from_distributed": self._update_from_distributed,
            "/update_weights_from_tensor": self._update_from_tensor,
            "/begin_weight_update": self._begin_session,
            "/end_weight_update": self._end_session,
            "/pause_generation": self._pause,
            # Test-only controls of a mock in another process (never SGLang endpoints).
            "/_test/restart": self._test_restart,
            "/_test/dump_weights": self._test_dump,
            "/continue_generation": self._continue,
        }.get(path)
        if handler is None or (path in SESSION_PATHS and not mock.has_sessions):
            return self._send(404, {"detail": "Not Found"})
        missing = [f for f in REQUIRED.get(path, ()) if not isinstance(body, dict) or f not in body]
        if missing:  # SGLang 0.5.23's validation answer (msgspec-style), HTTP 400
            lines = "".join(f"\n  {{'type': 'missing', 'loc': ('body', {f!r}), 'msg': 'Field required'}}" for f in missing)
            return self._send(400, {"object": "error", "message": f"{len(missing)} validation errors:{lines}"})
        if path == "/pause_generation" and (body or {}).get("mode", "abort") not in PAUSE_MODES:
            return self._send(400, {"object": "error", "message": "1 validation errors:\n  {'type': 'literal_error', "
                                    "'loc': ('body', 'mode'), 'msg': \"Input should be 'abort', 'retract' or "
                                    "'in_place'\"}"})
        if path == "/generate" and not any(k in (body or {}) for k in ("text", "input_ids", "input_embeds")):
            return self._send(400, {"error": {"message": "Either text, input_ids or input_embeds should be provided."}})
        handler(body)

    def _generate(self, request: dict) -> None:
        mock, b = self.server.mock, self.server.mock.behaviour
        with mock.lock:
            mock.generate_count += 1
            count = mock.generate_count
            mock.meter.enter()
            mock.running_here += 1
            self._metered = True
            prompt = tuple(request["input_ids"])
            slow = prompt in b.slow_prompts
            if slow:
                mock.slow_seen[prompt] = mock.slow_seen.get(prompt, 0) + 1
                slow = b.slow_times is None or mock.slow_seen[prompt] <= b.slow_times
        try:
            sp = request.get("sampling_params", {})
            unknown = set(sp) - SAMPLING_FIELDS
            if unknown:
                message = f"__init__() got an unexpected keyword argument {sorted(unknown)[0]!r}"
                return self._send(400, {"error": {"message": message}})
            for key in INT_SAMPLING_FIELDS & set(sp):
                if isinstance(sp[key], float):  # 0.5.23's answer is a bare string here
                    return self._send(400, {"error": f"invalid type: floating point `{sp[key]!r}`, expected i64"})
                if not isinstance(sp[key], int) or isinstance(sp[key], bool):
                    message = f"sampling_params.{key}: Expected `int`, got `{type(sp[key]).__name__}`"
                    return self._send(400, {"error": {"message": message}})
            if mock.die_after is not None and count == mock.die_after:
                mock.die_after = None
                threading.Thread(target=mock.restart, args=(mock.down_s,), daemon=True).start()
                return self._drop()
            delay = b.slow_delay_s if slow else b.delay_s
            if delay and mock.stopping.wait(delay):
                return self._drop()
            if count <= b.fail_5xx:
                echo = {k: v for k, v in self.headers.items()}
                return self._send(500, {"error": {"message": f"internal error, headers {echo}"}})
            if prompt in b.reject_prompts:
                return self._send(
                    400,
                    {"error": {"message": "The input is longer than the model's context length"}},
                )
            version = mock.weight_version
            if prompt in b.wrong_version_prompts:
                version = f"{version}-other"
            answer = fake_generate(request, b, version, b.mixed_version_prompts.get(prompt))
            with mock.lock:
                mock.served_versions.append(answer["meta_info"]["weight_version"])
                if "weight_versions" in answer["meta_info"]:
                    mock.served_spans.append(answer["meta_info"]["weight_versions"])
            if b.delay_per_token_s:
                if not self._decode(answer, version):
                    return self._drop()
            self._send(200, answer)
        finally:
            self._leave_meter()  # dropped connections and errors too

    def _decode(self, answer: dict, version: str) -> bool:
        """Spend ``delay_per_token_s`` per output token, token by token: paused (in_place or
        retract) decoding waits; a version change between tokens is recorded as SGLang does (the
        tokens generated so far are the old version's); a retract counts once per pause. An abort
        pause ends the request. False: the server is stopping."""
        mock, b = self.server.mock, self.server.mock.behaviour
        meta = answer["meta_info"]
        n = len(answer.get("output_ids", []))
        epoch, changes, current, retracts = mock.abort_epoch, [], version, mock.retract_pauses
        key = "num_retractions" if "num_retractions" in meta else "total_retractions"
        for i in range(n):
            while mock.paused in ("in_place", "retract"):
                if mock.stopping.wait(0.005):
                    return False
            # Every retract pause while this request runs retracts it, whether or not this loop
            # was between tokens at the time (a pause, update and continue can all fall inside one
            # token's delay).
            meta[key] = meta.get(key, 0) + mock.retract_pauses - retracts
            retracts = mock.retract_pauses
            if mock.weight_version != current:
                changes.append((current, i))
                current = mock.weight_version
            if mock.abort_epoch != epoch:  # /pause_generation mode "abort" while it ran
                meta["finish_reason"] = dict(ABORTED_BY_PAUSE)
                return True
            if mock.stopping.wait(b.delay_per_token_s):
                return False
        meta[key] = meta.get(key, 0) + mock.retract_pauses - retracts  # one during the last token
        if mock.weight_version != current and n == 0:
            current = mock.weight_version
        if changes or current != version:
            meta["weight_version"] = current
            if "weight_versions" in meta and meta["finish_reason"].get("type") != "abort":
                served = meta["weight_versions"]
                meta["weight_versions"] = weight_version_spans(changes + [(current, n)], n)
                with mock.lock:
                    at = next(i for i, spans in enumerate(mock.served_spans) if spans is served)
                    mock.served_spans[at] = meta["weight_versions"]
        return True

    def _server_info(self, _) -> None:
        b = self.server.mock.behaviour
        self._send(
            200,
            {
                "model_path": "mock/Qwen3-MoE",
                "tp_size": b.tp_size,
                "dp_size": b.dp_size,
                "pp_size": b.pp_size,
                "speculative_algorithm": b.speculative_algorithm,
                "enable_deterministic_inference": b.deterministic,
                "enable_return_routed_experts": b.routed_experts,
                "custom_weight_loader": list(b.custom_weight_loaders),
                "quantization": None,
                "disable_radix_cache": b.disable_radix_cache,
                "version": b.version,
            },
        )

    def _flush_cache(self, _) -> None:
        mock = self.server.mock
        if mock.running_here > 0:  # SGLang flushes only an idle server
            return self._send(400, "Cache not flushed: there are running or waiting requests.\n",
                              content_type="text/plain")
        mock.flushes += 1
        self._send(200, "Cache flushed.\nPlease check backend logs for more details.", content_type="text/plain")

    def _answer_weights(self, ok: bool, message: str, body: dict, **extra) -> None:
        mock = self.server.mock
        if ok and body.get("weight_version") is not None:
            mock.weight_version = str(body["weight_version"])  # as the tokenizer manager does
        self._send(200 if ok else 400, {"success": ok, "message": message, **extra})

    def _pause(self, body) -> None:
        mock = self.server.mock
        mock.paused = (body or {}).get("mode", "abort")
        mock.pause_epoch += 1
        mock.retract_pauses += mock.paused == "retract"
        if mock.paused == "abort":
            mock.abort_epoch += 1  # running requests answer 200 with finish_reason abort
        self._send(200, {"message": "Generation paused successfully.", "status": "ok"})

    def _continue(self, _) -> None:
        self.server.mock.paused = None
        self._send(200, {"message": "Generation continued successfully.", "status": "ok"})

    def _update_from_disk(self, body: dict) -> None:
        mock, b = self.server.mock, self.server.mock.behaviour
        ok = b.weight_update_ok and os.path.isdir(body["model_path"])
        config = os.path.join(body["model_path"], "config.json")
        if os.path.exists(config):  # when the directory was finished (tests: written before a pause?)
            self._record["config_mtime"] = os.path.getmtime(config)
        message = "Succeeded to update model weights." if ok else "Failed to load weights"
        if ok and body.get("flush_cache", True) and mock.paused == "in_place" and mock.running_here > 0:
            # 0.5.22+ (weight_updater.py flush_cache_after_weight_update): a paused server loads
            # at once, then cannot flush the requests held in place; the version does not move.
            ok, message = False, ("Weights were updated, but the cache was not flushed because requests are still "
                                  "running or queued. Retract or finish them, then call /flush_cache.")
        self._answer_weights(ok, message, body, num_paused_requests=0)  # 0.5.23 reports it here

    def _init_group(self, body: dict) -> None:
        mock = self.server.mock
        if not mock.behaviour.weight_update_ok:
            return self._answer_weights(False, "failed", body)
        if mock.receiver is None:  # no rendezvous: only the names, as SGLang (torch) checks them
            name = body.get("group_name", "weight_update_group")
            with mock.lock:
                taken = name in mock.groups
                mock.groups.add(name)
            if taken:
                return self._answer_weights(False, f"Failed to initialize custom process group: {NAME_TAKEN}.", {})
            return self._answer_weights(True, "Succeeded to initialize custom process group.", {})
        with mock.scheduler_lock:
            ok, message = mock.receiver.init_group(body)
        self._answer_weights(ok, message, {})

    def _destroy_group(self, body: dict) -> None:
        mock = self.server.mock
        name = body.get("group_name", "weight_update_group")
        if mock.receiver is None:
            with mock.lock:
                known = name in mock.groups
                mock.groups.discard(name)
            if not known:
                return self._answer_weights(False, "The group to be destroyed does not exist.", {})
            return self._answer_weights(True, "Succeeded to destroy custom process group.", {})
        with mock.scheduler_lock:  # never while an update of this server is inside a broadcast
            ok, message = mock.receiver.destroy_group(name)
        self._answer_weights(ok, message, {})

    # The weight-update session (0.5.21+).
    def _begin_session(self, _) -> None:
        mock = self.server.mock
        with mock.scheduler_lock:
            if mock.session_open:
                return self._send(400, {"success": False, "message": "a weight-update session is already open; "
                                                                      "call end_weight_update() first"})
            mock.session_open = True
        self._send(200, {"success": True, "message": "Success"})

    def _end_session(self, _) -> None:
        mock = self.server.mock
        with mock.scheduler_lock:
            if not mock.session_open:
                return self._send(400, {"success": False, "message": "no weight-update session is open; call "
                                                                     "begin_weight_update() first"})
            mock.session_open = False
        self._send(200, {"success": True, "message": "Success"})

    def _outside_session(self, endpoint: str) -> bool:
        """Refused as SGLang >= 0.5.21 refuses an update outside a session (answers it)."""
        mock = self.server.mock
        if mock.has_sessions and not mock.session_open:
            self._send(400, {"success": False, "message": f"{endpoint} must run between begin_weight_update() "
                                                          f"and end_weight_update()"})
            return True
        return False

    def _update_from_tensor(self, body: dict) -> None:
        # The gate, and a registered custom loader called as SGLang calls it (weight_updater.py:374);
        # any other tensor payload is not loaded.
        if self._outside_session("update_weights_from_tensor"):
            return
        load_format = body.get("load_format")
        if load_format is not None and load_format not in ("direct", "flattened_bucket"):
            if load_format not in self.server.mock.behaviour.custom_weight_loaders:
                # SGLang raises NotImplementedError in the scheduler: the server dies, no answer.
                return self._send(500, {"success": False, "message": f"Unknown load_format={load_format}"})
            import base64
            import importlib
            import pickle

            import torch.multiprocessing  # noqa: F401 - torch's reductions, as ForkingPickler wrote them

            named = pickle.loads(base64.b64decode(body["serialized_named_tensors"][0]))
            module, fn = load_format.rsplit(".", 1)
            getattr(importlib.import_module(module), fn)(None, named)
        self._answer_weights(self.server.mock.behaviour.weight_update_ok, "Success", body)

    def _test_restart(self, _) -> None:
        self._send(200, {"restarting": True})
        threading.Thread(target=self.server.mock.restart, daemon=True).start()

    def _test_dump(self, body: dict) -> None:
        mock = self.server.mock
        received = {} if mock.receiver is None else {k: v.clone() for k, v in mock.receiver.weights.items()}
        with mock.lock:  # the weight endpoints' requests so far (this one excluded), with their statuses
            requests = [(r["path"], r["status"]) for r in mock.requests
                        if not r["path"].startswith(("/_test", "/generate"))]
        torch.save({"weights": received, "version": mock.weight_version,
                    "broadcasts": 0 if mock.receiver is None else mock.receiver.broadcasts,
                    "request_dtypes": [] if mock.receiver is None else mock.receiver.request_dtypes,
                    "requests": requests, "session_open": mock.session_open,
                    "groups": sorted(mock.groups if mock.receiver is None else mock.receiver.groups)}, body["path"])
        self._send(200, {"saved": len(received)})

    def _update_from_distributed(self, body: dict) -> None:
        mock = self.server.mock
        with mock.scheduler_lock:
            if self._outside_session("update_weights_from_distributed"):
                return
            with mock.lock:
                mock.distributed_updates += 1
                refused = mock.distributed_updates == mock.behaviour.refuse_update_at
            if not mock.behaviour.weight_update_ok or refused:
                if refused and mock.stopping.wait(mock.behaviour.refusal_delay_s):
                    return self._drop()
                return self._answer_weights(False, "Failed to receive weights: refused by the test", body)
            ok, message = True, "Succeeded to update parameter online."
            group = body.get("group_name", "weight_update_group")
            if mock.receiver is not None:
                ok, message = mock.receiver.receive(body)
            elif group not in mock.groups:  # 0.5.23 model_runner_components/weight_updater.py
                ok, message = False, (f"Failed to receive weights: Group {group} not in {sorted(mock.groups)}. "
                                      f"Please call `init_weights_update_group` first.")
        if ok and body.get("flush_cache", True):
            mock.flushes += 1
        if ok and body.get("weight_version") is not None:  # the tokenizer manager's addition
            message += f" Weight version updated to {body['weight_version']}."
        self._answer_weights(ok, message, body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # uvicorn listens with a backlog of 2048; socketserver's default of 5 resets connections
    # when a 16-request rollout connects at once (a mock-only failure).
    request_queue_size = 2048
    mock: "MockSGLang"


class ConcurrencyMeter:
    """Requests in flight, possibly shared by several mock servers (guarded by their locks)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now = 0
        self.peak = 0

    def enter(self) -> None:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        with self._lock:
            self.now -= 1


class MockSGLang:
    def __init__(self, behaviour: Behaviour | None = None, meter: ConcurrencyMeter | None = None):
        self.behaviour = behaviour or Behaviour()
        self.meter = meter or ConcurrencyMeter()
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.generate_count = 0
        self.slow_seen: dict = {}
        self.die_after: int | None = None
        self.down_s = 0.0
        self.restarted = threading.Event()
        self.stopping = threading.Event()
        self.abort_epoch = 0  # bumped by /pause_generation {"mode": "abort"}
        self.pause_epoch = 0  # bumped by every /pause_generation
        self.retract_pauses = 0  # bumped by every /pause_generation mode "retract"
        self.port = 0
        self.weight_version = "default"  # a fresh server's version
        self.running_here = 0
        self.served_versions: list[str] = []  # weight_version of every /generate answer
        self.served_spans: list[list[dict]] = []  # their weight_versions spans (0.5.19+)
        self.paused: str | None = None  # the mode of the last /pause_generation until /continue_generation
        self.flushes = 0
        self.update_lock = threading.Lock()
        self.connections: set = set()  # open client connections, closed by stop() as by a dying server
        # SGLang's scheduler runs the weight operations (init, destroy, updates, begin, end) one
        # at a time in its event loop: a destroy waits for an update stuck in a broadcast.
        self.scheduler_lock = threading.Lock()
        self.session_open = False  # a weight-update session (0.5.21+)
        self.groups: set[str] = set()  # weight-update group names, without a receiver
        self.distributed_updates = 0
        self.receiver = None
        if self.behaviour.receiver:
            from tests.dist.sglang_receiver import Receiver

            self.receiver = Receiver(keep=self.behaviour.keep_weights)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.start()

    @property
    def has_sessions(self) -> bool:
        version = parse_version(self.behaviour.version)
        return version is not None and version >= SESSION_SINCE

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.stopping.clear()
        self._server = _Server(("127.0.0.1", self.port), _Handler)
        self._server.mock = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is None:
            return
        self.stopping.set()  # wakes delayed handlers, which drop their connections
        self._server.shutdown()
        self._server.server_close()
        with self.lock:  # a stopped server's keep-alive connections die with it
            for conn in self.connections:
                try:
                    conn.shutdown(2)
                except OSError:
                    pass
            self.connections.clear()
        self._thread.join(timeout=5)
        self._server = None

    def die_at(self, request_number: int, down_s: float) -> None:
        """The ``request_number``-th /generate drops its connection and the server goes away
        for ``down_s`` seconds (connections refused), then serves again on the same port."""
        self.die_after, self.down_s = request_number, down_s

    def restart(self, down_s: float = 0.0) -> None:
        """A restarted server: launch weights again (version "default"), no weight-update group."""
        self.stop()
        self.weight_version = "default"
        self.session_open = False
        self.groups.clear()
        if self.receiver is not None:
            self.receiver.destroy_all()
            self.receiver.weights.clear()
        time.sleep(down_s)
        self.start()
        self.restarted.set()

    def paths(self) -> list[str]:
        with self.lock:
            return [r["path"] for r in self.requests]

    def records(self, path: str) -> list[dict]:
        """The requests to ``path``, whole (body, wall-clock ``wall``, what a handler noted)."""
        with self.lock:
            return [dict(r) for r in self.requests if r["path"] == path]

    def bodies(self, path: str) -> list[dict]:
        with self.lock:
            return [r["body"] for r in self.requests if r["path"] == path]

    def __enter__(self) -> "MockSGLang":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
