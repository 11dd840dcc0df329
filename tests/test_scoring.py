"""Compiled, bucketed passes (``scoring.Scorer``, ``evaluate_pairs``) give what the plain uncompiled computation gives.

The reference is each pair alone, padded only to a multiple of 8, through
``objective.batch_logprobs`` without ``mx.compile``; the scorer batches pairs
of many lengths, pads them to length buckets and compiles the policy and the
reference into one graph.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from tidpo_mlx.backend import select
from tidpo_mlx.batching import EVAL_TOKENS, bucket, collate, eval_batches
from tidpo_mlx.config import build_config
from tidpo_mlx.data import PairEncoder
from tidpo_mlx.evaluation import Pairs, evaluate_pairs
from tidpo_mlx.models import attach_trainable, eval_mode, load_base
from tidpo_mlx.objective import batch_logprobs, batch_objective
from tidpo_mlx.runtime import RowLayout
from tidpo_mlx.scoring import Scorer

from test_objective import ROWS, _randomise_lora

WORDS = "the quick brown fox jumps over the lazy dog and then it counts 1 2 3 4 5 6 7 8 9 slowly".split()


def _rows(n: int) -> list[dict]:
    """Pairs of many lengths: multi-turn prompts, long and one-token responses."""
    rng = np.random.default_rng(0)
    rows = list(ROWS)
    for i in range(n):
        words = lambda k: " ".join(rng.choice(WORDS, k))  # noqa: E731
        turns = [{"role": "user", "content": words(int(rng.integers(3, 40)))},
                 {"role": "assistant", "content": words(int(rng.integers(1, 30)))},
                 {"role": "user", "content": words(int(rng.integers(2, 60)))}]
        rows.append({"prompt": turns, "chosen": [{"role": "assistant", "content": words(int(rng.integers(1, 50)))}],
                     "rejected": [{"role": "assistant", "content": words(int(rng.integers(1, 3)) if i % 4 == 0
                                                                     else int(rng.integers(5, 90)))}]})
    return rows


def _plain_sums(rt, cfg, examples) -> np.ndarray:
    """(2 models, 2, pairs): policy and reference sums of each pair alone, uncompiled."""
    out = []
    with eval_mode(rt.model):
        for ex in examples:
            batch, layout = rt.layout_batch(collate([ex], 0))
            logp, _ = batch_logprobs(rt, batch, rt.embed(batch), layout, chunk=cfg.logits_chunk)
            with rt.reference():
                ref, _ = batch_logprobs(rt, batch, rt.embed(batch), layout, chunk=cfg.logits_chunk)
            out.append(np.array(mx.stack([logp.sum(-1), ref.sum(-1)]), dtype=np.float64))
    return np.stack(out, axis=-1)


def test_buckets_bound_padding_and_shapes():
    sizes = [bucket(n) for n in range(1, 4097)]
    assert all(b >= n and b % 8 == 0 for n, b in zip(range(1, 4097), sizes))
    assert all(b - n < 8 for n, b in zip(range(1, 129), sizes))
    assert max((b - n) / n for n, b in zip(range(129, 4097), sizes, strict=False)) <= 1 / 8
    assert sizes == sorted(sizes)
    assert len({bucket(n) for n in range(200, 1001)}) == 20


def test_eval_batches_fill_the_token_budget(tiny_model):
    cfg = build_config({"model": str(tiny_model)})
    _, tok, _ = load_base(tiny_model)
    enc = PairEncoder(tok, cfg)
    examples = [enc.encode_row(i, f"mem:{i}", r) for i, r in enumerate(_rows(60))]
    batches = eval_batches(examples, 4, max_tokens=EVAL_TOKENS)
    assert sorted(ex.index for b in batches for ex in b) == list(range(len(examples)))
    assert len(batches[0]) > 4
    assert all(len(b) == 4 or len(b) * 2 * bucket(b[-1].length) <= EVAL_TOKENS for b in batches[:-1])
    triplets = eval_batches(examples, 4, max_tokens=EVAL_TOKENS, rows=3)
    assert all(len(b) == 4 or len(b) * 3 * bucket(b[-1].length) <= EVAL_TOKENS for b in triplets[:-1])
    assert len(triplets) > len(batches)
    limited = eval_batches(examples, 4, limit=3, max_tokens=EVAL_TOKENS)
    assert sum(len(b) for b in limited) == 12


@pytest.mark.parametrize("fixture,keys", [
    ("tiny_model", {}),
    ("tiny_model", {"shared_prefix": "false"}),
    ("tiny_qwen2", {}),
    ("tiny_model", {"fine_tune_type": "full", "num_layers": 1}),
])
def test_compiled_bucketed_sums_equal_plain_ones(request, fixture, keys):
    path = request.getfixturevalue(fixture)
    cfg = build_config({"model": str(path), "num_layers": 1, **keys})
    model, tok, _ = load_base(path)
    rt = select(model, cfg, reference=attach_trainable(model, cfg))
    _randomise_lora(model, seed=4)
    enc = PairEncoder(tok, cfg)
    examples = [enc.encode_row(i, f"mem:{i}", r) for i, r in enumerate(_rows(40))]
    shared = "shared_prefix" not in keys
    assert rt.facts.backend == "cpu" and rt.facts.layout is (RowLayout.SHARED_PREFIX if shared else RowLayout.ROWS)
    scorer = Scorer(rt, cfg, 0)
    batches = scorer.batches(examples, 2)
    assert len({(len(b), bucket(max(ex.length for ex in b))) for b in batches}) > 1
    order = [ex.index for b in batches for ex in b]
    want = _plain_sums(rt, cfg, examples)[:, :, order]
    reference_first = scorer.sums(batches, "reference")
    policy = scorer.sums(batches, "policy")
    both = scorer.sums(batches, "both")
    assert np.abs(want).min() > 0.1 and np.abs(want[0] - want[1]).max() > 0.1
    np.testing.assert_allclose(reference_first[0], want[1], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(policy[0], want[0], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(both, want, rtol=1e-4, atol=1e-3)
    changed = {k: v * 0 for k, v in tree_flatten(model.trainable_parameters())}
    model.load_weights(list(changed.items()), strict=False)
    after = scorer.sums(batches, "both")
    if cfg.fine_tune_type == "full":
        assert np.abs(after[0] - want[0]).max() > 0.1
        np.testing.assert_allclose(after[1], want[1], rtol=1e-4, atol=1e-3)
    else:
        np.testing.assert_allclose(after[0], after[1], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("keys", [
    {"loss_type": "dpo", "weighting": "none"},
    {},
    {"preset": "official"},
])
def test_eval_command_compiled_equals_each_pair_alone(tiny_model, keys):
    """``evaluate_pairs`` (compiled, bucketed, batches of many pairs) == ``batch_objective`` on each pair alone."""
    cfg = build_config({"model": str(tiny_model), "num_layers": 1, "gamma": 0.0, **keys})
    model, tok, _ = load_base(tiny_model)
    rt = select(model, cfg, reference=attach_trainable(model, cfg))
    _randomise_lora(model, seed=5)
    enc = PairEncoder(tok, cfg)
    rows = _rows(14)
    examples = [enc.encode_row(i, f"mem:{i}", r) for i, r in enumerate(rows)]
    records = evaluate_pairs(rt, tok, cfg, Pairs("mem", rows, examples, enc, []), 3)
    assert [r["index"] for r in records] == list(range(len(examples)))
    keys_seen = set(records[0]) - {"index"}
    assert {"loss", "reward_chosen", "logp_rejected"} <= keys_seen
    with eval_mode(model):
        for ex, rec in zip(examples, records):
            batch, layout = rt.layout_batch(collate([ex], tok.pad_token_id or 0))
            _, aux = batch_objective(rt, cfg, batch, layout)
            for k in keys_seen:
                np.testing.assert_allclose(rec[k], float(aux[k][0]), rtol=1e-4, atol=2e-4, err_msg=k)
    assert np.std([r["reward_chosen"] for r in records]) > 1e-3
