"""Built-in synthetic corpora with learnable structure, so demos and tests need no downloads.

Every task's structure (grammar, Markov chains, cipher) is fixed; ``seed`` only picks the
samples, so data generated with different seeds comes from the same distribution. Record ``i``
depends on ``(task, seed, i)`` alone: ``generate(task, 10, seed=s)`` is a prefix of
``generate(task, 100, seed=s)``.
"""

from __future__ import annotations

import random
from typing import Literal, NamedTuple, get_args

from stream_rnn.train.data import Record
from stream_rnn.train.exceptions import DataError

Task = Literal["next-token", "classify", "seq2seq", "tag"]
TASKS: tuple[str, ...] = get_args(Task)
# (min_len, max_len) per task: next-token in characters, the others in symbols.
DEFAULT_LENGTHS: dict[str, tuple[int, int]] = {
    "next-token": (32, 128),
    "classify": (16, 48),
    "seq2seq": (3, 10),
    "tag": (8, 32),
}


def _rng(*parts: object) -> random.Random:
    # A str seed is hashed with SHA-512, so it is stable across runs and Python versions.
    return random.Random("stream_rnn.synthetic/" + "/".join(map(str, parts)))  # noqa: S311


# next-token: a small English-like grammar over 18 symbols (16 letters, space, '.').
# Words, agreement-free phrases and sentence ends give a char RNN plenty to learn beyond
# unigram frequencies; '.' is a separate word so word-level vocabularies stay clean.
_GRAMMAR = {
    "DET": ("the", "a", "one"),
    "ADJ": ("red", "cold", "small", "dark"),
    "NOUN": ("cat", "dog", "tree", "stone", "road", "moon"),
    "VERB": ("sees", "holds", "finds", "meets"),
}
_LONGEST_WORD = max(len(w) for ws in _GRAMMAR.values() for w in ws)


def _sentence(rng: random.Random) -> list[str]:
    def noun_phrase() -> list[str]:
        adj = [rng.choice(_GRAMMAR["ADJ"])] if rng.random() < 0.5 else []
        return [rng.choice(_GRAMMAR["DET"]), *adj, rng.choice(_GRAMMAR["NOUN"])]

    words = [*noun_phrase(), rng.choice(_GRAMMAR["VERB"]), *noun_phrase()]
    if rng.random() < 0.3:
        words += ["and", rng.choice(_GRAMMAR["VERB"]), *noun_phrase()]
    return [*words, "."]


def _next_token(rng: random.Random, key: str, min_len: int, max_len: int) -> Record:
    target = rng.randint(min_len, max_len)
    text = ""
    words: list[str] = []
    while len(text) < target:
        if not words:
            words = _sentence(rng)
        grown = f"{text} {words[0]}" if text else words[0]
        if len(grown) > max_len:  # cut at a word boundary; len(text) >= max_len - word - 1
            break
        text = grown
        words.pop(0)
    return Record(key, text=text)


# classify: four "dialects", order-1 Markov chains over one shared 12-letter alphabet. Each
# transition matrix mixes two permutations with uniform noise, so it is doubly stochastic:
# every dialect has the same (uniform) letter frequencies and only letter pairs tell them apart.
CLASSIFY_ALPHABET = "abcdefghijkl"
CLASSIFY_LABELS = ("d0", "d1", "d2", "d3")
_MIX = (0.25, 0.15)  # probability of following permutation 1, 2; the rest is uniform


def _make_chains() -> list[tuple[list[int], list[int]]]:
    rng, n = _rng("structure", "classify"), len(CLASSIFY_ALPHABET)
    return [(rng.sample(range(n), n), rng.sample(range(n), n)) for _ in CLASSIFY_LABELS]


_CHAINS = _make_chains()


def _classify(rng: random.Random, key: str, min_len: int, max_len: int) -> Record:
    k = rng.randrange(len(CLASSIFY_LABELS))
    perm1, perm2 = _CHAINS[k]
    n = len(CLASSIFY_ALPHABET)
    x = rng.randrange(n)
    out = [x]
    for _ in range(rng.randint(min_len, max_len) - 1):
        u = rng.random()
        x = perm1[x] if u < _MIX[0] else perm2[x] if u < sum(_MIX) else rng.randrange(n)
        out.append(x)
    return Record(key, text="".join(CLASSIFY_ALPHABET[i] for i in out), label=CLASSIFY_LABELS[k])


# seq2seq: target = the source reversed, each letter then replaced by a fixed cipher letter.
SEQ2SEQ_ALPHABET = "abcdefgh"
SEQ2SEQ_CIPHER: dict[str, str] = dict(
    zip(
        SEQ2SEQ_ALPHABET,
        _rng("structure", "seq2seq").sample(SEQ2SEQ_ALPHABET, len(SEQ2SEQ_ALPHABET)),
        strict=True,
    )
)


def seq2seq_transform(source: str) -> str:
    """The target the seq2seq task expects for ``source``."""
    return "".join(SEQ2SEQ_CIPHER[c] for c in reversed(source))


def _seq2seq(rng: random.Random, key: str, min_len: int, max_len: int) -> Record:
    source = "".join(rng.choices(SEQ2SEQ_ALPHABET, k=rng.randint(min_len, max_len)))
    return Record(key, text=source, target=seq2seq_transform(source))


