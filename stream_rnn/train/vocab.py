"""Vocabularies (token <-> id) and label sets, JSON-serialisable so checkpoints carry them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, get_args

import orjson

from stream_rnn.train.exceptions import DataError

Level = Literal["char", "word", "token"]
Token = str | int
LEVELS: tuple[str, ...] = get_args(Level)

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIALS: tuple[str, ...] = (PAD, UNK, BOS, EOS)
_SPECIAL_SET = frozenset(SPECIALS)


def check_level(level: object) -> Level:
    """Return ``level`` if it is a known split level, else raise `DataError`."""
    if level not in LEVELS:
        raise DataError(f"unknown level {level!r}; use one of {', '.join(LEVELS)}")
    return level  # type: ignore[return-value]


def split_text(text: str, level: Level) -> list[str]:
    """Split ``text`` into tokens: characters for ``char``, whitespace-separated otherwise."""
    if level == "char":
        return list(text)
    # "token" data normally arrives as token lists; text at that level is whitespace-separated.
    return text.split()


def _tokens_of(item: str | Sequence[Token], level: Level) -> Sequence[Token]:
    return split_text(item, level) if isinstance(item, str) else item


@dataclass(frozen=True)
class Vocab:
    """Token <-> id mapping; ids 0-3 are ``<pad>``, ``<unk>``, ``<bos>``, ``<eos>``.

    >>> v = Vocab.build(["abca", "bc"], "char")
    >>> v.encode("cab", add_eos=True)
    [6, 4, 5, 3]
    >>> v.detok(v.encode("cab?"))
    'cab'
    """

    level: Level
    itos: tuple[str, ...]

    def __post_init__(self) -> None:
        check_level(self.level)
        if not isinstance(self.itos, tuple) or not all(isinstance(t, str) for t in self.itos):
            raise DataError("vocabulary 'itos' must be a tuple of strings")
        if self.itos[:4] != SPECIALS:
            raise DataError(
                f"a vocabulary must start with {list(SPECIALS)} (ids 0-3), got "
                f"{list(self.itos[:4])}; build it with Vocab.build or Vocab.from_tokens"
            )
        if len(set(self.itos)) != len(self.itos):
            dups = sorted(t for t, c in Counter(self.itos).items() if c > 1)
            raise DataError(f"vocabulary has duplicate tokens {dups[:10]}; each token needs one id")

    def __len__(self) -> int:
        return len(self.itos)

    @cached_property
    def stoi(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.itos)}

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def unk_id(self) -> int:
        return 1

    @property
    def bos_id(self) -> int:
        return 2

    @property
    def eos_id(self) -> int:
        return 3

    def id_of(self, token: Token) -> int:
        """The id of ``token`` (ints are looked up as ``str(token)``); unknown -> ``unk_id``."""
        return self.stoi.get(token if isinstance(token, str) else str(token), 1)

    def encode(
        self,
        text_or_tokens: str | Sequence[Token],
        *,
        add_bos: bool = False,
        add_eos: bool = False,
    ) -> list[int]:
        """Ids of a text (split by ``level``) or of a token list."""
        stoi = self.stoi
        ids = [
            stoi.get(t if isinstance(t, str) else str(t), 1)
            for t in _tokens_of(text_or_tokens, self.level)
        ]
        if add_bos:
            ids.insert(0, 2)
        if add_eos:
            ids.append(3)
        return ids

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Tokens of ``ids`` (specials included); out-of-range ids raise `DataError`."""
        out = []
        for raw in ids:
            i = int(raw)  # accepts numpy / 0-d torch integers too
            if not 0 <= i < len(self.itos):
                raise DataError(
                    f"id {i} is out of range for a vocabulary of {len(self.itos)} tokens; "
                    "was it produced by a model trained with another vocabulary?"
                )
            out.append(self.itos[i])
        return out

    def detok(self, ids: Iterable[int]) -> str:
        """Readable text of ``ids``: specials dropped, joined by "" (char) or " " (word/token)."""
        tokens = [t for t in self.decode(ids) if t not in _SPECIAL_SET]
        return ("" if self.level == "char" else " ").join(tokens)

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level, "itos": list(self.itos)}

    @classmethod
    def from_dict(cls, data: object) -> Vocab:
        """Rebuild from `to_dict` output, raising `DataError` on anything malformed."""
        if not isinstance(data, dict):
            raise DataError(f"a vocabulary must be a JSON object, got {type(data).__name__}")
        if set(data) != {"level", "itos"}:
            raise DataError(
                f"a vocabulary object needs exactly the fields 'level' and 'itos', got {sorted(data)}"
            )
        itos = data["itos"]
        if not isinstance(itos, list) or not all(isinstance(t, str) for t in itos):
            raise DataError("vocabulary 'itos' must be a list of strings")
        return cls(check_level(data["level"]), tuple(itos))

    @classmethod
    def build(
        cls,
        items: Iterable[str | Sequence[Token]],
        level: Level,
        *,
        min_count: int = 1,
        max_size: int | None = None,
    ) -> Vocab:
        """Count tokens over texts or token lists; most frequent first, ties by token string.

        ``max_size`` bounds ``len(vocab)``, the four specials included.
        """
        check_level(level)
        if isinstance(items, str):
            raise DataError("Vocab.build takes a list of texts or token lists, not a single str")
        if max_size is not None and max_size < len(SPECIALS):
            raise DataError(f"max_size={max_size} leaves no room for the 4 special tokens")
        counts: Counter[str] = Counter()
        for item in items:
            counts.update(t if isinstance(t, str) else str(t) for t in _tokens_of(item, level))
        for s in SPECIALS:
            counts.pop(s, None)
        ranked = sorted(
            (t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t)
        )
        if max_size is not None:
            ranked = ranked[: max_size - len(SPECIALS)]
        return cls(level, SPECIALS + tuple(ranked))

    @classmethod
    def from_tokens(cls, tokens: Sequence[str], level: Level) -> Vocab:
        """A given vocabulary, ids in the order given; the specials are prepended if absent."""
        tokens = tuple(tokens)
        if tokens[:4] == SPECIALS:
            return cls(level, tokens)
        misplaced = [s for s in SPECIALS if s in tokens]
        if misplaced:
            raise DataError(
                f"special tokens {misplaced} appear in the given vocabulary but not as its first "
                f"four entries; put {list(SPECIALS)} first or leave them out entirely"
            )
        return cls(level, SPECIALS + tokens)

    @classmethod
    def from_file(cls, path: str | Path, level: Level | None = None) -> Vocab:
        """Load ``*.json`` (a `to_dict` object or a list of tokens) or one token per line.

        ``level`` defaults to the file's own (JSON object) or ``"token"``.
        """
        path = Path(path)
        if path.suffix == ".json":
            try:
                data = orjson.loads(path.read_bytes())
            except orjson.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON ({e}); fix the file") from e
            if isinstance(data, dict):
                vocab = cls.from_dict(data)
                if level is not None and level != vocab.level:
                    raise DataError(f"{path}: vocabulary level is {vocab.level!r}, not {level!r}")
                return vocab
            if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
                raise DataError(f"{path}: expected a JSON list of token strings or a vocab object")
            tokens: list[str] = data
        else:
            text = path.read_text(encoding="utf-8")
            # Strip only line ends: a token may be a space; empty lines carry no token.
            tokens = [t for t in (line.rstrip("\r\n") for line in text.split("\n")) if t]
        try:
            return cls.from_tokens(tokens, level or "token")
        except DataError as e:
            raise DataError(f"{path}: {e}") from e


