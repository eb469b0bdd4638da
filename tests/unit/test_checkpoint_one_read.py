"""Every checkpoint load reads each file once, refuses links and non-regular files, bounds
sizes, and loads exactly the bytes it verified (issue 17, "one read").

Each of these failed on the loader that hashed a file and then opened it again by name."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from stream_rnn.model.config import ModelConfig
from stream_rnn.model.network import RecurrentModel
from stream_rnn.registry import safe_read
from stream_rnn.registry.checkpoint import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    Manifest,
    load_checkpoint,
    load_verified,
    read_manifest,
    read_manifest_with_sha256,
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


class _SwapAfterHash:
    """Stands in for ``hashlib.sha256``: once the digest of ``target`` bytes is taken, runs
    ``swap`` — whatever the loader's structure, the file changes right after its check."""

    def __init__(self, real: Callable[..., Any], target: str, swap: Callable[[], None]) -> None:
        self.real, self.target, self.swap, self.fired = real, target, swap, False

    def __call__(self, *args: Any, **kw: Any) -> Any:
        outer = self
        inner = self.real(*args, **kw)

        class _Digest:
            def update(self, data: bytes) -> None:
                inner.update(data)

            def digest(self) -> bytes:
                return bytes(inner.digest())

            def hexdigest(self) -> str:
                value = str(inner.hexdigest())
                if value == outer.target and not outer.fired:
                    outer.fired = True
                    outer.swap()
                return value

        return _Digest()


def test_weights_replaced_right_after_their_hash_are_not_what_is_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No hook into the loader: the swap fires when the weights' sha256 is computed. A loader
    that hashes a file and then opens it again loads the attacker's tensors; this one loads the
    bytes it hashed."""
    good = _save(tmp_path / "good", seed=1)
    _save(tmp_path / "evil", seed=2)
    target = read_manifest(tmp_path / "good").weights_sha256

    def swap() -> None:
        os.replace(tmp_path / "evil" / WEIGHTS_FILE, tmp_path / "good" / WEIGHTS_FILE)

    hook = _SwapAfterHash(hashlib.sha256, target, swap)
    monkeypatch.setattr(hashlib, "sha256", hook)
    model, manifest = load_checkpoint(tmp_path / "good")
    assert hook.fired  # the file on disk is now the attacker's
    assert manifest.weights_sha256 == target
    for name, tensor in good.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor)


def test_a_file_that_grows_past_the_cap_while_read_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fstat said small (the file grew after it), the reader still stops at cap + 1 bytes."""
    (tmp_path / "f").write_bytes(b"x" * 10_000)
    real_fstat, real_read = os.fstat, os.read
    read: list[int] = []

    def small_fstat(fd: int) -> os.stat_result:
        info = real_fstat(fd)
        return os.stat_result((*info[:6], 0, *info[7:10]))

    def counting_read(fd: int, n: int) -> bytes:
        data = real_read(fd, n)
        read.append(len(data))
        return data

    monkeypatch.setattr(os, "fstat", small_fstat)
    monkeypatch.setattr(os, "read", counting_read)
    with pytest.raises(CheckpointError, match="more than 100 bytes.*unreadable"):
        safe_read.read_file_once(tmp_path, "f", limit=100)
    assert sum(read) == 101


@settings(max_examples=40, deadline=None)
@given(content=st.binary(max_size=300), limit=st.integers(min_value=0, max_value=300))
def test_read_file_once_returns_the_file_iff_it_fits(content: bytes, limit: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "f").write_bytes(content)
        if len(content) <= limit:
            assert safe_read.read_file_once(root, "f", limit=limit) == content
        else:
            with pytest.raises(CheckpointError, match="more than"):
                safe_read.read_file_once(root, "f", limit=limit)


def test_the_happy_path_loads_what_an_independent_reader_sees(tmp_path: Path) -> None:
    """Same tensors and manifest as reading the files with safetensors and json directly, and
    the reported hashes are those of the files."""
    _save(tmp_path / "v", seed=3)
    raw_manifest = (tmp_path / "v" / MANIFEST_FILE).read_bytes()
    raw_weights = (tmp_path / "v" / WEIGHTS_FILE).read_bytes()
    found = load_verified(tmp_path / "v")
    assert found.manifest == Manifest.from_dict(json.loads(raw_manifest), tmp_path)
    assert found.manifest_sha256 == hashlib.sha256(raw_manifest).hexdigest()
    assert found.weights_sha256 == hashlib.sha256(raw_weights).hexdigest()
    reference = load_file(str(tmp_path / "v" / WEIGHTS_FILE))
    state = found.model.state_dict()
    assert set(state) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor)
    assert not found.model.training
    model, manifest = load_checkpoint(tmp_path / "v")
    assert manifest == found.manifest
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())


def test_the_manifest_and_its_sha256_come_from_one_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What an announcement carries (manifest fields and manifest sha256) describes one set
    of bytes, even if the file is replaced right after it was read."""
    _save(tmp_path / "v", seed=1)
    _save(tmp_path / "evil", seed=2)
    raw = (tmp_path / "v" / MANIFEST_FILE).read_bytes()
    real = safe_read.read_file_once

    def read_then_swap(directory: Path, name: str, **kw: Any) -> bytes:
        data = real(directory, name, **kw)
        os.replace(tmp_path / "evil" / MANIFEST_FILE, directory / MANIFEST_FILE)
        return data

    monkeypatch.setattr("stream_rnn.registry.checkpoint.read_file_once", read_then_swap)
    manifest, sha = read_manifest_with_sha256(tmp_path / "v")
    assert sha == hashlib.sha256(raw).hexdigest()
    assert manifest == Manifest.from_dict(json.loads(raw), tmp_path)
    (tmp_path / "link").symlink_to(tmp_path / "v")
    with pytest.raises(CheckpointError, match="symbolic link"):
        read_manifest_with_sha256(tmp_path / "link")
