"""The chunked LM head (``logprobs.py``): same log-probs, KL and gradients as the plain one, less memory."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from tidpo_mlx.batching import collate
from tidpo_mlx.config import build_config
from tidpo_mlx.logprobs import Head, head_parameters, token_logprobs, token_logprobs_kl
from tidpo_mlx.objective import batch_objective
from tidpo_mlx.trainer import build_optimizer, compile_steps

from test_objective import setup  # noqa: F401  (the fixture)

N, D, V = 12, 8, 50


def _head(seed: int) -> nn.Linear:
    mx.random.seed(seed)
    head = nn.Linear(D, V)
    mx.eval(head.parameters())
    return head


def _plain(head: nn.Linear, h: mx.array, targets: mx.array) -> mx.array:
    logits = head(h)
    return mx.take_along_axis(logits - mx.logsumexp(logits, axis=-1, keepdims=True), targets[:, None], axis=-1)[:, 0]


@pytest.mark.parametrize("chunk", [3, 4, 5, 11])
def test_token_logprobs_and_gradients_equal_the_plain_head(chunk):
    """Chunks that do (3, 4) and do not (5, 11) divide the 12 positions; gradients reach hidden and the head."""
    head = _head(0)
    h = mx.random.normal((N, D), key=mx.random.key(1))
    targets = mx.random.randint(0, V, (N,), key=mx.random.key(2))
    weights = mx.random.normal((N,), key=mx.random.key(3))
    params = dict(tree_flatten(head.trainable_parameters()))

    def loss(h, params, chunk):
        return (token_logprobs(Head(head, head, params), h, targets, chunk) * weights).sum()

    want = _plain(head, h, targets)
    np.testing.assert_allclose(np.array(token_logprobs(head, h, targets, chunk)), np.array(want), atol=1e-5)
    got_h, got_p = mx.grad(loss, argnums=(0, 1))(h, params, chunk)
    plain_h, plain_p = mx.grad(loss, argnums=(0, 1))(h, params, 0)
    np.testing.assert_allclose(np.array(got_h), np.array(plain_h), atol=1e-5)
    assert float(mx.abs(plain_p["weight"]).max()) > 1e-3
    for k in params:
        np.testing.assert_allclose(np.array(got_p[k]), np.array(plain_p[k]), atol=1e-5)


@pytest.mark.parametrize("chunk", [4, 5])
def test_token_kl_matches_the_full_vocabulary_formula(chunk):
    """``KL(ref || pi)`` per position from the log-softmaxes, gradient through the policy only."""
    head, ref = _head(0), _head(1)
    h = mx.random.normal((2, N // 2, D), key=mx.random.key(1))
    h_ref = mx.random.normal((2, N // 2, D), key=mx.random.key(4))
    targets = mx.random.randint(0, V, (2, N // 2), key=mx.random.key(2))
    lp = np.array(nn.log_softmax(head(h), axis=-1), dtype=np.float64)
    lr = np.array(nn.log_softmax(ref(h_ref), axis=-1), dtype=np.float64)
    logp, ref_logp, kl = token_logprobs_kl(head, h, ref, h_ref, targets, chunk)
    t = np.array(targets)[..., None]
    np.testing.assert_allclose(np.array(logp), np.take_along_axis(lp, t, -1)[..., 0], atol=1e-5)
    np.testing.assert_allclose(np.array(ref_logp), np.take_along_axis(lr, t, -1)[..., 0], atol=1e-5)
    np.testing.assert_allclose(np.array(kl), (np.exp(lr) * (lr - lp)).sum(-1), atol=1e-5)

    def loss(h, h_ref, chunk):
        logp, ref_logp, kl = token_logprobs_kl(head, h, ref, h_ref, targets, chunk)
        return (kl + 0.3 * logp + ref_logp).sum()

    got = mx.grad(loss, argnums=(0, 1))(h, h_ref, chunk)
    plain = mx.grad(loss, argnums=(0, 1))(h, h_ref, 0)
    np.testing.assert_allclose(np.array(got[0]), np.array(plain[0]), atol=1e-5)
    assert float(mx.abs(got[1]).max()) == 0.0 == float(mx.abs(plain[1]).max())


def test_chunked_backward_holds_one_chunk_of_logits():
    """Compiled gradient: the plain head holds several (n, V) arrays, the chunked one about a chunk's worth."""
    n, dim, vocab, chunk = 2048, 32, 8192, 128
    head = nn.Linear(dim, vocab, bias=False)
    head.freeze()
    h = mx.random.normal((n, dim), key=mx.random.key(1))
    targets = mx.random.randint(0, vocab, (n,), key=mx.random.key(2))
    mx.eval(head.parameters(), h, targets)
    logits_bytes = n * vocab * 4

    def peak(chunk: int) -> int:
        grad = mx.compile(mx.grad(lambda x: token_logprobs(head, x, targets, chunk).sum()))
        mx.eval(grad(h))
        base = mx.get_active_memory()
        limit = mx.set_memory_limit(base + 2**20)  # eval then waits for running work before allocating more
        try:
            mx.reset_peak_memory()
            mx.eval(grad(h))
            return mx.get_peak_memory() - base
        finally:
            mx.set_memory_limit(limit)

    assert peak(0) >= 1.5 * logits_bytes
    assert peak(chunk) <= 0.25 * logits_bytes


