"""Every checkpoint load reads each file once, refuses links and non-regular files, bounds
sizes, and loads exactly the bytes it verified (issue 17, "one read").

Each of these failed on the loader that hashed a file and then opened it again by name."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from stream_rnn.model.config import ModelConfig
from stream_rnn.model.network import RecurrentModel
from stream_rnn.registry import safe_read
from stream_rnn.registry.checkpoint import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    load_checkpoint,
    load_verified,
    read_manifest,
    save_checkpoint,
)
from stream_rnn.registry.exceptions import CheckpointError
from stream_rnn.train.vocab import Vocab

VOCAB = Vocab.from_tokens(list("abc"), "char").to_dict()


def _save(where: Path, seed: int) -> RecurrentModel:
    torch.manual_seed(seed)
    model = RecurrentModel(
        ModelConfig(task="next-token", cell="gru", vocab_size=7, hidden_size=4, embed_dim=3)
    )
    save_checkpoint(where, model, vocab=VOCAB)
    return model


def test_a_file_swapped_after_its_check_is_never_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attacker replaces the weights (with another model's, manifest included) right
    after the loader read them: what is loaded is what was hashed, read once per file."""
    good = _save(tmp_path / "good", seed=1)
    _save(tmp_path / "evil", seed=2)
    reads: list[str] = []
    real = safe_read.read_file_once

    def read_then_swap(directory: Path, name: str, **kw: object) -> bytes:
        data = real(directory, name, **kw)  # type: ignore[arg-type]
        reads.append(name)
        if name == WEIGHTS_FILE:  # swap both files once the loader has its bytes
            for f in (WEIGHTS_FILE, MANIFEST_FILE):
                os.replace(tmp_path / "evil" / f, directory / f)
        return data

    monkeypatch.setattr("stream_rnn.registry.checkpoint.read_file_once", read_then_swap)
    opened: list[str] = []
    real_open = os.open

    def counting_open(path: object, flags: int, *args: object, **kw: object) -> int:
        opened.append(str(path))
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", counting_open)
    model, _ = load_checkpoint(tmp_path / "good")
    assert reads == [MANIFEST_FILE, WEIGHTS_FILE]
    assert opened.count(WEIGHTS_FILE) == 1 and opened.count(MANIFEST_FILE) == 1
    for name, tensor in good.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor)


@pytest.mark.parametrize("target", [WEIGHTS_FILE, MANIFEST_FILE])
def test_symbolic_links_are_refused(tmp_path: Path, target: str) -> None:
    _save(tmp_path / "v", seed=1)
    real = tmp_path / f"real-{target}"
    os.replace(tmp_path / "v" / target, real)
    (tmp_path / "v" / target).symlink_to(real)
    with pytest.raises(CheckpointError, match="symbolic link"):
        load_checkpoint(tmp_path / "v")


def test_a_linked_version_directory_is_refused(tmp_path: Path) -> None:
    _save(tmp_path / "v", seed=1)
    (tmp_path / "link").symlink_to(tmp_path / "v")
    with pytest.raises(CheckpointError, match="symbolic link"):
        load_checkpoint(tmp_path / "link")
    with pytest.raises(CheckpointError, match="symbolic link"):
        read_manifest(tmp_path / "link")


@pytest.mark.timeout(30)
def test_a_fifo_or_directory_in_place_of_the_weights_is_refused_without_waiting(
    tmp_path: Path,
) -> None:
    _save(tmp_path / "v", seed=1)
    (tmp_path / "v" / WEIGHTS_FILE).unlink()
    os.mkfifo(tmp_path / "v" / WEIGHTS_FILE)  # a reader of a FIFO would wait for a writer
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint(tmp_path / "v")
    (tmp_path / "v" / WEIGHTS_FILE).unlink()
    (tmp_path / "v" / WEIGHTS_FILE).mkdir()
    with pytest.raises(CheckpointError, match="not a regular file|unreadable"):
        load_checkpoint(tmp_path / "v")


def test_files_over_the_caps_are_refused(tmp_path: Path) -> None:
    _save(tmp_path / "v", seed=1)
    size = (tmp_path / "v" / WEIGHTS_FILE).stat().st_size
    with pytest.raises(CheckpointError, match="more than"):
        load_verified(tmp_path / "v", max_weights_bytes=size - 1)
    with pytest.raises(CheckpointError, match="more than"):
        load_verified(tmp_path / "v", max_manifest_bytes=100)
    assert load_verified(tmp_path / "v", max_weights_bytes=size).weights_sha256


def test_the_announced_manifest_hash_is_checked_on_the_bytes_parsed(tmp_path: Path) -> None:
    _save(tmp_path / "v", seed=1)
    raw = (tmp_path / "v" / MANIFEST_FILE).read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    found = load_verified(tmp_path / "v", expect_manifest_sha256=sha)
    assert found.manifest_sha256 == sha and found.manifest == read_manifest(tmp_path / "v")
    with pytest.raises(CheckpointError, match="does not match the manifest"):
        load_verified(tmp_path / "v", expect_manifest_sha256="0" * 64)
    with pytest.raises(CheckpointError, match="does not match the manifest"):
        load_verified(tmp_path / "v", expect_weights_sha256="0" * 64)
