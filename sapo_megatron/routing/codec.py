"""SGLang's ``routed_experts`` wire format: decode, validate, encode, and join multi-turn rows.

Wire format (SGLang >= 0.5.7, server flag ``--enable-return-routed-experts``, request field
``"return_routed_experts": true``, ``"routed_experts_start_len"`` from 0.5.8; see
shared/FIELD-NOTES.md section 2):
``meta_info["routed_experts"]`` is base64 of a little-endian, C-order array
``[rows, num_hidden_layers, topk]``, int32 unless ``meta_info["routed_experts_dtype"]`` names
``uint16`` or ``uint8``. Row ``r`` is the routing of input token ``start_len + r``; the last
token of the sequence is never fed through the model, so
``rows = prompt_len + response_len - 1 - start_len``. Older servers could add one row at a
stop ("stop edge"); it belongs to no token we train on and is dropped.

Design choices:
- Speed: one base64 pass (``pybase64``'s SIMD decoder when installed, 10-100x faster than the
  standard library's, which tops out near 0.15 GB/s here), then ``torch.frombuffer`` on a
  ``bytearray`` (zero copy, writable), and validation in a few whole-tensor passes: a min/max
  for the id range and a SWAR byte-rotation test for duplicate ids within a token's top-k.
  No Python loop ever runs over tokens, except to name the first offending token in an error.
- The layer axis covers ALL hidden layers; dense layers hold zeros, which would read as
  duplicate ids. Pass ``moe_layers`` (see :mod:`sapo_megatron.routing.compact`) and only those
  layers are validated and returned.
- Errors name the sample and the numbers expected, because a bad payload is usually a server
  flag or a layer-count mismatch, and the user must be able to tell which from the message.

Single process; nothing here needs torch.distributed.
"""

from __future__ import annotations

import base64
import binascii
import sys
from collections.abc import Mapping, Sequence

import torch

try:  # SIMD base64; optional, same output and errors as the standard library.
    import pybase64 as _b64
except ImportError:  # pragma: no cover - depends on the environment
    _b64 = None

ROUTES_FIELD = "routed_experts"
DTYPE_FIELD = "routed_experts_dtype"
WIRE_DTYPES = {"int32": torch.int32, "uint16": torch.uint16, "uint8": torch.uint8}

if sys.byteorder != "little":  # pragma: no cover - no big-endian training hosts exist
    raise ImportError("sapo_megatron.routing.codec assumes a little-endian host")


def _b64decode(text) -> bytearray:
    if _b64 is not None:
        return _b64.b64decode_as_bytearray(text, validate=True)
    return bytearray(base64.b64decode(text, validate=True))


def _b64encode(data: bytes) -> str:
    encoder = _b64.b64encode if _b64 is not None else base64.b64encode
    return encoder(data).decode("ascii")


def _who(sample_id) -> str:
    return f"sample {sample_id}" if sample_id is not None else "this sample"


