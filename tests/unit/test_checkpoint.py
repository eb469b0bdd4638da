"""Checkpoints: plain names, verified loading, no unpickling, manifest contents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stream_rnn.model import ModelConfig, RecurrentModel
from stream_rnn.registry import CheckpointError, load_checkpoint, read_manifest, save_checkpoint
from stream_rnn.registry.checkpoint import sha256_file
from stream_rnn.train.vocab import Vocab

VOCAB = Vocab.build(["abcdefgh"], "char")


def _model(**kw) -> RecurrentModel:
    base = dict(task="next-token", cell="lstm", vocab_size=len(VOCAB), embed_dim=6, hidden_size=8)
    base.update(kw)
    torch.manual_seed(1)
    return RecurrentModel(ModelConfig(**base))


def test_plain_pytorch_names_for_a_stacked_model(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _model(num_layers=2), vocab=VOCAB.to_dict())
    names = set(load_file(str(tmp_path / "weights.safetensors")))
    expected = {"embedding.weight", "decoder.weight", "decoder.bias"} | {
        f"rnn.{kind}_l{layer}"
        for layer in (0, 1)
        for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    }
    assert names == expected


def test_bidirectional_and_seq2seq_names(tmp_path: Path) -> None:
    bi = _model(task="classify", num_labels=3, bidirectional=True, cell="gru")
    save_checkpoint(tmp_path / "bi", bi, vocab=VOCAB.to_dict(), labels=["a", "b", "c"])
    names = set(load_file(str(tmp_path / "bi" / "weights.safetensors")))
    assert {"rnn.weight_ih_l0_reverse", "rnn.bias_hh_l0_reverse"} <= names
    s2s = _model(task="seq2seq", bidirectional=True)
    save_checkpoint(tmp_path / "s2s", s2s, vocab=VOCAB.to_dict())
    names = set(load_file(str(tmp_path / "s2s" / "weights.safetensors")))
    assert {"encoder.embedding.weight", "encoder.rnn.weight_ih_l0_reverse"} <= names
    assert {"embedding.weight", "rnn.weight_hh_l0", "decoder.weight", "bridge.weight"} <= names


@pytest.mark.parametrize("task", ["next-token", "classify", "tag", "seq2seq"])
def test_round_trip_rebuilds_from_manifest_and_gives_identical_outputs(task, tmp_path: Path):
    labels = ["x", "y"] if task in ("classify", "tag") else None
    model = _model(task=task, num_labels=2 if labels else 0, num_layers=2, dropout=0.1).eval()
    manifest = save_checkpoint(
        tmp_path, model, vocab=VOCAB.to_dict(), labels=labels, metrics={"loss": 1.5}
    )
    loaded, read = load_checkpoint(tmp_path)
    assert loaded.config == model.config and not loaded.training
    assert read.version == manifest.version and read.metrics == {"loss": 1.5}
    x = torch.randint(0, len(VOCAB), (2, 5))
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])


def test_manifest_fields(tmp_path: Path) -> None:
    save_checkpoint(
        tmp_path,
        _model(),
        vocab=VOCAB.to_dict(),
        parent_version="m-parent",
        training={"epochs": 3},
        metrics={"valid": {"loss": 2.0}},
    )
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["format_version"] == 1
    assert data["model_config"]["cell"] == "lstm"
    assert data["vocab"]["itos"][:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert data["parent_version"] == "m-parent"
    assert data["training"] == {"epochs": 3}
    assert data["weights_sha256"] == sha256_file(tmp_path / "weights.safetensors")
    assert data["version"].startswith("m-") and data["created_at"] > 0


def test_tied_weights_survive_a_round_trip(tmp_path: Path) -> None:
    model = _model(embed_dim=8, tie_weights=True)
    save_checkpoint(tmp_path, model, vocab=VOCAB.to_dict())
    loaded, _ = load_checkpoint(tmp_path)
    assert loaded.decoder.weight is loaded.embedding.weight
    assert torch.equal(loaded.decoder.weight, model.decoder.weight)


def _rewrite(tmp_path: Path, mutate) -> None:
    """Change the weights file and re-sign it, so only the content check can object."""
    path = tmp_path / "weights.safetensors"
    tensors = load_file(str(path))
    mutate(tensors)
    save_file(tensors, str(path))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["weights_sha256"] = sha256_file(path)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _model(), vocab=VOCAB.to_dict())
    path = tmp_path / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the manifest"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.pop("rnn.bias_hh_l0"), r"missing tensors \['rnn.bias_hh_l0'\]"),
        (lambda t: t.update({"decoder.bias": torch.zeros(3)}), "has shape"),
        (lambda t: t["rnn.weight_hh_l0"].__setitem__((0, 0), float("nan")), "non-finite"),
        (lambda t: t.update({"extra.weight": torch.zeros(1)}), "unexpected tensors"),
    ],
)
def test_inconsistent_weights_are_refused(tmp_path: Path, mutate, message) -> None:
    save_checkpoint(tmp_path, _model(), vocab=VOCAB.to_dict())
    _rewrite(tmp_path, mutate)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path)


def test_missing_or_foreign_checkpoints_explain_themselves(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, _model(), vocab=VOCAB.to_dict())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format_version 99 is not supported"):
        read_manifest(tmp_path)


def test_package_never_unpickles() -> None:
    """Weights are data, never code: no torch.load / pickle anywhere in the package."""
    root = Path(__file__).resolve().parents[2] / "stream_rnn"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "torch.load(" not in text, path
        assert "import pickle" not in text and "pickle.load" not in text, path
