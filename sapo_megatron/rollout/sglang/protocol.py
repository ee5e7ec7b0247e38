"""SGLang's native wire format: request payloads, response parsing, server checks.

Pure functions over dicts (read from the sglang 0.5.23 source, shared/FIELD-NOTES.md 2 and 2b):
- ``/generate``: integer sampling parameters go out as JSON integers (0.5.22+ refuses a float
  ``max_new_tokens`` with 400); ``logprob_start_len = -1`` (log-probs of generated tokens only:
  a start inside the prompt would recompute the prompt instead of reusing the radix cache);
  ``return_routed_experts`` only when routes are asked for (servers < 0.5.7 refuse the field).
- Responses: tokens come from ``meta_info.output_token_logprobs`` (the matched stop token
  included, as ``completion_tokens`` and the route rows count them), ``output_ids`` is the
  fallback of an abort; ``meta_info.weight_version`` names the weights that served the request
  (``"default"`` on a fresh server); a retraction count > 0 means the request was re-prefilled.

Protocol by release (read from each release's source, 0.5.7 ... 0.5.23; FIELD-NOTES 2d); the
gates are the constants below and :func:`check_server` / :func:`check_admin_key`:
- Retraction count: ``total_retractions`` in 0.5.7-0.5.11, ``num_retractions`` from 0.5.12;
  either is read.
- Weight version: up to 0.5.18 ``meta_info.weight_version`` is the server's version when the
  response is built; from 0.5.19 it is the version of the LAST tokens, and
  ``meta_info.weight_versions`` lists ``{version, start, end}`` spans (one span when a single
  version served the request). The version of a response is its OLDEST token's
  (docs/design.md), so the spans are read when present.
- ``/model_info.weight_version`` exists since 0.5.7 (``/get_weight_version`` answers 404 from
  0.5.8 and is gone in 0.5.21: not used).
- ``routed_experts_start_len`` needs 0.5.8: sent only for a multi-turn episode's later turns
  (rollout/episodes.py), whose routes then start there; refused below 0.5.8
  (:func:`check_routes_start`). A start outside ``[0, prompt]`` is an abort from the server.
- Partial rollouts (``rollout.partial``) need the spans: :data:`WEIGHT_SPANS_SINCE` (0.5.19).
  A span's version moves when an update lands: tokens ``[0, n)`` of a request that had ``n``
  output tokens then are the old version's (``record_weight_version_events`` in the scheduler).
- ``--admin-api-key`` exists from 0.5.8.
- Flushing the cache while requests are paused in place asserts in the scheduler up to 0.5.21
  and answers 400 from 0.5.22 though the weights did change: refused by the engine.
- ``/server_info`` (``/get_server_info`` before 0.5.x renamed it): ``version``, ``tp_size``,
  ``dp_size``, ``pp_size``, ``speculative_algorithm``, ``enable_deterministic_inference``,
  ``enable_return_routed_experts``. :func:`check_server` refuses what would silently break
  training and names the release that fixes it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

from sapo_megatron.rollout.base import RolloutResult, RouteSpec, SamplingParams
from sapo_megatron.routing import decode_routed_experts, storage_dtype

logger = logging.getLogger(__name__)

ROUTES_SINCE = (0, 5, 7)  # routed experts exist (PR #12162)
ROUTES_SPECULATIVE_FIXED = (0, 5, 15)  # route rows over-counted with speculative decoding before
ROUTES_START_SINCE = (0, 5, 8)  # routed_experts_start_len (multi-turn routes per turn)
ADMIN_KEY_SINCE = (0, 5, 8)  # --admin-api-key; 0.5.7's weight endpoints take the API key
WEIGHT_SPANS_SINCE = (0, 5, 19)  # meta_info.weight_versions: per-token versions (partial rollouts)
FRESH_VERSION = "default"  # a server's weight_version before any update


# --------------------------------------------------------------------------- /generate

def generate_payload(prompt: list[int], params: SamplingParams, index: int, return_routes: bool,
                     routes_start: int = 0) -> dict:
    sampling = {
        "temperature": float(params.temperature),
        "top_p": float(params.top_p),
        "max_new_tokens": int(params.max_new_tokens),
        "stop_token_ids": [int(t) for t in params.stop_token_ids],
    }
    if params.seed is not None:
        # Distinct per prompt: the same prompt is usually repeated n times in a group.
        sampling["sampling_seed"] = int(params.seed) + index
    payload = {
        "input_ids": [int(t) for t in prompt],
        "sampling_params": sampling,
        "return_logprob": True,
        "logprob_start_len": -1,
    }
    if return_routes:
        payload["return_routed_experts"] = True
        if routes_start:  # 0 is the server's default: older servers never see the field
            payload["routed_experts_start_len"] = int(routes_start)
    return payload


class MissingRoutes(RuntimeError):
    """The server returned no routes although asked: it runs without the flag (fatal)."""


def parse_generate(response, prompt: list[int], index: int, url: str, return_routes: bool,
                   route_spec: RouteSpec | None, routes_start: int = 0) -> RolloutResult:
    """A ``/generate`` answer -> :class:`RolloutResult`; ``meta`` has ``weight_version`` (the
    oldest token's), ``weight_versions`` (each span's, oldest first; 0.5.19+) and
    ``num_retractions``. Raises ValueError on a malformed answer."""
    if not isinstance(response, dict):
        raise ValueError(f"sample {index}: /generate returned {type(response).__name__}, expected a JSON object")
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
        raise ValueError(f"sample {index}: meta_info has no output_token_logprobs although the request set "
                         f"return_logprob")
    completion = meta_info.get("completion_tokens", len(response_ids))
    if finish_type != "abort" and completion != len(response_ids):
        raise ValueError(f"sample {index}: output_token_logprobs has {len(response_ids)} entries, "
                         f"completion_tokens is {completion}")
    retractions = meta_info.get("num_retractions", meta_info.get("total_retractions"))  # renamed in 0.5.12
    meta = {
        "finish": finish,
        "prompt_tokens": meta_info.get("prompt_tokens"),
        "weight_version": meta_info.get("weight_version"),
        "num_retractions": int(retractions or 0),
    }
    spans = meta_info.get("weight_versions")
    if spans:
        parsed = parse_spans(spans, len(response_ids), index)
        meta["weight_versions"] = [v for v, _, _ in parsed]
        meta["weight_version_spans"] = parsed
        meta["weight_version"] = parsed[0][0]  # the oldest token's
    if meta_info.get("cached_tokens") is not None:
        meta["cached_tokens"] = int(meta_info["cached_tokens"])
    if finish_type == "abort" and isinstance(finish, dict) and finish.get("message"):
        meta["error"] = f"aborted by the server: {finish['message']}"
    routes = None
    if return_routes:
        if meta_info.get("routed_experts") is None:
            if finish_type != "abort":  # an aborted request may end before any forward
                raise MissingRoutes(
                    f"SGLang server {url} returned no routed_experts for sample {index} although the request "
                    f"set return_routed_experts: start the server with --enable-return-routed-experts "
                    f"(routing replay must not fall back to live routing silently)")
        elif finish_type == "abort":
            try:  # rows of a request cut short need not match its partial output
                routes = decode_routes(meta_info, prompt, response_ids, index, route_spec, routes_start)
            except ValueError:
                routes = None
        else:
            routes = decode_routes(meta_info, prompt, response_ids, index, route_spec, routes_start)
    return RolloutResult(list(prompt), response_ids, log_probs, finish_type, routes, meta)


def parse_spans(spans, num_tokens: int, index: int) -> list[tuple[str, int, int]]:
    """``meta_info.weight_versions`` (``[{version, start, end}]``, or ``[version, start, end]``
    arrays) -> ``[(version, start, end)]``, oldest first. Spans are contiguous over the
    response: ``start`` of the first is 0, each starts where the last ended; ``end`` of the last is
    the response length (an abort's spans may end earlier and are not checked for it)."""
    out = []
    for span in spans:
        if isinstance(span, dict):
            version, start, end = span.get("version"), span.get("start"), span.get("end")
        elif isinstance(span, (list, tuple)) and len(span) == 3:
            version, start, end = span
        else:
            raise ValueError(f"sample {index}: meta_info.weight_versions entry {span!r} is not "
                             f"{{version, start, end}}")
        if not isinstance(start, int) or not isinstance(end, int):
            raise ValueError(f"sample {index}: meta_info.weight_versions span {span!r} has non-integer bounds")
        expected_start = out[-1][2] if out else 0
        if start != expected_start or end < start:
            raise ValueError(f"sample {index}: meta_info.weight_versions span {span!r} starts at {start}, "
                             f"expected {expected_start} (spans must tile the response in order)")
        out.append((str(version), start, end))
    if out and num_tokens and out[-1][2] != num_tokens:
        raise ValueError(f"sample {index}: meta_info.weight_versions ends at token {out[-1][2]}, the response "
                         f"has {num_tokens} tokens")
    return out


def token_versions(meta: dict, num_tokens: int, default: int) -> list[int]:
    """Each response token's weight version (an int) from ``meta["weight_version_spans"]``; without
    spans (SGLang < 0.5.19, the embedded engine), every token gets the response's ``weight_version``.
    A version that is not a number ("default", a fresh server) counts as ``default``."""
    def as_int(v) -> int:
        if isinstance(v, int):
            return v
        return int(v) if isinstance(v, str) and v.isdigit() else default

    spans = meta.get("weight_version_spans")
    if not spans:
        return [as_int(meta.get("weight_version"))] * num_tokens
    out: list[int] = []
    for version, start, end in spans:
        out += [as_int(version)] * (end - start)
    return out[:num_tokens] + [as_int(spans[-1][0])] * max(0, num_tokens - len(out))


def decode_routes(meta_info: dict, prompt: list[int], response_ids: list[int], index: int,
                  spec: RouteSpec, routes_start: int = 0) -> torch.Tensor:
    return decode_routed_experts(
        meta_info, num_layers=spec.num_hidden_layers, topk=spec.topk, prompt_len=len(prompt),
        response_len=len(response_ids), start_len=routes_start, num_experts=spec.num_experts, moe_layers=spec.moe_layers,
        out_dtype=storage_dtype(spec.num_experts), sample_id=index,
    )


# --------------------------------------------------------------------------- server checks

def parse_version(text) -> tuple[int, ...] | None:
    """``"0.5.23"``, ``"0.5.23.post1"``, ``"v0.5.15rc0"`` -> ``(0, 5, 23)``; None if absent."""
    m = re.match(r"v?(\d+)\.(\d+)(?:\.(\d+))?", str(text or ""))
    return tuple(int(g or 0) for g in m.groups()) if m else None


def _release(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


@dataclass(frozen=True)
class ServerInfo:
    url: str
    version: tuple[int, ...] | None
    tp_size: int
    dp_size: int
    pp_size: int
    speculative: bool
    deterministic: bool | None  # None: the info does not say
    routed_experts: bool | None
    radix_cache: bool | None = None  # None: the info does not say (``disable_radix_cache``)

    @classmethod
    def from_json(cls, url: str, info: dict) -> "ServerInfo":
        def flag(key):
            return None if key not in info else bool(info[key])

        return cls(
            url=url,
            version=parse_version(info.get("version")),
            tp_size=int(info.get("tp_size") or 1),
            dp_size=int(info.get("dp_size") or 1),
            pp_size=int(info.get("pp_size") or 1),
            speculative=info.get("speculative_algorithm") not in (None, "", "NONE"),
            deterministic=flag("enable_deterministic_inference"),
            routed_experts=flag("enable_return_routed_experts"),
            radix_cache=None if "disable_radix_cache" not in info else not info["disable_radix_cache"],
        )


def check_server(info: ServerInfo, *, require_routes: bool, seeded: bool, distributed: bool) -> None:
    """Refuse a server that would break training silently; warn where it would only weaken it."""
    url = info.url
    if require_routes:
        if info.routed_experts is False:
            raise RuntimeError(
                f"SGLang server {url} runs without routed experts (enable_return_routed_experts=False), "
                f"but routing replay (R3) needs them: restart it with --enable-return-routed-experts")
        if info.version is None:
            logger.warning("SGLang server %s reports no version; routed experts need >= %s", url,
                           _release(ROUTES_SINCE))
        elif info.version < ROUTES_SINCE:
            raise RuntimeError(
                f"SGLang server {url} is version {_release(info.version)}; routed experts (R3) need "
                f"sglang >= {_release(ROUTES_SINCE)}")
        elif info.speculative and info.version < ROUTES_SPECULATIVE_FIXED:
            raise RuntimeError(
                f"SGLang server {url} is version {_release(info.version)} with speculative decoding: its "
                f"route rows are over-counted before sglang {_release(ROUTES_SPECULATIVE_FIXED)}; upgrade to "
                f">= {_release(ROUTES_SPECULATIVE_FIXED)} or turn speculative decoding off for R3")
    if distributed and (info.dp_size > 1 or info.pp_size > 1):
        raise RuntimeError(
            f"SGLang server {url} runs --dp-size {info.dp_size} --pp-size {info.pp_size}: SGLang's "
            f"distributed weight update joins the group at rank_offset + tp_rank with no offset for "
            f"data-parallel replicas or pipeline stages (it asserts dp_size == 1), so ranks would "
            f"collide; run one server per replica (--dp-size 1 --pp-size 1) or use weight_sync: disk")
    if seeded and not info.deterministic:
        logger.warning(
            "SGLang server %s: sampling_seed is ignored unless the server runs "
            "--enable-deterministic-inference (server info: enable_deterministic_inference=%s); "
            "rollouts are not reproducible from the run seed", url, info.deterministic)


def check_routes_start(info: ServerInfo) -> None:
    """Multi-turn routes (``routed_experts_start_len``) need 0.5.8: an older server does not know
    the field (it fails the request, or returns rows from token 0: routes paired with the wrong
    tokens)."""
    if info.version is None:
        logger.warning("SGLang server %s reports no version; multi-turn routes (routed_experts_start_len) "
                       "need >= %s", info.url, _release(ROUTES_START_SINCE))
    elif info.version < ROUTES_START_SINCE:
        raise RuntimeError(
            f"SGLang server {info.url} is version {_release(info.version)}; multi-turn episodes with routing "
            f"replay (R3) ask each turn's routes with routed_experts_start_len, which needs sglang >= "
            f"{_release(ROUTES_START_SINCE)}: upgrade the server, or use routing.mode R2/none or rollout.max_turns=1")
def check_partial(info: ServerInfo, pause_mode: str) -> None:
    """Refuse a server that cannot serve partial rollouts (``rollout.partial``, trainer/partial.py).

    Each token's version comes from ``meta_info.weight_versions`` spans: 0.5.19+. Under
    ``in_place`` the update is pushed without a flush (a flush cannot run under requests paused in
    place), so the radix cache would keep serving the old weights' KV and prefix routes to every
    later request that shares a prefix (a GRPO group shares its prompt): the server must run
    ``--disable-radix-cache``. Under ``retract`` the paused requests leave the running batch and
    the update flushes as usual, so the cache may stay on."""
    url = info.url
    if info.version is not None and info.version < WEIGHT_SPANS_SINCE:
        raise RuntimeError(
            f"SGLang server {url} is version {_release(info.version)}; rollout.partial needs per-token weight "
            f"versions (meta_info.weight_versions spans), added in sglang {_release(WEIGHT_SPANS_SINCE)}: upgrade "
            f"to >= {_release(WEIGHT_SPANS_SINCE)} or set rollout.partial=false")
    if info.version is None:
        logger.warning("SGLang server %s reports no version; rollout.partial needs >= %s", url,
                       _release(WEIGHT_SPANS_SINCE))
    if pause_mode == "in_place" and info.radix_cache is not False:
        raise RuntimeError(
            f"SGLang server {url} runs with its radix cache on (disable_radix_cache={not info.radix_cache}"
            f"{'' if info.radix_cache is not None else ', not reported'}), but rollout.partial with "
            f"rollout.partial_pause=in_place updates the weights without a flush: the cache would serve the old "
            f"weights' KV and prefix routes to later requests. Restart it with --disable-radix-cache, or set "
            f"rollout.partial_pause=retract (the update flushes then)")


def check_admin_key(info: ServerInfo, admin_key_env: str) -> None:
    """Called when ``$admin_key_env`` is set: refuse a server that has no admin key."""
    if info.version is not None and info.version < ADMIN_KEY_SINCE:
        raise RuntimeError(
            f"SGLang server {info.url} is version {_release(info.version)}, which has no --admin-api-key "
            f"(added in {_release(ADMIN_KEY_SINCE)}), but ${admin_key_env} is set: its weight endpoints take "
            f"the API key, so unset ${admin_key_env} or upgrade the server to >= {_release(ADMIN_KEY_SINCE)}")


# --------------------------------------------------------------------------- weights

def weight_version_of(answer) -> str | None:
    """The version in a ``/model_info`` answer (since 0.5.7)."""
    if isinstance(answer, dict) and answer.get("weight_version") is not None:
        return str(answer["weight_version"])
    return None


# Weight updates flush the cache unless told not to (``flush_cache: bool = True`` in io_struct.py).
FLUSHING_UPDATES = ("/update_weights_from_disk", "/update_weights_from_distributed", "/update_weights_from_tensor")


def asks_flush(path: str, payload: dict) -> bool:
    return path == "/flush_cache" or (path in FLUSHING_UPDATES and bool(payload.get("flush_cache", True)))


# The weight-update session (read from 0.5.20, 0.5.21, 0.5.23): from 0.5.21 SGLang answers
# /update_weights_from_distributed and /update_weights_from_tensor with 400 ("... must run between
# begin_weight_update() and end_weight_update()", managers/scheduler_components/weight_updater.py:179
# in 0.5.21, :192 in 0.5.23) unless POST /begin_weight_update {} opened a session, which
# POST /end_weight_update {} closes; begin on an open session answers 400 "a weight-update session is
# already open" (:311-316 in 0.5.23). Before 0.5.21 neither endpoint exists (404). Disk updates
# never need one.
WEIGHT_SESSION_SINCE = (0, 5, 21)
SESSION_ALREADY_OPEN = "session is already open"


def weight_session_needed(info: ServerInfo) -> bool:
    """Whether the server refuses distributed (and tensor) updates outside a session. A server
    that reports no version is taken to predate sessions."""
    return info.version is not None and info.version >= WEIGHT_SESSION_SINCE


def disk_update_payload(path: str, version: int) -> dict:
    return {"model_path": path, "flush_cache": True, "abort_all_requests": False,
            "weight_version": str(version)}


def init_group_payload(*, master_address: str, master_port: int, rank_offset: int, world_size: int,
                       group_name: str, backend: str) -> dict:
    return {"master_address": master_address, "master_port": int(master_port), "rank_offset": int(rank_offset),
            "world_size": int(world_size), "group_name": group_name, "backend": backend}


def distributed_update_payload(names: list[str], dtypes: list[torch.dtype], shapes: list[tuple[int, ...]], *,
                               group_name: str, load_format: str | None, last: bool, version: int) -> dict:
    """One ``/update_weights_from_distributed`` request. The cache is flushed and the version
    moves only with the last bucket, so a server never reports a version it half holds."""
    payload = {
        "names": list(names),
        "dtypes": [str(d).removeprefix("torch.") for d in dtypes],
        "shapes": [[int(s) for s in shape] for shape in shapes],
        "group_name": group_name,
        "flush_cache": bool(last),
        "abort_all_requests": False,
    }
    if load_format is not None:
        payload["load_format"] = load_format
    if last:
        payload["weight_version"] = str(version)
    return payload
