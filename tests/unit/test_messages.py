"""Message schemas: reason codes, the shipped JSON Schemas, and their agreement with the codec."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, get_args

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_rnn.stream.codec import decode_event, encode_dead_letter, encode_prediction
from stream_rnn.stream.exceptions import MalformedMessage, Rejected, StreamError
from stream_rnn.stream.messages import (
    CHUNK_TYPES,
    EVENT_FIELDS,
    EVENT_TYPES,
    SCHEMA_NAMES,
    EndEvent,
    Event,
    GenerateEvent,
    Prediction,
    ResetEvent,
    TokenEvent,
    build_schema,
    load_schema,
    schema_path,
    write_schemas,
)
from stream_rnn.stream.reasons import REASONS, Reason

try:  # a dev dependency: without it only the tests that validate against the schemas skip
    import jsonschema
except ImportError:  # pragma: no cover
    jsonschema = None

COMMON = {"v": 1, "key": "user-1", "id": "3:1041", "seq": 0, "model_version": "m-7"}
PREDICTIONS: list[dict[str, Any]] = [
    {**COMMON, "pos": 4, "type": "next", "next": {"tokens": ["a", "b"], "probs": [0.7, 0.2]}},
    {**COMMON, "pos": 4, "type": "estimate", "label": "en", "probs": {"en": 0.9, "fr": 0.1}},
    {**COMMON, "pos": None, "type": "label", "label": "fr", "probs": {"en": 0.25, "fr": 0.75}},
    {**COMMON, "pos": 0, "type": "tag", "tag": "NOUN", "prob": 0.5},
    {**COMMON, "pos": None, "type": "translation", "output": "a b", "output_tokens": ["a", "b"]},
    {**COMMON, "pos": None, "type": "generated", "tokens": ["x", "y"], "text": "xy"},
    {**COMMON, "pos": None, "type": "end", "n_tokens": 12},
    {**COMMON, "pos": None, "seq": 3, "type": "reset"},
    {**COMMON, "pos": 4, "pos_to": 5, "type": "next_chunk",
     "next": [{"tokens": ["a", "b"], "probs": [0.7, 0.2]}, {"tokens": ["b", "a"], "probs": [0.6, 0.3]}]},
    {**COMMON, "pos": 0, "pos_to": 1, "type": "estimate_chunk", "label": ["en", "fr"],
     "probs": [{"en": 0.9, "fr": 0.1}, {"en": 0.4, "fr": 0.6}]},
    {**COMMON, "pos": 7, "pos_to": 7, "type": "tag_chunk", "tag": ["NOUN"], "prob": [0.5]},
]  # fmt: skip
for _p in PREDICTIONS:
    _p.update(latency_s=0.004, ts=1_700_000_000.5)


def _validator(name: str) -> Any:
    if jsonschema is None:
        pytest.skip("jsonschema is not installed (pip install jsonschema)")
    return jsonschema.Draft202012Validator(load_schema(name))


def test_reason_codes_are_all_documented() -> None:
    assert set(REASONS) == set(get_args(Reason))
    assert len(REASONS) == 12
    assert all(isinstance(doc, str) and len(doc) > 20 for doc in REASONS.values())


def test_event_fields_match_the_structs() -> None:
    assert tuple(EVENT_FIELDS) == EVENT_TYPES
    assert EVENT_FIELDS["token"] == ("type", "token", "ts", "v")
    assert EVENT_FIELDS["tokens"] == ("type", "tokens", "ts", "v")
    assert EVENT_FIELDS["generate"][1:] == GenerateEvent.__struct_fields__


def test_struct_defaults() -> None:
    assert GenerateEvent(n=5) == GenerateEvent(5, 1.0, 0, False, None, None, 1)
    assert TokenEvent("a") == TokenEvent("a", None, 1)
    assert EndEvent().v == ResetEvent().v == 1


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_checked_in_schema_equals_generated(name: str) -> None:
    assert schema_path(name).name == f"{name}.schema.json"
    assert load_schema(name) == build_schema(name), (
        f"{schema_path(name)} is stale: run python -m stream_rnn.stream.messages"
    )


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_schema_is_valid_draft_2020_12(name: str) -> None:
    schema = load_schema(name)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    type(_validator(name)).check_schema(schema)


def test_write_schemas_round_trips(tmp_path: Path) -> None:
    paths = write_schemas(tmp_path)
    assert [p.name for p in paths] == [f"{n}.schema.json" for n in SCHEMA_NAMES]
    assert all(orjson.loads(p.read_bytes()) == build_schema(p.name[:-12]) for p in paths)


def test_unknown_schema_name() -> None:
    with pytest.raises(StreamError, match=r"unknown schema 'tokens'.*token_event"):
        schema_path("tokens")


def test_event_schemas_require_the_version() -> None:
    token = _validator("token_event")
    assert token.is_valid({"v": 1, "type": "token", "token": "a", "ts": 1.5})
    assert token.is_valid({"v": 1, "type": "token", "token": 7})
    assert not token.is_valid({"type": "token", "token": "a"})
    assert not token.is_valid({"v": 2, "type": "token", "token": "a"})
    assert not token.is_valid({"v": 1, "type": "token", "token": True})
    assert not token.is_valid({"v": 1, "type": "token", "token": "a", "x": 0})
    tokens = _validator("tokens_event")
    assert tokens.is_valid({"v": 1, "type": "tokens", "tokens": ["h", 17], "ts": 1.5})
    assert not tokens.is_valid({"v": 1, "type": "tokens", "tokens": []})
    assert not tokens.is_valid({"v": 1, "type": "tokens", "tokens": ["a", True]})
    assert not tokens.is_valid({"v": 1, "type": "tokens", "tokens": "ab"})
    assert not tokens.is_valid({"type": "tokens", "tokens": ["a"]})
    control = _validator("control_event")
    assert control.is_valid({"v": 1, "type": "generate", "n": 3, "seed": None})
    assert control.is_valid({"v": 1, "type": "end"})
    assert not control.is_valid({"v": 1, "type": "generate", "n": 1001})
    assert not control.is_valid({"v": 1, "type": "generate", "n": 3, "temperature": 0})
    assert not control.is_valid({"v": 1, "type": "token", "token": "a"})


@pytest.mark.parametrize("pred", PREDICTIONS, ids=lambda p: p["type"])
def test_sample_predictions_match_the_schema(pred: dict[str, Any]) -> None:
    _validator("prediction").validate(orjson.loads(encode_prediction(pred, validate=True)))


def test_prediction_schema_rejects_what_the_codec_rejects() -> None:
    bad = {**PREDICTIONS[0], "id": "not-an-id"}
    assert not _validator("prediction").is_valid(bad)
    with pytest.raises(MalformedMessage, match="not a valid prediction"):
        encode_prediction(bad, validate=True)


def test_dead_letter_matches_the_schema() -> None:
    data = encode_dead_letter(
        reason="oversized", detail="too big", topic="t", partition=1, offset=2, key=None,
        value=b"\x00\xff",
    )  # fmt: skip
    _validator("dead_letter").validate(orjson.loads(data))
    assert not _validator("dead_letter").is_valid({**orjson.loads(data), "reason": "nope"})


def test_rejected_pickles_and_prints() -> None:
    err = pickle.loads(pickle.dumps(Rejected("bad_value", "n is 0; send 1..1000")))  # noqa: S301
    assert (err.reason, err.detail) == ("bad_value", "n is 0; send 1..1000")
    assert str(err) == "bad_value: n is 0; send 1..1000"
    assert isinstance(err, StreamError) and isinstance(err, ValueError)


# Values chosen so that JSON Schema and the typed decoder may legitimately agree: no integral
# floats (JSON Schema counts 2.0 as an integer; the wire decoder, like Python, does not).
_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2, 1000, 1001, 0.5, -1.5, 1.7e9 + 0.25]),
    st.text(max_size=5),
    st.sampled_from(EVENT_TYPES + ("tok",)),
    st.lists(st.integers(), max_size=2),
    st.lists(st.one_of(st.text(max_size=2), st.integers(), st.booleans()), max_size=3),
)
_plausible = st.sampled_from([None, 0, 1, 3, 1000, 0.5, 1.7e9 + 0.25, "a", "é"])
# Half plausible, half anything: about a fifth of the events drawn below stay valid.
_value = st.tuples(st.booleans(), _plausible, _values).map(lambda t: t[1] if t[0] else t[2])


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(EVENT_TYPES), st.integers(0, 3).map(bool), st.data())
def test_codec_and_json_schemas_accept_the_same_events(
    typ: str, with_version: bool, data: st.DataObject
) -> None:
    # A valid event with up to two of its fields (rarely an unknown one) set to random values.
    names = st.sampled_from(
        [f for f in EVENT_FIELDS[typ] if f not in ("type", "v")] * 4 + ["v", "x"]
    )
    fields = data.draw(st.dictionaries(names, _value, max_size=2))
    bases: dict[str, dict[str, Any]] = {
        "token": {"token": "a"},
        "tokens": {"tokens": ["a", 5]},
        "generate": {"n": 3},
    }
    base = bases.get(typ, {})
    obj: dict[str, Any] = {"type": typ, **({"v": 1} if with_version else {}), **base, **fields}
    schema = {"token": "token_event", "tokens": "tokens_event"}.get(typ, "control_event")
    try:
        # json, not orjson: orjson cannot write the integers past 64 bits drawn here
        event: Event | None = decode_event(json.dumps(obj).encode())
    except Rejected:
        event = None
    assert (event is not None) == _validator(schema).is_valid(obj), obj


def test_chunk_predictions_carry_the_per_token_fields_as_lists() -> None:
    by_tag = {cls.__struct_config__.tag: cls for cls in get_args(Prediction)}
    base = set(by_tag["reset"].__struct_fields__)
    for chunk, (kind, fields) in CHUNK_TYPES.items():
        assert set(by_tag[kind].__struct_fields__) - base == set(fields)
        assert set(by_tag[chunk].__struct_fields__) - base == {*fields, "pos_to"}
    schema = load_schema("prediction")["$defs"]
    assert schema["NextChunkPrediction"]["properties"]["next"]["type"] == "array"
    assert schema["TagChunkPrediction"]["properties"]["pos"]["minimum"] == 0
