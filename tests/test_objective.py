"""The objective on a tiny model against an independent NumPy computation.

The reference here is a second, separately loaded copy of the base model (no
LoRA), so the adapter switch, the response slicing and the log-prob gather are
all checked against plain full-vocabulary forwards.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from tidpo_mlx.backend import select
from tidpo_mlx.config import build_config
from tidpo_mlx.data import PairEncoder
from tidpo_mlx.importance import attribution
from tidpo_mlx.batching import collate
from tidpo_mlx.models import attach_lora, load_base
from tidpo_mlx.objective import batch_objective, response_logprobs

from test_losses import np_kl, np_log_sigmoid, np_weights

ROWS = [
    {"prompt": "What is 12 plus 30?", "chosen": "The answer is 42.", "rejected": "The answer is 43.",
     "anchor": "It is 42, I think."},
    {"prompt": "Convert 3 km to metres.", "chosen": "3 km = 3000 m.", "rejected": "3 km = 300 m, so 300.",
     "anchor": "3000"},
]


def np_distance(x, y):
    """docs/method.md section 5: d(a, b) = sum of squared differences over the overlapping positions."""
    n = min(len(x), len(y))
    return ((x[:n] - y[:n]) ** 2).sum()


def _randomise_lora(model, seed=0):
    rng = np.random.default_rng(seed)
    updates = [(k, mx.array(rng.normal(scale=0.05, size=v.shape).astype(np.float32)))
               for k, v in tree_flatten(model.trainable_parameters())]
    model.load_weights(updates, strict=False)
    mx.eval(model.parameters())


@pytest.fixture(scope="module")
def setup(tiny_model):
    cfg = build_config({"model": str(tiny_model), "num_layers": 2})
    model, tok, _ = load_base(tiny_model)
    reference = attach_lora(model, cfg)
    _randomise_lora(model)
    base, _, _ = load_base(tiny_model)
    select(base, cfg)
    model.eval()
    rt = select(model, cfg, reference=reference).whole_rows()  # whole rows, as every config here allows
    enc = PairEncoder(tok, cfg)
    examples = [enc.encode_row(i, f"mem:{i}", r) for i, r in enumerate(ROWS)]
    return cfg, rt, base, tok, examples


def _np_logps(model, rows):
    """Full-vocabulary log-softmax of a whole forward, gathered at the response tokens."""
    batch = rows.arrays
    logits = np.array(model(mx.array(batch["tokens"])), dtype=np.float64)
    logits -= logits.max(-1, keepdims=True)
    logsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    out, full = [], []
    for i in range(batch["tokens"].shape[0]):
        n = int(batch["resp_mask"][i].sum())
        pos = batch["resp_pos"][i, :n]
        out.append([logsm[i, p - 1, batch["tokens"][i, p]] for p in pos])
        full.append(logsm[i, pos - 1])
    return out, full


def test_reference_is_the_base_model(setup):
    cfg, rt, base, tok, examples = setup
    model = rt.model
    tokens = mx.array(collate(examples, 0).arrays["tokens"])
    with rt.reference():
        off = np.array(model(tokens))
    np.testing.assert_array_equal(off, np.array(base(tokens)))
    assert np.abs(np.array(model(tokens)) - off).max() > 1e-3


def test_response_logprobs_match_full_forward(setup):
    cfg, rt, base, tok, examples = setup
    model = rt.model
    batch = collate(examples, 0)
    arrays, layout = rt.layout_batch(batch)
    got, _ = response_logprobs(rt, rt.embed(arrays), arrays, layout.groups[0], full=False)
    want, _ = _np_logps(model, batch)
    got = np.array(got)
    for i, row in enumerate(want):
        np.testing.assert_allclose(got[i, : len(row)], row, rtol=1e-4, atol=1e-4)
        assert np.all(got[i, len(row):] == 0)


def test_attribution_matches_finite_differences(setup):
    cfg, rt, base, tok, examples = setup
    model = rt.model
    rows = rt.whole_rows()
    batch, _ = rows.layout_batch(collate(examples[:1], 0))
    last = int(batch["last"][0])
    e = rows.embed(batch).astype(mx.float32)
    importance = np.array(attribution(rows, e, batch, slice(None)))[0]

    def target(e_np):
        logits = model(None, input_embeddings=mx.array(e_np))
        return float(logits[0, last].max())

    e_np = np.array(e, dtype=np.float64)
    h = 1e-2
    for pos in (2, last - 3, last):
        grad = np.zeros(e_np.shape[-1])
        for d in range(e_np.shape[-1]):
            plus, minus = e_np.copy(), e_np.copy()
            plus[0, pos, d] += h
            minus[0, pos, d] -= h
            grad[d] = (target(plus.astype(np.float32)) - target(minus.astype(np.float32))) / (2 * h)
        assert importance[pos] == pytest.approx(np.abs(grad).sum(), rel=3e-2)
    assert np.all(importance[last + 1:] == 0)


@pytest.mark.parametrize("preset,loss_type,weighting", [
    ("paper", "dpo", "hybrid"),
    ("official", "tdpo2", "hybrid"),
    ("official", "tdpo1", "softmax"),
    ("paper", "ipo", "none"),
    ("paper", "dpo", "uniform"),
])
def test_batch_objective_matches_numpy(setup, preset, loss_type, weighting):
    base_cfg, rt, base, tok, examples = setup
    model = rt.model
    cfg = build_config({"model": "x", "num_layers": 2, "preset": preset, "loss_type": loss_type,
                        "weighting": weighting, "label_smoothing": 0.1 if loss_type == "dpo" else 0.0})
    anchors = [e.anchor for e in examples]
    batch = collate(examples, 0, anchors)
    loss, aux = batch_objective(rt, cfg, *rt.layout_batch(batch))

    pol, pol_full = _np_logps(model, batch)
    ref, ref_full = _np_logps(base, batch)
    rows = rt.whole_rows()
    whole, _ = rows.layout_batch(batch)
    imp = np.array(attribution(rows, rows.embed(whole)[:4], whole, slice(0, 4)))
    b = len(examples)
    per_pair = []
    for i in range(b):
        terms = {}
        for k, row in (("w", i), ("l", b + i)):
            rho = np.array(pol[row]) - np.array(ref[row])
            p0 = len(examples[i].prompt)
            n_resp = len(rho)
            seq_len = p0 + n_resp
            if cfg.weight_span == "response":
                w = np_weights(weighting, imp[row, p0:seq_len], cfg.lam, cfg.sigma_div, cfg.weight_norm)
            else:
                w = np_weights(weighting, imp[row, :seq_len], cfg.lam, cfg.sigma_div, cfg.weight_norm)[p0:]
            terms[k] = dict(rho=rho, m=(w * rho).sum(), avg=(w * rho).sum() / w.sum(),
                            kl=np_kl(np.array(pol_full[row]), np.array(ref_full[row]), np.ones(n_resp)))
        h = terms["w"]["m"] - terms["l"]["m"]
        if loss_type == "dpo":
            z = cfg.beta * h
            pref = -(1 - cfg.label_smoothing) * np_log_sigmoid(z) - cfg.label_smoothing * np_log_sigmoid(-z)
        elif loss_type == "ipo":
            pref = (terms["w"]["avg"] - terms["l"]["avg"] - 1 / (2 * cfg.beta)) ** 2
        else:
            alpha = 1.0 if loss_type == "tdpo1" else cfg.alpha
            pref = -np_log_sigmoid(cfg.beta * (h - alpha * (terms["l"]["kl"] - terms["w"]["kl"])))
        rho_a = np.array(pol[2 * b + i]) - np.array(ref[2 * b + i])

        trip = max(0.0, np_distance(rho_a, terms["w"]["rho"]) - np_distance(rho_a, terms["l"]["rho"]) + cfg.triplet_margin)
        per_pair.append(pref + cfg.gamma * trip)
        assert float(aux["reward_chosen"][i]) == pytest.approx(cfg.beta * terms["w"]["rho"].sum(), rel=1e-3, abs=1e-5)
    np.testing.assert_allclose(np.array(aux["loss"]), per_pair, rtol=2e-3, atol=1e-5)
    assert float(loss) == pytest.approx(float(np.mean(per_pair)), rel=2e-3, abs=1e-5)


def test_simpo_needs_no_reference(setup):
    _, rt, base, tok, examples = setup
    model = rt.model
    cfg = build_config({"model": "x", "loss_type": "simpo", "weighting": "none"})
    batch = collate(examples, 0)
    _, aux = batch_objective(rt, cfg, *rt.layout_batch(batch))
    pol, _ = _np_logps(model, batch)
    b = len(examples)
    for i in range(b):
        avg_w, avg_l = np.mean(pol[i]), np.mean(pol[b + i])
        want = -np_log_sigmoid(cfg.simpo_beta * (avg_w - avg_l) - cfg.simpo_gamma)
        assert float(aux["loss"][i]) == pytest.approx(want, rel=1e-3)


def test_gradients_reach_only_lora(setup):
    import mlx.nn as nn

    cfg, rt, base, tok, examples = setup
    model = rt.model
    model.train()
    batch, layout = rt.layout_batch(collate(examples, 0, [e.anchor for e in examples]))
    vg = nn.value_and_grad(model, lambda bt: batch_objective(rt, dataclasses.replace(cfg), bt, layout))
    (loss, _), grads = vg(batch)
    flat = dict(tree_flatten(grads))
    assert flat and all(k.endswith(("lora_a", "lora_b")) for k in flat)
    assert max(float(mx.abs(g).max()) for g in flat.values()) > 0
    model.eval()


def test_anchor_cut_to_the_pair_keeps_the_triplet_loss(setup):
    """Anchor tokens past max(len y_w, len y_l) cannot reach d(a, .): the cut batch gives the
    triplet loss of the whole anchor, computed here from separate full-length forwards."""
    base_cfg, rt, base, tok, examples = setup
    model = rt.model
    cfg = build_config({"model": "x", "num_layers": 2, "preset": "paper"})
    enc = PairEncoder(tok, cfg)
    long_anchors = [enc.encode_response(e.source, "anchor", e.messages, e.prompt,
                                        "Well, let me think about this for quite a while first. " * 3)[0]
                    for e in examples]
    assert all(len(a) > e.overlap for a, e in zip(long_anchors, examples))
    batch = collate(examples, 0, long_anchors)
    assert batch.arrays["tokens"].shape == collate(examples, 0, [e.chosen for e in examples]).arrays["tokens"].shape
    _, aux = batch_objective(rt, cfg, *rt.layout_batch(batch))

    full = collate([dataclasses.replace(e, chosen=a, rejected=a) for e, a in zip(examples, long_anchors)], 0)
    pol_a, _ = _np_logps(model, full)
    ref_a, _ = _np_logps(base, full)
    pair = collate(examples, 0)
    pol, _ = _np_logps(model, pair)
    ref, _ = _np_logps(base, pair)
    b = len(examples)
    for i in range(b):
        rho_a = np.array(pol_a[i]) - np.array(ref_a[i])
        assert len(rho_a) == len(long_anchors[i])
        rho_w, rho_l = (np.array(pol[r]) - np.array(ref[r]) for r in (i, b + i))

        want = max(0.0, np_distance(rho_a, rho_w) - np_distance(rho_a, rho_l) + cfg.triplet_margin)
        assert float(aux["loss_triplet"][i]) == pytest.approx(want, rel=2e-3, abs=1e-5)
