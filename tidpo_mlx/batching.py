"""Batches of preference pairs: seeded length-bucketed order, and whole-row padded arrays.

A collated batch stacks the chosen, rejected (and anchor) sequences of B
pairs as whole rows ``x ++ y``, with a :class:`Layout` that says what it
holds. A forward (``forward.py``) may turn the rows into its own layout
before the model sees them; nothing downstream infers the layout from the
arrays' keys or shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from tidpo_mlx.data.example import Example
from tidpo_mlx.errors import DataError

PAD_MULTIPLE = 8
"""Lengths are rounded up to this, so compiled steps see few distinct shapes.

Each new shape costs a trace of the whole model while padding stays a
few tokens (on the bundled data, rounding to 32 padded two thirds of the
batches from at most 75 to 96 positions).
"""


EVAL_TOKENS = 4096
"""Token budget of an evaluation batch (rows x padded length) when it holds more than the training batch."""


@dataclass(frozen=True)
class Layout:
    """What a batch holds: ``pairs`` pairs, anchor rows or not, and the row layout ``kind``.

    Rows are ``[chosen x B, rejected x B]`` and, with ``anchors``, ``[anchor x B]``
    after them. ``kind`` is ``rows`` (whole sequences) or the layout a forward
    turned them into (e.g. the CPU backend's ``shared-prefix``).
    """

    pairs: int
    anchors: bool
    kind: str = "rows"

    @property
    def rows(self) -> int:
        """Rows in the batch: 2B, or 3B with anchors."""
        return (3 if self.anchors else 2) * self.pairs

    @property
    def groups(self) -> list[slice]:
        """Row groups that run as one forward each: the pair rows, then the anchor rows."""
        b = self.pairs
        return [slice(0, 2 * b)] + ([slice(2 * b, 3 * b)] if self.anchors else [])


def round_up(n: int, multiple: int = PAD_MULTIPLE) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class Rows:
    """A collated batch of whole rows (NumPy arrays), its layout and its padding id."""

    arrays: dict[str, np.ndarray]
    layout: Layout
    pad_id: int
    pad_to: Callable[[int], int] = round_up
    """How lengths are padded (a forward's own layout pads the same way)."""


def bucket(n: int) -> int:
    """``n`` rounded up to a length bucket: multiples of 8 to 128, then eight buckets per doubling
    (144, 160, ..., 256, 288, ...), so at most 1/8 of a row is padding and 200-1000 tokens take 20 shapes."""
    step = max(PAD_MULTIPLE, 1 << max(0, (n - 1).bit_length() - 4))
    return round_up(n, step)


def collate(
    examples: Sequence[Example],
    pad_id: int,
    anchors: Sequence[list[int]] | None = None,
    pad_to: Callable[[int], int] = round_up,
) -> Rows:
    """Right-padded whole rows for chosen, rejected (and anchor) sequences, stacked in that order.

    Arrays: ``tokens`` (N, L), ``seq_mask`` (N, L: real tokens), ``resp_span``
    (N, L: response tokens), ``resp_pos`` (N, R: position of response token r),
    ``resp_mask`` (N, R), ``last`` (N: last real position), ``prompt_len`` (N)
    and ``pair_index`` (B: the pairs' positions in their file), with N = 2B
    (3B with anchors). An anchor is cut to :attr:`Example.overlap` tokens: the
    rest cannot reach the triplet distance, so the loss is exactly that of the
    whole anchor while the anchor rows pad no longer than the pair. Masks are
    inputs, not constants, so compiled graphs can share them between the
    attribution and the loss forward. ``pad_to`` pads lengths (training:
    :func:`round_up`; evaluation: :func:`bucket`, fewer shapes to compile).
    """
    groups = [[e.chosen for e in examples], [e.rejected for e in examples]]
    if anchors is not None:
        groups.append([a[: e.overlap] for e, a in zip(examples, anchors)])
    prompts = [e.prompt for e in examples] * len(groups)
    responses = [r for g in groups for r in g]
    n = len(responses)
    L = pad_to(max(len(p) + len(r) for p, r in zip(prompts, responses)))
    R = pad_to(max(len(r) for r in responses))
    tokens = np.full((n, L), pad_id, dtype=np.int32)
    seq_mask = np.zeros((n, L), dtype=np.float32)
    resp_span = np.zeros((n, L), dtype=np.float32)
    resp_pos = np.zeros((n, R), dtype=np.int32)
    resp_mask = np.zeros((n, R), dtype=np.float32)
    last = np.zeros((n,), dtype=np.int32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = p + r
        tokens[i, : len(seq)] = seq
        seq_mask[i, : len(seq)] = 1.0
        resp_span[i, len(p): len(seq)] = 1.0
        resp_pos[i, : len(r)] = np.arange(len(p), len(seq))
        resp_pos[i, len(r):] = len(p)
        resp_mask[i, : len(r)] = 1.0
        last[i] = len(seq) - 1
    arrays = dict(
        pair_index=np.array([e.index for e in examples], dtype=np.int32),
        tokens=tokens,
        seq_mask=seq_mask,
        resp_span=resp_span,
        resp_pos=resp_pos,
        resp_mask=resp_mask,
        last=last,
        prompt_len=np.array([len(p) for p in prompts], dtype=np.int32),
    )
    return Rows(arrays, Layout(pairs=len(examples), anchors=anchors is not None), pad_id, pad_to)


def batch_order(examples: Sequence[Example], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-bucketed batches of example positions, in a seeded order for ``epoch``.

    Examples are sorted by length and cut into batches of similar length (little
    padding); the order of the batches is shuffled per epoch. Deterministic in
    (seed, epoch), so a resumed run sees the same batches.
    """
    if len(examples) < batch_size:
        raise DataError(f"only {len(examples)} training pairs for batch_size {batch_size}")
    order = sorted(range(len(examples)), key=lambda i: (examples[i].length, i))
    batches = [order[i: i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    rng = np.random.default_rng([seed, epoch])
    return [batches[i] for i in rng.permutation(len(batches))]


def iterate_batches(
    examples: Sequence[Example], batch_size: int, seed: int, start: int = 0
) -> Iterator[list[Example]]:
    """Endless micro-batches from micro-batch number ``start`` on (epochs reshuffled)."""
    per_epoch = len(batch_order(examples, batch_size, seed, 0))
    k = start
    while True:
        epoch, pos = divmod(k, per_epoch)
        order = batch_order(examples, batch_size, seed, epoch)
        for idx in order[pos:]:
            yield [examples[i] for i in idx]
            k += 1


def eval_batches(
    examples: Sequence[Example], batch_size: int, limit: int = -1, max_tokens: int = 0, rows: int = 2
) -> list[list[Example]]:
    """Held-out batches in length order (no shuffling), of ``limit`` batches' worth of pairs at most.

    With a limit, the ``limit * batch_size`` pairs are spread evenly over the
    split in file order (every k-th pair), not the shortest ones, so a subset
    keeps the split's mix of tasks and lengths. With ``max_tokens``, a batch
    takes more pairs than ``batch_size`` while their ``rows`` rows per pair
    (chosen and rejected; 3 with anchor rows), padded to the :func:`bucket` of
    its longest pair, fit that budget.
    """
    keep = range(len(examples))
    if 0 <= limit and limit * batch_size < len(examples):
        keep = np.unique(np.linspace(0, len(examples) - 1, limit * batch_size).round().astype(int)).tolist()
    order = sorted(keep, key=lambda i: (examples[i].length, i))
    if not max_tokens:
        return [[examples[i] for i in order[j: j + batch_size]] for j in range(0, len(order), batch_size)]
    batches: list[list[Example]] = []
    for i in order:
        ex = examples[i]
        if batches and (len(batches[-1]) < batch_size or (len(batches[-1]) + 1) * rows * bucket(ex.length) <= max_tokens):
            batches[-1].append(ex)
        else:
            batches.append([ex])
    return batches
