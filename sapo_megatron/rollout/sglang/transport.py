"""HTTP to the SGLang servers: keep-alive connection pools, retries with backoff, key handling.

Standard library only (``http.client``). Design choices:
- Keep-alive: each server has a pool of idle connections, at most ``concurrency`` of them (the
  client never has more requests in flight than that, over all servers). SGLang (uvicorn)
  closes a connection idle for ``SGLANG_TIMEOUT_KEEP_ALIVE`` (5 s by default), and a closed
  connection fails only when used. So a pooled connection idle longer than ``keepalive_idle_s``
  (a little under the server's timeout) is closed instead of reused; and when a reused one fails
  anyway (not by a timeout), every idle connection of that server goes too (they are from the
  same era: after a 16-request rollout, 16 of them) and the attempt is repeated once on a NEW
  connection, not counted as a retry.
- Probes (``/server_info``, ``/model_info``: is the server up, what does it serve) are one
  attempt with a short connect timeout: a dead server costs one refused connect per probe.
- Failure classes: :class:`Retryable` (timeouts, refused/dropped connections, HTTP 5xx/408/429,
  unreadable bodies), :class:`Rejected` (another 4xx: the server refused this request; never
  retried) and :class:`ServerConfigError` (401/403/404: a wrong key or URL, fatal for the call).
- Keys: ``Authorization: Bearer`` with the key read from ``api_key_env`` at request time, or for
  ``admin=True`` requests (weight endpoints, ``/flush_cache``) from ``admin_api_key_env`` when
  that variable is set (SGLang then accepts only the admin key there). Keys are never stored
  and are masked in every message this module writes.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import queue
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0
# Connect timeout of a reachability probe: a server on the cluster accepts within milliseconds,
# so a probe of a dead host costs at most this (a refused connect costs nothing).
PROBE_CONNECT_S = 2.0
ERROR_BODY_CHARS = 300  # enough for SGLang's error messages, bounded for logs
_FATAL_STATUS = {401: "wrong or missing API key", 403: "API key refused", 404: "not an SGLang endpoint"}


class ServerConfigError(RuntimeError):
    """A server answered 401/403/404: a wrong URL or key, fatal for the whole call."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Retryable(Exception):
    """A transient failure of one attempt: try again (on the next server)."""


class Rejected(Exception):
    """The server refused this request (HTTP 4xx): no retry. ``message`` is the server's own."""

    def __init__(self, text: str, *, status: int, message: str) -> None:
        super().__init__(text)
        self.status = status
        self.message = message


def json_or_none(raw: bytes):
    try:
        return json.loads(raw)
    except ValueError:
        return None


def server_message(raw: bytes) -> str:
    """SGLang's error text: ``{"error": {"message"}}`` (400), ``{"detail"}`` (FastAPI, 422) or
    ``{"error": "Unauthorized"}``; else the start of the body."""
    body = json_or_none(raw)
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if "detail" in body:
            return json.dumps(body["detail"])[:ERROR_BODY_CHARS]
        if "message" in body:
            return str(body["message"])
    return raw[:ERROR_BODY_CHARS].decode("utf-8", "replace").strip()


