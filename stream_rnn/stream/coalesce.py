"""Coalescing a key's tokens into ``tokens`` chunks, without I/O (the producer drives it).

One open chunk per key collects the key's tokens as they are sent; it closes when it holds
``max_tokens`` tokens, when one more token would take its message past ``max_bytes``, when
its first token has waited ``linger_s`` (`Coalescer.due`), or when the key sends a control event
(`Coalescer.take`: the chunk goes out first, so the key's order is kept). Open chunks are kept
in the order they were opened, which is also the order of their deadlines (every chunk lingers
equally long), so finding the due ones never scans the others.

>>> c = Coalescer(max_tokens=3, linger_s=0.005)
>>> c.add("u1", ["h", "e"], ts=None, now=0.0)
[]
>>> [chunk.tokens for chunk in c.add("u1", ["l", "l", "o"], ts=None, now=0.001)]
[['h', 'e', 'l']]
>>> c.due(0.003), [chunk.tokens for chunk in c.due(0.0061)]
([], [['l', 'o']])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec

from stream_rnn.stream.codec import DEFAULT_MAX_BYTES
from stream_rnn.stream.exceptions import Rejected
from stream_rnn.stream.messages import TokensEvent

_encode = msgspec.json.Encoder().encode
# bytes of a chunk's message besides its tokens (the longest ts a float can print as)
_OVERHEAD = len(_encode(TokensEvent([], ts=-1.7976931348623157e308)))


@dataclass(slots=True)
class Chunk:
    """An open or closed chunk of one key: its tokens in order, the first one's ``ts``."""

    key: str
    ts: float | None
    deadline: float  # monotonic time by which it goes out, full or not
    tokens: list[str | int] = field(default_factory=list)
    size: int = _OVERHEAD  # bytes of its message so far (tokens and commas included)


class Coalescer:
    """Per-key open chunks; every method returns the chunks to send now, in order.

    ``max_bytes``: the worker's message size limit (``max_message_bytes``); a token too large
    for any chunk goes out alone (the worker dead-letters it, as it would a single token).
    """

    def __init__(
        self, max_tokens: int, linger_s: float, *, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (1: no chunks), got {max_tokens}")
        if not linger_s >= 0:
            raise ValueError(f"linger must be >= 0 seconds, got {linger_s}")
        self.max_tokens, self.linger_s, self.max_bytes = max_tokens, linger_s, max_bytes
        self._open: dict[str, Chunk] = {}  # key -> its open chunk, oldest first
        self.buffered = 0  # tokens in open chunks

    def __len__(self) -> int:
        return len(self._open)

    def add(
        self, key: str, tokens: Sequence[str | int], ts: float | None, now: float
    ) -> list[Chunk]:
        """Append ``tokens`` to ``key``'s open chunk (opening one with ``ts`` if none);
        the chunks this filled up. Every token is checked first: a bad one adds nothing.

        Raises:
            Rejected: a token is neither a string nor an integer (``wrong_type``), or a
                string that has no UTF-8 form (``not_json``).
        """
        sizes = [_token_size(token) for token in tokens]
        closed: list[Chunk] = []
        chunk = self._open.get(key)
        for token, size in zip(tokens, sizes, strict=True):
            if chunk is not None and chunk.tokens and chunk.size + size > self.max_bytes:
                closed.append(self._close(key))
                chunk = None
            if chunk is None:
                chunk = self._open[key] = Chunk(key, ts, now + self.linger_s)
            chunk.tokens.append(token)
            chunk.size += size
            self.buffered += 1
            if len(chunk.tokens) >= self.max_tokens:
                closed.append(self._close(key))
                chunk = None
        return closed

    def take(self, key: str) -> Chunk | None:
        """Close ``key``'s open chunk (before the key's next control event), if it has one."""
        return self._close(key) if key in self._open else None

    def due(self, now: float) -> list[Chunk]:
        """Close the chunks that have lingered long enough, oldest first."""
        out = []
        for chunk in self._open.values():  # opening order = deadline order
            if chunk.deadline > now:
                break
            out.append(chunk)
        for chunk in out:
            self._close(chunk.key)
        return out

    def drain(self) -> list[Chunk]:
        """Close every open chunk, oldest first (a flush)."""
        out = list(self._open.values())
        self._open.clear()
        self.buffered = 0
        return out

    def next_deadline(self) -> float | None:
        """When the oldest open chunk is due; None if none is open."""
        for chunk in self._open.values():
            return chunk.deadline
        return None

    def _close(self, key: str) -> Chunk:
        chunk = self._open.pop(key)
        self.buffered -= len(chunk.tokens)
        return chunk


def _token_size(token: object) -> int:
    """Bytes ``token`` takes in a chunk's message (a comma included), or `Rejected`."""
    if token.__class__ is not str and token.__class__ is not int:
        shown = repr(token)
        raise Rejected(
            "wrong_type",
            f"token {shown[:60]} ({type(token).__name__}) must be a string token (looked up "
            "in the vocabulary) or an integer token id; send str or int",
        )
    try:
        return len(_encode(token)) + 1
    except UnicodeEncodeError as err:  # a lone surrogate: no UTF-8 for it
        raise Rejected("not_json", f"a string cannot be written as UTF-8 ({err})") from None
