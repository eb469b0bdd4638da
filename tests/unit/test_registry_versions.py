"""The model registry: immutable versions, the production pointer, its log and its lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from stream_rnn.model import ModelConfig, RecurrentModel
from stream_rnn.registry import Registry, RegistryError, load_checkpoint, save_checkpoint
from stream_rnn.registry.checkpoint import sha256_file
from stream_rnn.train.vocab import Vocab

VOCAB = Vocab.build(["abcdefgh"], "char")
REPO = Path(__file__).resolve().parents[2]


def _checkpoint(out: Path, *, seed: int = 0, hidden: int = 8, **manifest_kw) -> Path:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        task="next-token", cell="gru", vocab_size=len(VOCAB), embed_dim=4, hidden_size=hidden
    )
    save_checkpoint(out, RecurrentModel(cfg).eval(), vocab=VOCAB.to_dict(), **manifest_kw)
    return out


def _events(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "events.jsonl").read_text().splitlines()]


def test_add_copies_the_checkpoint_unchanged_with_its_metadata(tmp_path: Path) -> None:
    src = _checkpoint(tmp_path / "m1", metrics={"valid_loss": 2.0}, parent_version="m-parent")
    reg = Registry(tmp_path / "reg")
    manifest = reg.add(src, data_window={"from": "2024-01-01"}, metrics={"valid_acc": 0.5})
    where = reg.path(manifest.version)
    assert where == (tmp_path / "reg" / "versions" / manifest.version).absolute()
    for name in ("weights.safetensors", "manifest.json"):
        assert (where / name).read_bytes() == (src / name).read_bytes()
    _, loaded = load_checkpoint(where)
    assert loaded.version == manifest.version
    [info] = reg.list()
    assert info.version == manifest.version and info.parent == "m-parent"
    assert info.metrics == {"valid_loss": 2.0, "valid_acc": 0.5}
    assert info.data_window == {"from": "2024-01-01"}
    assert not info.is_production and info.created_at == manifest.created_at
    assert info.added_at >= manifest.created_at
    assert reg.production() is None
    # nothing half-made is left behind
    assert sorted(p.name for p in (tmp_path / "reg").iterdir()) == [
        ".lock",
        "events.jsonl",
        "versions",
    ]
    assert [e["event"] for e in _events(tmp_path / "reg")] == ["add"]


def test_add_is_idempotent_for_the_same_weights(tmp_path: Path) -> None:
    src = _checkpoint(tmp_path / "m1")
    reg = Registry(tmp_path / "reg")
    first = reg.add(src, metrics={"a": 1})
    again = reg.add(src, metrics={"a": 2})
    assert again.version == first.version and len(reg.list()) == 1
    assert reg.show(first.version).metrics == {"a": 1}  # the first add's metadata stands
    assert len(_events(tmp_path / "reg")) == 1


def test_add_refuses_a_known_version_with_other_weights(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    first = reg.add(_checkpoint(tmp_path / "m1", seed=0))
    impostor = _checkpoint(tmp_path / "m2", seed=1)
    manifest = json.loads((impostor / "manifest.json").read_text())
    manifest["version"] = first.version
    (impostor / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RegistryError, match="already registered with different weights"):
        reg.add(impostor)
    assert sha256_file(reg.path(first.version) / "weights.safetensors") == first.weights_sha256


def test_add_refuses_a_damaged_checkpoint_and_leaves_nothing(tmp_path: Path) -> None:
    src = _checkpoint(tmp_path / "m1")
    weights = src / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    reg = Registry(tmp_path / "reg")
    with pytest.raises(RegistryError, match=r"refusing to add .*m1.*does not match"):
        reg.add(src)
    assert reg.list() == []
    assert not [p for p in (tmp_path / "reg").iterdir() if p.name.startswith(".add-")]
    with pytest.raises(RegistryError, match="not a checkpoint: weights.safetensors is missing"):
        reg.add(tmp_path)


def test_add_refuses_a_version_id_that_is_not_a_directory_name(tmp_path: Path) -> None:
    src = _checkpoint(tmp_path / "m1")
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["version"] = "../escape"
    (src / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RegistryError, match=r"version id '../escape' cannot name"):
        Registry(tmp_path / "reg").add(src)
    assert not (tmp_path / "escape").exists()


def test_promote_and_rollback_walk_the_history(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    reg = Registry(root)
    a, b, c = (reg.add(_checkpoint(tmp_path / n, seed=i)).version for i, n in enumerate("abc"))
    with pytest.raises(RegistryError, match="no earlier production version"):
        reg.rollback()
    assert reg.promote(a) is None
    assert reg.promote(b) == a
    assert reg.promote(b) == b  # no-op: nothing logged, history unchanged
    assert reg.promote(c) == b
    pointer = json.loads((root / "production.json").read_text())
    assert pointer["version"] == c and pointer["history"] == [a, b]
    assert pointer["updated_at"] > 0
    assert [i.version for i in reg.list() if i.is_production] == [c]
    assert reg.rollback() == b
    assert reg.rollback() == a and reg.production() == a and reg.history() == []
    with pytest.raises(RegistryError, match=r"production: m-.*promote a version explicitly"):
        reg.rollback()
    events = _events(root)
    assert [(e["event"], e["version"]) for e in events[3:]] == [
        ("promote", a),
        ("promote", b),
        ("promote", c),
        ("rollback", b),
        ("rollback", a),
    ]
    assert all(e["at"] <= time.time() for e in events)
    assert not [p for p in root.iterdir() if p.name.startswith(".production.json")]


def test_unknown_versions_and_a_damaged_pointer_are_explained(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    assert reg.list() == [] and reg.production() is None
    version = reg.add(_checkpoint(tmp_path / "m1")).version
    with pytest.raises(RegistryError, match=rf"'m-nope' is not in the registry .*known: {version}"):
        reg.promote("m-nope")
    with pytest.raises(RegistryError, match="cannot name a registry directory"):
        reg.show("../x")
    (tmp_path / "reg" / "production.json").write_text('{"version": 3}')
    with pytest.raises(RegistryError, match="production.json is damaged"):
        reg.production()


def test_lineage_follows_parents_through_the_registry(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    a = reg.add(_checkpoint(tmp_path / "a", seed=0)).version
    b = reg.add(_checkpoint(tmp_path / "b", seed=1, parent_version=a)).version
    c = reg.add(_checkpoint(tmp_path / "c", seed=2), parent_version=b).version
    assert reg.lineage(c) == [c, b, a]
    d = reg.add(_checkpoint(tmp_path / "d", seed=3, parent_version="m-elsewhere")).version
    assert reg.lineage(d) == [d, "m-elsewhere"]


_PROMOTER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from stream_rnn.registry.versions import Registry

    root, barrier, rounds, *versions = sys.argv[1:]
    reg = Registry(Path(root))
    # start together: both interpreters are up (importing torch takes seconds)
    (Path(barrier) / str(os.getpid())).touch()
    while len(list(Path(barrier).iterdir())) < 2:
        time.sleep(0.001)
    changed = 0
    for i in range(int(rounds)):
        target = versions[i % len(versions)]
        if reg.promote(target) != target:
            changed += 1
    print(changed)
    """
)


