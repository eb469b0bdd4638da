"""Wire codec: event decoding with a precise reason per rejection, encoders, token ids."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_rnn.stream.codec import (
    DEFAULT_MAX_BYTES,
    decode_batch,
    decode_dead_letter,
    decode_event,
    decode_key,
    decode_prediction,
    encode_dead_letter,
    encode_event,
    encode_prediction,
    resolve_token,
    resolve_tokens,
)
from stream_rnn.stream.exceptions import MalformedMessage, Rejected
from stream_rnn.stream.messages import (
    EndEvent,
    GenerateEvent,
    ResetEvent,
    TokenEvent,
    TokensEvent,
)
from stream_rnn.stream.reasons import REASONS
from stream_rnn.train.vocab import Vocab

VALID = [
    (b'{"v": 1, "type": "token", "token": "a", "ts": 1.7e9}', TokenEvent("a", 1.7e9)),
    (b'{"v":1,"type":"token","token":42}', TokenEvent(42)),
    (b'{"token":"\xc3\xa9","type":"token","v":1}', TokenEvent("é")),  # tag after the fields
    (b'{"v":1,"type":"token","token":-3,"ts":5}', TokenEvent(-3, 5.0)),
    (b'{"v":1,"type":"token","token":123456789012345678901234567890}', TokenEvent(123456789012345678901234567890)),
    (b'{"v":1,"type":"token","token":"","ts":null}', TokenEvent("")),
    (b' {"v" : 1 , "type":"end"} \n', EndEvent()),  # whitespace: the version check's slow path
    (b'{"\\u0076":1,"type":"reset","ts":0}', ResetEvent(0.0)),  # an escaped key "v"
    (b'{"v":1,"type":"generate","n":1}', GenerateEvent(1)),
    (
        b'{"v":1,"type":"generate","n":1000,"temperature":0.7,"top_k":5,"greedy":true,'
        b'"seed":9223372036854775807,"ts":1.5}',
        GenerateEvent(1000, 0.7, 5, True, 2**63 - 1, 1.5),
    ),
    (b'{"v":1,"type":"generate","n":3,"temperature":2,"seed":null}', GenerateEvent(3, 2.0)),
    (b'{"v":1,"type":"tokens","tokens":["h","e",17],"ts":1.5}', TokensEvent(["h", "e", 17], 1.5)),
    (b'{"tokens":[""],"type":"tokens","v":1}', TokensEvent([""])),
    (b'{"v":1,"type":"tokens","tokens":[' + b'"a",' * 255 + b'"b"]}', TokensEvent(["a"] * 255 + ["b"])),
]  # fmt: skip

# (value, reason, a piece of the detail that tells the producer what to fix)
INVALID: list[tuple[bytes | None, str, str]] = [
    (b"hello", "not_json", "not valid JSON"),
    (b'{"v":1,"type":"token","token":"a"', "not_json", "not valid JSON"),
    (b'{"v":1,"type":"token","token":"a"} {}', "not_json", "trailing characters"),
    (b'{"v":1,"type":"token","token":"a","ts":NaN}', "not_json", "not valid JSON"),
    (b'{"v":1,"type":"token","token":"a","ts":Infinity}', "not_json", "not valid JSON"),
    (b"", "not_json", "the value is empty"),
    (b'{"v":1,"type":"token","token":"\xff"}', "not_json", "not UTF-8 (invalid byte at offset 31"),
    (b"\x80\x81garbage", "not_json", "not UTF-8 (invalid byte at offset 0"),
    (None, "not_json", "tombstone"),
    (b"[" * 3000, "not_object", "JSON array, not an object"),
    (b'"token"', "not_object", "JSON string, not an object"),
    (b"17", "not_object", "JSON integer"),
    (b"null", "not_object", "JSON null"),
    (b'{"type":"token","token":"a"}', "missing_field", 'add "v": 1'),
    (b'{"type":"token","token":"v","ts":1}', "missing_field", "'v'"),
    (b'{"v":1,"token":"a"}', "missing_field", "field 'type' is missing"),
    (b'{"v":1,"type":"token"}', "missing_field", "field 'token' is missing"),
    (b'{"v":1,"type":"generate","top_k":3}', "missing_field", "'n' is missing; it must be an integer from 1 to 1000"),
    (b'{"v":1,"type":"token","token":"a","colour":"red"}', "extra_field", "field 'colour' is not allowed on 'token' events"),
    (b'{"label":"spam","v":1,"type":"end","why":1}', "extra_field", "allowed: ['type', 'ts', 'v', 'label']"),
    (b'{"label":"","v":1,"type":"end"}', "bad_value", "'label'"),
    (b'{"label":7,"v":1,"type":"end"}', "wrong_type", "'label'"),
    (b'{"v":1,"type":"token","token":true}', "wrong_type", "got boolean true (true/false is not a number)"),
    (b'{"v":1,"type":"token","token":1.0}', "wrong_type", "got number 1.0 (a number with a fraction"),
    (b'{"v":1,"type":"token","token":null}', "wrong_type", "got null"),
    (b'{"v":1,"type":"token","token":["a"]}', "wrong_type", "got array"),
    (b'{"v":1,"type":"token","token":"a","ts":"now"}', "wrong_type", "'ts' must be a finite number"),
    (b'{"v":1,"type":"generate","n":true}', "wrong_type", "'n' must be an integer from 1 to 1000"),
    (b'{"v":1,"type":"generate","n":2.5}', "wrong_type", "got number 2.5"),
    (b'{"v":1,"type":"generate","n":2,"greedy":1}', "wrong_type", "'greedy' must be true or false"),
    (b'{"v":1,"type":"generate","n":2,"seed":"7"}', "wrong_type", "'seed'"),
    (b'{"v":1,"type":7}', "wrong_type", "'type' must be a string"),
    (b'{"v":2,"type":"token","token":"a"}', "bad_version", 'schema version "v": 2; this worker understands v=1'),
    (b'{"v":true,"type":"token","token":"a"}', "bad_version", '"v": true'),
    (b'{"v":"1","type":"end"}', "bad_version", '"v": "1"'),
    (b'{"v":1,"type":"tick"}', "bad_value", 'unknown event type "tick"'),
    (b'{"v":1,"type":"generate","n":0}', "bad_value", "'n' is out of range (got 0)"),
    (b'{"v":1,"type":"generate","n":1001}', "bad_value", "from 1 to 1000"),
    (b'{"v":1,"type":"generate","n":99999999999999999999999999}', "bad_value", "got 99999999999999999999999999"),
    (b'{"v":1,"type":"generate","n":5,"temperature":0}', "bad_value", "'temperature' is out of range (got 0); it must be a finite number > 0"),
    (b'{"v":1,"type":"generate","n":5,"temperature":-0.5}', "bad_value", "'temperature'"),
    (b'{"v":1,"type":"generate","n":5,"temperature":1e999}', "bad_value", "beyond the double range"),
    (b'{"v":1,"type":"generate","n":5,"top_k":-1}', "bad_value", "'top_k'"),
    (b'{"v":1,"type":"generate","n":5,"seed":-1}', "bad_value", "'seed'"),
    (b'{"v":1,"type":"generate","n":5,"seed":9223372036854775808}', "bad_value", "2**63-1"),
    (b'{"v":1,"type":"token","token":"a","ts":-1}', "bad_value", "'ts' is out of range (got -1)"),
    (b'{"v":1,"type":"token","token":"a","ts":1e999}', "bad_value", "'ts'"),
    (b'{"v":1,"type":"token","token":"a","ts":' + b"9" * 400 + b"}", "bad_value", "'ts'"),
    (b'{"v":1,"type":"token","token":"' + b"x" * 5000 + b'"}', "oversized", "over this worker's limit of 4096"),
    (b"\xff" * (DEFAULT_MAX_BYTES + 1), "oversized", "4097 bytes"),
    # chunks: a bad token rejects the whole chunk, and the detail names its index
    (b'{"v":1,"type":"tokens","tokens":["a",true]}', "wrong_type", "token 1 of 'tokens' must be a string token"),
    (b'{"v":1,"type":"tokens","tokens":["a","b",1.5]}', "wrong_type", "token 2 of 'tokens' must be a string token (looked up in the vocabulary) or an integer token id, got number 1.5 (a number with a fraction"),
    (b'{"v":1,"type":"tokens","tokens":[null]}', "wrong_type", "token 0 of 'tokens' must be a string token (looked up in the vocabulary) or an integer token id, got null;"),
    (b'{"v":1,"type":"tokens","tokens":[["a"]]}', "wrong_type", "token 0 of 'tokens'"),
    (b'{"v":1,"type":"tokens","tokens":[1,1e999]}', "bad_value", "token 1 of 'tokens' is out of range (got a number beyond the double range)"),
    (b'{"v":1,"type":"tokens","tokens":"hello"}', "wrong_type", "'tokens' must be an array of 1 to max_chunk_tokens"),
    (b'{"v":1,"type":"tokens","tokens":[]}', "bad_value", "'tokens' is empty"),
    (b'{"v":1,"type":"tokens"}', "missing_field", "field 'tokens' is missing"),
    (b'{"v":1,"type":"tokens","tokens":["a"],"token":"b"}', "extra_field", "allowed: ['type', 'tokens', 'ts', 'v']"),
    (b'{"type":"tokens","tokens":["a"]}', "missing_field", 'add "v": 1'),
    (b'{"v":1,"type":"tokens","tokens":[' + b'"a",' * 256 + b'"b"]}', "oversized", "holds 257 tokens, over this worker's limit of 256"),
]  # fmt: skip


@pytest.mark.parametrize(("value", "expected"), VALID)
def test_valid_events_decode_to_structs(value: bytes, expected: Any) -> None:
    event = decode_event(value)
    assert event == expected
    assert type(event) is type(expected)


@pytest.mark.parametrize(("value", "reason", "detail"), INVALID)
def test_each_rejection_has_its_reason_and_detail(
    value: bytes | None, reason: str, detail: str
) -> None:
    with pytest.raises(Rejected) as info:
        decode_event(value)  # type: ignore[arg-type]  # None: a Kafka tombstone
    assert (info.value.reason, info.value.reason in REASONS) == (reason, True)
    assert detail in info.value.detail


def test_every_decode_reason_is_covered() -> None:
    engine_only = {"missing_key", "unknown_token", "token_out_of_range", "unknown_key"}
    assert {reason for _, reason, _ in INVALID} == set(REASONS) - engine_only


def test_size_is_checked_before_parsing() -> None:
    value = b'{"v":1,"type":"token","token":"' + b"x" * 100 + b'"}'
    assert decode_event(value, max_bytes=len(value)) == TokenEvent("x" * 100)
    with pytest.raises(Rejected, match="oversized"):
        decode_event(value, max_bytes=len(value) - 1)
    with pytest.raises(Rejected, match="oversized"):  # garbage too: never parsed
        decode_event(b"\x00" * 10, max_bytes=9)


def test_decode_batch_matches_decode_event() -> None:
    values: list[Any] = [v for v, _ in VALID] + [v for v, _, _ in INVALID]
    values.append(bytearray(b'{"v":1,"type":"token","token":"a"}'))
    batch = decode_batch(values)
    assert len(batch) == len(values)
    for value, got in zip(values, batch, strict=True):
        try:
            expected: Any = decode_event(value)
        except Rejected as err:
            assert isinstance(got, Rejected)
            assert (got.reason, got.detail) == (err.reason, err.detail)
        else:
            assert got == expected


def test_decode_key() -> None:
    assert decode_key("user-é".encode()) == "user-é"
    for key, detail in [(None, "no key"), (b"", "no key"), (b"\xfe", "not UTF-8")]:
        with pytest.raises(Rejected, match="missing_key") as info:
            decode_key(key)
        assert detail in info.value.detail


@pytest.mark.parametrize("event", [e for _, e in VALID])
def test_encode_event_round_trips(event: Any) -> None:
    assert decode_event(encode_event(event)) == event


def test_encode_event_from_dict_defaults_the_version() -> None:
    data = encode_event({"type": "token", "token": 7, "ts": 1.5})
    assert orjson.loads(data) == {"type": "token", "token": 7, "ts": 1.5, "v": 1}
    assert decode_event(encode_event({"type": "generate", "n": 4})) == GenerateEvent(4)


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        ({"type": "token", "token": True}, "wrong_type"),
        ({"type": "token", "token": "a", "ts": float("nan")}, "bad_value"),
        ({"type": "end", "v": 2}, "bad_version"),
        ({"type": "reset", "colour": 1}, "extra_field"),
        ({"token": "a"}, "missing_field"),
        (GenerateEvent(n=0), "bad_value"),  # structs are not validated on construction
        (TokenEvent(token=1.5), "wrong_type"),  # type: ignore[arg-type]
        ({"type": "token", "token": "\ud800"}, "not_json"),  # a lone surrogate
    ],
)
def test_encode_event_validates(event: Any, reason: str) -> None:
    with pytest.raises(Rejected) as info:
        encode_event(event)
    assert info.value.reason == reason


def _vocab() -> Vocab:
    return Vocab.from_tokens(["a", "b", "c"], "char")  # ids: 4 specials, then a=4 b=5 c=6


def test_resolve_token_ids_and_strings() -> None:
    vocab = _vocab()
    assert [resolve_token(t, vocab) for t in ("a", "c", 4, 6, 1, 2, 3, "<eos>")] == [
        4, 6, 4, 6, 1, 2, 3, 3,
    ]  # fmt: skip
    assert resolve_token("zz", vocab) == vocab.unk_id
    with pytest.raises(Rejected, match="unknown_token") as info:
        resolve_token("zz", vocab, unknown="reject")
    assert "'zz' is not in the model's vocabulary (7 tokens)" in info.value.detail


@pytest.mark.parametrize(
    ("token", "detail"),
    [
        (0, "token id 0 is <pad>"),
        ("<pad>", "token id 0 is <pad>"),
        (7, "token id 7 is outside this model's vocabulary of 7 tokens (ids 1 to 6)"),
        (-1, "token id -1 is outside"),
        (10**40, "token id 10000000000000000000000000000000000000000 is outside"),
    ],
)
def test_resolve_token_out_of_range(token: str | int, detail: str) -> None:
    with pytest.raises(Rejected, match="token_out_of_range") as info:
        resolve_token(token, _vocab(), unknown="reject")
    assert detail in info.value.detail


def test_resolve_token_checks_its_mode() -> None:
    with pytest.raises(ValueError, match="use 'unk' or 'reject'"):
        resolve_token("a", _vocab(), unknown="drop")  # type: ignore[arg-type]


PREDICTION = {
    "v": 1, "key": "k", "id": "0:17", "seq": 2, "pos": 9, "model_version": "v3",
    "type": "next", "next": {"tokens": ["a", "<eos>"], "probs": [0.6000000238418579, 0.1]},
    "latency_s": None, "ts": 1_700_000_000.123456,
}  # fmt: skip


def test_prediction_round_trip() -> None:
    assert decode_prediction(encode_prediction(PREDICTION)) == PREDICTION
    label = {**PREDICTION, "type": "label", "pos": None, "label": "x", "probs": {"x": 1.0}}
    del label["next"]
    assert decode_prediction(encode_prediction(label, validate=True)) == label


@pytest.mark.parametrize(
    "change",
    [{"type": "guess"}, {"seq": -1}, {"v": 2}, {"extra": 1}, {"next": {"tokens": []}}],
)
def test_malformed_predictions(change: dict[str, Any]) -> None:
    with pytest.raises(MalformedMessage, match="not a valid prediction"):
        decode_prediction(encode_prediction({**PREDICTION, **change}))


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.none(), st.binary(max_size=64)), st.binary(max_size=512))
def test_dead_letter_keeps_the_original_bytes(key: bytes | None, value: bytes) -> None:
    data = encode_dead_letter(
        reason="not_json", detail="d", topic="tokens", partition=3, offset=99, key=key,
        value=value, ts=1.0,
    )  # fmt: skip
    letter = decode_dead_letter(data)
    assert (letter["key"], letter["value"]) == (key, value)
    assert {k: letter[k] for k in ("v", "reason", "topic", "partition", "offset", "ts")} == {
        "v": 1, "reason": "not_json", "topic": "tokens", "partition": 3, "offset": 99, "ts": 1.0,
    }  # fmt: skip
    assert isinstance(letter["value_b64"], str)


def test_dead_letter_edge_cases() -> None:
    data = encode_dead_letter(
        reason="not_json", detail="tombstone", topic="t", partition=0, offset=0, key=b"k",
        value=None,
    )  # fmt: skip
    assert decode_dead_letter(data)["value"] == b""
    with pytest.raises(ValueError, match="unknown dead-letter reason 'nope'"):
        encode_dead_letter(
            reason="nope",  # type: ignore[arg-type]
            detail="", topic="t", partition=0, offset=0, key=None, value=b"",
        )  # fmt: skip
    with pytest.raises(MalformedMessage, match="not a valid dead letter"):
        decode_dead_letter(b'{"v":1,"reason":"not_json"}')


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
_event_keys = st.sampled_from(
    ["v", "type", "token", "ts", "n", "temperature", "top_k", "greedy", "seed"]
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_ever_raise_rejected(value: bytes) -> None:
    try:
        decode_event(value)
    except Rejected as err:
        assert err.reason in REASONS and err.detail


@settings(max_examples=300, deadline=None)
@given(_json | st.dictionaries(_event_keys, _json, max_size=6))
def test_random_json_only_ever_raises_rejected(obj: Any) -> None:
    # allow_nan: the stdlib writes NaN/Infinity, which must come back as not_json
    value = json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
    try:
        event = decode_event(value)
    except Rejected as err:
        assert err.reason in REASONS and err.detail
    else:
        assert decode_event(encode_event(event)) == event


def test_end_may_carry_the_sequences_label() -> None:
    event = decode_event(b'{"v":1,"type":"end","label":"en"}')
    assert isinstance(event, EndEvent) and event.label == "en"
    assert decode_event(b'{"v":1,"type":"end"}') == EndEvent()


def test_the_chunk_limit_is_the_workers() -> None:
    value = b'{"v":1,"type":"tokens","tokens":["a","b","c"]}'
    assert decode_event(value, max_tokens=3) == TokensEvent(["a", "b", "c"])
    with pytest.raises(Rejected, match="oversized") as info:
        decode_event(value, max_tokens=2)
    assert "STREAM_RNN_MAX_CHUNK_TOKENS" in info.value.detail
    batch = decode_batch([value, value.replace(b',"c"', b"")], max_tokens=2)
    assert isinstance(batch[0], Rejected) and batch[0].reason == "oversized"
    assert batch[1] == TokensEvent(["a", "b"])


def test_encode_event_checks_chunks_like_the_worker() -> None:
    data = encode_event({"type": "tokens", "tokens": ["a", 5], "ts": 2.0})
    assert orjson.loads(data) == {"type": "tokens", "tokens": ["a", 5], "ts": 2.0, "v": 1}
    with pytest.raises(Rejected, match="oversized"):
        encode_event(TokensEvent(["a"] * 300))
    data = encode_event(TokensEvent(["a"] * 300), max_tokens=300)
    assert decode_event(data, max_tokens=300) == TokensEvent(["a"] * 300)
    for bad, reason in [([], "bad_value"), (["a", True], "wrong_type"), (["\ud800"], "not_json")]:
        with pytest.raises(Rejected) as info:
            encode_event(TokensEvent(bad))  # type: ignore[arg-type]
        assert info.value.reason == reason


def test_resolve_tokens_names_the_bad_tokens_index() -> None:
    vocab = _vocab()  # a=4 b=5 c=6, 7 ids
    assert resolve_tokens(["a", "b", "c"], vocab) == [4, 5, 6]
    assert resolve_tokens([4, 6, 1], vocab) == [4, 6, 1]
    assert resolve_tokens(["a", 5, "zz", "<eos>"], vocab) == [4, 5, vocab.unk_id, 3]
    cases = [
        (["a", "zz"], "unknown_token", "token 1 of the chunk: token 'zz' is not in"),
        (["a", "b", 7], "token_out_of_range", "token 2 of the chunk: token id 7 is outside"),
        ([0, "a"], "token_out_of_range", "token 0 of the chunk: token id 0 is <pad>"),
        (["<pad>"], "token_out_of_range", "token 0 of the chunk: token id 0 is <pad>"),
        ([4, -1], "token_out_of_range", "token 1 of the chunk: token id -1"),
    ]
    for tokens, reason, detail in cases:
        with pytest.raises(Rejected) as info:
            resolve_tokens(tokens, vocab, unknown="reject")
        assert (info.value.reason, info.value.detail[: len(detail)]) == (reason, detail)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(["a", "b", "c", "zz", "<pad>", "<eos>"]), st.integers(-2, 9)), min_size=1, max_size=12))  # fmt: skip
def test_resolve_tokens_equals_resolve_token_per_token(tokens: list[str | int]) -> None:
    vocab = _vocab()
    for unknown in ("unk", "reject"):
        try:
            want: list[int] | str = [resolve_token(t, vocab, unknown=unknown) for t in tokens]  # type: ignore[arg-type]
        except Rejected as err:
            want = err.reason
        try:
            got: list[int] | str = resolve_tokens(tokens, vocab, unknown=unknown)  # type: ignore[arg-type]
        except Rejected as err:
            got = err.reason
        assert got == want
