"""The anchor sampler keeps what Hugging Face's temperature -> top-k -> top-p warpers keep."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from tidpo_mlx.anchors import filter_logits, keyed_sampler
from tidpo_mlx.config import build_config


def hf_kept(logits: np.ndarray, top_k: int, top_p: float) -> set[int]:
    """TopKLogitsWarper then TopPLogitsWarper (ascending sort, drop cumulative <= 1 - top_p, keep the top)."""
    kept = np.argsort(-logits)[:top_k] if top_k > 0 else np.arange(len(logits))
    vals = logits[kept]
    order = np.argsort(vals)
    probs = np.exp(vals[order] - vals.max())
    probs /= probs.sum()
    remove = np.cumsum(probs) <= 1 - top_p
    remove[-1] = False
    return {int(kept[order[i]]) for i in range(len(order)) if not remove[i]}


@pytest.mark.parametrize("top_k,top_p", [(50, 0.95), (0, 0.9), (7, 1.0), (20, 0.5)])
def test_filter_matches_hf_warpers(top_k, top_p):
    rng = np.random.default_rng(top_k)
    logits = (rng.standard_normal((3, 500)) * 3).astype(np.float32)
    vals, ids = filter_logits(mx.array(logits), top_k, top_p)
    vals = np.array(vals)
    ids = np.array(ids) if ids is not None else np.broadcast_to(np.arange(500), vals.shape)
    for row in range(3):
        got = {int(i) for i, v in zip(ids[row], vals[row]) if np.isfinite(v)}
        assert got == hf_kept(logits[row], top_k, top_p)
        assert all(vals[row][ids[row] == i][0] == logits[row, i] for i in got)


def test_keyed_sampler_draws_only_kept_tokens_and_repeats_per_key():
    cfg = build_config({"model": "x", "anchor_temperature": 0.8, "anchor_top_k": 5, "anchor_top_p": 0.9})
    logits = mx.array(np.random.default_rng(0).standard_normal((1, 300)).astype(np.float32) * 4)
    kept = hf_kept(np.array(logits[0]) / 0.8, 5, 0.9)
    draws = [int(keyed_sampler(cfg, seed)(logits)[0]) for seed in range(200)]
    assert set(draws) <= kept and len(set(draws)) > 1
    again = [int(keyed_sampler(cfg, seed)(logits)[0]) for seed in range(200)]
    assert draws == again
