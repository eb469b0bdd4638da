"""The model registry: immutable versions on disk and a production pointer.

Layout of a registry directory ``ROOT`` (``--registry DIR``, ``$STREAM_RNN_REGISTRY``)::

    ROOT/versions/<version>/weights.safetensors   the checkpoint, byte for byte as added
    ROOT/versions/<version>/manifest.json
    ROOT/versions/<version>/registry.json         added_at, parent, data window, metrics
    ROOT/production.json                          {"version", "history", "updated_at"}
    ROOT/events.jsonl                             append-only: add / promote / rollback
    ROOT/.lock                                    flock'ed around every read-modify-write

Guarantees: a version directory appears complete or not at all (it is assembled and verified
in a temporary directory inside ROOT, then renamed into place) and is never rewritten;
``production.json`` is replaced atomically (temp file, fsync, ``os.replace``), so a reader sees
the old pointer or the new one, never a torn one; concurrent writers (processes) serialise on
an exclusive ``flock`` of ``ROOT/.lock``, so no promotion is lost.

Example::

    registry = Registry(Path("runs/registry"))
    manifest = registry.add(Path("runs/lang"), metrics={"valid_loss": 1.23})
    registry.promote(manifest.version)
    registry.rollback()          # back to the previous production version
"""

from __future__ import annotations

import builtins
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stream_rnn.registry.checkpoint import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    Manifest,
    atomic_write,
    load_checkpoint,
    read_manifest,
)
from stream_rnn.registry.exceptions import CheckpointError, RegistryError

VERSIONS_DIR = "versions"
PRODUCTION_FILE = "production.json"
EVENTS_FILE = "events.jsonl"
LOCK_FILE = ".lock"
INFO_FILE = "registry.json"
# A version id becomes a directory name: no separators, no dot-dot, no hidden names.
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class VersionInfo:
    """One registered version: what `Registry.list` and `Registry.show` return.

    ``created_at`` is when the checkpoint was written (its manifest), ``added_at`` when it
    entered the registry; ``metrics`` are the manifest's, overridden by those given to `add`.
    """

    version: str
    created_at: float
    added_at: float
    parent: str | None
    metrics: dict[str, Any]
    data_window: dict[str, Any] | None
    is_production: bool
    path: Path
    manifest: Manifest


def check_version_id(version: str) -> str:
    """Return ``version`` if it is usable as a directory name, else raise `RegistryError`."""
    if not isinstance(version, str) or not _VERSION_RE.match(version) or ".." in version:
        raise RegistryError(
            f"version id {version!r} cannot name a registry directory: use letters, digits, "
            "'.', '_' and '-' only (checkpoints written by `stream-rnn train` are m-<sha256>)"
        )
    return version