@dataclass(frozen=True)
class LabelSet:
    """Sequence labels <-> class indices.

    >>> labels = LabelSet.build(["spam", "ham", "spam"])
    >>> labels.labels, labels.index("spam")
    (('ham', 'spam'), 1)
    """

    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.labels, tuple) or not all(isinstance(x, str) for x in self.labels):
            raise DataError("a label set must be a tuple of strings")
        if len(set(self.labels)) != len(self.labels):
            raise DataError(f"label set has duplicates: {list(self.labels)}")

    def __len__(self) -> int:
        return len(self.labels)

    @cached_property
    def _index(self) -> dict[str, int]:
        return {x: i for i, x in enumerate(self.labels)}

    def index(self, label: str) -> int:
        try:
            return self._index[label]
        except KeyError:
            shown = ", ".join(repr(x) for x in self.labels[:20])
            more = f" (and {len(self.labels) - 20} more)" if len(self.labels) > 20 else ""
            raise DataError(
                f"unknown label {label!r}; known labels: {shown}{more}. Fix the record or "
                "rebuild the label set from data that contains this label"
            ) from None

    @classmethod
    def build(cls, labels: Iterable[str]) -> LabelSet:
        """The distinct labels, sorted."""
        return cls(tuple(sorted(set(labels))))

    def to_dict(self) -> dict[str, Any]:
        return {"labels": list(self.labels)}

    @classmethod
    def from_dict(cls, data: object) -> LabelSet:
        if not isinstance(data, dict) or set(data) != {"labels"}:
            raise DataError("a label set must be a JSON object with exactly the field 'labels'")
        labels = data["labels"]
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise DataError("label set 'labels' must be a list of strings")
        return cls(tuple(labels))