def decode_routed_experts(
    meta_info: Mapping,
    *,
    num_layers: int,
    topk: int,
    prompt_len: int,
    response_len: int,
    start_len: int = 0,
    num_experts: int | None = None,
    sample_id=None,
    moe_layers: Sequence[int] | None = None,
    out_dtype: torch.dtype = torch.int32,
) -> torch.Tensor:
    """Decode one response's routes: ``routes_RLK`` (every wire layer), or ``routes_RMK``
    (MoE layers only) when ``moe_layers`` is given; ``out_dtype``.

    ``rows = prompt_len + response_len - 1 - start_len`` (row ``r`` = token ``start_len + r``).
    ``num_layers`` is the number of hidden layers on the wire (all of them, dense included);
    with ``moe_layers`` only those layer indices are validated and returned, in that order.
    ``num_experts`` enables the id range check. ``out_dtype`` may be a compact storage dtype
    (see :func:`sapo_megatron.routing.compact.storage_dtype`); the range check guarantees the
    ids fit when ``num_experts`` is given. Raises ``ValueError`` naming ``sample_id``.
    """
    who = _who(sample_id)
    if prompt_len < 1 or response_len < 0:
        raise ValueError(
            f"{who}: prompt_len must be >= 1 and response_len >= 0, got {prompt_len} and "
            f"{response_len}"
        )
    if not 0 <= start_len <= prompt_len:
        raise ValueError(
            f"{who}: routed_experts_start_len {start_len} is outside [0, prompt {prompt_len}]"
        )
    payload = meta_info.get(ROUTES_FIELD) if isinstance(meta_info, Mapping) else None
    if payload is None:
        raise ValueError(
            f"meta_info of {who} has no {ROUTES_FIELD!r}: the SGLang server must run with "
            f"--enable-return-routed-experts and the request must set "
            f"'return_routed_experts': true (the sgl router/gateway drops the field; with "
            f"streaming it arrives only in the final chunk)"
        )
    dtype_name = meta_info.get(DTYPE_FIELD) or "int32"
    if dtype_name not in WIRE_DTYPES:
        raise ValueError(
            f"routed_experts for {who} has unknown {DTYPE_FIELD} {dtype_name!r}; "
            f"expected one of {sorted(WIRE_DTYPES)}"
        )
    wire_dtype = WIRE_DTYPES[dtype_name]
    try:
        raw = _b64decode(payload)
    except (binascii.Error, ValueError, TypeError) as err:
        raise ValueError(f"routed_experts for {who} is not valid base64: {err}") from None

    itemsize = wire_dtype.itemsize
    expected = prompt_len + response_len - 1 - start_len
    per_token = num_layers * topk
    explain = (
        f"(prompt {prompt_len} + response {response_len} - 1 - start {start_len}) "
        f"or {expected + 1} (stop edge)"
    )
    values, leftover = divmod(len(raw), itemsize)
    rows = None
    if not leftover:
        for candidate in (expected, expected + 1):
            if values == candidate * per_token:
                rows = candidate
                break
    if rows is None:
        if not leftover and values % per_token == 0:
            hint = ""
            if expected > 0 and values % expected == 0:
                hint = (
                    f"; or a wrong layer count / top-k: {values // expected} values per token "
                    f"would fill the expected rows, num_layers {num_layers} x topk {topk} = "
                    f"{per_token}"
                )
            raise ValueError(
                f"routed_experts for {who} has {values // per_token} rows, expected {expected} "
                f"{explain}{hint}"
            )
        for candidate in (expected, expected + 1):
            if not leftover and candidate > 0 and values % candidate == 0:
                raise ValueError(
                    f"routed_experts for {who} holds {values // candidate} {dtype_name} values "
                    f"per token for {candidate} rows, expected num_layers {num_layers} x topk "
                    f"{topk} = {per_token}: wrong layer count or top-k (the wire covers all "
                    f"hidden layers, dense ones included)"
                )
        raise ValueError(
            f"routed_experts for {who} has {len(raw)} bytes, not a multiple of num_layers "
            f"{num_layers} x topk {topk} x {itemsize} bytes ({dtype_name}) = "
            f"{per_token * itemsize}"
        )

    routes = torch.frombuffer(raw, dtype=wire_dtype) if raw else torch.empty(0, dtype=wire_dtype)
    routes = routes.view(rows, num_layers, topk)[:expected]
    if wire_dtype == torch.uint16:  # few torch ops accept uint16
        routes = routes.to(torch.int32)
    if moe_layers is not None:
        bad = [i for i in moe_layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"moe_layers {bad} are outside [0, num_layers {num_layers})")
        if list(moe_layers) != list(range(num_layers)):
            routes = routes[:, list(moe_layers)]
    validate_routes(routes, num_experts=num_experts, sample_id=sample_id, start_len=start_len)
    return routes.to(out_dtype)


def validate_routes(
    routes: torch.Tensor, *, num_experts: int | None = None, sample_id=None, start_len: int = 0
) -> None:
    """Raise ``ValueError`` on an expert id outside ``[0, num_experts)`` or a repeated id
    within one token's top-k (it breaks the alltoall dispatcher's split sizes).

    ``routes`` is ``[R, L, K]`` (every wire layer) or ``[R, M, K]`` (MoE layers only); the
    layer named in an error is an index on that axis."""
    who = _who(sample_id)
    if routes.numel() == 0:
        return
    lo, hi = torch.aminmax(routes)
    lo, hi = int(lo), int(hi)
    if lo < 0 or (num_experts is not None and hi >= num_experts):
        limit = num_experts if num_experts is not None else "inf"
        bad = (routes < 0) if lo < 0 else (routes >= num_experts)
        r, layer, k = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"routed_experts for {who} has expert id {int(routes[r, layer, k])} at token "
            f"{start_len + r}, layer {layer}, slot {k}: expected ids in [0, {limit})"
        )
    if routes.shape[-1] > 1 and has_duplicate_ids(routes, max_id=hi):
        sorted_ids = routes.sort(dim=-1).values
        dup = (sorted_ids[..., 1:] == sorted_ids[..., :-1]).any(-1)
        r, layer = (int(i) for i in dup.nonzero()[0])
        raise ValueError(
            f"routed_experts for {who} repeats an expert within the top-k of token "
            f"{start_len + r}, layer {layer}: {routes[r, layer].tolist()} (expected "
            f"distinct ids; a dense layer, which holds zeros, may have been left in)"
        )


_WORD = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_signed(value: int, bits: int) -> int:
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


