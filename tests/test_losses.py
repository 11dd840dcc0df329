"""Losses and weights against hand values and a separate, plain NumPy implementation."""

from __future__ import annotations

import math

import tidpo_mlx  # noqa: F401

import mlx.core as mx
import numpy as np
import pytest

from tidpo_mlx import losses
from tidpo_mlx.importance import gaussian_prior, response_weights, span_weights, weights_entropy


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_prior(n, sigma_div):
    t = np.arange(n, dtype=np.float64)
    mu = (n - 1) / 2
    sigma = max(1.0, n / sigma_div)
    p = np.exp(-(((t - mu) / sigma) ** 2) / 2)
    return p / p.sum()


def np_weights(kind, importance, lam, sigma_div, norm, random_draw=None):
    """Straightforward per-span implementation of docs/method.md sections 2, 3 and 8."""
    n = len(importance)
    if kind == "none":
        return np.ones(n)
    if kind == "uniform":
        w = np.full(n, 1.0 / n)
    else:
        i = np.asarray(importance, dtype=np.float64)
        if kind == "random":
            i = random_draw
        if kind == "prior":
            i = np.zeros(n)
        lam = {"attribution": 1.0, "prior": 0.0}.get(kind, lam)
        if kind == "softmax":
            z = i / (i.mean() + 1e-8)
            i_hat = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        else:
            i_hat = i / (i.sum() + 1e-8)
        w = lam * i_hat + (1 - lam) * np_prior(n, sigma_div)
    return w * n if norm == "mean1" else w


def test_prior_hand_values():
    # n = 3, sigma_div 4 -> sigma = max(1, 0.75) = 1, mu = 1: P ~ [e^-0.5, 1, e^-0.5]
    span = mx.array([[1.0, 1.0, 1.0, 0.0]])
    p = np.array(gaussian_prior(span, 4.0))[0]
    e = math.exp(-0.5)
    np.testing.assert_allclose(p, [e / (1 + 2 * e), 1 / (1 + 2 * e), e / (1 + 2 * e), 0.0], rtol=1e-6)
    one = np.array(gaussian_prior(mx.array([[0.0, 1.0, 0.0]]), 4.0))[0]
    np.testing.assert_allclose(one, [0.0, 1.0, 0.0])


@pytest.mark.parametrize("n", [1, 2, 5, 17, 40])
@pytest.mark.parametrize("sigma_div", [4.0, 8.0])
def test_prior_matches_numpy_on_offset_spans(n, sigma_div):
    span = np.zeros((1, n + 7), dtype=np.float32)
    span[0, 3: 3 + n] = 1.0
    got = np.array(gaussian_prior(mx.array(span), sigma_div))[0]
    np.testing.assert_allclose(got[3: 3 + n], np_prior(n, sigma_div), rtol=1e-5, atol=1e-7)
    assert got[:3].sum() == 0 and got[3 + n:].sum() == 0


@pytest.mark.parametrize("kind", ["hybrid", "attribution", "prior", "softmax", "uniform", "none", "random"])
@pytest.mark.parametrize("norm", ["sum1", "mean1"])
def test_span_weights_match_numpy(kind, norm):
    rng = np.random.default_rng(0)
    spans = [(2, 6), (0, 9), (4, 5)]
    L = 10
    span = np.zeros((3, L), dtype=np.float32)
    for i, (a, b) in enumerate(spans):
        span[i, a:b] = 1
    importance = rng.random((3, L)).astype(np.float32) * 3
    draw = rng.random((3, L)).astype(np.float32)
    got = np.array(
        span_weights(kind, mx.array(span), mx.array(importance), 0.7, 4.0, norm, random=lambda shape: mx.array(draw))
    )
    for i, (a, b) in enumerate(spans):
        want = np_weights(kind, importance[i, a:b], 0.7, 4.0, norm, draw[i, a:b])
        np.testing.assert_allclose(got[i, a:b], want, rtol=1e-5, atol=1e-6)
        assert np.all(got[i, :a] == 0) and np.all(got[i, b:] == 0)
        if kind != "none":
            target = (b - a) if norm == "mean1" else 1.0
            assert got[i].sum() == pytest.approx(target, rel=1e-5)