@pytest.fixture(scope="module")
def tiny(setup):
    """test_objective's tiny LoRA model (randomised adapters) over whole rows, and its two pairs."""
    _, rt, _, _, examples = setup
    return rt, examples


def test_head_parameters_are_none_under_lora(tiny):
    rt, _ = tiny
    assert head_parameters(rt.model) == {}


@pytest.mark.parametrize("preset,loss_type", [("paper", "dpo"), ("official", "tdpo2")])
@pytest.mark.parametrize("chunk", [4, 7])
def test_objective_chunked_equals_plain(tiny, preset, loss_type, chunk):
    """Loss, per-pair terms and LoRA gradients of the compiled step, chunked vs ``logits_chunk: 0``."""
    rt, examples = tiny
    base = build_config({"model": "x", "num_layers": 2, "preset": preset, "loss_type": loss_type})
    batch, layout = rt.layout_batch(collate(examples, 0))
    positions = layout.rows * batch["resp_pos"].shape[1]
    assert positions % 4 == 0 and positions % 7 != 0
    results = []
    for c in (0, chunk):
        cfg = dataclasses.replace(base, logits_chunk=c)
        grad_step, _ = compile_steps(rt, cfg, build_optimizer(cfg))
        loss, aux, grads = grad_step(batch, layout)
        mx.eval(loss, aux, grads)
        results.append((loss, aux, dict(tree_flatten(grads))))
    (loss0, aux0, g0), (loss1, aux1, g1) = results
    np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-5, atol=1e-6)
    for k in ("loss", "reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected"):
        np.testing.assert_allclose(np.array(aux1[k]), np.array(aux0[k]), rtol=1e-5, atol=1e-5)
    if loss_type == "tdpo2":
        assert float(mx.abs(aux0["kl_rejected"]).max()) > 1e-4
        np.testing.assert_allclose(np.array(aux1["kl_rejected"]), np.array(aux0["kl_rejected"]), rtol=1e-5, atol=1e-6)
    assert len(g0) > 0 and max(float(mx.abs(g).max()) for g in g0.values()) > 1e-4
    for k in g0:
        np.testing.assert_allclose(np.array(g1[k]), np.array(g0[k]), rtol=1e-4, atol=1e-6)


def test_objective_uncompiled_chunked_equals_plain(tiny):
    """The objective uncompiled (as a plain call runs it): the chunked head gives the whole-vocabulary values."""
    rt, examples = tiny
    batch, layout = rt.layout_batch(collate(examples, 0))
    outs = [
        batch_objective(rt, build_config({"model": "x", "preset": "official", "logits_chunk": c}), batch, layout)[1]
        for c in (0, 5)
    ]
    for k in ("loss", "kl_chosen", "logp_rejected"):
        np.testing.assert_allclose(np.array(outs[1][k]), np.array(outs[0][k]), rtol=1e-5, atol=1e-6)
