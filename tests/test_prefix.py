"""The shared-prefix layout (each pair's prompt run once) gives what whole rows give.

Losses, metrics, token weights, attribution and LoRA gradients of the same
pairs are computed from whole rows and from the CPU backend's shared-prefix
layout of the same rows (the CPU runtime ``backend.select`` builds, and its
``whole_rows()``) and compared; the whole-row path is itself checked against NumPy in
``test_objective.py``.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from tidpo_mlx.backend import select
from tidpo_mlx.backend.cpu.prefix import shared_layout
from tidpo_mlx.backend.cpu.runtime import shared_prefix_active as active
from tidpo_mlx.backend.cpu.runtime import shared_prefix_difference as max_difference
from tidpo_mlx.batching import collate
from tidpo_mlx.config import ConfigError, Switch, build_config
from tidpo_mlx.data import PairEncoder
from tidpo_mlx.models import attach_lora, load_base
from tidpo_mlx.objective import batch_objective, token_weights
from tidpo_mlx.runtime import RowLayout

from test_objective import ROWS, _randomise_lora

MORE = [
    {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Hello there, how are you doing today, friend?",
     "anchor": "Hey, hi, hello."},
]


@pytest.fixture(scope="module")
def setup(tiny_model):
    cfg = build_config({"model": str(tiny_model), "num_layers": 2})
    model, tok, _ = load_base(tiny_model)
    reference = attach_lora(model, cfg)
    _randomise_lora(model, seed=3)
    rt = select(model, cfg, reference=reference)
    assert rt.facts.layout is RowLayout.SHARED_PREFIX and rt.whole_rows().facts.layout is RowLayout.ROWS
    enc = PairEncoder(tok, cfg)
    examples = [enc.encode_row(i, f"mem:{i}", r) for i, r in enumerate(ROWS + MORE)]
    assert len({len(e.prompt) for e in examples}) > 1
    return rt, examples


def _both(rt, cfg, examples, anchors):
    """(loss, aux, grads) from whole rows and from the shared layout, dropout off."""
    out = []
    for run in (rt.whole_rows(), rt):
        batch, layout = run.layout_batch(collate(examples, 0, anchors))
        vg = nn.value_and_grad(rt.model, lambda bt: batch_objective(run, cfg, bt, layout))
        mx.random.seed(5)
        (loss, aux), grads = vg(batch)
        mx.eval(loss, aux, grads)
        out.append((loss, aux, dict(tree_flatten(grads))))
    return out


CASES = [
    ({"preset": "paper"}, True),
    ({"preset": "paper", "weighting": "none"}, False),
    ({"preset": "official", "weight_span": "response"}, True),
    ({"preset": "paper", "loss_type": "ipo", "weighting": "softmax"}, False),
    ({"preset": "paper", "weighting": "prior"}, True),
    ({"preset": "paper", "weighting": "uniform", "loss_type": "tdpo1"}, False),
    ({"preset": "paper", "loss_type": "simpo", "weighting": "none"}, False),
]


@pytest.mark.parametrize("keys,with_anchor", CASES)
def test_shared_prefix_matches_whole_rows(setup, keys, with_anchor):
    rt, examples = setup
    cfg = build_config({"model": "x", "num_layers": 2, **keys})
    anchors = [e.anchor for e in examples] if with_anchor else None
    (loss_w, aux_w, g_w), (loss_s, aux_s, g_s) = _both(rt, cfg, examples, anchors)
    assert float(loss_s) == pytest.approx(float(loss_w), rel=1e-4, abs=1e-6)
    for k in aux_w:
        np.testing.assert_allclose(np.array(aux_s[k]), np.array(aux_w[k]), rtol=1e-4, atol=1e-5, err_msg=k)
    if with_anchor:
        assert float(mx.abs(aux_w["loss_triplet"]).max()) > 0
    assert g_w.keys() == g_s.keys()
    for k in g_w:
        scale = max(float(mx.abs(g_w[k]).max()), 1e-6)
        np.testing.assert_allclose(np.array(g_s[k]), np.array(g_w[k]), atol=5e-4 * scale, err_msg=k)


def test_random_weights_draw_per_row_position(setup):
    """weighting: random draws one number per position of a row, so the two layouts draw
    different numbers (same distribution); everything not weighted stays equal."""
    rt, examples = setup
    cfg = build_config({"model": "x", "num_layers": 2, "preset": "paper", "weighting": "random"})
    (_, aux_w, _), (loss_s, aux_s, _) = _both(rt, cfg, examples, None)
    assert np.isfinite(float(loss_s))
    for k in ("reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected", "ntoks"):
        np.testing.assert_allclose(np.array(aux_s[k]), np.array(aux_w[k]), rtol=1e-4, atol=1e-5, err_msg=k)


def test_attribution_at_the_response_is_that_of_the_whole_sequence(setup):
    rt, examples = setup
    cfg = build_config({"model": "x", "num_layers": 2, "preset": "paper"})
    rows = collate(examples, 0)
    n = rows.layout.rows
    got = {}
    for name, run in (("whole", rt.whole_rows()), ("shared", rt)):
        batch, _ = run.layout_batch(rows)
        out = token_weights(run, cfg, batch, run.embed(batch), n)
        imp = np.array(out["importance"])
        pos, mask = np.array(batch["resp_pos"]), np.array(batch["resp_mask"])
        got[name] = (np.take_along_axis(imp, pos, axis=1) * mask, np.array(out["weights"]))
    assert got["whole"][0].max() > 0
    np.testing.assert_allclose(got["shared"][0], got["whole"][0], rtol=1e-3, atol=1e-5 * got["whole"][0].max())
    np.testing.assert_allclose(got["shared"][1], got["whole"][1], rtol=1e-3, atol=1e-6)


def test_shared_layout_arrays(setup):
    _, examples = setup
    rows = collate(examples, 0)
    whole, shared = rows.arrays, shared_layout(rows)
    b = len(examples)
    assert shared["prompt_tokens"].shape[0] == b
    assert shared["tokens"].shape[1] < whole["tokens"].shape[1]
    for i, e in enumerate(examples):
        p = len(e.prompt) - 1
        assert list(shared["prompt_tokens"][i, :p]) == e.prompt[:-1]
        for row, r in ((i, e.chosen), (b + i, e.rejected)):
            assert list(shared["tokens"][row, : len(r) + 1]) == [e.prompt[-1]] + r
            assert shared["positions"][row, 0] == p
            allowed = shared["attn_mask"][row] == 0
            assert allowed[0, :p].all() and not allowed[0, p: shared["prompt_tokens"].shape[1]].any()
            chunk = allowed[:, shared["prompt_tokens"].shape[1]:]
            assert (chunk == np.tril(np.ones_like(chunk))).all()
    np.testing.assert_array_equal(shared["resp_mask"], whole["resp_mask"])
    np.testing.assert_array_equal(
        np.take_along_axis(shared["tokens"], shared["resp_pos"], 1) * shared["resp_mask"],
        np.take_along_axis(whole["tokens"], whole["resp_pos"], 1) * whole["resp_mask"],
    )
    groups = shared["tokens"].shape[0] // b
    assert shared["seq_mask"].sum() + groups * shared["prompt_mask"].sum() == whole["seq_mask"].sum()


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_qwen2"])
def test_load_checks_the_shared_forward(request, fixture):
    model, _, _ = load_base(request.getfixturevalue(fixture))
    rt = select(model, build_config({"model": "x"}))
    assert any("shared prefix" in n for n in rt.notes)
    assert max_difference(rt) < 1e-5


def test_active_only_where_exact(setup):
    model = setup[0].model
    paper = build_config({"model": "x", "preset": "paper"})
    official = build_config({"model": "x", "preset": "official"})
    assert active(model, paper)
    assert not active(model, official)
    assert active(model, dataclasses.replace(official, weighting="none"))
    assert not active(model, dataclasses.replace(paper, grad_checkpoint=Switch.TRUE))
    assert not active(model, dataclasses.replace(paper, shared_prefix=Switch.FALSE))
    with pytest.raises(ConfigError, match="weight_span: sequence"):
        active(model, dataclasses.replace(official, shared_prefix=Switch.TRUE))
