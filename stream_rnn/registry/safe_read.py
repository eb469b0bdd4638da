"""Reading registry and checkpoint files as hostile input: once, bounded, no links.

A checkpoint directory may be writable by someone other than the reader (a shared registry,
an object-store mirror). Hashing a file and then opening it again to load it leaves a window in
which the file can be replaced; following a symbolic link lets a writer point the reader at
anything on its machine; a FIFO in place of a file blocks the reader for ever. So every file of
a checkpoint is read exactly once through a file descriptor opened without following links
(the directory too), checked to be a regular file, read up to a cap, and whatever is verified
(sha256) and parsed is made from those same bytes.

>>> import tempfile, pathlib
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> _ = (root / "a.json").write_bytes(b"{}")
>>> read_file_once(root, "a.json", limit=16)
b'{}'
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from stream_rnn.registry.exceptions import CheckpointError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def open_directory(directory: Path) -> int:
    """A file descriptor of ``directory`` itself, refusing a symbolic link in its place."""
    try:
        return os.open(directory, os.O_RDONLY | _DIRECTORY | _NOFOLLOW)
    except FileNotFoundError:
        raise CheckpointError(f"{directory} does not exist") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            what = "a symbolic link" if os.path.islink(directory) else "not a directory"
            raise CheckpointError(
                f"{directory} is {what}; a checkpoint is a real directory of regular files: "
                "re-publish the version (unreadable)"
            ) from None
        raise CheckpointError(f"{directory}: unreadable ({exc.strerror or exc})") from exc


def read_file_once(directory: Path, name: str, *, limit: int, dir_fd: int | None = None) -> bytes:
    """The bytes of ``directory/name``, read once: a regular file (no symbolic link, FIFO,
    device or directory), at most ``limit`` bytes. Raises `CheckpointError` saying what was
    wrong; a missing file says "is missing"."""
    own = dir_fd is None
    fd_dir = open_directory(directory) if dir_fd is None else dir_fd
    path = directory / name
    try:
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer
            fd = os.open(name, os.O_RDONLY | _NOFOLLOW | _NONBLOCK, dir_fd=fd_dir)
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing; the checkpoint is incomplete") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CheckpointError(
                    f"{path} is a symbolic link; checkpoint files must be regular files: "
                    "re-publish the version (unreadable)"
                ) from None
            raise CheckpointError(f"{path}: unreadable ({exc.strerror or exc})") from exc
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise CheckpointError(
                    f"{path} is not a regular file (mode {stat.filemode(info.st_mode)}); "
                    "checkpoint files must be regular files: re-publish the version (unreadable)"
                )
            if info.st_size > limit:
                raise CheckpointError(_too_large(path, info.st_size, limit))
            chunks: list[bytes] = []
            size = 0
            while True:  # to the end, not to st_size: a file that grows is caught
                chunk = os.read(fd, min(1 << 20, limit + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise CheckpointError(_too_large(path, size, limit))
            return b"".join(chunks)
        finally:
            os.close(fd)
    finally:
        if own:
            os.close(fd_dir)


def _too_large(path: Path, size: int, limit: int) -> str:
    return (
        f"{path} holds more than {limit:,} bytes ({size:,} read); refusing to read it "
        "(unreadable): a checkpoint file this large is not one this product wrote, or raise "
        "the limit"
    )
