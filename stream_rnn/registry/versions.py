"""The model registry: immutable versions on disk and a production pointer.

Layout of a registry directory ``ROOT`` (``--registry DIR``, ``$STREAM_RNN_REGISTRY``)::

    ROOT/versions/<version>/weights.safetensors   the checkpoint, byte for byte as added
    ROOT/versions/<version>/manifest.json
    ROOT/versions/<version>/registry.json         added_at, parent, data window, metrics
    ROOT/production.json                          {"version", "history", "updated_at"}
    ROOT/events.jsonl                             append-only: add / promote / rollback
    ROOT/registry-id                              random id, made once: the announcements' domain
    ROOT/sequence                                 the last announcement sequence number issued
    ROOT/announcement.json                        the last announcement, as signed and sent
    ROOT/.lock                                    flock'ed around every read-modify-write

Guarantees: a version directory appears complete or not at all (it is assembled and verified
in a temporary directory inside ROOT, then renamed into place) and is never rewritten;
``production.json`` is replaced atomically (temp file, fsync, ``os.replace``), so a reader sees
the old pointer or the new one, never a torn one; concurrent writers (processes) serialise on
an exclusive ``flock`` of ``ROOT/.lock``, so no promotion is lost; `Registry.locked` holds it
around a promotion *and* its announcement (`stream_rnn.registry.updates.announce_production`),
so that the pointer and the last announcement name the same version. Directories are 0750 and
files 0640: a worker of the same group may read them, nobody else.

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
import secrets
import shutil
import tempfile
import threading
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
    load_checkpoint,
    read_manifest,
)
from stream_rnn.registry.exceptions import CheckpointError, RegistryError
from stream_rnn.registry.files import (
    DIR_MODE,
    FILE_MODE,
    atomic_write,
    fsync_dir,
    fsync_file,
    read_json,
    write_json,
)

VERSIONS_DIR = "versions"
PRODUCTION_FILE = "production.json"
EVENTS_FILE = "events.jsonl"
LOCK_FILE = ".lock"
INFO_FILE = "registry.json"
ID_FILE = "registry-id"
SEQUENCE_FILE = "sequence"
ANNOUNCEMENT_FILE = "announcement.json"
MAX_ANNOUNCEMENT_BYTES = 64 * 1024
DEFAULT_POLICY = "rewarm"  # what `models publish` asked for before policies were recorded
_ID_RE = re.compile(r"^[0-9a-f]{32}$")
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
        self._held = threading.local()  # lock depth per thread: `locked` is re-entrant

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

    def swap_history(self) -> builtins.list[tuple[str, str]]:
        """Every promotion and rollback as ``(version, policy)``, oldest first.

        ``policy`` is the state policy the promotion asked workers to apply (keep, reset,
        rewarm); entries written before policies were recorded read as ``rewarm``, what
        ``models publish`` asked for then. Read from the append-only ``events.jsonl``.
        """
        path = self.root / EVENTS_FILE
        if not path.is_file():
            return []
        swaps = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-append
            if isinstance(event, dict) and event.get("event") in ("promote", "rollback"):
                policy = event.get("policy")
                swaps.append((str(event["version"]), str(policy or DEFAULT_POLICY)))
        return swaps

    def identity(self) -> str:
        """This registry's id (32 hex digits), made once at random: the domain that its
        announcements are signed for, so that another registry's are refused."""
        path = self.root / ID_FILE
        if not path.exists():
            with self.locked():
                if not path.exists():
                    atomic_write(path, secrets.token_hex(16).encode() + b"\n")
        try:
            ident = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise RegistryError(f"cannot read the registry id {path} ({exc})") from exc
        if not _ID_RE.match(ident):
            raise RegistryError(f"{path} holds {ident[:40]!r}, not a registry id: it is damaged")
        return ident

    def next_sequence(self) -> int:
        """Issue the next announcement sequence number (1, 2, ...); only under `locked`."""
        if not getattr(self._held, "depth", 0):
            raise RegistryError("a sequence number is issued only under Registry.locked()")
        path = self.root / SEQUENCE_FILE
        last = int(path.read_text().strip()) if path.is_file() else 0
        atomic_write(path, f"{last + 1}\n".encode())
        return last + 1

    def record_announcement(self, raw: bytes) -> None:
        """Keep the announcement just sent (its exact bytes); workers starting later take the
        freshest of it and the topic's, so a replay that compaction kept cannot win."""
        atomic_write(self.root / ANNOUNCEMENT_FILE, raw)

    def last_announcement(self) -> bytes | None:
        """The bytes of the last announcement sent from this registry, or None."""
        path = self.root / ANNOUNCEMENT_FILE
        if not path.is_file() or path.is_symlink():
            return None
        with path.open("rb") as fh:
            return fh.read(MAX_ANNOUNCEMENT_BYTES + 1)

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
        staging.chmod(DIR_MODE)  # mkdtemp makes it 0700: workers of the group must read it
        try:
            for name in (WEIGHTS_FILE, MANIFEST_FILE):
                if not (source / name).is_file():
                    raise RegistryError(
                        f"{source} is not a checkpoint: {name} is missing (train one with "
                        "`stream-rnn train --out DIR`)"
                    )
                shutil.copyfile(source / name, staging / name)
                (staging / name).chmod(FILE_MODE)
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
            write_json(staging / INFO_FILE, info)
            for name in (WEIGHTS_FILE, MANIFEST_FILE):
                fsync_file(staging / name)
            fsync_dir(staging)
            with self.locked():
                target = self.root / VERSIONS_DIR / version
                if target.exists():
                    return self._same_or_refuse(target, manifest, source)
                os.rename(staging, target)
                fsync_dir(target.parent)
                self._event("add", version=version, source=str(source.absolute()))
            return manifest
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def promote(self, version: str, *, policy: str = DEFAULT_POLICY) -> str | None:
        """Make ``version`` production; return the version it replaced (None if none).

        The replaced version goes onto the history that `rollback` returns to. Promoting the
        current production version changes nothing (and logs nothing). ``policy`` (the state
        policy announced with it) is recorded for `swap_history`.
        """
        self.path(version)
        with self.locked():
            pointer = self._read_pointer()
            previous = pointer["version"]
            if previous == version:
                return previous
            history = list(pointer["history"])
            if previous is not None:
                history.append(previous)
            self._write_pointer(version, history)
            self._event("promote", version=version, previous=previous, policy=policy)
        return previous

    def rollback(self, *, policy: str = DEFAULT_POLICY) -> str:
        """Make the previous production version production again; return it.

        The current version is dropped from production (not pushed onto the history), so
        successive rollbacks walk back through earlier production versions.
        """
        with self.locked():
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
            self._event("rollback", version=target, previous=pointer["version"], policy=policy)
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
        extra = read_json(where / INFO_FILE) if (where / INFO_FILE).is_file() else {}
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
        data = read_json(path)
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
        write_json(self.root / PRODUCTION_FILE, pointer, atomic=True)

    def _event(self, event: str, **fields: Any) -> None:
        line = json.dumps({"at": time.time(), "event": event, **fields}, sort_keys=True)
        fd = os.open(self.root / EVENTS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        try:
            os.write(fd, line.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the registry's exclusive lock (re-entrant within a thread).

        Other processes, and other threads with their own `Registry`, wait until it is
        released: hold it around a promotion and its announcement.
        """
        depth = getattr(self._held, "depth", 0)
        if depth:
            self._held.depth = depth + 1
            try:
                yield
            finally:
                self._held.depth -= 1
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_FILE, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            self._held.depth = 1
            try:
                yield
            finally:
                self._held.depth = 0
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
