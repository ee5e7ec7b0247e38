"""The ``sglang`` rollout engine: an HTTP client for one or more SGLang servers.

SGLang (>= 0.5.7 for routes) runs as separate server processes, usually on their own GPUs or
nodes; see docs/sglang.md for how to launch them. This module speaks SGLang's native HTTP API
(shared/FIELD-NOTES.md section 2) with the standard library only: ``http.client`` plus a thread
pool. It never imports ``sglang``.

Design choices:
- One ``/generate`` request per prompt, spread round-robin over the servers, at most
  ``concurrency`` in flight in total. Per-request requests make retries and partial results
  simple; SGLang batches concurrent requests itself (continuous batching).
- Failures are per request. Timeouts, refused or dropped connections, HTTP 5xx/408/429 and
  unreadable bodies are retried with exponential backoff, each retry on the next server. A
  request that still fails becomes ``finish_reason="abort"`` with an empty response and
  ``meta["error"]``; the other results are kept. An abort reported by the server (and an HTTP
  4xx such as 400, SGLang's answer to an invalid request like a prompt longer than the context)
  is passed through without retry. A wrong URL or API key (401/403/404), and a server that
  returns no ``routed_experts`` while routes are asked for, are configuration errors:
  ``RuntimeError`` for the whole call, never silent live routing.
- Response tokens come from ``meta_info["output_token_logprobs"]`` (one entry per generated
  token, the matched stop token included, as ``completion_tokens`` and the route rows count
  them); ``output_ids`` is the fallback when log-probs are absent.
- ``logprob_start_len = -1``: log-probs of generated tokens only. A start inside the prompt
  would make SGLang recompute the prompt from that position instead of reusing its radix cache.
- The API key is read from ``config.api_key_env`` at request time and sent as
  ``Authorization: Bearer ...``; it is never stored on the engine or the config and is masked in
  every error message this module writes.
- Weight sync, disk: the injected ``weight_writer(model_chunks, dir)`` writes HF safetensors
  into ``weight_dir/step_{step}`` (a filesystem the servers can read), then every server gets
  ``/update_weights_from_disk`` and ``/flush_cache``. Distributed: ``/init_weights_update_group``
  once, then per batch ``/update_weights_from_distributed``, with the NCCL broadcast done by an
  injected :class:`WeightBroadcaster` while the servers' requests are open (each side blocks on
  the collective). Flushing the cache matters for R3: cached prefix rows keep the routes of the
  forward that filled them, i.e. of the old weights.
- Ranks: only ONE process (rank 0 of the trainer) may call :meth:`SGLangEngine.generate`,
  :meth:`SGLangEngine.load_weights` or the distributed sync. A weight writer that gathers
  shards collectively can run on every rank through :meth:`SGLangEngine.write_weights`, after
  which rank 0 calls :meth:`SGLangEngine.load_weights`; :meth:`update_weights` does both and
  is for a writer that runs on rank 0 alone.

Usage::

    engine = SGLangEngine(SGLangConfig(urls=["http://10.0.0.5:30000"], weight_dir="/shared/w"),
                          route_spec=spec, weight_writer=write_hf_safetensors)
    results = engine.generate(prompts, SamplingParams(max_new_tokens=512), return_routes=True)
    engine.update_weights(model_chunks, step)
    engine.close()

Tests: ``pytest tests/test_sglang_client.py`` (a local mock server, tests/sglang_mock.py).
"""

from __future__ import annotations

import http.client
import itertools
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import torch

from sapo_megatron.rollout.base import RolloutResult, RouteSpec, SamplingParams
from sapo_megatron.routing import decode_routed_experts, storage_dtype

logger = logging.getLogger(__name__)

_MAX_BACKOFF_S = 60.0
_ERROR_BODY_CHARS = 300  # enough for SGLang's error messages, bounded for logs
_FATAL_STATUS = {401: "wrong or missing API key", 403: "API key refused", 404: "not an SGLang URL"}