# tag: each letter is tagged by how it compares with the previous one, a causal rule (a
# streaming tagger can follow it) that needs memory: the current letter alone does not tell.
TAG_ALPHABET = "abcdefgh"
TAGS = ("start", "up", "down", "same")
_REPEAT = 0.2


def tag_rule(tokens: list[str]) -> list[str]:
    """The tags the tag task expects for ``tokens``."""
    prev = [None, *tokens[:-1]]
    return [
        "start" if p is None else "up" if t > p else "down" if t < p else "same"
        for p, t in zip(prev, tokens, strict=True)
    ]


def _tag(rng: random.Random, key: str, min_len: int, max_len: int) -> Record:
    tokens = [rng.choice(TAG_ALPHABET)]
    for _ in range(rng.randint(min_len, max_len) - 1):
        repeat = rng.random() < _REPEAT
        tokens.append(tokens[-1] if repeat else rng.choice(TAG_ALPHABET.replace(tokens[-1], "")))
    return Record(key, tokens=list(tokens), tags=tag_rule(tokens))


_MAKERS = {"next-token": _next_token, "classify": _classify, "seq2seq": _seq2seq, "tag": _tag}


def _lengths(task: str, min_len: int | None, max_len: int | None) -> tuple[int, int]:
    if task not in TASKS:
        raise DataError(f"unknown synthetic task {task!r}; use one of {', '.join(TASKS)}")
    lo = DEFAULT_LENGTHS[task][0] if min_len is None else min_len
    hi = DEFAULT_LENGTHS[task][1] if max_len is None else max_len
    # next-token cuts at word boundaries, so it needs room for one more word above min_len.
    slack = _LONGEST_WORD + 1 if task == "next-token" else 0
    if lo < 1 or hi < lo + slack:
        need = f"max_len >= min_len + {slack}" if slack else "max_len >= min_len"
        raise DataError(
            f"bad lengths min_len={lo}, max_len={hi} for {task!r}; need min_len >= 1, {need}"
        )
    return lo, hi


def generate(
    task: Task, n: int, *, seed: int, min_len: int | None = None, max_len: int | None = None
) -> list[Record]:
    """``n`` records of ``task``, keys ``syn-<task>-<i>``, deterministic per ``seed``.

    >>> [r.key for r in generate("tag", 2, seed=0)]
    ['syn-tag-0', 'syn-tag-1']
    """
    return _generate(task, 0, n, seed, min_len, max_len)


def _generate(
    task: str, first: int, n: int, seed: int, min_len: int | None, max_len: int | None
) -> list[Record]:
    lo, hi = _lengths(task, min_len, max_len)
    if n < 0:
        raise DataError(f"number of records must be >= 0, got {n}")
    out = []
    for i in range(first, first + n):
        out.append(_MAKERS[task](_rng(task, seed, i), f"syn-{task}-{i}", lo, hi))
    return out


class Split(NamedTuple):
    train: list[Record]
    valid: list[Record]
    test: list[Record]


def generate_split(
    task: Task,
    n_train: int,
    n_valid: int,
    n_test: int,
    seed: int,
    *,
    min_len: int | None = None,
    max_len: int | None = None,
) -> Split:
    """Disjoint train/valid/test sets (distinct keys); ``train`` equals `generate`'s output."""
    return Split(
        _generate(task, 0, n_train, seed, min_len, max_len),
        _generate(task, n_train, n_valid, seed, min_len, max_len),
        _generate(task, n_train + n_valid, n_test, seed, min_len, max_len),
    )


# The next-token grammar as people write it: sentences capitalised, "one" as a digit, a comma
# before "and", and sentences that end in '!' or '?' as well as '.'. Same words and structure,
# but characters ("T", "A", "1", ",", "!", "?") that the plain corpus never uses: a model trained
# on it needs a larger vocabulary (the demo's v2).
WRITTEN_CHARS = frozenset("TA1,!?")


def written(text: str, rng: random.Random) -> str:
    """``text`` of the next-token grammar written with capitals, digits and punctuation.

    >>> written("the cat sees one dog . a moon finds", random.Random(0))
    'The cat sees 1 dog ? A moon finds'
    >>> written("the cat sees one dog and holds a moon .", random.Random(1))
    'The cat sees 1 dog, and holds a moon .'
    """
    out: list[str] = []
    for word in text.split(" "):
        if word == ".":
            word = rng.choice((".", ".", "!", "?"))
        elif word == "one":
            word = "1"
        elif word == "and":
            out[-1] += ","
        if not out or out[-1] in (".", "!", "?"):
            word = word[:1].upper() + word[1:]
        out.append(word)
    return " ".join(out)


def generate_written(
    n: int, *, seed: int, min_len: int | None = None, max_len: int | None = None
) -> list[Record]:
    """``n`` next-token records (keys ``syn-written-<i>``) of the grammar `written` as people
    write it; deterministic per ``seed``."""
    return [
        Record(f"syn-written-{i}", text=written(str(rec.text), _rng("written", seed, i)))
        for i, rec in enumerate(generate("next-token", n, seed=seed, min_len=min_len,
                                         max_len=max_len))
    ]  # fmt: skip