class Transport:
    """Pooled HTTP exchanges with the servers of one client."""

    def __init__(self, *, concurrency: int, retries: int, backoff_s: float, api_key_env: str,
                 admin_api_key_env: str, keepalive_idle_s: float = 4.0) -> None:
        self.concurrency = concurrency
        self.retries = retries
        self.backoff_s = backoff_s
        self.api_key_env = api_key_env
        self.admin_api_key_env = admin_api_key_env
        self.keepalive_idle_s = keepalive_idle_s
        # (connection, time.monotonic() when it was last used), most recent on top.
        self._idle: dict[tuple[str, str, int | None], queue.LifoQueue] = {}
        # Counts for tests and logs: keep-alive keeps connections_opened small; reuse_failures are
        # pooled connections the server had closed; retried are failed attempts that were retried
        # or given up (the fresh-connection repeat is not one).
        self.connections_opened = 0
        self.reuse_failures = 0
        self.retried = 0

    # ------------------------------------------------------------------ keys
    def _key(self, admin: bool) -> tuple[str | None, str]:
        if admin and os.environ.get(self.admin_api_key_env):
            return os.environ[self.admin_api_key_env], self.admin_api_key_env
        return os.environ.get(self.api_key_env) or None, self.api_key_env

    def mask(self, text: str) -> str:
        for name in (self.api_key_env, self.admin_api_key_env):
            key = os.environ.get(name)
            if key:
                text = text.replace(key, "***")
        return text

    # ------------------------------------------------------------------ connections
    def _pool(self, parts) -> queue.LifoQueue:
        where = (parts.scheme, parts.hostname, parts.port)
        if where not in self._idle:
            self._idle.setdefault(where, queue.LifoQueue(maxsize=self.concurrency))
        return self._idle[where]

    def _connection(self, parts, timeout: float, *, fresh: bool = False) -> tuple[http.client.HTTPConnection, bool]:
        """A pooled connection used within ``keepalive_idle_s`` (older ones are closed: the server
        may have closed them already), else a new one; and whether it was reused."""
        pool = self._pool(parts)
        while not fresh:
            try:
                conn, last_used = pool.get_nowait()
            except queue.Empty:
                break
            if time.monotonic() - last_used > self.keepalive_idle_s:
                conn.close()
                continue
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            return conn, True
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self.connections_opened += 1
        return cls(parts.hostname, parts.port, timeout=timeout), False

    def _release(self, parts, conn, response) -> None:
        if response.will_close:
            conn.close()
            return
        try:
            self._pool(parts).put_nowait((conn, time.monotonic()))
        except queue.Full:
            conn.close()

    @staticmethod
    def _drain(pool: queue.LifoQueue) -> None:
        while True:
            try:
                conn, _ = pool.get_nowait()
            except queue.Empty:
                return
            conn.close()

    def close(self) -> None:
        for pool in self._idle.values():
            self._drain(pool)

    def request(self, url: str, path: str, payload: dict | None, *, timeout: float,
                method: str = "POST", admin: bool = False, connect_timeout: float | None = None,
                once: bool = False) -> tuple[int, bytes]:
        """One HTTP exchange; transport failures become :class:`Retryable`. ``connect_timeout``
        bounds the connect of a new connection (``timeout`` then bounds each read/write).
        ``once``: a new connection, and never sent twice. For requests that put the server into a
        collective (joining a group, a bucket's broadcast): a pooled connection that fails looks the
        same whether the server closed it idle or received the request and then dropped it, and a
        resent collective request would join or receive twice."""
        parts = urlsplit(url)
        body = None if payload is None else json.dumps(payload).encode()
        key, _ = self._key(admin)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        for fresh_try in range(2):
            conn, reused = self._connection(parts, timeout, fresh=once or fresh_try > 0)
            try:
                if not reused and connect_timeout is not None:
                    conn.timeout = min(connect_timeout, timeout)
                    conn.connect()
                    conn.sock.settimeout(timeout)
                    conn.timeout = timeout
                conn.request(method, parts.path + path, body=body, headers=headers)
                response = conn.getresponse()
                raw = response.read()
            except (OSError, http.client.HTTPException) as err:  # timeouts, refused, dropped
                conn.close()
                timed_out = isinstance(err, (TimeoutError, socket.timeout))
                if reused and not timed_out:
                    # The server closed it while idle, and with it the other idle ones of its era:
                    # drop them all and go once more on a new connection.
                    self.reuse_failures += 1
                    self._drain(self._pool(parts))
                    continue
                kind = "timed out" if timed_out else "failed"
                raise Retryable(self.mask(f"{method} {url}{path} {kind}: {type(err).__name__}: {err}")) from None
            self._release(parts, conn, response)
            return response.status, raw
        raise AssertionError("unreachable")

    def call_json(self, url: str, path: str, payload: dict | None, *, timeout: float,
                  method: str = "POST", admin: bool = False, connect_timeout: float | None = None,
                  once: bool = False) -> Any:
        """One exchange expecting JSON; classifies HTTP errors (see the module docstring)."""
        status, raw = self.request(url, path, payload, timeout=timeout, method=method, admin=admin,
                                   connect_timeout=connect_timeout, once=once)
        message = self.mask(server_message(raw))
        if status in _FATAL_STATUS:
            _, env = self._key(admin)
            hint = f" (key from ${env})" if status in (401, 403) else ""
            raise ServerConfigError(status, f"SGLang server {url} answered {path} with HTTP {status}: "
                                            f"{_FATAL_STATUS[status]}{hint}: {message}")
        if 400 <= status < 500 and status not in (408, 429):
            answer = json_or_none(raw)
            if isinstance(answer, dict) and "success" in answer:
                return answer  # weight endpoints answer failures as {"success": false, "message"}
            raise Rejected(f"{url}{path} rejected the request (HTTP {status}): {message}",
                           status=status, message=message)
        if status >= 400:
            raise Retryable(f"{url}{path} answered HTTP {status}: {message}")
        answer = json_or_none(raw)
        if answer is None:
            raise Retryable(f"{url}{path} returned a body that is not JSON: {message}")
        return answer

    def probe(self, url: str, path: str, *, timeout: float) -> Any:
        """``GET path``, once: a reachability check. A server that is down costs one refused (or
        ``PROBE_CONNECT_S``-bounded) connect, no retries and no backoff."""
        return self.call_json(url, path, None, timeout=timeout, method="GET", connect_timeout=PROBE_CONNECT_S)

    # ------------------------------------------------------------------ retries
    def backoff(self, attempt: int) -> None:
        time.sleep(min(self.backoff_s * 2**attempt, MAX_BACKOFF_S))

    def with_retries(self, fn: Callable[[str], Any], urls: Callable[[int], str | None] | list[str], what: str):
        """``fn(url)`` with retries; attempt ``k`` goes to ``urls[k % len(urls)]`` (or to
        ``urls(k)`` when a function, which returns None when no server is left). Returns
        ``(result, attempts, url)``."""
        pick = urls if callable(urls) else (lambda k: urls[k % len(urls)])
        errors = []
        for attempt in range(self.retries + 1):
            url = pick(attempt)
            if url is None:
                break
            if attempt:
                self.backoff(attempt - 1)
            try:
                return fn(url), attempt + 1, url
            except Retryable as err:
                self.retried += 1
                errors.append(str(err))
                logger.warning("%s, attempt %d/%d: %s", what, attempt + 1, self.retries + 1, err)
        last = errors[-1] if errors else "no server left to try"
        raise Retryable(f"{what} failed after {len(errors)} attempts; last error: {last}")