@dataclass
class DistributedSync:
    """NCCL weight sync (``/init_weights_update_group`` + ``/update_weights_from_distributed``).

    The group has ``world_size`` ranks: the trainer's rank 0 is rank 0 of the group, server
    ``i`` joins at ``rank_offsets[i]`` with its tensor-parallel ranks after it. Without
    ``rank_offsets`` the ``world_size - 1`` server ranks are split evenly over the servers.
    ``master_address`` must be reachable from the servers (not 127.0.0.1 across nodes).
    """

    master_address: str
    master_port: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: str = "nccl"
    rank_offsets: list[int] | None = None

    def offsets(self, num_servers: int) -> list[int]:
        if self.rank_offsets is not None:
            if len(self.rank_offsets) != num_servers:
                raise ValueError(
                    f"distributed.rank_offsets has {len(self.rank_offsets)} entries, expected one "
                    f"per server ({num_servers})"
                )
            return list(self.rank_offsets)
        per_server, rest = divmod(self.world_size - 1, num_servers)
        if per_server < 1 or rest:
            raise ValueError(
                f"distributed.world_size {self.world_size} - 1 (the trainer) does not split evenly "
                f"over {num_servers} servers; set distributed.rank_offsets"
            )
        return [1 + i * per_server for i in range(num_servers)]


@dataclass
class SGLangConfig:
    urls: list[str]
    api_key_env: str = "SGLANG_API_KEY"  # the NAME of the variable; the key itself is never held
    concurrency: int = 64  # requests in flight over all servers
    timeout_s: float = 600  # per socket operation of a /generate request
    retries: int = 3  # extra attempts per request, each on the next server
    backoff_s: float = 1.0  # first retry delay, doubled per retry (capped at 60 s)
    require_routes: bool = False  # probe /get_server_info at start, fail fast without routes
    weight_dir: str | None = None  # shared with the servers; step_{step} subdirs are written
    keep_weight_dirs: int = 1  # step dirs kept on disk (0: keep all)
    weight_timeout_s: float = 1800  # loading a large checkpoint takes minutes
    distributed: DistributedSync | None = None  # set: NCCL sync instead of disk

    def __post_init__(self) -> None:
        if isinstance(self.urls, str):
            self.urls = [self.urls]
        if not self.urls:
            raise ValueError(
                "sglang.urls is empty: give at least one server, e.g. http://host:30000"
            )
        for url in self.urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"sglang.urls entry {url!r} is not an http(s)://host:port URL")
        self.urls = [url.rstrip("/") for url in self.urls]
        if self.concurrency < 1:
            raise ValueError(f"sglang.concurrency must be >= 1, got {self.concurrency}")
        if self.retries < 0 or self.backoff_s < 0 or self.timeout_s <= 0:
            raise ValueError(
                f"sglang retries/backoff_s must be >= 0 and timeout_s > 0, got {self.retries}, "
                f"{self.backoff_s}, {self.timeout_s}"
            )
        if isinstance(self.distributed, dict):
            self.distributed = DistributedSync(**self.distributed)


class WeightBroadcaster(Protocol):
    """The trainer's side of the NCCL weight sync (rank 0 of the group), injected."""

    def init_group(self, sync: DistributedSync) -> None:
        """Join the group as rank 0 (runs while the servers' init requests are open)."""

    def batches(self, model_chunks) -> Iterable[list[tuple[str, torch.Tensor]]]:
        """The live weights under their HF names, in batches of a bounded size."""

    def broadcast(self, batch: list[tuple[str, torch.Tensor]], sync: DistributedSync) -> None:
        """Broadcast one batch from rank 0 (runs while the servers' update requests are open)."""


def _json_or_none(raw: bytes):
    try:
        return json.loads(raw)
    except ValueError:
        return None


