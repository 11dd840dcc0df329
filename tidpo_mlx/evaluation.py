"""Evaluation without training: the held-out pass of a run and ``tidpo-mlx eval``, one path.

Both compute per-pair arrays and summarise them with the metric names of
training (``metrics.py``: TRL's ``rewards/accuracies``, ``rewards/margins``,
...). :class:`HeldOut` needs only summed log-probs, with the reference's
computed once; :func:`evaluate_pairs` runs the recipe's whole objective
(``objective.batch_objective``, the very function training differentiates)
on every pair with the model in eval mode. Both are compiled over bucketed
lengths (``scoring.py``, ``batching.bucket``).

Anchors (triplet term): a pair's ``anchor`` field wins; the others are sampled
from the policy with the recipe's sampler, seeded from the pair's index
(``seeds.anchor_seed(seed, 0, index)``) with one keyed sampler per pair, so a
pair's anchor does not depend on the batch it lands in.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import mlx.core as mx
import numpy as np

from tidpo_mlx import memory_guard
from tidpo_mlx.anchors import sample_anchors
from tidpo_mlx.batching import EVAL_TOKENS, Layout, bucket, collate, eval_batches
from tidpo_mlx.config import Config
from tidpo_mlx.data.encoder import PairEncoder
from tidpo_mlx.data.example import Example
from tidpo_mlx.data.load import load_split
from tidpo_mlx.interrupts import check
from tidpo_mlx.metrics import held_out_metrics
from tidpo_mlx.models import eval_mode
from tidpo_mlx.objective import PER_PAIR_KEYS, batch_objective
from tidpo_mlx.runtime import Runtime
from tidpo_mlx.scoring import Scorer, Which
from tidpo_mlx.seeds import EVAL_BATCH, derive_seed


@dataclass
class Pairs:
    """The rows of ``--data`` to evaluate and their encoded examples (same order)."""

    path: str
    """What was read: a file, or a source and its split."""
    rows: list[dict[str, Any]]
    examples: list[Example]
    encoder: PairEncoder
    notes: list[str]


def load_pairs(data: str, tokenizer: Any, cfg: Config, limit: int | None = None) -> Pairs:
    """The pairs of ``data`` to evaluate (first ``limit`` if given), loaded as training loads them
    (:func:`~tidpo_mlx.data.load.load_split`: same cache, checks, held-out split and indices).

    A file: all its rows. A folder, bundled name, save_to_disk folder or Hub
    id: its valid split, or the held-out split training makes when it has
    none (same ``valid_fraction`` and ``seed``). Invalid rows are reported as
    in training (``skip_invalid`` drops them).
    """
    split = load_split(data, tokenizer, cfg, limit=limit)
    return Pairs(split.name, split.rows, split.examples, PairEncoder(tokenizer, cfg), split.notes)


def pad_id_of(tokenizer: Any) -> int:
    """The padding id batches use (pad token, else 0)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def batch_seed(cfg: Config, first_index: int) -> int:
    """Seed of the global RNG for one eval batch (only ``weighting: random`` draws from it)."""
    return derive_seed(cfg.seed, first_index, EVAL_BATCH)


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Pairs and the held-out metrics of per-pair records, plus the mean weighted margin ``m_w - m_l``."""
    arrays = {k: np.array([r[k] for r in records], dtype=np.float64) for k in records[0] if k != "index"}
    return {
        "pairs": len(records),
        **held_out_metrics(arrays),
        "margins/weighted": float(arrays["weighted_margin"].mean()),
    }


class HeldOut:
    """Held-out metrics of the current policy from summed response log-probs (``scoring.Scorer``).

    The reference's sums are computed once. Each rank evaluates its share of
    the batches, then the sums are all-summed. After each batch the buffer
    cache is bounded (``clear_cache_threshold``) and a Ctrl-C or SIGTERM
    stops the pass (``interrupts.check``).
    """

    def __init__(self, rt: Runtime, cfg: Config, examples: list[Example], pad_id: int, world: Any):
        self.cfg = cfg
        self.world = world
        self.scorer = Scorer(rt, cfg, pad_id)
        batches = self.scorer.batches(examples, 2 * cfg.batch_size, cfg.val_batches)
        ours = np.arange(len(batches)) % world.size() == world.rank()
        self.mine = [b for b, keep in zip(batches, ours) if keep]
        self.positions = np.flatnonzero(np.repeat(ours, [len(b) for b in batches]))
        self.pairs = sum(len(b) for b in batches)
        self.ref = self._sums("reference") if cfg.uses_reference else None

    def _sums(self, which: Which) -> tuple[np.ndarray, np.ndarray]:
        """Summed log-probs of every held-out pair, chosen and rejected, of the policy or the reference."""
        sums = np.zeros((2, self.pairs), dtype=np.float32)
        if self.mine:
            sums[:, self.positions] = self.scorer.sums(self.mine, which, done=self._after_batch)[0]
        if self.world.size() > 1:
            sums = np.array(mx.distributed.all_sum(mx.array(sums), stream=mx.cpu))
        return sums[0], sums[1]

    def _after_batch(self, pairs: int) -> None:
        memory_guard.after_step(self.cfg.clear_cache_threshold)
        check()

    def __call__(self, policy_is_reference: bool = False) -> dict[str, float]:
        """Metrics of the current policy; ``policy_is_reference`` reuses the reference sums
        (fresh LoRA: lora_b is 0, so the policy computes exactly the reference)."""
        chosen, rejected = self.ref if policy_is_reference and self.ref is not None else self._sums("policy")
        per_pair = {"logp_chosen": chosen, "logp_rejected": rejected}
        if self.ref is not None:
            beta = self.cfg.beta
            per_pair.update(reward_chosen=beta * (chosen - self.ref[0]), reward_rejected=beta * (rejected - self.ref[1]))
        return held_out_metrics(per_pair)


def evaluate_pairs(
    rt: Runtime,
    tokenizer: Any,
    cfg: Config,
    pairs: Pairs,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """The recipe's per-pair loss and metrics on every pair, in input order.

    Records carry ``index`` (0-based position in the file) and the per-pair
    arrays of ``batch_objective`` (``kl_*`` for tdpo losses only). Rewards are
    docs/method.md section 10's ``beta * sum rho`` (simpo: ``simpo_beta * avg logp``).
    The objective is compiled once per layout, lengths padded to
    :func:`~tidpo_mlx.batching.bucket` lengths (few shapes to trace); without
    the attribution (no gradient inside the objective) batches grow to
    :data:`~tidpo_mlx.batching.EVAL_TOKENS` like the held-out pass, with them
    they keep ``batch_size`` pairs (the attribution's backward holds a training
    micro-step's activations).
    """
    pad = pad_id_of(tokenizer)
    model = rt.model
    compiled: dict[Layout, Callable] = {}

    def per_pair(batch: dict[str, mx.array], layout: Layout) -> dict[str, mx.array]:
        _, aux = batch_objective(rt, cfg, batch, layout)
        return {k: v for k, v in aux.items() if k in PER_PAIR_KEYS}

    budget = 0 if cfg.uses_attribution else EVAL_TOKENS
    records: dict[int, dict[str, Any]] = {}
    with eval_mode(model):
        for batch_examples in eval_batches(pairs.examples, batch_size, max_tokens=budget,
                                           rows=3 if cfg.triplet_on else 2):
            anchors = None
            if cfg.triplet_on:
                anchors = sample_anchors(model, tokenizer, pairs.encoder, batch_examples, cfg, step=0)
            batch, layout = rt.layout_batch(collate(batch_examples, pad, anchors, pad_to=bucket))
            if layout not in compiled:
                compiled[layout] = rt.compile(partial(per_pair, layout=layout))
            mx.random.seed(batch_seed(cfg, batch_examples[0].index))
            values = {k: np.array(v, dtype=np.float64) for k, v in compiled[layout](batch).items()}
            for j, ex in enumerate(batch_examples):
                records[ex.index] = {"index": ex.index, **{k: float(values[k][j]) for k in PER_PAIR_KEYS if k in values}}
            memory_guard.after_step(cfg.clear_cache_threshold)
            if progress is not None:
                progress(len(batch_examples))
    return [records[i] for i in sorted(records)]
