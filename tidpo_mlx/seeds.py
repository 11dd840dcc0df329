"""Seeds as functions of (run seed, position): what makes a resumed or re-batched run repeat itself.

Every random draw of a run (batch order, dropout, ``weighting: random``,
anchor sampling) is seeded from the run's ``seed`` and *where* it happens
(micro-batch, pair, decode step), never from a generator's history.
"""

from __future__ import annotations

MODULUS = 2**31

MICRO_BATCH = 17
"""Purpose of the global-RNG seed of one training micro-batch (dropout, random weights)."""
EVAL_BATCH = 31
"""Purpose of the global-RNG seed of one evaluation batch (only ``weighting: random`` draws)."""


def derive_seed(seed: int, index: int, purpose: int) -> int:
    """``(seed * 7919 + index * 104729 + purpose) mod 2^31``: one seed per (seed, index, purpose)."""
    return (seed * 7_919 + index * 104_729 + purpose) % MODULUS


def anchor_seed(seed: int, step: int, pair_index: int) -> int:
    """Seed of one pair's anchor at one step: a function of the run seed, the step and the pair's
    global index, so the draw does not depend on which rank or batch holds the pair."""
    return (seed * 1_000_003 + step * 10_007 + pair_index * 7_919) % MODULUS