def test_sequence_span_weights_sliced_to_response():
    # span = whole sequence (5 tokens); the response is the last 2: weights neither sum nor average to 1
    seq = mx.array([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    imp = mx.array([[1.0, 2.0, 3.0, 4.0, 5.0, 9.0]])
    w = span_weights("hybrid", seq, imp, 0.2, 8.0, "mean1")
    resp = response_weights(w, mx.array([[3, 4, 3]]), mx.array([[1.0, 1.0, 0.0]]))
    full = np_weights("hybrid", [1, 2, 3, 4, 5], 0.2, 8.0, "mean1")
    np.testing.assert_allclose(np.array(resp)[0], [full[3], full[4], 0.0], rtol=1e-5)
    assert float(np.array(resp).sum()) != pytest.approx(2.0, rel=1e-3)


def test_weights_entropy():
    w = mx.array([[0.5, 0.5, 0.0], [2.0, 0.0, 0.0]])
    m = mx.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(np.array(weights_entropy(w, m)), [math.log(2), 0.0], atol=1e-6)


def test_dpo_hand_value_and_label_smoothing():
    h = mx.array([2.0, -1.0])
    got = np.array(losses.dpo_loss(h, beta=0.5))
    np.testing.assert_allclose(got, -np_log_sigmoid(np.array([1.0, -0.5])), rtol=1e-6)
    ls = np.array(losses.dpo_loss(h, beta=0.5, label_smoothing=0.1))
    z = np.array([1.0, -0.5])
    np.testing.assert_allclose(ls, -0.9 * np_log_sigmoid(z) - 0.1 * np_log_sigmoid(-z), rtol=1e-6)
    assert float(losses.dpo_loss(mx.array([0.0]), beta=0.1)[0]) == pytest.approx(math.log(2), rel=1e-6)


def test_weighted_sum_is_a_sum_not_a_mean():
    rho = mx.array([[1.0, 2.0, 3.0, 100.0]])
    w = mx.array([[1.0, 1.0, 1.0, 1.0]])
    mask = mx.array([[1.0, 1.0, 1.0, 0.0]])
    assert float(losses.weighted_sum(rho, w, mask)[0]) == pytest.approx(6.0)
    assert float(losses.weighted_mean(rho, w, mask)[0]) == pytest.approx(2.0)


def test_ipo_and_simpo_hand_values():
    assert float(losses.ipo_loss(mx.array([3.0]), beta=0.5)[0]) == pytest.approx((3.0 - 1.0) ** 2)
    got = float(losses.simpo_loss(mx.array([-1.0]) - mx.array([-2.0]), beta=2.0, gamma=1.0)[0])
    assert got == pytest.approx(-float(np_log_sigmoid(np.array(2.0 * 1.0 - 1.0))), rel=1e-6)


def np_kl(policy_logits, ref_logits, mask):
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lr = log_softmax(policy_logits), log_softmax(ref_logits)
    per = (np.exp(lr) * (lr - lp)).sum(-1)
    return (per * mask).sum(-1)


def test_sequence_kl_full_vocab_matches_numpy():
    rng = np.random.default_rng(1)
    pol = rng.normal(size=(2, 4, 11)).astype(np.float32)
    ref = rng.normal(size=(2, 4, 11)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=np.float32)
    lp = mx.array(pol) - mx.logsumexp(mx.array(pol), axis=-1, keepdims=True)
    lr = mx.array(ref) - mx.logsumexp(mx.array(ref), axis=-1, keepdims=True)
    got = np.array(losses.sequence_kl(lp, lr, mx.array(mask)))
    np.testing.assert_allclose(got, np_kl(pol, ref, mask), rtol=1e-5)
    assert np.all(got > 0)


def test_tdpo_forms_and_stop_gradient():
    m, klw, kll = mx.array([0.3]), mx.array([0.2]), mx.array([0.5])
    z = 0.3 - 0.5 * (0.5 - 0.2)
    assert float(losses.tdpo_loss(m, klw, kll, 0.2, 0.5, True)[0]) == pytest.approx(-float(np_log_sigmoid(np.array(0.2 * z))), rel=1e-6)

    def grad_wrt_klw(stop):
        return mx.grad(lambda k: losses.tdpo_loss(m, k, kll, 0.2, 1.0, stop).sum())(klw)

    assert float(grad_wrt_klw(True)[0]) == 0.0
    assert float(grad_wrt_klw(False)[0]) != 0.0


def test_triplet_uses_overlap_only():
    rho_a = mx.array([[1.0, 2.0, 0.0, 0.0]])
    m_a = mx.array([[1.0, 1.0, 0.0, 0.0]])
    rho_w = mx.array([[1.0, 1.0, 5.0, 0.0]])
    m_w = mx.array([[1.0, 1.0, 1.0, 0.0]])
    rho_l = mx.array([[0.0, 0.0, 0.0, 7.0]])
    m_l = mx.array([[1.0, 1.0, 1.0, 1.0]])
    # d(a, w) = 0 + 1 (position 2 is outside the overlap); d(a, l) = 1 + 4 = 5
    assert float(losses.triplet_distance(rho_a, m_a, rho_w, m_w)[0]) == pytest.approx(1.0)
    assert float(losses.triplet_distance(rho_a, m_a, rho_l, m_l)[0]) == pytest.approx(5.0)
    got = losses.triplet_loss(rho_a, m_a, rho_w, m_w, rho_l, m_l, margin=1.0)
    assert float(got[0]) == 0.0
    got = losses.triplet_loss(rho_a, m_a, rho_l, m_l, rho_w, m_w, margin=1.0)
    assert float(got[0]) == pytest.approx(5.0)
