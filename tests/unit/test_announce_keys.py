"""Announcement keys: Ed25519 pairs and HMAC secrets, their file modes, strength and algorithm."""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

import pytest

from stream_rnn.registry.exceptions import RegistryError
from stream_rnn.registry.keys import UpdateKey, generate_ed25519, load_update_key


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_ed25519_pair_signs_and_only_the_public_half_verifies(tmp_path: Path) -> None:
    private_path, public_path = generate_ed25519(tmp_path / "keys")
    assert private_path.stat().st_mode & 0o777 == 0o600
    private, public = load_update_key(private_path), load_update_key(public_path)
    assert (private.alg, public.alg) == ("ed25519", "ed25519")
    assert private.can_sign and not public.can_sign
    signature = private.sign(b"payload")
    assert len(signature) == 128 and public.verify(b"payload", signature)
    assert not public.verify(b"payload!", signature)
    with pytest.raises(RegistryError, match="cannot sign"):
        public.sign(b"payload")
    other = load_update_key(generate_ed25519(tmp_path / "other")[1])
    assert not other.verify(b"payload", signature)
    with pytest.raises(RegistryError, match="exists"):
        generate_ed25519(tmp_path / "keys")


def test_key_file_modes(tmp_path: Path) -> None:
    private_path, public_path = generate_ed25519(tmp_path)
    public_path.chmod(0o644)
    load_update_key(public_path)  # a public key may be world-readable
    public_path.chmod(0o666)
    with pytest.raises(RegistryError, match="writable by group/others"):
        load_update_key(public_path)
    private_path.chmod(0o640)
    with pytest.raises(RegistryError, match=r"private key file .* \(mode 640\).*chmod 600"):
        load_update_key(private_path)
    secret = _write(tmp_path / "s", base64.b64encode(os.urandom(32)), 0o604)
    with pytest.raises(RegistryError, match="HMAC secret"):
        load_update_key(secret)
    link = tmp_path / "link"
    link.symlink_to(private_path)
    with pytest.raises(RegistryError, match="symlink"):
        load_update_key(link)


@pytest.mark.parametrize(
    "weak",
    [
        b"correct horse battery staple in production",
        b"ThisIsMyVeryLongPasswordForProductionUse",
        b"k" * 40,
        b"abababababababababababababababababab12",
        b"0123456789abcdef0123",  # short
    ],
)
def test_a_passphrase_like_hmac_key_is_refused(tmp_path: Path, weak: bytes) -> None:
    with pytest.raises(RegistryError, match="head -c 32 /dev/urandom | base64"):
        load_update_key(_write(tmp_path / "weak.key", weak))


@pytest.mark.parametrize(
    "make",
    [
        lambda: base64.b64encode(os.urandom(32)),  # the README's recipe
        lambda: secrets.token_urlsafe(32).encode(),  # the demo's
        lambda: secrets.token_hex(32).encode(),
        lambda: b"0123456789abcdef0123456789abcdef",  # the integration tests' (hex, 128 bits)
    ],
)
def test_random_hmac_keys_pass(tmp_path: Path, make) -> None:
    key = load_update_key(_write(tmp_path / "ok.key", make() + b"\n"))
    assert key.alg == "hmac-sha256" and key.can_sign


def test_no_algorithm_confusion(tmp_path: Path) -> None:
    from stream_rnn.registry.announce import ModelUpdate, sign, verify_signature
    from stream_rnn.registry.exceptions import UpdateRejected

    update = ModelUpdate(
        version="m-1", seq=1, registry_id="0" * 32, topic="t", weights_sha256="0" * 64,
        manifest_sha256="0" * 64, architecture={}, policy="keep", published_at=1,
    )  # fmt: skip
    private_path, public_path = generate_ed25519(tmp_path)
    public = load_update_key(public_path)
    # the public key's PEM bytes used as an HMAC secret (what an attacker knows)
    forged = sign(update, UpdateKey.hmac(public_path.read_bytes()))
    with pytest.raises(UpdateRejected, match="signed with hmac-sha256 but") as info:
        verify_signature(forged, public)
    assert info.value.reason == "bad_signature"
    good = sign(update, load_update_key(private_path))
    verify_signature(good, public)
    relabelled = ModelUpdate(**{**good.to_dict(), "alg": "hmac-sha256"})
    with pytest.raises(UpdateRejected):
        verify_signature(relabelled, public)
