"""Small durable-file helpers of the registry: JSON files, fsyncs and the modes it creates.

Registry files are written by the publisher and read by workers that may run as another user
of the same group: directories are created ``0750`` and files ``0640`` (never group- or
world-writable), whatever the umask.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from stream_rnn.registry.exceptions import RegistryError

DIR_MODE = 0o750
FILE_MODE = 0o640


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; `RegistryError` if it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{path} is unreadable ({exc}); the registry is damaged") from exc
    if not isinstance(data, dict):
        raise RegistryError(f"{path} must hold a JSON object; the registry is damaged")
    return data


def write_json(path: Path, data: dict[str, Any], *, atomic: bool = False) -> None:
    """Write ``data`` to ``path`` (mode 0640); ``atomic``: all at once, durably."""
    payload = json.dumps(data, indent=2, allow_nan=False).encode() + b"\n"
    if atomic:
        atomic_write(path, payload)
        return
    path.write_bytes(payload)
    path.chmod(FILE_MODE)


def atomic_write(path: Path, data: bytes, *, mode: int = FILE_MODE) -> None:
    """Replace ``path`` with ``data`` (temp file with ``mode``, fsync, rename, fsync dir)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    """Flush ``path`` (a file, or a directory: a rename or replace is durable only once its
    directory entry is) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_file
