"""Reference scores a trained model must beat."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from stream_rnn.train.batching import Example


def unigram_perplexity(
    train: Sequence[Example], valid: Sequence[Example], vocab_size: int
) -> float:
    """Perplexity of an add-one-smoothed unigram model on exactly the next-token targets.

    Uses the same targets the trainer scores (tokens 2..n and ``<eos>`` of every sequence), so
    the number is directly comparable with a next-token model's validation perplexity.
    """
    counts = Counter(t for ex in train for t in ex.tgt)
    total = sum(counts.values()) + vocab_size
    nll, n = 0.0, 0
    for ex in valid:
        for t in ex.tgt:
            nll -= math.log((counts.get(t, 0) + 1) / total)
            n += 1
    if n == 0:
        raise ValueError("no validation targets to score")
    return math.exp(nll / n)