def test_concurrent_promotes_from_two_processes_lose_nothing(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    reg = Registry(root)
    versions = [reg.add(_checkpoint(tmp_path / n, seed=i)).version for i, n in enumerate("abc")]
    reg.promote(versions[0])
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [
        # 100 rounds each: enough overlap that promotes without the lock lose updates
        subprocess.Popen(
            [sys.executable, "-c", _PROMOTER, str(root), str(barrier), "100", *order],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for order in (versions, versions[::-1])
    ]
    changed = 0
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        changed += int(out)
    pointer = json.loads((root / "production.json").read_text())
    # every effective promotion pushed exactly one entry: no read-modify-write was lost
    assert len(pointer["history"]) == changed > 0
    assert pointer["version"] in versions and set(pointer["history"]) <= set(versions)
    promotes = [e for e in _events(root) if e["event"] == "promote"]
    assert len(promotes) == changed + 1
    # the history is a chain: each entry was production right before the next promotion
    chain = [*pointer["history"], pointer["version"]]
    assert [e["version"] for e in promotes] == chain
    assert [e["previous"] for e in promotes[1:]] == chain[:-1]


def test_swap_history_records_each_promotion_policy_and_reads_old_logs(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    v1 = reg.add(_checkpoint(tmp_path / "m1", seed=1)).version
    v2 = reg.add(_checkpoint(tmp_path / "m2", seed=2)).version
    assert reg.swap_history() == []
    reg.promote(v1, policy="keep")
    reg.promote(v2, policy="reset")
    reg.promote(v2, policy="keep")  # already production: not a swap
    reg.rollback(policy="rewarm")
    assert reg.swap_history() == [(v1, "keep"), (v2, "reset"), (v1, "rewarm")]
    # a log written before policies were recorded, with a line torn by a crash
    old = tmp_path / "old"
    old.mkdir()
    (old / "events.jsonl").write_text(
        json.dumps({"at": 1, "event": "add", "version": "m-a"}) + "\n"
        + json.dumps({"at": 2, "event": "promote", "version": "m-a", "previous": None}) + "\n"
        + json.dumps({"at": 3, "event": "promote", "version": "m-b", "previous": "m-a"}) + "\n"
        + '{"at": 4, "event": "prom'
    )  # fmt: skip
    assert Registry(old).swap_history() == [("m-a", "rewarm"), ("m-b", "rewarm")]


def test_registry_files_are_group_readable_and_never_group_writable(tmp_path: Path) -> None:
    import os
    import stat

    reg = Registry(tmp_path / "reg")
    version = reg.add(_checkpoint(tmp_path / "m1")).version
    reg.promote(version)
    reg.identity()
    where = reg.path(version)
    assert stat.S_IMODE(where.stat().st_mode) == 0o750
    for path in [*where.iterdir(), reg.root / "production.json", reg.root / "registry-id",
                 reg.root / "events.jsonl"]:  # fmt: skip
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path
    for dirpath, dirnames, filenames in os.walk(reg.root):
        for name in [*dirnames, *filenames]:
            assert not os.stat(os.path.join(dirpath, name)).st_mode & 0o022, name


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
def test_a_worker_of_the_same_group_reads_the_registry(tmp_path: Path) -> None:
    """As root: a registry owned by root and group G; a process running as nobody:G loads a
    version (and nobody in another group cannot)."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="group-read-", dir="/tmp"))  # noqa: S108
    try:
        base.chmod(0o711)  # traversable, as /srv or /var/lib
        reg = Registry(base / "reg")
        version = reg.add(_checkpoint(tmp_path / "m1")).version
        reg.promote(version)
        reg.identity()
        gid = 4242
        for dirpath, dirnames, filenames in os.walk(reg.root):
            for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                os.chown(name, 0, gid)
        reg.root.chmod(0o750)

        def read_as_nobody(group: int) -> str:
            # a forked child (the interpreter may live where nobody cannot exec it) drops to
            # uid 65534 in ``group`` and loads the production version
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                os.close(read)
                try:
                    os.setgroups([])
                    os.setgid(group)
                    os.setuid(65534)
                    version = Registry(reg.root).production() or ""
                    _, manifest = load_checkpoint(Registry(reg.root).path(version))
                    out = f"ok {manifest.version} {Registry(reg.root).identity()}"
                except Exception as exc:  # noqa: BLE001 - reported to the parent
                    out = f"error {exc!r}"
                os.write(write, out.encode())
                os._exit(0)
            os.close(write)
            with os.fdopen(read) as fh:
                text = fh.read()
            os.waitpid(pid, 0)
            return text

        assert read_as_nobody(gid).split()[:2] == ["ok", version]
        denied = read_as_nobody(4343)
        assert denied.startswith("error") and "Permission denied" in denied
    finally:
        shutil.rmtree(base, ignore_errors=True)
