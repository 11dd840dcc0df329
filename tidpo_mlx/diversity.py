"""Diversity of a prompt's samples, in tokens: distinct-n and self-BLEU-2 (docs/generation.md).

Every function takes the samples of one prompt as token-id lists. A score
that has nothing to count (no n-gram at all, fewer than two samples) is
``None`` and the prompt is left out of that score's mean.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

Tokens = Sequence[int]


def ngrams(tokens: Tokens, n: int) -> Counter:
    """Counts of the n-grams (tuples of ``n`` consecutive ids) of one sample."""
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def distinct_n(samples: Sequence[Tokens], n: int) -> float | None:
    """Distinct-n (Li et al. 2016): unique n-grams over all n-grams, pooled over the samples."""
    pooled: Counter = Counter()
    for s in samples:
        pooled.update(ngrams(s, n))
    total = sum(pooled.values())
    return len(pooled) / total if total else None


def bleu2(hypothesis: Tokens, references: Sequence[Tokens]) -> float | None:
    """Sentence BLEU-2 of one sample against the others (Papineni et al. 2002), unsmoothed.

    ``BP * sqrt(p1 * p2)``: ``p_n`` counts each hypothesis n-gram at most as
    often as it occurs in the reference holding it most (clipped precision),
    ``BP = exp(1 - r / c)`` when the hypothesis length ``c`` is below the
    length ``r`` of the reference closest to it (the shorter on a tie), else
    1. None when the hypothesis has no bigram.
    """
    c = len(hypothesis)
    if c < 2:
        return None
    precisions = []
    for n in (1, 2):
        hyp = ngrams(hypothesis, n)
        most: Counter = Counter()
        for ref in references:
            most |= ngrams(ref, n)
        precisions.append(sum(min(k, most[g]) for g, k in hyp.items()) / sum(hyp.values()))
    if min(precisions) == 0:
        return 0.0
    r = min((len(ref) for ref in references), key=lambda length: (abs(length - c), length))
    penalty = 1.0 if c >= r else math.exp(1 - r / c)
    return penalty * math.sqrt(precisions[0] * precisions[1])


def self_bleu2(samples: Sequence[Tokens]) -> float | None:
    """Self-BLEU-2 (Zhu et al. 2018): the mean :func:`bleu2` of each sample against the other samples.

    Higher means more alike (less diverse); None with fewer than two samples
    or when no sample has a bigram.
    """
    samples = list(samples)
    if len(samples) < 2:
        return None
    scores = [bleu2(s, samples[:i] + samples[i + 1:]) for i, s in enumerate(samples)]
    scores = [s for s in scores if s is not None]
    return sum(scores) / len(scores) if scores else None


def diversity_scores(samples: Sequence[Tokens]) -> dict[str, float | None]:
    """``length`` (mean tokens per sample), and with two samples or more ``distinct-1``, ``distinct-2``
    and ``self-bleu-2``."""
    samples = [list(s) for s in samples]
    out: dict[str, float | None] = {"length": sum(map(len, samples)) / len(samples)}
    if len(samples) >= 2:
        out.update({"distinct-1": distinct_n(samples, 1), "distinct-2": distinct_n(samples, 2),
                    "self-bleu-2": self_bleu2(samples)})
    return out
