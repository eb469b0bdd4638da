"""The Kafka-free adapter: raw records -> engine events -> wire predictions and dead letters."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
import torch

from stream_rnn.engine.engine import Engine
from stream_rnn.engine.events import END, GENERATE, RESET, TOKEN, BatchResult, Event, Rejection
from stream_rnn.model import ModelConfig, RecurrentModel
from stream_rnn.predict.offline import score_records
from stream_rnn.registry.checkpoint import Manifest
from stream_rnn.stream.adapter import MIN_TEMPERATURE, Adapter, RawRecord
from stream_rnn.stream.codec import decode_dead_letter, decode_prediction
from stream_rnn.stream.collect import to_lines
from stream_rnn.stream.encoder import finalise
from stream_rnn.stream.sensors import CountingSensor
from stream_rnn.train.data import Record
from stream_rnn.train.vocab import Vocab

VOCAB = Vocab.from_tokens(["a", "b", "c"], "char")  # ids: a=4, b=5, c=6


class FakeClock:
    """A wall clock the test sets (the adapter reads it once per decode/finish)."""

    def __init__(self, now: float = 1_700_000_100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _rec(
    value: bytes | None, key: bytes | None = b"k1", offset: int = 0, part: int = 2
) -> RawRecord:
    return RawRecord(key, value, "tokens", part, offset, 1_700_000_000.0)


def _engine(task: str = "next-token", labels: list[str] | None = None) -> Engine:
    torch.manual_seed(3)
    cfg = ModelConfig(
        task=task,
        cell="lstm",
        vocab_size=len(VOCAB),
        embed_dim=4,
        hidden_size=6,
        num_labels=len(labels) if labels else 0,
    )
    manifest = Manifest(
        model_config=cfg.to_dict(),
        vocab=VOCAB.to_dict(),
        weights_sha256="0" * 64,
        version="m-adapter",
        labels=labels,
    )
    return Engine(RecurrentModel(cfg).eval(), manifest, capacity=4)


def _letters(adapter_out: list[tuple[bytes | None, bytes]]) -> list[dict[str, Any]]:
    return [decode_dead_letter(value) for _, value in adapter_out]


def test_valid_records_become_engine_events() -> None:
    adapter = Adapter()
    batch = adapter.decode(
        [
            _rec(b'{"v":1,"type":"token","token":"b","ts":1700000000.5}', offset=10),
            _rec(b'{"v":1,"type":"token","token":6}', offset=11),
            _rec(b'{"v":1,"type":"token","token":"zz"}', offset=12),  # unknown -> <unk>
            _rec(b'{"v":1,"type":"end"}', offset=13),
            _rec(b'{"v":1,"type":"reset","ts":3}', b"k2", offset=14),
            _rec(b'{"v":1,"type":"generate","n":4,"top_k":2,"seed":7}', "é".encode(), 15),
        ],
        VOCAB,
    )
    assert batch.dead_letters == []
    got = [(e.key, e.kind, e.token, e.id, e.ts) for e in batch.events]
    assert got == [
        ("k1", TOKEN, 5, "2:10", 1_700_000_000.5),
        ("k1", TOKEN, 6, "2:11", None),
        ("k1", TOKEN, VOCAB.unk_id, "2:12", None),
        ("k1", END, -1, "2:13", None),
        ("k2", RESET, -1, "2:14", 3.0),
        ("é", GENERATE, -1, "2:15", None),
    ]
    gen = batch.events[-1].gen
    assert gen is not None and (gen.n, gen.top_k, gen.seed, gen.temperature) == (4, 2, 7, 1.0)
    assert set(batch.records) == {f"2:{o}" for o in range(10, 16)}


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (b"k", b"{nope", "not_json"),
        (b"k", None, "not_json"),  # a tombstone
        (b"k", b"[1]", "not_object"),
        (b"k", b'{"type":"token","token":"a"}', "missing_field"),
        (b"k", b'{"v":1,"type":"token","token":"a","x":0}', "extra_field"),
        (b"k", b'{"v":1,"type":"token","token":true}', "wrong_type"),
        (b"k", b'{"v":2,"type":"token","token":"a"}', "bad_version"),
        (None, b'{"v":1,"type":"token","token":"a"}', "missing_key"),
        (b"", b'{"v":1,"type":"token","token":"a"}', "missing_key"),
        (b"\xff", b'{"v":1,"type":"token","token":"a"}', "missing_key"),
        (b"k", b'{"v":1,"type":"token","token":"zz"}', "unknown_token"),
        (b"k", b'{"v":1,"type":"token","token":"<pad>"}', "token_out_of_range"),
        (b"k", b'{"v":1,"type":"token","token":7}', "token_out_of_range"),
        (b"k", b'{"v":1,"type":"token","token":0}', "token_out_of_range"),
        (b"k", b'{"v":1,"type":"token","token":"' + b"a" * 100 + b'"}', "oversized"),
        (b"k", b'{"v":1,"type":"generate","n":0}', "bad_value"),
        (b"k", b'{"v":1,"type":"generate","n":3,"temperature":1e-300}', "bad_value"),
    ],
)
def test_rejected_records_become_dead_letters_with_their_bytes(
    key: bytes | None, value: bytes | None, reason: str
) -> None:
    sensor = CountingSensor()
    adapter = Adapter(unknown="reject", max_bytes=64, sensor=sensor, clock=FakeClock())
    good = _rec(b'{"v":1,"type":"token","token":"a"}', offset=4)
    batch = adapter.decode([good, RawRecord(key, value, "tokens", 1, 99, None), good], VOCAB)
    assert [e.id for e in batch.events] == ["2:4", "2:4"]
    [letter] = _letters(batch.dead_letters)
    assert letter["reason"] == reason, letter["detail"]
    assert (letter["topic"], letter["partition"], letter["offset"]) == ("tokens", 1, 99)
    assert letter["value"] == (value or b"") and letter["key"] == key
    assert letter["ts"] == 1_700_000_100.0 and letter["detail"]
    assert batch.dead_letters[0][0] == key  # the dead letter keeps the original message key
    assert sensor.dead_letters == {reason: 1}


def test_engine_rejections_carry_the_original_record() -> None:
    engine = _engine()
    adapter = Adapter(clock=FakeClock())
    ghost = b'{"v":1,"type":"end","ts":1}'
    out = adapter.process(
        [
            _rec(b'{"v":1,"type":"token","token":"a"}', b"k1", 0),
            _rec(ghost, b"ghost", 1),  # end for a key that never sent a token
            _rec(b'{"v":1,"type":"reset"}', b"ghost2", 2),
        ],
        engine,
    )
    letters = _letters(out.dead_letters)
    assert [(d["reason"], d["offset"], d["key"]) for d in letters] == [
        ("unknown_key", 1, b"ghost"),
        ("unknown_key", 2, b"ghost2"),
    ]
    assert letters[0]["value"] == ghost and "ghost" in letters[0]["detail"]
    assert len(out.predictions) == 1 and out.tokens == 1


def test_predictions_are_finalised_and_match_the_schema() -> None:
    clock = FakeClock(1_700_000_002.0)
    sensor = CountingSensor()
    adapter = Adapter(clock=clock, sensor=sensor)
    out = adapter.process(
        [
            _rec(b'{"v":1,"type":"token","token":"a","ts":1700000001.5}', b"u", 0),
            _rec(b'{"v":1,"type":"token","token":"c"}', b"u", 1),
            _rec(b'{"v":1,"type":"end","ts":1700000001.0}', b"u", 2),
        ],
        _engine(),
    )
    preds = [decode_prediction(value) for _, value in out.predictions]  # validates the schema
    assert [k for k, _ in out.predictions] == [b"u", b"u", b"u"]
    assert [p["type"] for p in preds] == ["next", "next", "end"]
    assert [p["latency_s"] for p in preds] == [0.5, None, 1.0]
    assert all(p["ts"] == clock.now and p["v"] == 1 for p in preds)
    assert preds[2]["n_tokens"] == 2 and [p["pos"] for p in preds] == [0, 1, None]
    assert all(b'"_ts"' not in value for _, value in out.predictions)
    assert (sensor.batches, sensor.events, sensor.tokens, sensor.predictions) == (1, 3, 2, 3)
    assert sensor.seconds > 0
    # what the metrics read: types, latencies of the events that carried a ts, tokens per
    # source partition, the network pass and the batch size
    assert sensor.predictions_by_type == {"next": 2, "end": 1}
    assert (sensor.latency.count, sensor.latency.total) == (2, 1.5)
    assert sensor.tokens_by_partition == {2: 2}
    assert sensor.step.count == 1 and sensor.batch_tokens.total == 2


def test_finalise_in_place() -> None:
    pred = {"key": "k", "type": "reset", "_ts": None}
    assert finalise(pred, 5.0) is pred
    assert pred == {"key": "k", "type": "reset", "latency_s": None, "ts": 5.0, "v": 1}


def test_streamed_through_the_adapter_equals_offline_scoring() -> None:
    labels = ["x", "y"]
    engine = _engine("classify", labels)
    rng = random.Random(5)
    records = [
        Record(f"key-{i}", tokens=[rng.choice("abc") for _ in range(rng.randint(1, 9))])
        for i in range(12)
    ]
    # Interleave all sequences at random (per-key order kept), end each one.
    queues = {r.key: [*r.tokens, None] for r in records if r.tokens}
    raws: list[RawRecord] = []
    while queues:
        key = rng.choice(sorted(queues))
        tok = queues[key].pop(0)
        ev = {"v": 1, "type": "end"} if tok is None else {"v": 1, "type": "token", "token": tok}
        raws.append(RawRecord(key.encode(), orjson.dumps(ev), "t", 0, len(raws)))
        if not queues[key]:
            del queues[key]
    adapter = Adapter()
    preds = []
    for start in range(0, len(raws), 7):
        out = adapter.process(raws[start : start + 7], engine)
        assert out.dead_letters == []
        preds += [decode_prediction(v) for _, v in out.predictions]
    lines = {line["key"]: line for line in to_lines(preds)}
    for want in score_records(engine.model, engine.manifest, records):
        got = lines[want["key"]]
        assert got["label"] == want["label"]
        assert list(got["probs"].values()) == pytest.approx(list(want["probs"].values()), abs=1e-5)


def test_outputs_are_grouped_by_source_partition() -> None:
    """Exactly-once puts each output into the transaction of the partition that caused it."""
    adapter = Adapter()
    records = [
        RawRecord(b"k1", b'{"v":1,"type":"token","token":"a"}', "t", 2, 10),
        RawRecord(b"k2", b"not json", "t", 0, 4),
        RawRecord(b"k3", b'{"v":1,"type":"token","token":"b"}', "t", 0, 5),
        RawRecord(b"k1", b'{"v":1,"type":"token","token":"b"}', "t", 2, 11),
    ]
    out = adapter.process(records, _engine())
    grouped = out.by_source()
    assert sorted(grouped) == [0, 2]
    assert [decode_prediction(v)["id"] for _, v in grouped[2][0]] == ["2:10", "2:11"]
    assert [decode_prediction(v)["id"] for _, v in grouped[0][0]] == ["0:5"]
    assert [d["offset"] for d in _letters(grouped[0][1])] == [4] and grouped[2][1] == []


def test_engine_rejection_of_a_generate_becomes_a_dead_letter() -> None:
    adapter = Adapter()
    batch = adapter.decode([_rec(b'{"v":1,"type":"generate","n":2}', offset=3)], VOCAB)
    result = BatchResult(rejections=[Rejection(batch.events[0], "bad_value", "not next-token")])
    [letter] = _letters(adapter.finish(batch, result).dead_letters)
    assert (letter["reason"], letter["offset"]) == ("bad_value", 3)


def test_greedy_ignores_the_temperature_floor() -> None:
    value = b'{"v":1,"type":"generate","n":2,"greedy":true,"temperature":1e-300}'
    batch = Adapter().decode([_rec(value)], VOCAB)
    assert batch.dead_letters == [] and isinstance(batch.events[0], Event)
    assert MIN_TEMPERATURE > 1e-300


def test_unknown_policy_is_checked() -> None:
    with pytest.raises(ValueError, match="'drop'"):
        Adapter(unknown="drop")  # type: ignore[arg-type]


def test_chunks_become_one_engine_event_each() -> None:
    batch = Adapter().decode(
        [
            _rec(b'{"v":1,"type":"tokens","tokens":["a","b",6,"zz"],"ts":5}', offset=20),
            _rec(b'{"v":1,"type":"tokens","tokens":[4]}', b"k2", offset=21),
        ],
        VOCAB,
    )
    assert batch.dead_letters == []
    got = [(e.key, e.kind, e.token, e.tokens, e.id, e.ts, e.offset) for e in batch.events]
    assert got == [
        ("k1", TOKEN, -1, [4, 5, 6, VOCAB.unk_id], "2:20", 5.0, 20),  # unknown -> <unk>
        ("k2", TOKEN, -1, [4], "2:21", None, 21),
    ]


@pytest.mark.parametrize(
    ("value", "reason", "detail"),
    [
        (b'{"v":1,"type":"tokens","tokens":["a","b","zz"]}', "unknown_token", "token 2 of the chunk: token 'zz'"),
        (b'{"v":1,"type":"tokens","tokens":["a",7]}', "token_out_of_range", "token 1 of the chunk: token id 7"),
        (b'{"v":1,"type":"tokens","tokens":[0]}', "token_out_of_range", "token 0 of the chunk: token id 0 is <pad>"),
        (b'{"v":1,"type":"tokens","tokens":["a",false]}', "wrong_type", "token 1 of 'tokens'"),
        (b'{"v":1,"type":"tokens","tokens":[]}', "bad_value", "'tokens' is empty"),
        (b'{"v":1,"type":"tokens","tokens":["a","a","a","a","a"]}', "oversized", "holds 5 tokens, over this worker's limit of 4"),
        (b'{"v":1,"type":"tokens","tokens":["' + b"a" * 60 + b'"]}', "oversized", "bytes, over this worker's limit of 64"),
    ],
)  # fmt: skip
def test_a_bad_chunk_is_dead_lettered_whole(value: bytes, reason: str, detail: str) -> None:
    engine = _engine()
    adapter = Adapter(unknown="reject", max_bytes=64, max_tokens=4, clock=FakeClock())
    good = b'{"v":1,"type":"tokens","tokens":["a","b"]}'
    out = adapter.process(
        [_rec(good, offset=1), _rec(value, offset=2), _rec(good, offset=3)], engine
    )
    [letter] = _letters(out.dead_letters)
    assert (letter["reason"], letter["offset"], letter["value"]) == (reason, 2, value)
    assert detail in letter["detail"], letter["detail"]
    # nothing of the bad chunk reached the key's state: the good chunks are positions 0..3
    preds = [decode_prediction(v) for _, v in out.predictions]
    assert [(p["id"], p["pos"], p["pos_to"]) for p in preds] == [("2:1", 0, 1), ("2:3", 2, 3)]
    assert out.tokens == 4


def test_chunk_predictions_on_the_wire() -> None:
    clock = FakeClock(1_700_000_003.0)
    sensor = CountingSensor()
    adapter = Adapter(clock=clock, sensor=sensor)
    out = adapter.process(
        [
            _rec(b'{"v":1,"type":"token","token":"a","ts":1700000002.0}', b"u", 5, part=1),
            _rec(b'{"v":1,"type":"tokens","tokens":["b","c","a"],"ts":1700000002.5}', b"u", 6, 1),
            _rec(b'{"v":1,"type":"tokens","tokens":["c"]}', b"w", 2, part=3),
            _rec(b'{"v":1,"type":"end"}', b"u", 7, part=1),
        ],
        _engine(),
    )
    preds = [decode_prediction(value) for _, value in out.predictions]  # validates the schema
    assert [(p["type"], p["id"], p["pos"], p.get("pos_to")) for p in preds] == [
        ("next", "1:5", 0, None),
        ("next_chunk", "1:6", 1, 3),
        ("next_chunk", "3:2", 0, 0),
        ("end", "1:7", None, None),
    ]
    assert [len(p["next"]) for p in preds[1:3]] == [3, 1]
    assert [p["latency_s"] for p in preds] == [1.0, 0.5, None, None]
    assert preds[3]["n_tokens"] == 4 and out.prediction_parts == [1, 1, 3, 1]
    assert [k for k, _ in out.predictions] == [b"u", b"u", b"w", b"u"]
    assert (sensor.events, sensor.tokens, sensor.predictions) == (4, 5, 4)


@pytest.mark.parametrize("task", ["next-token", "tag", "classify"])
def test_the_columnar_encoder_writes_what_the_prediction_dicts_say(task: str) -> None:
    from stream_rnn.stream.codec import encode_prediction
    from stream_rnn.stream.encoder import PredictionEncoder

    labels = None if task == "next-token" else ["x", "y", "z"]
    torch.manual_seed(3)
    cfg = ModelConfig(task=task, cell="gru", vocab_size=len(VOCAB), embed_dim=4, hidden_size=6,
                      num_labels=len(labels) if labels else 0)  # fmt: skip
    manifest = Manifest(model_config=cfg.to_dict(), vocab=VOCAB.to_dict(), weights_sha256="0" * 64,
                        version="m", labels=labels)  # fmt: skip
    rng = random.Random(2)
    for chunks in (False, True):
        engine = Engine(RecurrentModel(cfg).eval(), manifest, running_estimate=True)
        events = []
        for i in range(40):
            key, ts = f"k{rng.randrange(6)}", rng.choice([None, 1_700_000_000.25])
            if chunks and rng.random() < 0.6:
                ids = [rng.randrange(4, 7) for _ in range(rng.randint(1, 5))]
                events.append(Event(key, TOKEN, -1, f"{i % 3}:{i}", ts, None, i % 3, i, ids))
            else:
                events.append(
                    Event(key, TOKEN, rng.randrange(4, 7), f"{i % 3}:{i}", ts, None, i % 3, i)
                )
        events.insert(20, Event("k0", END, id="0:99", partition=0, offset=99))
        result = engine.process(events)
        keys, values, parts = PredictionEncoder().encode(result, 1_700_000_001.0)
        want = [encode_prediction(finalise(dict(p), 1_700_000_001.0)) for p in result.predictions]
        assert [decode_prediction(v) for v in values] == [decode_prediction(v) for v in want]
        assert keys == [p["key"].encode() for p in result.predictions]
        assert parts == [int(p["id"].split(":")[0]) for p in result.predictions]


def test_chunked_and_per_token_streams_collect_to_the_same_lines() -> None:
    rng = random.Random(8)
    records = [
        Record(f"key-{i}", tokens=[rng.choice("abc") for _ in range(rng.randint(1, 12))])
        for i in range(10)
    ]

    def stream(chunked: bool) -> list[dict[str, Any]]:
        engine, adapter = _engine(), Adapter()
        queues = {r.key: list(r.tokens or []) for r in records}
        raws: list[RawRecord] = []
        while queues:
            key = rng.choice(sorted(queues))
            n = rng.randint(1, 4) if chunked else 1
            piece, queues[key] = queues[key][:n], queues[key][n:]
            if chunked and (n > 1 or rng.random() < 0.5):
                ev: dict[str, Any] = {"v": 1, "type": "tokens", "tokens": piece}
            else:
                ev = {"v": 1, "type": "token", "token": piece[0]}
            raws.append(RawRecord(key.encode(), orjson.dumps(ev), "t", 0, len(raws)))
            if not queues[key]:
                del queues[key]
                raws.append(RawRecord(key.encode(), b'{"v":1,"type":"end"}', "t", 0, len(raws)))
        preds: list[dict[str, Any]] = []
        for start in range(0, len(raws), 5):
            out = adapter.process(raws[start : start + 5], engine)
            preds += [decode_prediction(v) for _, v in out.predictions]
        return to_lines(preds)

    per_token, chunked = stream(False), stream(True)
    assert [(line["key"], len(line["next"])) for line in chunked] == [
        (line["key"], len(line["next"])) for line in per_token
    ]
    for a, b in zip(chunked, per_token, strict=True):
        for x, y in zip(a["next"], b["next"], strict=True):
            assert x["probs"] == pytest.approx(y["probs"], abs=1e-6)


def test_collections_wait_while_a_batch_is_processed() -> None:
    import gc

    class Probe:
        seen: list[bool] = []
        served = SimpleNamespace(vocab=VOCAB)

        def process(self, events: list[Event], served: object = None) -> BatchResult:
            self.seen.append(gc.isenabled())
            if len(self.seen) == 2:
                raise RuntimeError("engine fault")
            return BatchResult()

    probe, adapter = Probe(), Adapter()
    adapter.process([], probe)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="engine fault"):
        adapter.process([], probe)  # type: ignore[arg-type]
    assert probe.seen == [False, False] and gc.isenabled()  # back on, even after a fault
    gc.disable()  # an application that runs without automatic collection keeps it off
    try:
        adapter.process([], probe)  # type: ignore[arg-type]
        assert not gc.isenabled()
    finally:
        gc.enable()
