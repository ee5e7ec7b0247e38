"""``SGLangEngine``: the client of one or more SGLang servers (one process; see replica.py for
the trainer's ranks).

Design choices:
- One ``/generate`` request per prompt, spread round-robin over the servers, at most
  ``concurrency`` in flight in total (SGLang batches concurrent requests itself).
- Failures are per request: retries with backoff, each on the next server; a request that still
  fails becomes ``finish_reason="abort"`` with ``meta["error"]``. A 4xx is passed through as an
  abort, except when EVERY request of the call fails with the same 4xx status: that is a
  systematic error (a schema change, a bad parameter) and raises with the server's message.
- Never stale. The engine knows the version it expects (:meth:`expect`: the policy version last
  pushed, = RL steps completed). A response whose ``meta_info.weight_version`` differs comes
  from a server that restarted or missed an update: it is never returned (the request is retried
  on another server), the server is taken out of rotation and listed in :attr:`stale` until it
  is re-synced (:meth:`mark_synced`). A response's version is its OLDEST token's: from 0.5.19
  every span of ``meta_info.weight_versions`` must be the expected version (a response generated
  across an update is stale). :meth:`stale_servers` also asks every server directly
  (``/model_info``), so a restart between steps is caught before the next rollout.
- Under R3, responses with ``num_retractions > 0`` carry prefix routes from a re-prefill: they
  are counted (``metrics``) and, with ``drop_retracted``, turned into aborts (never trained on).
- Partial rollouts (``rollout.partial``, trainer/partial.py): :meth:`start` returns one future
  per request; with ``accept_spans`` a response may span versions (the trainer judges each
  token's staleness), and with ``flush_on_update`` false weight updates are sent with
  ``flush_cache: false`` (the update lands under requests paused in place).
- For callers that drive generation themselves (async rollouts): :meth:`pause_generation`,
  :meth:`continue_generation`, :meth:`flush_cache`, :meth:`weight_versions`. While paused in
  place, a flush (``flush_cache`` or a weight update with ``flush_cache: true``) is refused
  before it is sent: SGLang cannot flush the requests it holds (protocol.py).
- With ``$admin_api_key_env`` set, each server's version is checked before its first admin
  request (0.5.7 has no admin key).

Only ONE process of the trainer (rank 0) talks to the weight endpoints; see weight_sync/.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections import Counter
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Callable

from sapo_megatron.rollout.base import RolloutResult, RouteSpec, SamplingParams
from sapo_megatron.rollout.sglang.config import SGLangConfig
from sapo_megatron.rollout.sglang.protocol import (
    FLUSHING_UPDATES,
    MissingRoutes,
    ServerInfo,
    asks_flush,
    check_admin_key,
    check_routes_start,
    check_server,
    generate_payload,
    parse_generate,
    weight_version_of,
)
from sapo_megatron.rollout.sglang.transport import (
    ERROR_BODY_CHARS,
    Rejected,
    Retryable,
    ServerConfigError,
    Transport,
)

logger = logging.getLogger(__name__)


class _Stale(Retryable):
    """The server answered with weights other than the expected version."""


class SGLangEngine:
    """:class:`~sapo_megatron.rollout.base.RolloutEngine`-style client over SGLang's HTTP API."""

    def __init__(self, config: SGLangConfig, *, route_spec: RouteSpec | None = None,
                 require_routes: bool = False) -> None:
        if not config.urls:
            raise ValueError("rollout.sglang.urls is empty: give at least one server, e.g. http://host:30000")
        self.config = config
        self.route_spec = route_spec
        self.require_routes = require_routes
        self.transport = Transport(concurrency=config.concurrency, retries=config.retries,
                                   backoff_s=config.backoff_s, api_key_env=config.api_key_env,
                                   admin_api_key_env=config.admin_api_key_env,
                                   keepalive_idle_s=config.keepalive_idle_s)
        self._pool = ThreadPoolExecutor(config.concurrency, thread_name_prefix="sglang")
        self._next_server = itertools.count()
        self._lock = threading.Lock()
        self.expected_version: str | None = None  # None: nothing pushed yet, any version passes
        self.stale: set[str] = set()
        self.counters: Counter = Counter()
        self._infos: dict[str, ServerInfo] = {}
        self._checked_seed = False
        self._checked_routes_start = False
        self._admin_checked: set[str] = set()
        self._paused_in_place = False
        # Partial rollouts (rollout.partial): responses may span weight versions, each token's
        # version is judged by the trainer (any numeric version passes here), and a weight update
        # while paused in place is sent with flush_cache: false (weight updates otherwise flush).
        self.accept_spans = False
        self.flush_on_update = True
        self._closed = False
        if require_routes:
            self.check_servers()

    def __repr__(self) -> str:
        return f"SGLangEngine(urls={self.config.urls}, concurrency={self.config.concurrency})"

    # ------------------------------------------------------------------ server checks
    def server_info(self, url: str, *, refresh: bool = False) -> ServerInfo:
        """``/server_info`` (``/get_server_info`` on older releases), parsed and cached. A probe:
        one attempt (a server that is down raises RuntimeError at once, without retries)."""
        if url in self._infos and not refresh:
            return self._infos[url]
        raw = None
        for path in ("/server_info", "/get_server_info"):
            try:
                raw = self.transport.probe(url, path, timeout=self.config.timeout_s)
                break
            except ServerConfigError as err:
                if err.status != 404:
                    raise
            except (Retryable, Rejected) as err:
                raise RuntimeError(f"SGLang server {url} is not reachable: {err}") from None
        self._infos[url] = ServerInfo.from_json(url, raw if isinstance(raw, dict) else {})
        return self._infos[url]

    def reachable(self, urls) -> tuple[list[str], dict[str, str]]:
        """The servers of ``urls`` that answer a probe now, and for the others why not."""
        up, down = [], {}
        for url in urls:
            try:
                self.server_info(url, refresh=True)
                up.append(url)
            except ServerConfigError:
                raise  # up, but a wrong key or URL: fatal, not "down"
            except RuntimeError as err:
                down[url] = str(err)
        return up, down

    def check_servers(self, *, seeded: bool = False, distributed: bool = False) -> list[ServerInfo]:
        """Fail fast on a server that is down, too old for R3, or in a layout the sync refuses."""
        infos = [self.server_info(url) for url in self.config.urls]
        for info in infos:
            check_server(info, require_routes=self.require_routes, seeded=seeded, distributed=distributed)
        return infos

    # ------------------------------------------------------------------ versions
    def expect(self, version: int | str | None) -> None:
        """Responses must now carry ``weight_version == str(version)``."""
        self.expected_version = None if version is None else str(version)

    def mark_synced(self, urls) -> None:
        with self._lock:
            self.stale.difference_update(urls)

    def mark_stale(self, urls) -> None:
        """Out of rotation until :meth:`mark_synced` (e.g. left out of a weight push)."""
        with self._lock:
            self.stale.update(urls)

    def weight_version(self, url: str) -> str | None:
        """What the server serves now (``/model_info``); None when it cannot be asked (down)."""
        try:
            return weight_version_of(self.transport.probe(url, "/model_info", timeout=self.config.timeout_s))
        except (Retryable, Rejected):
            return None

    def weight_versions(self) -> dict[str, str | None]:
        return {url: self.weight_version(url) for url in self.config.urls}

    def stale_servers(self) -> list[str]:
        """Servers known stale plus those whose version now differs from the expected one."""
        if self.expected_version is not None:
            for url, version in self.weight_versions().items():
                if version is not None and version != self.expected_version:
                    with self._lock:
                        if url not in self.stale:
                            logger.warning("SGLang server %s serves weight_version %r, expected %r: it is "
                                           "re-synced before it serves again", url, version, self.expected_version)
                        self.stale.add(url)
        return sorted(self.stale)

    # ------------------------------------------------------------------ generate
    def generate(self, prompts: list[list[int]], params: SamplingParams, *, return_routes: bool,
                 routes_start: list[int] | None = None) -> list[RolloutResult]:
        """One result per prompt, in order; see the module docstring for failure handling.
        ``routes_start[i]``: prompt ``i``'s routes start there (``routed_experts_start_len``,
        a multi-turn episode's later turns; refused on servers below 0.5.8)."""
        futures = self.start(prompts, params, return_routes=return_routes, routes_start=routes_start)
        _, pending = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f.done() and f.exception() is not None), None)
        if failed is not None:
            for f in pending:
                f.cancel()
            raise failed.exception()
        outcomes = [f.result() for f in futures]
        self._raise_if_systematic(outcomes)
        return [result for result, _ in outcomes]

    def start(self, prompts: list[list[int]], params: SamplingParams, *, return_routes: bool,
              routes_start: list[int] | None = None) -> list[Future]:
        """Send the requests and return at once: one future per prompt, whose result is
        ``(RolloutResult, Rejected | None)`` (partial rollouts take them as groups complete)."""
        starts = list(routes_start) if routes_start is not None else [0] * len(prompts)
        if len(starts) != len(prompts):
            raise ValueError(f"routes_start has {len(starts)} entries for {len(prompts)} prompts")
        if return_routes and any(starts) and not self._checked_routes_start:
            for url in self.config.urls:
                check_routes_start(self.server_info(url))
            self._checked_routes_start = True
        if self._closed:
            raise RuntimeError("SGLangEngine.generate called after close()")
        if return_routes and self.route_spec is None:
            raise ValueError("return_routes=True needs SGLangEngine(route_spec=RouteSpec(...))")
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty; SGLang needs at least one input token")
        if params.seed is not None and not self._checked_seed:
            self._checked_seed = True
            for url in self.config.urls:  # a start-up warning only; a server that is down is skipped
                try:
                    check_server(self.server_info(url), require_routes=False, seeded=True, distributed=False)
                except RuntimeError:
                    pass
        return [self._pool.submit(self._generate_one, prompt, params, i, return_routes, start)
                for i, (prompt, start) in enumerate(zip(prompts, starts))]

    @staticmethod
    def _raise_if_systematic(outcomes) -> None:
        rejections = [rejected for _, rejected in outcomes]
        if rejections and all(r is not None for r in rejections):
            if len({r.status for r in rejections}) == 1:
                first = rejections[0]
                raise RuntimeError(f"every request of this call ({len(rejections)}) was refused with HTTP "
                                   f"{first.status}; the server says: {first.message} ({first})")

    def _pick_server(self) -> Callable[[int], str | None]:
        """Round-robin start; attempt ``k`` takes the ``k``-th server not known stale."""
        with self._lock:
            start = next(self._next_server)
        urls = self.config.urls

        def pick(k: int) -> str | None:
            with self._lock:
                live = [u for u in (urls[(start + j) % len(urls)] for j in range(len(urls))) if u not in self.stale]
            return live[k % len(live)] if live else None

        return pick

    def _generate_one(self, prompt, params, index, return_routes, routes_start=0
                      ) -> tuple[RolloutResult, Rejected | None]:
        payload = generate_payload(prompt, params, index, return_routes, routes_start)

        def call(url: str) -> RolloutResult:
            answer = self.transport.call_json(url, "/generate", payload, timeout=self.config.timeout_s)
            try:
                result = parse_generate(answer, prompt, index, url, return_routes, self.route_spec, routes_start)
            except MissingRoutes:
                raise
            except ValueError as err:
                raise ValueError(f"{err} (response from SGLang server {url})") from None
            self._check_version(url, result, index)
            return result

        try:
            result, attempts, url = self.transport.with_retries(call, self._pick_server(),
                                                                f"/generate of sample {index}")
        except Rejected as err:
            return RolloutResult(list(prompt), [], [], "abort", meta={"error": str(err)}), err
        except Retryable as err:
            return RolloutResult(list(prompt), [], [], "abort", meta={"error": str(err)}), None
        result.meta.update(server=url, attempts=attempts)
        if result.meta["num_retractions"] > 0:
            with self._lock:
                self.counters["retracted"] += 1
            if return_routes and self.config.drop_retracted:
                with self._lock:
                    self.counters["retracted_dropped"] += 1
                reason = (f"dropped: re-prefilled after {result.meta['num_retractions']} retraction(s), its "
                          f"prefix routes are not those of the sampling forward (rollout.sglang.drop_retracted)")
                return RolloutResult(list(prompt), [], [], "abort", meta={**result.meta, "error": reason}), None
        return result, None

    def _check_version(self, url: str, result: RolloutResult, index: int) -> None:
        """Every token must come from the expected weights: with spans (0.5.19+) each span's
        version, else the response's one."""
        expected = self.expected_version
        versions = result.meta.get("weight_versions") or [result.meta.get("weight_version")]
        if self.accept_spans:
            # Partial rollouts: the trainer counts each token's staleness from the spans; only a
            # version that is not one of ours ("default": a restarted server) is stale here.
            expected_text = "a numeric weight_version (one the trainer pushed)"
            if expected is None or all(v is not None and str(v).isdigit() for v in versions):
                return
            expected = expected_text
        if expected is None or all(v is None or str(v) == expected for v in versions):
            return
        got = versions[0] if len(versions) == 1 else versions
        with self._lock:
            self.counters["stale_responses"] += 1
            if url not in self.stale:
                logger.warning("SGLang server %s answered sample %d with weight_version %r, expected %r: its "
                               "responses are discarded until it is re-synced", url, index, got, expected)
            self.stale.add(url)
        raise _Stale(f"{url} served sample {index} with weight_version {got!r}, expected {expected!r}")

    def take_metrics(self) -> dict[str, float]:
        """Counters since the last call, as ``sglang/...`` metrics."""
        with self._lock:
            out = {f"sglang/{k}": float(v) for k, v in self.counters.items()}
            self.counters.clear()
        return out

    # ------------------------------------------------------------------ admin endpoints
    def _check_admin(self, url: str) -> None:
        """Before the first admin request to ``url`` with the admin key set: the server must
        have one (0.5.8+). A server that cannot be asked is left to fail the request itself."""
        if url in self._admin_checked or not os.environ.get(self.config.admin_api_key_env):
            return
        try:
            info = self.server_info(url)
        except ServerConfigError:
            raise
        except RuntimeError:
            return
        check_admin_key(info, self.config.admin_api_key_env)
        self._admin_checked.add(url)

    def _refuse_flush_while_paused_in_place(self, what: str) -> None:
        if self._paused_in_place:
            raise RuntimeError(
                f"{what} asks SGLang to flush its cache while generation is paused in place "
                f"(pause_generation(mode='in_place')): the paused requests stay in the running batch, so the "
                f"flush fails (a scheduler assert up to 0.5.21, HTTP 400 from 0.5.22 although a weight update "
                f"did change the weights). Call continue_generation() first, pause with mode 'retract' or "
                f"'abort', or update with flush_cache: false")

    def submit_all(self, path: str, payload_of: Callable[[str], dict], *, urls=None,
                   collective: bool = False, timeout: float | None = None) -> dict[str, Future]:
        """POST ``path`` (an admin endpoint) to every server of ``urls`` concurrently, each
        request bounded by ``timeout`` (default ``weight_timeout_s``). Collective requests (the
        server enters a broadcast) are not retried: a half-joined group cannot be re-entered. A
        request asking for a flush is refused while paused in place."""
        timeout = self.config.weight_timeout_s if timeout is None else timeout
        urls = self.config.urls if urls is None else urls
        if not self.flush_on_update and path in FLUSHING_UPDATES:
            # Partial rollouts: the update lands under requests paused in place, which a flush
            # would refuse; the radix cache is off on such servers (check_server).
            unflushed = payload_of
            payload_of = lambda url: {**unflushed(url), "flush_cache": False}  # noqa: E731
        if urls and asks_flush(path, payload_of(urls[0])):
            self._refuse_flush_while_paused_in_place(path)
        for url in urls:
            self._check_admin(url)

        def post(url: str) -> dict:
            def call(u: str) -> dict:
                return self.transport.call_json(u, path, payload_of(u), timeout=timeout, admin=True,
                                                once=collective)

            return call(url) if collective else self.transport.with_retries(call, [url], f"{path} on {url}")[0]

        return {url: self._pool.submit(post, url) for url in urls}

    def collect(self, futures: dict[str, Future], path: str, what: str, errors: list[str] | None = None,
                *, lost: dict[str, str] | None = None) -> dict:
        """Wait for :meth:`submit_all`'s requests and require ``success`` from each. With
        ``lost``, a server that could not be reached (a :class:`Retryable` failure) is recorded
        there (url -> why) instead of failing the call: it went down."""
        errors = list(errors or [])
        answers = {}
        for url, future in futures.items():
            try:
                answer = future.result()
            except Retryable as err:
                if lost is None:
                    errors.append(str(err))
                else:
                    lost[url] = str(err)
                continue
            except Rejected as err:
                errors.append(str(err))
                continue
            if not (isinstance(answer, dict) and answer.get("success")):
                reason = answer.get("message", answer) if isinstance(answer, dict) else answer
                errors.append(f"SGLang server {url} failed {path}: {reason}")
            answers[url] = answer
        if errors:
            raise RuntimeError(self.transport.mask(f"{what} failed: " + "; ".join(errors)))
        return answers

    def on_all_servers(self, path: str, payload_of: Callable[[str], dict], what: str, *, urls=None,
                       while_open: Callable[[], None] | None = None) -> dict[str, dict]:
        """:meth:`submit_all` then :meth:`collect`; ``while_open`` runs while the requests are in
        flight (the trainer's side of a collective)."""
        futures = self.submit_all(path, payload_of, urls=urls, collective=while_open is not None)
        errors = []
        if while_open is not None:
            try:
                while_open()
            except Exception as err:  # still collect the answers: they name the server-side cause
                errors.append(f"the trainer's side of {path} failed: {type(err).__name__}: {err}")
        return self.collect(futures, path, what, errors)

    def flush_cache(self, urls=None) -> None:
        """``/flush_cache`` on every server (plain-text answer). 400 means requests are still
        running: retried after a backoff. Stale prefix-cache entries would hand out routes of the
        old weights, so a flush that keeps failing raises. Refused while paused in place."""
        self._refuse_flush_while_paused_in_place("/flush_cache")
        for url in (self.config.urls if urls is None else urls):
            self._check_admin(url)

            def flush(u: str) -> None:
                status, raw = self.transport.request(u, "/flush_cache", None, timeout=self.config.timeout_s,
                                                     admin=True)
                if status in (401, 403):
                    raise ServerConfigError(status, self.transport.mask(
                        f"/flush_cache on {u} answered HTTP {status}: set ${self.config.admin_api_key_env} "
                        f"(the server's --admin-api-key)"))
                if status != 200:
                    raise Retryable(self.transport.mask(
                        f"/flush_cache on {u} answered HTTP {status}: "
                        f"{raw[:ERROR_BODY_CHARS].decode('utf-8', 'replace')}"))

            try:
                self.transport.with_retries(flush, [url], f"/flush_cache on {url}")
            except Retryable as err:
                raise RuntimeError(str(err)) from None

    def pause_generation(self, mode: str = "abort") -> None:
        """``/pause_generation`` on every server (``abort`` | ``retract`` | ``in_place``). Until
        :meth:`continue_generation`, ``in_place`` keeps the paused requests in the running batch:
        no flush is possible then (:meth:`flush_cache` and flushing weight updates refuse)."""
        for url in self.config.urls:
            self._check_admin(url)
            self.transport.call_json(url, "/pause_generation", {"mode": mode}, timeout=self.config.timeout_s,
                                     admin=True)
        self._paused_in_place = mode == "in_place"

    def continue_generation(self) -> None:
        for url in self.config.urls:
            self._check_admin(url)
            self.transport.call_json(url, "/continue_generation", {}, timeout=self.config.timeout_s, admin=True)
        self._paused_in_place = False

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.transport.close()