class ServerConfigError(RuntimeError):
    """A server answered 401/403/404: a wrong URL or API key, fatal for the whole call."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Retryable(Exception):
    """A transient failure of one attempt: try again (on the next server)."""


class _Rejected(Exception):
    """The server refused this request (HTTP 4xx): pass it through as an abort, no retry."""


class SGLangEngine:
    """:class:`~sapo_megatron.rollout.base.RolloutEngine` over SGLang's HTTP API."""

    def __init__(
        self,
        config: SGLangConfig,
        *,
        route_spec: RouteSpec | None = None,
        weight_writer: Callable[[Any, str], None] | None = None,
        weight_broadcaster: WeightBroadcaster | None = None,
    ) -> None:
        self.config = config
        self.route_spec = route_spec
        self.weight_writer = weight_writer
        self.weight_broadcaster = weight_broadcaster
        self._pool = ThreadPoolExecutor(config.concurrency, thread_name_prefix="sglang")
        self._next_server = itertools.count()
        self._rr_lock = threading.Lock()
        self._group_ready = False
        self._written_dirs: list[str] = []
        self._closed = False
        if config.require_routes:
            self.check_servers(require_routes=True)

    def __repr__(self) -> str:
        return f"SGLangEngine(urls={self.config.urls}, concurrency={self.config.concurrency})"

    # ------------------------------------------------------------------ HTTP

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.config.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _mask(self, text: str) -> str:
        key = os.environ.get(self.config.api_key_env)
        return text.replace(key, "***") if key else text

    def _request(
        self, url: str, path: str, payload: dict | None, *, timeout: float, method: str = "POST"
    ) -> tuple[int, bytes]:
        """One HTTP exchange; transport failures become :class:`_Retryable`."""
        parts = urlsplit(url)
        https = parts.scheme == "https"
        connection = http.client.HTTPSConnection if https else http.client.HTTPConnection
        conn = connection(parts.hostname, parts.port, timeout=timeout)
        body = None if payload is None else json.dumps(payload).encode()
        try:
            conn.request(method, parts.path + path, body=body, headers=self._headers())
            response = conn.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException) as err:  # timeouts, refused, dropped
            kind = "timed out" if isinstance(err, (TimeoutError, socket.timeout)) else "failed"
            raise _Retryable(f"{method} {url}{path} {kind}: {type(err).__name__}: {err}") from None
        finally:
            conn.close()

    def _call_json(
        self, url: str, path: str, payload: dict | None, *, timeout: float, method: str = "POST"
    ) -> dict:
        """One exchange expecting JSON; classifies HTTP errors."""
        status, raw = self._request(url, path, payload, timeout=timeout, method=method)
        text = raw[:_ERROR_BODY_CHARS].decode("utf-8", "replace")
        if status in _FATAL_STATUS:
            hint = f" (API key from ${self.config.api_key_env})" if status in (401, 403) else ""
            raise ServerConfigError(
                status,
                self._mask(
                    f"SGLang server {url} answered {path} with HTTP {status}: "
                    f"{_FATAL_STATUS[status]}{hint}: {text}"
                ),
            )
        if 400 <= status < 500 and status not in (408, 429):
            answer = _json_or_none(raw)
            if isinstance(answer, dict) and "success" in answer:
                return answer  # weight endpoints answer failures as {"success": false, "message"}
            message = f"{url}{path} rejected the request (HTTP {status}): {text}"
            raise _Rejected(self._mask(message))
        if status >= 400:
            raise _Retryable(self._mask(f"{url}{path} answered HTTP {status}: {text}"))
        answer = _json_or_none(raw)
        if answer is None:
            raise _Retryable(self._mask(f"{url}{path} returned a body that is not JSON: {text}"))
        return answer

    def _backoff(self, attempt: int) -> None:
        time.sleep(min(self.config.backoff_s * 2**attempt, _MAX_BACKOFF_S))

    def _with_retries(self, fn: Callable[[str], Any], urls: list[str], what: str):
        """``fn(url)`` with retries: attempt ``k`` goes to ``urls[k % len(urls)]``."""
        errors = []
        for attempt in range(self.config.retries + 1):
            if attempt:
                self._backoff(attempt - 1)
            url = urls[attempt % len(urls)]
            try:
                return fn(url), attempt + 1, url
            except _Retryable as err:
                errors.append(str(err))
                logger.warning(
                    "%s, attempt %d/%d: %s", what, attempt + 1, self.config.retries + 1, err
                )
        raise _Retryable(f"{what} failed after {len(errors)} attempts; last error: {errors[-1]}")

    # ------------------------------------------------------------------ server checks

    def server_info(self, url: str) -> dict:
        """The server's arguments and state (``/get_server_info``, ``/server_info`` in newer
        releases); ``{}`` when the server exposes neither."""
        for path in ("/get_server_info", "/server_info"):

            def call(u: str, path=path) -> dict:
                return self._call_json(u, path, None, timeout=self.config.timeout_s, method="GET")

            try:
                info, _, _ = self._with_retries(call, [url], f"{path} of {url}")
            except ServerConfigError as err:
                if err.status != 404:
                    raise
                continue
            return info if isinstance(info, dict) else {}
        return {}

    def check_servers(self, *, require_routes: bool) -> None:
        """Fail fast on a server that is down or, with ``require_routes``, that does not return
        routes. A server whose info lacks the flag (older or customised SGLang) passes; the
        per-response check in :meth:`generate` still catches it."""
        for url in self.config.urls:
            try:
                info = self.server_info(url)
            except (_Retryable, _Rejected) as err:
                message = f"SGLang server {url} is not reachable: {err}"
                raise RuntimeError(self._mask(message)) from None
            if require_routes and info.get("enable_return_routed_experts") is False:
                raise RuntimeError(
                    f"SGLang server {url} runs without routed experts (server_args "
                    f"enable_return_routed_experts=False), but routing replay (R3) needs them: "
                    f"restart it with --enable-return-routed-experts"
                )

    # ------------------------------------------------------------------ generate

    def _payload(
        self, prompt: list[int], params: SamplingParams, index: int, return_routes: bool
    ) -> dict:
        sampling = {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_new_tokens": params.max_new_tokens,
            "stop_token_ids": list(params.stop_token_ids),
        }
        if params.seed is not None:
            # Distinct per prompt: the same prompt is usually repeated n times in a group.
            sampling["sampling_seed"] = params.seed + index
        payload = {
            "input_ids": list(prompt),
            "sampling_params": sampling,
            "return_logprob": True,
            "logprob_start_len": -1,
        }
        if return_routes:  # omitted otherwise: servers older than 0.5.7 reject the field
            payload["return_routed_experts"] = True
        return payload

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, *, return_routes: bool
    ) -> list[RolloutResult]:
        """One result per prompt, in order; see the module docstring for failure handling."""
        if self._closed:
            raise RuntimeError("SGLangEngine.generate called after close()")
        if return_routes and self.route_spec is None:
            raise ValueError("return_routes=True needs SGLangEngine(route_spec=RouteSpec(...))")
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty; SGLang needs at least one input token")
        futures = [
            self._pool.submit(self._generate_one, prompt, params, i, return_routes)
            for i, prompt in enumerate(prompts)
        ]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f.done() and f.exception() is not None), None)
        if failed is not None:
            for f in pending:
                f.cancel()
            raise failed.exception()
        return [f.result() for f in futures]

    def _servers_from(self) -> list[str]:
        with self._rr_lock:
            start = next(self._next_server)
        urls = self.config.urls
        return [urls[(start + k) % len(urls)] for k in range(len(urls))]

    def _generate_one(
        self, prompt: list[int], params: SamplingParams, index: int, return_routes: bool
    ) -> RolloutResult:
        payload = self._payload(prompt, params, index, return_routes)

        def call(url: str) -> dict:
            return self._call_json(url, "/generate", payload, timeout=self.config.timeout_s)

        try:
            response, attempts, url = self._with_retries(
                call, self._servers_from(), f"/generate of sample {index}"
            )
        except (_Retryable, _Rejected) as err:
            return RolloutResult(list(prompt), [], [], "abort", meta={"error": str(err)})
        try:
            result = self._parse(response, prompt, index, url, return_routes)
        except ValueError as err:
            raise ValueError(f"{err} (response from SGLang server {url})") from None
        result.meta.update(server=url, attempts=attempts)
        return result

    def _parse(
        self, response: dict, prompt: list[int], index: int, url: str, return_routes: bool
    ) -> RolloutResult:
        if not isinstance(response, dict):
            raise ValueError(
                f"sample {index}: /generate returned {type(response).__name__}, "
                f"expected a JSON object"
            )
        meta_info = response.get("meta_info") or {}
        finish = meta_info.get("finish_reason") or {}
        finish_type = finish.get("type") if isinstance(finish, dict) else finish
        if finish_type not in ("stop", "length", "abort"):
            raise ValueError(f"sample {index}: unknown finish_reason {finish!r}")
        entries = meta_info.get("output_token_logprobs")
        if entries is not None:
            response_ids = [int(e[1]) for e in entries]
            log_probs = [float(e[0]) for e in entries]
        elif finish_type == "abort":
            response_ids, log_probs = list(response.get("output_ids") or []), []
        else:
            raise ValueError(
                f"sample {index}: meta_info has no output_token_logprobs although the request set "
                f"return_logprob"
            )
        completion = meta_info.get("completion_tokens", len(response_ids))
        if completion != len(response_ids):
            raise ValueError(
                f"sample {index}: output_token_logprobs has {len(response_ids)} entries, "
                f"completion_tokens is {completion}"
            )
        meta = {"finish": finish, "prompt_tokens": meta_info.get("prompt_tokens")}
        if finish_type == "abort" and isinstance(finish, dict) and finish.get("message"):
            meta["error"] = f"aborted by the server: {finish['message']}"
        routes = None
        if return_routes:
            if meta_info.get("routed_experts") is None:
                if finish_type != "abort":  # an aborted request may end before any forward
                    raise RuntimeError(
                        f"SGLang server {url} returned no routed_experts for sample {index} "
                        f"although the request set return_routed_experts: start the server with "
                        f"--enable-return-routed-experts (routing replay must not fall back to "
                        f"live routing silently)"
                    )
            elif finish_type == "abort":
                try:  # rows of a request cut short need not match its partial output
                    routes = self._decode_routes(meta_info, prompt, response_ids, index)
                except ValueError:
                    routes = None
            else:
                routes = self._decode_routes(meta_info, prompt, response_ids, index)
        return RolloutResult(list(prompt), response_ids, log_probs, finish_type, routes, meta)

    def _decode_routes(
        self, meta_info: dict, prompt: list[int], response_ids: list[int], index: int
    ) -> torch.Tensor:
        spec = self.route_spec
        return decode_routed_experts(
            meta_info,
            num_layers=spec.num_hidden_layers,
            topk=spec.topk,
            prompt_len=len(prompt),
            response_len=len(response_ids),
            num_experts=spec.num_experts,
            moe_layers=spec.moe_layers,
            out_dtype=storage_dtype(spec.num_experts),
            sample_id=index,
        )

    # ------------------------------------------------------------------ weights

    def update_weights(self, model_chunks, step: int) -> None:
        """Serve the trainer's current weights (rank 0 only; see the module docstring)."""
        if self.config.distributed is not None:
            self.broadcast_weights(model_chunks, step)
        else:
            self.load_weights(self.write_weights(model_chunks, step), step)

    def write_weights(self, model_chunks, step: int) -> str:
        """Write HF safetensors of the live model to ``weight_dir/step_{step}``; returns it."""
        if self.weight_writer is None or self.config.weight_dir is None:
            raise ValueError(
                "disk weight sync needs SGLangEngine(weight_writer=...) and sglang.weight_dir "
                "(a directory the SGLang servers can read)"
            )
        path = os.path.join(os.path.abspath(self.config.weight_dir), f"step_{step}")
        if os.path.isdir(path):  # left by a crashed run: never load a half-written dir
            shutil.rmtree(path)
        os.makedirs(path)
        self.weight_writer(model_chunks, path)
        if path not in self._written_dirs:
            self._written_dirs.append(path)
        return path

    def load_weights(self, path: str, step: int) -> None:
        """Make every server load ``path`` and flush its cache; then delete the oldest step
        dirs that :meth:`write_weights` made (never other directories, never ``path``)."""
        payload = {"model_path": path, "flush_cache": True}
        self._on_all_servers("/update_weights_from_disk", lambda url: payload, step)
        self._flush_all()
        keep = self.config.keep_weight_dirs
        old = [d for d in self._written_dirs if d != path]
        while keep and old and len(old) + 1 > keep:
            stale = old.pop(0)
            self._written_dirs.remove(stale)
            shutil.rmtree(stale, ignore_errors=True)
        logger.info("SGLang servers serve the weights of step %d from %s", step, path)

    def broadcast_weights(self, model_chunks, step: int) -> None:
        """NCCL sync: init the group once, then one update request per batch."""
        sync = self.config.distributed
        if self.weight_broadcaster is None:
            raise ValueError("distributed weight sync needs SGLangEngine(weight_broadcaster=...)")
        if not self._group_ready:
            offsets = dict(zip(self.config.urls, sync.offsets(len(self.config.urls)), strict=True))
            self._on_all_servers(
                "/init_weights_update_group",
                lambda url: {
                    "master_address": sync.master_address,
                    "master_port": sync.master_port,
                    "rank_offset": offsets[url],
                    "world_size": sync.world_size,
                    "group_name": sync.group_name,
                    "backend": sync.backend,
                },
                step,
                while_open=lambda: self.weight_broadcaster.init_group(sync),
            )
            self._group_ready = True
        # One batch of look-ahead (two batches in memory) to mark the last one: SGLang then
        # flushes its cache once, not after every batch.
        batches = iter(self.weight_broadcaster.batches(model_chunks))
        batch = next(batches, None)
        while batch is not None:
            following = next(batches, None)
            payload = {
                "names": [name for name, _ in batch],
                "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in batch],
                "shapes": [list(t.shape) for _, t in batch],
                "group_name": sync.group_name,
                "flush_cache": following is None,  # once, after the last batch
            }
            self._on_all_servers(
                "/update_weights_from_distributed",
                lambda url, p=payload: p,
                step,
                while_open=lambda b=batch: self.weight_broadcaster.broadcast(b, sync),
            )
            batch = following
        self._flush_all()
        logger.info("SGLang servers serve the weights of step %d (broadcast)", step)

    def _on_all_servers(
        self,
        path: str,
        payload_of: Callable[[str], dict],
        step: int,
        while_open: Callable[[], None] | None = None,
    ) -> None:
        """POST ``path`` to every server concurrently and require ``success``.

        ``while_open`` runs while the requests are in flight: the NCCL collectives block until
        both the trainer and the servers have entered them. Requests to a collective endpoint
        are not retried (a half-joined group cannot be re-entered).
        """
        collective = while_open is not None

        def post(url: str) -> dict:
            def call(u: str) -> dict:
                return self._call_json(u, path, payload_of(u), timeout=self.config.weight_timeout_s)

            if collective:
                return call(url)
            return self._with_retries(call, [url], f"{path} on {url}")[0]

        futures: dict[str, Future] = {url: self._pool.submit(post, url) for url in self.config.urls}
        if while_open is not None:
            while_open()
        for url, future in futures.items():
            try:
                answer = future.result()
            except (_Retryable, _Rejected) as err:
                raise RuntimeError(
                    self._mask(f"weight update of step {step} failed: {err}")
                ) from None
            if not (isinstance(answer, dict) and answer.get("success")):
                reason = answer.get("message", answer) if isinstance(answer, dict) else answer
                raise RuntimeError(
                    self._mask(f"SGLang server {url} failed {path} for step {step}: {reason}")
                )

    def _flush_all(self) -> None:
        """``/flush_cache`` on every server (its answer is plain text, not JSON). Stale prefix
        cache entries would hand out routes of the old weights, so a failed flush raises."""
        for url in self.config.urls:

            def flush(u: str) -> None:
                status, raw = self._request(u, "/flush_cache", None, timeout=self.config.timeout_s)
                if status != 200:
                    # 400: requests still running; they finish soon, try again after a backoff.
                    raise _Retryable(
                        self._mask(
                            f"/flush_cache on {u} answered HTTP {status}: "
                            f"{raw[:_ERROR_BODY_CHARS].decode('utf-8', 'replace')}"
                        )
                    )

            try:
                self._with_retries(flush, [url], f"/flush_cache on {url}")
            except _Retryable as err:
                raise RuntimeError(str(err)) from None

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
