"""An on-disk store for evicted states (SQLite, in the standard library).

Evicted keys leave process memory entirely, so a worker facing millions of keys keeps a
bounded footprint: the pool holds ``capacity`` states, the rest sit in a local file. Durability
comes from the state topic (every state written here is also queued for the next checkpoint);
the file is a cache that a restarted worker rebuilds from that topic.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from stream_rnn.engine.exceptions import StateCodecError
from stream_rnn.engine.store import StoredState, decode_position, decode_state, encode_state

# keys per SELECT when pending states are read back (SQLite allows 32,766 parameters)
_READ_CHUNK = 500

# One restored state: key, source partition, encoded state and, optionally, the wall-clock
# time (seconds) it was last used.
RestoredRow = tuple[str, int, bytes] | tuple[str, int, bytes, float | None]


class DiskStateStore:
    """:class:`~stream_rnn.engine.store.StateStore` backed by one SQLite file.

    ``pending`` names (key -> source partition) what was put since the last
    :meth:`take_pending` (the checkpointer writes those to the state topic). The states
    themselves stay in the file only: :meth:`take_pending` reads them back, so a worker evicting
    thousands of keys a second holds none of their tensors between two checkpoints (holding them
    cost 4 KiB per evicted LSTM 2x256 key, ~40 MiB a checkpoint interval at 5k evictions/s).
    A pending state popped back into the pool before its checkpoint is kept decoded until then
    (the pool admits it clean). Every row keeps the wall-clock time its key was last used
    (``last_used``), so that retention can delete keys idle too long without loading them.

    Example::

        pool = StatePool(cfg, capacity=1000, store=DiskStateStore("/var/lib/w1/states.db"))
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The worker touches the store from one thread at a time (the engine's), but that may
        # not be the thread that opened it.
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")  # a cache: the state topic is the truth
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS states "
            "(key TEXT PRIMARY KEY, part INTEGER, value BLOB, last_used REAL)"
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(states)")}
        if "last_used" not in columns:  # a file written before retention existed
            self._db.execute("ALTER TABLE states ADD COLUMN last_used REAL")
            self._db.execute("UPDATE states SET last_used = ?", (time.time(),))
        # retention finds idle keys through this index instead of reading every state's bytes
        self._db.execute("CREATE INDEX IF NOT EXISTS states_last_used ON states (last_used)")
        self._count = int(self._db.execute("SELECT COUNT(*) FROM states").fetchone()[0])
        self.pending: dict[str, int] = {}  # key -> partition, its state in the file
        self._popped: dict[str, StoredState] = {}  # pending, then handed back to the pool

    def put(self, key: str, state: StoredState, last_used: float | None = None) -> None:
        """Store ``key``'s state, last used at ``last_used`` (wall clock; ``None``: now)."""
        existed = key in self
        self._db.execute(
            "INSERT OR REPLACE INTO states (key, part, value, last_used) VALUES (?, ?, ?, ?)",
            (
                key,
                state.partition,
                encode_state(state),
                time.time() if last_used is None else last_used,
            ),
        )
        self._count += 0 if existed else 1
        self.pending[key] = state.partition
        self._popped.pop(key, None)  # the file holds its newer state

    def put_restored(self, key: str, state: StoredState, last_used: float | None = None) -> None:
        """Load a state read back from the state topic (already durable: not pending)."""
        self.put(key, state, last_used)
        self._forget_pending(key)

    def put_restored_encoded(self, rows: Sequence[RestoredRow]) -> None:
        """Load many ``(key, partition, encoded state[, last_used])`` read back from the state
        topic, in one transaction and without decoding them (a restore of 100,000 keys: ~0.2 s
        instead of ~2.5 s key by key).

        ``last_used`` is the wall-clock time in seconds the state was last used (the state
        record's timestamp); absent, ``None`` or negative (Kafka's "no timestamp"): now.
        """
        if not rows:
            return
        now = time.time()
        full = [_with_time(row, now) for row in rows]
        with self._db:  # one transaction
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO states (key, part, value, last_used) VALUES (?, ?, ?, ?)",
                full,
            )
        self._count = int(self._db.execute("SELECT COUNT(*) FROM states").fetchone()[0])
        for row in full:
            self._forget_pending(row[0])

    def pop(self, key: str) -> StoredState | None:
        row = self._db.execute("SELECT value FROM states WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        self._db.execute("DELETE FROM states WHERE key = ?", (key,))
        self._count -= 1
        # the pool owns it again and the next checkpoint writes its newer state if it changes;
        # an evicted-but-unwritten state must still reach the topic, so keep it pending (the
        # pool admits it clean, and its row is gone from the file)
        state = decode_state(row[0])
        if key in self.pending:
            self._popped[key] = state
        return state

    def delete(self, key: str) -> bool:
        """Forget ``key`` for good, its pending checkpoint write included (the caller writes a
        tombstone instead); whether a stored state was deleted."""
        cur = self._db.execute("DELETE FROM states WHERE key = ?", (key,))
        self._count -= cur.rowcount
        self._forget_pending(key)
        return cur.rowcount > 0

    def delete_idle(self, before_wall: float) -> list[tuple[str, int, int]]:
        """Delete every key last used at or before ``before_wall`` (wall clock, seconds), with
        its pending write; returns the deleted ``(key, partition, applied offset)``."""
        with self._db:  # one transaction: nothing put between the read and the delete is lost
            self._db.execute("BEGIN")
            gone = [
                (str(key), int(part), _offset(value))
                for key, part, value in self._db.execute(
                    "SELECT key, part, value FROM states WHERE last_used <= ?", (before_wall,)
                )
            ]
            if gone:
                self._db.execute("DELETE FROM states WHERE last_used <= ?", (before_wall,))
        self._count -= len(gone)
        for key, _, _ in gone:
            self._forget_pending(key)
        return gone

    def take_pending(self, partition: int | None = None) -> list[tuple[str, StoredState]]:
        """The states put since the last call (of one source partition or all), read back from
        the file (or kept since :meth:`pop`), and no longer pending."""
        keys = [k for k, p in self.pending.items() if partition is None or p == partition]
        if not keys:
            return []
        items: list[tuple[str, StoredState]] = []
        in_file: list[str] = []
        for k in keys:
            del self.pending[k]
            popped = self._popped.pop(k, None)
            if popped is not None:
                items.append((k, popped))
            else:
                in_file.append(k)
        for at in range(0, len(in_file), _READ_CHUNK):
            chunk = in_file[at : at + _READ_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT key, value FROM states WHERE key IN ({marks})",  # noqa: S608 (only ?s)
                chunk,
            ).fetchall()
            items.extend((str(key), decode_state(value)) for key, value in rows)
        return items

    def drop_partition(self, partition: int) -> int:
        """Forget a partition's evicted states (it moved to another worker)."""
        cur = self._db.execute("DELETE FROM states WHERE part = ?", (partition,))
        self._count -= cur.rowcount
        for k in [k for k, p in self.pending.items() if p == partition]:
            self._forget_pending(k)
        return cur.rowcount

    def _forget_pending(self, key: str) -> None:
        self.pending.pop(key, None)
        self._popped.pop(key, None)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        return self._db.execute("SELECT 1 FROM states WHERE key = ?", (key,)).fetchone() is not None

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        self._db.close()


def _offset(value: bytes) -> int:
    """The applied offset in an encoded state's header; -1 for a damaged record (it is
    deleted all the same)."""
    try:
        return decode_position(value)[0]
    except StateCodecError:
        return -1


def _with_time(row: RestoredRow, now: float) -> tuple[str, int, bytes, float]:
    """A restored row with its last-use time (``now`` where the row has none)."""
    if len(row) == 3:
        return (row[0], row[1], row[2], now)
    used = row[3]
    return (row[0], row[1], row[2], now if used is None or used < 0 else used)
