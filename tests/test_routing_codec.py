"""SGLang routed_experts codec: round trips against payloads built by hand in SGLang's wire
format (little-endian C-order [rows, layers, topk], base64), and every malformed input."""

import base64
import re
from array import array

import pytest
import torch

from sapo_megatron.routing import codec
from sapo_megatron.routing.codec import (
    concat_turns,
    decode_routed_experts,
    encode_routed_experts,
    has_duplicate_ids,
)

TYPECODE = {"int32": "i", "uint16": "H", "uint8": "B"}


def random_routes(rows, layers, topk, experts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    flat = torch.rand(rows * layers, experts, generator=gen).argsort(dim=1)[:, :topk]
    return flat.reshape(rows, layers, topk)


def sglang_payload(routes, dtype="int32"):
    """What SGLang puts in meta_info: built with the standard library only, not our encoder."""
    values = array(TYPECODE[dtype], [int(v) for v in routes.reshape(-1).tolist()])
    assert values.itemsize == {"int32": 4, "uint16": 2, "uint8": 1}[dtype]
    meta = {"routed_experts": base64.b64encode(values.tobytes()).decode("ascii")}
    if dtype != "int32":
        meta["routed_experts_dtype"] = dtype
    return meta


def decode(meta, **overrides):
    kwargs = dict(num_layers=3, topk=4, prompt_len=5, response_len=7, num_experts=300)
    kwargs.update(overrides)
    return decode_routed_experts(meta, **kwargs)


@pytest.mark.parametrize("dtype", ["int32", "uint16", "uint8"])
@pytest.mark.parametrize("start_len", [0, 2, 5])
def test_round_trip_hand_built(dtype, start_len):
    experts = 250 if dtype == "uint8" else 300
    routes = random_routes(5 + 7 - 1 - start_len, 3, 4, experts, seed=start_len)
    got = decode(sglang_payload(routes, dtype), start_len=start_len, num_experts=experts)
    assert got.dtype == torch.int32
    assert torch.equal(got, routes.to(torch.int32))
    assert encode_routed_experts(got, dtype) == sglang_payload(routes, dtype)["routed_experts"]


def test_known_bytes():
    # One token, one layer, top-2 ids (1, 258): little-endian int32 is 01 00 00 00 02 01 00 00.
    meta = {"routed_experts": base64.b64encode(bytes([1, 0, 0, 0, 2, 1, 0, 0])).decode()}
    got = decode_routed_experts(meta, num_layers=1, topk=2, prompt_len=1, response_len=1)
    assert got.tolist() == [[[1, 258]]]


def test_stop_edge_row_dropped():
    routes = random_routes(5 + 7, 3, 4, 300)  # one row more than seqlen - 1
    got = decode(sglang_payload(routes))
    assert torch.equal(got, routes[:11].to(torch.int32))


def test_standard_library_fallback(monkeypatch):
    routes = random_routes(11, 3, 4, 300)
    monkeypatch.setattr(codec, "_b64", None)
    assert torch.equal(decode(sglang_payload(routes)), routes.to(torch.int32))
    assert encode_routed_experts(routes) == sglang_payload(routes)["routed_experts"]


def test_result_is_writable_and_owns_its_buffer():
    routes = random_routes(11, 3, 4, 300)
    meta = sglang_payload(routes)
    got = decode(meta)
    got[0, 0, 0] = -5  # must not raise, nor change what a second decode of meta returns
    assert torch.equal(decode(meta), routes.to(torch.int32))


def test_moe_layers_skip_dense_zeros_and_compact_output():
    routes = random_routes(11, 4, 4, 128)
    routes[:, [0, 2]] = 0  # dense layers: zeros on the wire
    meta = sglang_payload(routes)
    with pytest.raises(ValueError, match="repeats an expert"):
        decode(meta, num_layers=4, num_experts=128)
    got = decode(meta, num_layers=4, num_experts=128, moe_layers=[1, 3], out_dtype=torch.uint8)
    assert got.dtype == torch.uint8
    assert torch.equal(got, routes[:, [1, 3]].to(torch.uint8))


def expect_error(meta, pattern, **overrides):
    with pytest.raises(ValueError) as info:
        decode(meta, sample_id=3, **overrides)
    message = str(info.value)
    assert re.search(pattern, message), message
    return message


def test_missing_field():
    for meta in ({}, {"routed_experts": None}):
        msg = expect_error(meta, "sample 3")
        assert "--enable-return-routed-experts" in msg and "return_routed_experts" in msg


def test_bad_base64():
    expect_error({"routed_experts": "AAAA$$$"}, "sample 3 is not valid base64")


def test_unknown_dtype():
    meta = sglang_payload(random_routes(11, 3, 4, 300))
    meta["routed_experts_dtype"] = "int64"
    expect_error(meta, r"sample 3 has unknown routed_experts_dtype 'int64'.*int32")


def test_row_count_message_names_the_numbers():
    meta = sglang_payload(random_routes(9, 3, 4, 300))  # expected 11 or 12
    msg = expect_error(meta, "sample 3 has 9 rows, expected 11")
    assert "(prompt 5 + response 7 - 1 - start 0) or 12 (stop edge)" in msg
    meta = sglang_payload(random_routes(13, 3, 4, 300))
    expect_error(meta, "sample 3 has 13 rows, expected 11")
    expect_error(sglang_payload(random_routes(11, 3, 4, 300)), "expected 8", start_len=3)


def test_byte_count_not_multiple():
    raw = array("i", list(range(3 * 4 * 11)) + [1]).tobytes()
    meta = {"routed_experts": base64.b64encode(raw).decode()}
    expect_error(meta, r"sample 3 has 532 bytes, not a multiple of .* = 48")
    odd = {"routed_experts": base64.b64encode(b"\x00" * 7).decode()}
    expect_error(odd, "sample 3 has 7 bytes")


@pytest.mark.parametrize("layers,topk", [(2, 5), (3, 3), (5, 4), (3, 7)])
def test_wrong_layer_count_or_topk(layers, topk):
    meta = sglang_payload(random_routes(11, layers, topk, 300))
    expect_error(
        meta,
        rf"sample 3 holds {layers * topk} int32 values per token for 11 rows, expected "
        r"num_layers 3 x topk 4 = 12",
    )


def test_expert_id_out_of_range():
    routes = random_routes(11, 3, 4, 300)
    routes[6, 2, 1] = 300
    expect_error(sglang_payload(routes), r"sample 3 has expert id 300 at token 6, layer 2, slot 1:"
                 r" expected ids in \[0, 300\)")
    expect_error(sglang_payload(routes), "token 8,", start_len=2, prompt_len=7)
    routes[6, 2, 1] = -1
    expect_error(sglang_payload(routes), "expert id -1 at token 6")


def test_duplicate_ids():
    routes = random_routes(11, 3, 4, 300)
    routes[4, 1] = torch.tensor([7, 9, 11, 7])
    msg = expect_error(sglang_payload(routes), "sample 3 repeats an expert .* token 4, layer 1")
    assert "[7, 9, 11, 7]" in msg
    # Without a sample id the message still says which token.
    with pytest.raises(ValueError, match="this sample .* token 4"):
        decode(sglang_payload(routes))


def test_invalid_lengths():
    meta = sglang_payload(random_routes(11, 3, 4, 300))
    expect_error(meta, r"start_len 6 is outside \[0, prompt 5\]", start_len=6)
    expect_error(meta, "prompt_len must be >= 1", prompt_len=0)


@pytest.mark.parametrize("topk", [1, 2, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("experts", [8, 256, 1000])
def test_has_duplicate_ids_matches_brute_force(topk, experts):
    if topk > experts:
        return
    gen = torch.Generator().manual_seed(topk * 1000 + experts)
    for trial in range(20):
        ids = torch.randint(0, experts, (6, 5, topk), generator=gen)
        if trial % 2:  # mostly distinct rows, with a single planted repeat
            ids = random_routes(6, 5, topk, experts, seed=trial)
            if topk > 1 and trial % 4 == 1:
                r, layer = trial % 6, trial % 5
                a, b = sorted(torch.randperm(topk, generator=gen)[:2].tolist())
                ids[r, layer, b] = ids[r, layer, a]
        brute = any(
            len(set(ids[r, layer].tolist())) < topk for r in range(6) for layer in range(5)
        )
        for dtype in (torch.int32, torch.int64):
            assert has_duplicate_ids(ids.to(dtype)) == brute, (ids, brute)


def test_duplicate_fast_path_every_pair_distance():
    # Each pair of slots (i, j) of a top-8 over uint8-range ids must be caught.
    base = torch.arange(8) * 30 + 5
    for i in range(8):
        for j in range(i + 1, 8):
            row = base.clone()
            row[j] = row[i]
            assert has_duplicate_ids(row.reshape(1, 1, 8))
    assert not has_duplicate_ids(base.reshape(1, 1, 8))
    assert not has_duplicate_ids(torch.tensor([[[255, 254, 0, 128, 127, 1, 129, 253]]]))


def test_encode_rejects_overflow_and_bad_shape():
    with pytest.raises(ValueError, match="do not fit uint8"):
        encode_routed_experts(torch.tensor([[[256, 1]]]), "uint8")
    with pytest.raises(ValueError, match=r"\[rows, layers, topk\]"):
        encode_routed_experts(torch.zeros(3, 4))


def test_concat_turns_covers_every_token_once():
    # Turn 0: prompt 4 + response 3 = 7 tokens -> rows for tokens 0..5.
    # Turn 1: prompt = those 7 + a 2-token user message = 9, response 4: 13 tokens; requested
    # with routed_experts_start_len = 6 -> rows for tokens 6..11.
    full = random_routes(12, 2, 3, 16)
    meta0 = sglang_payload(full[:6])
    meta1 = sglang_payload(full[6:])
    kw = dict(num_layers=2, topk=3, num_experts=16)
    turn0 = decode_routed_experts(meta0, prompt_len=4, response_len=3, **kw)
    turn1 = decode_routed_experts(meta1, prompt_len=9, response_len=4, start_len=6, **kw)
    joined = concat_turns([turn0, turn1], [0, 6])
    assert torch.equal(joined, full.to(torch.int32))


def test_concat_turns_rejects_gaps_and_overlaps():
    a, b = random_routes(6, 2, 3, 16), random_routes(6, 2, 3, 16, seed=1)
    with pytest.raises(ValueError, match="turn 1, start at token 7, expected 6"):
        concat_turns([a, b], [0, 7], sample_id=2)
    with pytest.raises(ValueError, match="sample 2, turn 1, start at token 5, expected 6"):
        concat_turns([a, b], [0, 5], sample_id=2)
    with pytest.raises(ValueError, match="turn 0, start at token 1, expected 0"):
        concat_turns([a], [1])
    with pytest.raises(ValueError, match="layers and top-k must agree"):
        concat_turns([a, random_routes(6, 3, 3, 16)], [0, 6])
    with pytest.raises(ValueError, match="one start length per turn"):
        concat_turns([a, b], [0])