def has_duplicate_ids(routes: torch.Tensor, *, max_id: int | None = None) -> bool:
    """True if some token repeats an id within its top-k (last dim ``K``; any leading dims).

    Fast path (ids < 256 and topk in {2, 4, 8}, the common MoE shapes): the top-k of a token is
    viewed as one 16/32/64-bit word of bytes; rotating it by ``i`` bytes and XOR-ing with itself
    yields a zero byte iff two slots ``i`` apart hold the same id, and rotations 1..topk/2 cover
    every pair. This is a handful of passes over the compact payload instead of a sort.
    Otherwise: sort along top-k and compare neighbours.
    """
    topk = routes.shape[-1]
    if max_id is None and routes.numel():
        max_id = int(routes.max())
    if topk in _WORD and max_id is not None and max_id < 256 and routes.numel():
        as_bytes = routes.to(torch.uint8).contiguous()
        words = as_bytes.view(-1, topk).view(_WORD[topk]).reshape(-1)
        bits = 8 * topk
        ones = _as_signed(int("01" * topk, 16), bits)
        highs = _as_signed(int("80" * topk, 16), bits)
        # In-place passes: allocation and memory traffic, not arithmetic, bound this loop.
        rotated, scratch = torch.empty_like(words), torch.empty_like(words)
        zero_bytes = torch.zeros_like(words)
        for shift in range(1, topk // 2 + 1):
            s = 8 * shift
            torch.bitwise_left_shift(words, s, out=rotated)
            torch.bitwise_right_shift(words, bits - s, out=scratch)
            rotated.bitwise_or_(scratch.bitwise_and_((1 << s) - 1))
            rotated.bitwise_xor_(words)  # a zero byte = equal ids `shift` slots apart
            torch.sub(rotated, ones, out=scratch)
            zero_bytes.bitwise_or_(scratch.bitwise_and_(rotated.bitwise_not_()))
        return bool(zero_bytes.bitwise_and_(highs).any())
    sorted_ids = routes.sort(dim=-1).values
    return bool((sorted_ids[..., 1:] == sorted_ids[..., :-1]).any())


def encode_routed_experts(routes_RLK: torch.Tensor, dtype: str = "int32") -> str:
    """Exact inverse of :func:`decode_routed_experts` (for tests, the embedded rollout engine and
    the SGLang mock server): base64 of little-endian C-order ``routes_RLK`` in ``dtype``."""
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"unknown routed_experts dtype {dtype!r}; expected {sorted(WIRE_DTYPES)}")
    if routes_RLK.dim() != 3:
        raise ValueError(f"routes must be [rows, layers, topk], got {tuple(routes_RLK.shape)}")
    wide = routes_RLK.to(torch.int64)
    info = torch.iinfo(WIRE_DTYPES[dtype])
    if wide.numel() and (int(wide.min()) < info.min or int(wide.max()) > info.max):
        raise ValueError(
            f"expert ids in [{int(wide.min())}, {int(wide.max())}] do not fit {dtype}"
        )
    data = wide.to(WIRE_DTYPES[dtype]).contiguous()
    return _b64encode(data.view(torch.uint8).numpy().tobytes())


def concat_turns(
    turn_routes: Sequence[torch.Tensor], turn_start_lens: Sequence[int], *, sample_id=None
) -> torch.Tensor:
    """Join the routes of a multi-turn conversation into one ``[seqlen - 1, L or M, K]``
    (each turn's layer axis as decoded).

    Turn ``k`` is generated from the whole conversation so far (its prompt), requested with
    ``routed_experts_start_len = turn_start_lens[k]`` and decoded with that ``start_len``: its
    rows cover tokens ``start, start + 1, ...``. For every token to be covered exactly once,
    each turn must start where the previous ones stopped: ``start_0 = 0`` and
    ``start_{k+1} = start_k + rows_k`` - i.e. the start length of a turn is the previous
    conversation length MINUS ONE, because the previous turn's last token was never fed through
    the model and its row arrives with the next turn. (Earlier turns' rows are the ones that
    produced those tokens; re-requesting them would only return the re-prefill's routing.)
    """
    if len(turn_routes) != len(turn_start_lens) or not turn_routes:
        raise ValueError(
            f"concat_turns needs one start length per turn, got {len(turn_routes)} turns and "
            f"{len(turn_start_lens)} start lengths"
        )
    covered = 0
    for k, (routes, start) in enumerate(zip(turn_routes, turn_start_lens)):
        if start != covered:
            raise ValueError(
                f"routed_experts of {_who(sample_id)}, turn {k}, start at token {start}, expected "
                f"{covered} (turns 0..{k - 1} cover tokens [0, {covered})): request turn {k} "
                f"with routed_experts_start_len = {covered}"
            )
        if routes.shape[1:] != turn_routes[0].shape[1:]:
            raise ValueError(
                f"turn {k} of {_who(sample_id)} has routes of shape {tuple(routes.shape)}, "
                f"turn 0 has {tuple(turn_routes[0].shape)} (layers and top-k must agree)"
            )
        covered += routes.shape[0]
    return torch.cat(list(turn_routes), dim=0)
