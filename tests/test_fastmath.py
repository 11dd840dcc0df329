"""The polynomial exp and what is built on it match MLX's own functions, values and gradients."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from tidpo_mlx.backend.cpu import fastmath


def test_exp_relative_error_over_the_float32_range():
    x = mx.linspace(-87.0, 88.0, 200_001)
    want = np.exp(np.array(x, dtype=np.float64))
    got = np.array(fastmath.exp(x), dtype=np.float64)
    assert np.max(np.abs(got - want) / want) < 5e-6
    small = mx.linspace(-10.0, 10.0, 2_001)
    want = np.exp(np.array(small, dtype=np.float64))
    assert np.max(np.abs(np.array(fastmath.exp(small)) - want) / want) < 1e-6


def test_masked_scores_give_exact_zeros():
    x = mx.array([0.0, -1e9, -200.0, 3.0])
    got = np.array(fastmath.exp(x))
    assert got[1] == 0.0 and got[2] == 0.0 and got[0] == 1.0
    probs = np.array(fastmath.softmax(mx.array([[1.0, -1e9, 2.0]])))
    assert probs[0, 1] == 0.0 and abs(probs.sum() - 1.0) < 1e-6


def test_silu_softmax_and_their_gradients():
    x = mx.random.normal((8, 300), key=mx.random.key(0)) * 5
    y = mx.random.normal((8, 300), key=mx.random.key(1))
    pairs = [
        (fastmath.silu, nn.silu),
        (lambda a: fastmath.softmax(a, axis=-1), lambda a: mx.softmax(a, axis=-1)),
    ]
    for ours, theirs in pairs:
        np.testing.assert_allclose(np.array(ours(x)), np.array(theirs(x)), rtol=1e-5, atol=1e-6)
        g_ours = mx.grad(lambda a: (ours(a) * y).sum())(x)
        g_theirs = mx.grad(lambda a: (theirs(a) * y).sum())(x)
        np.testing.assert_allclose(np.array(g_ours), np.array(g_theirs), rtol=1e-4, atol=1e-5)
    compiled = mx.compile(lambda a: fastmath.silu(a))
    np.testing.assert_allclose(np.array(compiled(x)), np.array(nn.silu(x)), rtol=1e-5, atol=1e-6)
