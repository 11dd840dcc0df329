"""Token importance (docs/method.md sections 1-3): gradient attribution, Gaussian prior, hybrid weights.

All arrays are batched over N sequences and L positions, with masks as float
arrays (1 = in the span). Position indices inside a span are derived from the
mask with a cumulative sum (an input, so a compiled step shares it).
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

from tidpo_mlx.runtime import Runtime

EPS = 1e-8


def attribution(rt: Runtime, inputs: mx.array, batch: dict[str, mx.array], rows: slice) -> mx.array:
    """Gradient attribution ``I_i = || d target / d E_i ||_1`` (docs/method.md section 1) of the batch rows ``rows``.

    ``target`` is the max over the vocabulary of the policy logits at the last
    real position ``last`` of each sequence. The gradient is taken with respect
    to the input embeddings ``inputs`` of those rows only (the parameters are
    constants here) and its result is cut from the graph with
    ``stop_gradient``. Sequences do not interact, so the gradient of the
    summed targets gives every sequence its own. Returns (N, L) over the
    positions of the runtime's layout (the response positions in every layout).
    """
    last = batch["last"][rows]

    def target(e: mx.array) -> mx.array:
        h = rt.hidden(e, batch, rows)
        h_last = mx.take_along_axis(h, last[:, None, None], axis=1)
        return rt.logits(h_last).max(axis=-1).sum()

    grad = mx.grad(target)(inputs)
    return mx.stop_gradient(mx.abs(grad).sum(axis=-1).astype(mx.float32))


def gaussian_prior(span: mx.array, sigma_div: float) -> mx.array:
    """Normalised Gaussian prior ``P_hat`` over each span (docs/method.md section 2).

    ``P(t) = exp(-((t - mu) / sigma)^2 / 2)`` with ``mu = (n - 1) / 2`` and
    ``sigma = max(1, n / sigma_div)`` over the ``n`` positions of the span,
    normalised to sum 1 (a one-token span gets weight 1).
    """
    n = span.sum(axis=-1, keepdims=True)
    t = mx.cumsum(span, axis=-1) - 1.0
    mu = (n - 1.0) / 2.0
    sigma = mx.maximum(n / sigma_div, 1.0)
    p = mx.exp(-0.5 * mx.square((t - mu) / sigma)) * span
    return p / mx.maximum(p.sum(axis=-1, keepdims=True), EPS)


def normalise_importance(importance: mx.array, span: mx.array, softmax: bool = False) -> mx.array:
    """``I_hat = I / (sum I + eps)`` over the span, or ``softmax(I / mean I)`` for the ablation."""
    masked = importance * span
    if not softmax:
        return masked / (masked.sum(axis=-1, keepdims=True) + EPS)
    n = mx.maximum(span.sum(axis=-1, keepdims=True), 1.0)
    scaled = masked / (masked.sum(axis=-1, keepdims=True) / n + EPS)
    scaled = mx.where(span > 0, scaled, -1e9)
    return mx.softmax(scaled, axis=-1) * span


def span_weights(
    weighting: str,
    span: mx.array,
    importance: mx.array | None,
    lam: float,
    sigma_div: float,
    weight_norm: str,
    random: Callable[[tuple[int, ...]], mx.array] | None = None,
) -> mx.array:
    """Weights ``w`` over each span (docs/method.md sections 3 and 8), shape (N, L).

    ``hybrid``: ``lam * I_hat + (1 - lam) * P_hat``; ``attribution``: lam = 1;
    ``prior``: lam = 0; ``softmax``: the softmax ``I_hat``; ``random``: I drawn
    uniform in [0, 1); ``uniform``: 1/n; ``none``: every weight 1 (plain
    losses, independent of ``weight_norm``). With ``weight_norm == "mean1"``
    the weights are multiplied by the span length n.
    """
    if weighting == "none":
        return span
    n = span.sum(axis=-1, keepdims=True)
    if weighting == "uniform":
        w = span / mx.maximum(n, 1.0)
    else:
        if weighting == "random":
            importance = random(span.shape)
        elif weighting == "prior":
            importance = mx.zeros_like(span)
        if weighting == "attribution":
            lam = 1.0
        elif weighting == "prior":
            lam = 0.0
        i_hat = normalise_importance(importance, span, softmax=weighting == "softmax")
        w = lam * i_hat + (1.0 - lam) * gaussian_prior(span, sigma_div)
    if weight_norm == "mean1":
        w = w * n
    return w


def response_weights(weights: mx.array, resp_pos: mx.array, resp_mask: mx.array) -> mx.array:
    """The weights at the response tokens (N, R): ``w_t`` for the token whose ``rho_t`` it multiplies."""
    return mx.take_along_axis(weights, resp_pos, axis=1) * resp_mask


def weights_entropy(w: mx.array, mask: mx.array) -> mx.array:
    """Entropy of each sequence's response weights renormalised to sum 1 (N,)."""
    p = w * mask
    p = p / mx.maximum(p.sum(axis=-1, keepdims=True), EPS)
    return -(mx.where(p > 0, p * mx.log(mx.maximum(p, EPS)), 0.0)).sum(axis=-1)
