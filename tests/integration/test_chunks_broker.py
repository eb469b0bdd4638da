"""Token chunks on the real broker: a worker fed chunks and single tokens == per-token == offline.

Half of the sequences go through ``stream-rnn produce --chunk 4`` (coalesced chunks, a lone
token after the linger going out as a ``token`` event), the other half through a
`TokenProducer` that coalesces but breaks every third token out as a single ``token`` event
(so chunks and single tokens interleave within keys). Collected lines must equal offline
scoring exactly as per-token streams do; malformed chunks must be dead-lettered whole, the
detail naming the bad token's index, without touching their key's state.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from stream_harness import (
    StreamTopicsFactory,
    WorkerFactory,
    assert_matches_offline,
    expected_count,
    make_model,
    run_cli,
)

from stream_rnn.producer import TokenProducer
from stream_rnn.stream.codec import decode_dead_letter
from stream_rnn.stream.collect import collect, read_predictions
from stream_rnn.stream.messages import TokenEvent
from stream_rnn.train.data import records_to_events, write_records

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
WAIT_S = 120.0
BAD_CHUNKS = {  # value -> (reason, what the detail must say)
    b'{"v":1,"type":"tokens","tokens":["a",99999,"e"]}': (
        "token_out_of_range",
        "token 1 of the chunk: token id 99999 is outside",
    ),
    b'{"v":1,"type":"tokens","tokens":["a","e","\xc2\xa7"]}': (
        "unknown_token",
        "token 2 of the chunk: token '\u00a7' is not in the model's vocabulary",
    ),
    b'{"v":1,"type":"tokens","tokens":["a",true]}': ("wrong_type", "token 1 of 'tokens'"),
    # over the worker's STREAM_RNN_MAX_CHUNK_TOKENS (8 here)
    orjson.dumps({"v": 1, "type": "tokens", "tokens": ["a"] * 9}): (
        "oversized",
        "holds 9 tokens, over this worker's limit of 8",
    ),
}


def _covered(task_total: int) -> Any:
    """``until`` for collect: predictions for ``task_total`` tokens and ends have arrived."""

    def enough(preds: list[dict[str, Any]]) -> bool:
        n = 0
        for p in preds:
            if p["type"] == "next_chunk":
                n += p["pos_to"] - p["pos"] + 1
            elif p["type"] in ("next", "end"):
                n += 1
        return n >= task_total

    return enough


def _dead_letters(bootstrap: str, topic: str, expected: int) -> list[dict[str, Any]]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        letters: list[dict[str, Any]] = []
        deadline = time.monotonic() + WAIT_S
        while len(letters) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                letters += [decode_dead_letter(rec.value) for rec in batch]
        return letters
    finally:
        consumer.close()


def test_chunks_and_single_tokens_equal_offline_and_bad_chunks_are_dead_lettered(
    tmp_path: Path,
    kafka_broker: str,
    stream_topics: StreamTopicsFactory,
    worker_factory: WorkerFactory,
) -> None:
    model_dir, _, records = make_model(tmp_path, "next-token", 30, seed=6)
    topics = stream_topics(partitions=2)
    worker = worker_factory(
        model_dir, *topics.worker_args(), "--max-batch", "32", "--unknown", "reject",
        env={"STREAM_RNN_MAX_CHUNK_TOKENS": "8"},
    )  # fmt: skip
    worker.wait_until(lambda s: len(s["assigned"]) == 2, "both partitions assigned")

    keys = sorted({r.key for r in records})
    cli_keys = set(keys[::2])
    cli_data = tmp_path / "cli.jsonl"
    write_records(cli_data, [r for r in records if r.key in cli_keys])
    out = run_cli("produce", "--data", str(cli_data), "--bootstrap", kafka_broker,
                  "--topic", topics.tokens, "--interleave-seed", "3", "--chunk", "4",
                  "--linger-ms", "2")  # fmt: skip
    assert " messages to " in out  # fewer messages than events: chunks went out

    mine = [r for r in records if r.key not in cli_keys]
    with TokenProducer(kafka_broker, topics.tokens, max_tokens=5, linger_ms=3) as producer:
        for i, ev in enumerate(records_to_events(mine, interleave_seed=5)):
            if ev["type"] == "end":
                producer.send_end(ev["key"])
            elif i % 3 == 0:  # a single token event between the key's chunks
                producer.send(ev["key"], TokenEvent(ev["token"]))
            else:
                producer.send_token(ev["key"], ev["token"])
    raw = KafkaProducer(bootstrap_servers=kafka_broker, acks="all")
    for value in BAD_CHUNKS:  # rejected whole before the engine: no key's lines may change
        raw.send(topics.tokens, key=keys[1].encode(), value=value)
    raw.flush(30)
    raw.close()

    total = expected_count("next-token", records)
    lines = collect(kafka_broker, topics.predictions, timeout_s=WAIT_S, max_wait_s=WAIT_S,
                    until=_covered(total))  # fmt: skip
    assert_matches_offline(lines, model_dir, records)

    preds = read_predictions(kafka_broker, topics.predictions, timeout_s=2, max_wait_s=WAIT_S)
    kinds = {p["type"] for p in preds}
    assert {"next_chunk", "next", "end"} <= kinds, kinds
    chunks = [p for p in preds if p["type"] == "next_chunk"]
    assert 2 <= max(p["pos_to"] - p["pos"] + 1 for p in chunks) <= 5
    assert all(len(p["next"]) == p["pos_to"] - p["pos"] + 1 for p in chunks)
    assert len(preds) < total  # one prediction per chunk

    letters = _dead_letters(kafka_broker, topics.dead_letters, len(BAD_CHUNKS))
    assert len(letters) == len(BAD_CHUNKS)
    for letter in letters:
        reason, detail = BAD_CHUNKS[letter["value"]]
        assert letter["reason"] == reason and detail in letter["detail"], letter
        assert letter["key"] == keys[1].encode() and letter["topic"] == topics.tokens
    status = worker.status()
    assert status is not None and sum(status["dead_letters"].values()) == len(BAD_CHUNKS)
    assert status["predictions"] == len(preds)
    assert worker.stop() == 0