class Registry:
    """A directory of immutable model versions and a production pointer.

    Every user error raises `RegistryError` with a message that says what to do. Reads
    (`list`, `show`, `production`) take no lock; writes (`add`, `promote`, `rollback`) do.

    Example::

        registry = Registry(Path("runs/registry"))
        for info in registry.list():
            print(info.version, info.is_production, info.metrics)
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # ------------------------------------------------------------------ reads
    def path(self, version: str) -> Path:
        """Absolute directory of ``version``; `RegistryError` if it is not registered."""
        check_version_id(version)
        where = (self.root / VERSIONS_DIR / version).absolute()
        if not (where / MANIFEST_FILE).is_file():
            known = self._version_ids()
            shown = ", ".join(known[-10:]) if known else "none"
            raise RegistryError(
                f"version {version!r} is not in the registry at {self.root} (known: {shown}); "
                "add it with `stream-rnn models publish MODEL_DIR` or check --registry"
            )
        return where

    def production(self) -> str | None:
        """The production version, or None when nothing was promoted yet."""
        return self._read_pointer()["version"]

    def history(self) -> builtins.list[str]:
        """Earlier production versions, newest last (what `rollback` returns to)."""
        return list(self._read_pointer()["history"])

    def list(self) -> builtins.list[VersionInfo]:
        """Every registered version, oldest first (by the time it was added)."""
        current = self.production()
        infos = [self._info(v, current) for v in self._version_ids()]
        return sorted(infos, key=lambda i: (i.added_at, i.version))

    def show(self, version: str) -> VersionInfo:
        """Manifest, metrics, data window and lineage facts of one version."""
        return self._info(version, self.production())

    def lineage(self, version: str) -> builtins.list[str]:
        """``version``, its parent, grandparent, … as far as the registry knows them."""
        chain = [version]
        parent = self.show(version).parent
        while parent is not None and parent not in chain:
            chain.append(parent)
            if not (self.root / VERSIONS_DIR / parent / MANIFEST_FILE).is_file():
                break
            parent = self.show(parent).parent
        return chain

    # ------------------------------------------------------------------ writes
    def add(
        self,
        model_dir: Path,
        *,
        data_window: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        parent_version: str | None = None,
    ) -> Manifest:
        """Copy the checkpoint at ``model_dir`` in as an immutable version; return its manifest.

        The version id is the manifest's ``version``. The copy is verified with
        `load_checkpoint` (sha256, tensor names and shapes, finite values) before it becomes
        visible. Adding a version that is already registered with the same weights is a no-op
        (the first add's metadata stands); with different weights it is refused. Weights and
        manifest are copied unchanged; ``parent_version`` (default: the manifest's), the data
        window and the metrics go to ``registry.json`` next to them.
        """
        source = Path(model_dir)
        extra = {"data_window": data_window, "metrics": metrics or {}}
        try:
            json.dumps(extra, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise RegistryError(
                f"metrics and data window must be JSON values without NaN/inf ({exc}); "
                "pass plain numbers and strings"
            ) from exc
        (self.root / VERSIONS_DIR).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=".add-"))
        try:
            for name in (WEIGHTS_FILE, MANIFEST_FILE):
                if not (source / name).is_file():
                    raise RegistryError(
                        f"{source} is not a checkpoint: {name} is missing (train one with "
                        "`stream-rnn train --out DIR`)"
                    )
                shutil.copyfile(source / name, staging / name)
            try:
                _, manifest = load_checkpoint(staging)
            except CheckpointError as exc:
                raise RegistryError(
                    f"refusing to add {source}: {str(exc).replace(str(staging), str(source))}"
                ) from exc
            version = check_version_id(manifest.version)
            info = {
                "version": version,
                "added_at": time.time(),
                "parent_version": parent_version or manifest.parent_version,
                "data_window": data_window,
                "metrics": {**manifest.metrics, **(metrics or {})},
                "source": str(source.absolute()),
            }
            _write_json(staging / INFO_FILE, info)
            for name in (WEIGHTS_FILE, MANIFEST_FILE):
                _fsync_file(staging / name)
            _fsync_dir(staging)
            with self._locked():
                target = self.root / VERSIONS_DIR / version
                if target.exists():
                    return self._same_or_refuse(target, manifest, source)
                os.rename(staging, target)
                _fsync_dir(target.parent)
                self._event("add", version=version, source=str(source.absolute()))
            return manifest
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def promote(self, version: str) -> str | None:
        """Make ``version`` production; return the version it replaced (None if none).

        The replaced version goes onto the history that `rollback` returns to. Promoting the
        current production version changes nothing (and logs nothing).
        """
        self.path(version)
        with self._locked():
            pointer = self._read_pointer()
            previous = pointer["version"]
            if previous == version:
                return previous
            history = list(pointer["history"])
            if previous is not None:
                history.append(previous)
            self._write_pointer(version, history)
            self._event("promote", version=version, previous=previous)
        return previous

    def rollback(self) -> str:
        """Make the previous production version production again; return it.

        The current version is dropped from production (not pushed onto the history), so
        successive rollbacks walk back through earlier production versions.
        """
        with self._locked():
            pointer = self._read_pointer()
            history = list(pointer["history"])
            if not history:
                raise RegistryError(
                    f"no earlier production version to roll back to in {self.root} "
                    f"(production: {pointer['version'] or 'none'}); promote a version "
                    "explicitly with `stream-rnn models promote VERSION`"
                )
            target = history.pop()
            self.path(target)
            self._write_pointer(target, history)
            self._event("rollback", version=target, previous=pointer["version"])
        return target

    # ------------------------------------------------------------------ internals
    def _version_ids(self) -> builtins.list[str]:
        base = self.root / VERSIONS_DIR
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if (p / MANIFEST_FILE).is_file())

    def _info(self, version: str, current: str | None) -> VersionInfo:
        where = self.path(version)
        manifest = read_manifest(where)
        extra = _read_json(where / INFO_FILE) if (where / INFO_FILE).is_file() else {}
        return VersionInfo(
            version=version,
            created_at=manifest.created_at,
            added_at=float(extra.get("added_at") or manifest.created_at),
            parent=extra.get("parent_version", manifest.parent_version),
            metrics=dict(extra.get("metrics", manifest.metrics)),
            data_window=extra.get("data_window"),
            is_production=version == current,
            path=where,
            manifest=manifest,
        )

    def _same_or_refuse(self, target: Path, manifest: Manifest, source: Path) -> Manifest:
        existing = read_manifest(target)
        if existing.weights_sha256 == manifest.weights_sha256:
            return existing
        raise RegistryError(
            f"version {manifest.version!r} is already registered with different weights "
            f"(sha256 {existing.weights_sha256[:12]}… there, {manifest.weights_sha256[:12]}… "
            f"in {source}); versions are immutable: save the new weights as a new version"
        )

    def _read_pointer(self) -> dict[str, Any]:
        path = self.root / PRODUCTION_FILE
        if not path.is_file():
            return {"version": None, "history": [], "updated_at": None}
        data = _read_json(path)
        version, history = data.get("version"), data.get("history")
        if not (version is None or isinstance(version, str)) or not (
            isinstance(history, list) and all(isinstance(v, str) for v in history)
        ):
            raise RegistryError(
                f"{path} is damaged (expected version and history, got {data!r}); rebuild it "
                f"from {self.root / EVENTS_FILE} or promote a version again"
            )
        return data

    def _write_pointer(self, version: str, history: builtins.list[str]) -> None:
        pointer = {"version": version, "history": history, "updated_at": time.time()}
        _write_json(self.root / PRODUCTION_FILE, pointer, atomic=True)

    def _event(self, event: str, **fields: Any) -> None:
        line = json.dumps({"at": time.time(), "event": event, **fields}, sort_keys=True)
        fd = os.open(self.root / EVENTS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_FILE, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{path} is unreadable ({exc}); the registry is damaged") from exc
    if not isinstance(data, dict):
        raise RegistryError(f"{path} must hold a JSON object; the registry is damaged")
    return data


def _write_json(path: Path, data: dict[str, Any], *, atomic: bool = False) -> None:
    payload = json.dumps(data, indent=2, allow_nan=False).encode() + b"\n"
    if not atomic:
        path.write_bytes(payload)
        return
    atomic_write(path, payload)
    _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # the rename/replace itself is durable only once its directory entry is
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
