"""Synthetic corpora: determinism, shapes, and that each task has the structure it promises."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from stream_rnn.train.data import Record, read_records, write_records
from stream_rnn.train.exceptions import DataError
from stream_rnn.train.synthetic import (
    CLASSIFY_ALPHABET,
    CLASSIFY_LABELS,
    DEFAULT_LENGTHS,
    SEQ2SEQ_ALPHABET,
    SEQ2SEQ_CIPHER,
    TAGS,
    TASKS,
    generate,
    generate_split,
    seq2seq_transform,
    tag_rule,
)


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_per_seed_with_prefix_property(task: str) -> None:
    a = generate(task, 40, seed=7)  # type: ignore[arg-type]
    assert a == generate(task, 40, seed=7)  # type: ignore[arg-type]
    assert a[:10] == generate(task, 10, seed=7)  # type: ignore[arg-type]
    other = generate(task, 40, seed=8)  # type: ignore[arg-type]
    assert [r.items("char") for r in a] != [r.items("char") for r in other]
    assert [r.key for r in a] == [f"syn-{task}-{i}" for i in range(40)]


@pytest.mark.parametrize("task", TASKS)
def test_lengths_within_bounds(task: str) -> None:
    lo, hi = DEFAULT_LENGTHS[task]
    for min_len, max_len in [(lo, hi), (10, 20)]:
        records = generate(task, 200, seed=1, min_len=min_len, max_len=max_len)  # type: ignore[arg-type]
        lengths = [len(r.items("char")) for r in records]
        assert min(lengths) >= min_len and max(lengths) <= max_len
        assert max(lengths) - min(lengths) >= (max_len - min_len) // 2  # lengths vary


def test_split_is_disjoint_and_train_equals_generate() -> None:
    split = generate_split("classify", 50, 20, 30, seed=5)
    assert (len(split.train), len(split.valid), len(split.test)) == (50, 20, 30)
    keys = [r.key for part in split for r in part]
    assert len(set(keys)) == 100
    assert split.train == generate("classify", 50, seed=5)
    assert split.valid == generate("classify", 70, seed=5)[50:]


def test_bad_arguments() -> None:
    with pytest.raises(
        DataError, match="unknown synthetic task 'translate'; use one of next-token"
    ):
        generate("translate", 3, seed=0)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="need min_len >= 1, max_len >= min_len$"):
        generate("tag", 3, seed=0, min_len=5, max_len=4)
    with pytest.raises(DataError, match="need min_len >= 1"):
        generate("seq2seq", 3, seed=0, min_len=0)
    with pytest.raises(DataError, match=r"max_len >= min_len \+ 6"):
        generate("next-token", 3, seed=0, min_len=20, max_len=22)
    with pytest.raises(DataError, match="must be >= 0, got -1"):
        generate("tag", -1, seed=0)


def _cross_entropy(train: list[str], test: list[str], order: int) -> float:
    """Nats per char of an add-one-smoothed order-``order`` char model."""
    alphabet = {c for t in train + test for c in t}
    counts: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for t in train:
        for i, c in enumerate(t):
            counts[t[max(0, i - order) : i] if order else ""][c] += 1
    total, n = 0.0, 0
    for t in test:
        for i, c in enumerate(t):
            ctx = counts[t[max(0, i - order) : i] if order else ""]
            total -= math.log((ctx[c] + 1) / (sum(ctx.values()) + len(alphabet)))
            n += 1
    return total / n


def test_next_token_is_predictable_beyond_unigrams() -> None:
    texts = [r.text or "" for r in generate("next-token", 600, seed=2)]
    assert len({c for t in texts for c in t}) <= 22
    assert all(t and t[0] != " " and "  " not in t for t in texts)
    train, test = texts[:500], texts[500:]
    unigram = math.exp(_cross_entropy(train, test, 0))
    order2 = math.exp(_cross_entropy(train, test, 2))
    assert unigram > 10 and order2 < unigram / 3
    words = Counter(w for t in texts for w in t.split())
    assert words["."] > 100 and len(words) < 30  # whole words: clean word-level vocabulary


def _naive_bayes_accuracy(train: list[Record], test: list[Record], order: int) -> float:
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for r in train:
        t = r.text or ""
        counts[r.label or ""].update(t[max(0, i - order) : i + 1] for i in range(len(t)))
    totals = {lab: sum(c.values()) for lab, c in counts.items()}
    correct = 0
    for r in test:
        t = r.text or ""
        grams = [t[max(0, i - order) : i + 1] for i in range(len(t))]

        def score(lab: str, grams: list[str] = grams) -> float:
            return sum(math.log((counts[lab][g] + 1) / (totals[lab] + 200)) for g in grams)

        correct += max(counts, key=score) == r.label
    return correct / len(test)


def test_classify_needs_letter_pairs_not_single_letters() -> None:
    split = generate_split("classify", 800, 0, 400, seed=11)
    labels = Counter(r.label for r in split.train)
    assert set(labels) == set(CLASSIFY_LABELS) and min(labels.values()) > 150
    assert {c for r in split.train for c in r.text or ""} == set(CLASSIFY_ALPHABET)
    assert _naive_bayes_accuracy(split.train, split.test, order=1) > 0.9
    assert _naive_bayes_accuracy(split.train, split.test, order=0) < 0.45


def test_seq2seq_target_is_reversed_cipher() -> None:
    assert sorted(SEQ2SEQ_CIPHER) == sorted(SEQ2SEQ_CIPHER.values()) == list(SEQ2SEQ_ALPHABET)
    assert any(k != v for k, v in SEQ2SEQ_CIPHER.items())
    for r in generate("seq2seq", 100, seed=3):
        assert r.text and set(r.text) <= set(SEQ2SEQ_ALPHABET)
        assert r.target == seq2seq_transform(r.text)
        assert r.target_items("char") == [SEQ2SEQ_CIPHER[c] for c in reversed(r.text)]


def test_tag_follows_a_causal_rule_that_needs_the_previous_token() -> None:
    assert tag_rule(["b", "c", "c", "a"]) == ["start", "up", "same", "down"]
    records = generate("tag", 200, seed=4)
    seen: defaultdict[str, set[str]] = defaultdict(set)
    for r in records:
        assert r.tokens is not None and r.tags == tag_rule([str(t) for t in r.tokens])
        for tok, tag in zip(r.tokens, r.tags, strict=True):
            seen[str(tok)].add(tag)
    assert {t for r in records for t in r.tags or []} == set(TAGS)
    assert all(len(tags) >= 3 for tags in seen.values())  # the current letter alone does not tell


@pytest.mark.parametrize("task", TASKS)
def test_synthetic_records_survive_a_file_round_trip(task: str, tmp_path: Path) -> None:
    records = generate(task, 30, seed=0)  # type: ignore[arg-type]
    write_records(tmp_path / f"{task}.jsonl", records)
    assert read_records(tmp_path / f"{task}.jsonl") == records
