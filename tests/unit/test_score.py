"""Offline scoring: the line format later compared against streaming, line by line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stream_rnn.model import ModelConfig, RecurrentModel
from stream_rnn.predict.offline import score_records
from stream_rnn.registry import load_checkpoint, save_checkpoint
from stream_rnn.train.data import (
    Record,
    read_records,
    records_to_events,
    write_events,
    write_records,
)
from stream_rnn.train.vocab import Vocab

VOCAB = Vocab.build(["abcdefghij klm"], "char")
RECORDS = [
    Record(key="k1", text="abcab", label="x", tags=list("ppqpq"), target="cba"),
    Record(key="k2", text="hij", label="y", tags=list("qqp"), target="ih"),
    Record(key="k3", text="a", label="x", tags=["p"], target="a"),
]


def _checkpoint(tmp_path: Path, task: str, labels=None):
    torch.manual_seed(5)
    cfg = ModelConfig(
        task=task,
        cell="gru",
        vocab_size=len(VOCAB),
        embed_dim=8,
        hidden_size=12,
        num_labels=len(labels) if labels else 0,
    )
    save_checkpoint(tmp_path, RecurrentModel(cfg), vocab=VOCAB.to_dict(), labels=labels)
    return load_checkpoint(tmp_path)


def test_classify_lines(tmp_path: Path) -> None:
    model, manifest = _checkpoint(tmp_path, "classify", ["x", "y"])
    lines = list(score_records(model, manifest, RECORDS, batch_size=2))
    assert [line["key"] for line in lines] == ["k1", "k2", "k3"]
    for line, rec in zip(lines, RECORDS, strict=True):
        assert line["model_version"] == manifest.version
        assert set(line["probs"]) == {"x", "y"}
        assert sum(line["probs"].values()) == pytest.approx(1.0, abs=1e-6)
        assert line["label"] == max(line["probs"], key=line["probs"].get)
        with torch.no_grad():
            logits = model.classify(torch.tensor([VOCAB.encode(rec.text)]))
        expected = torch.softmax(logits[0], -1).tolist()
        assert [line["probs"]["x"], line["probs"]["y"]] == pytest.approx(expected, abs=1e-6)


def test_next_token_lines_match_the_streaming_step(tmp_path: Path) -> None:
    model, manifest = _checkpoint(tmp_path, "next-token")
    (line,) = score_records(model, manifest, RECORDS[:1], top_k=5)
    assert len(line["next"]) == 5  # one entry per input token
    state = model.init_state(1)
    for pos, ch in enumerate("abcab"):
        out, state = model.step(torch.tensor([[VOCAB.id_of(ch)]]), state)
        probs = torch.softmax(out[0, 0], -1)
        top = probs.topk(5)
        entry = line["next"][pos]
        assert entry["tokens"] == VOCAB.decode(top.indices.tolist())
        assert entry["probs"] == pytest.approx(top.values.tolist(), abs=1e-5)
        assert entry["probs"] == sorted(entry["probs"], reverse=True)


def test_tag_and_seq2seq_lines(tmp_path: Path) -> None:
    model, manifest = _checkpoint(tmp_path / "t", "tag", ["p", "q"])
    lines = list(score_records(model, manifest, RECORDS))
    assert [len(x["tags"]) for x in lines] == [5, 3, 1]
    assert all(set(x["tags"]) <= {"p", "q"} for x in lines)
    model, manifest = _checkpoint(tmp_path / "s", "seq2seq")
    lines = list(score_records(model, manifest, RECORDS, max_output_len=6))
    assert all(isinstance(x["output"], str) and len(x["output_tokens"]) <= 6 for x in lines)


def test_event_logs_score_like_sequence_files(tmp_path: Path) -> None:
    model, manifest = _checkpoint(tmp_path / "m", "classify", ["x", "y"])
    write_records(tmp_path / "seq.jsonl", RECORDS)
    write_events(tmp_path / "ev.jsonl", records_to_events(RECORDS, interleave_seed=4))
    a = list(score_records(model, manifest, read_records(tmp_path / "seq.jsonl")))
    b = list(score_records(model, manifest, read_records(tmp_path / "ev.jsonl")))
    assert json.dumps(a) == json.dumps(b)
