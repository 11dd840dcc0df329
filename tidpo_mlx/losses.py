"""Preference losses as pure functions of arrays (docs/method.md sections 4-6 and 8).

Shapes: B pairs, R response slots. ``rho`` is the per-token log-ratio
``log pi - log ref`` (B, R), ``mask`` marks real response tokens, ``w`` the
token weights at the response tokens (all ones for plain losses). Every
function returns one loss per pair (B,); the caller averages over pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn


def weighted_sum(x: mx.array, w: mx.array, mask: mx.array) -> mx.array:
    """``sum_t w_t x_t`` over response tokens (the weighted margin ``m`` when x = rho)."""
    return (x * w * mask).sum(axis=-1)


def weighted_mean(x: mx.array, w: mx.array, mask: mx.array) -> mx.array:
    """``sum_t w_t x_t / sum_t w_t`` over response tokens (a plain mean when w = 1)."""
    return weighted_sum(x, w, mask) / mx.maximum((w * mask).sum(axis=-1), 1e-8)


def dpo_loss(margin: mx.array, beta: float, label_smoothing: float = 0.0) -> mx.array:
    """``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)`` with h = m_w - m_l."""
    logits = beta * margin
    return -(1.0 - label_smoothing) * nn.log_sigmoid(logits) - label_smoothing * nn.log_sigmoid(-logits)


def ipo_loss(avg_margin: mx.array, beta: float) -> mx.array:
    """``(h_avg - 1 / (2 beta))^2`` with h_avg the difference of per-token (weighted) averages of rho."""
    return mx.square(avg_margin - 1.0 / (2.0 * beta))


def tdpo_loss(
    margin: mx.array,
    kl_chosen: mx.array,
    kl_rejected: mx.array,
    beta: float,
    alpha: float,
    stop_chosen_kl: bool,
) -> mx.array:
    """TDPO: ``-log sigmoid(beta * ((m_w - m_l) - alpha * (KL(y_l) - sg(KL(y_w)))))``.

    tdpo2 stops the gradient of ``KL(y_w)``; tdpo1 calls this with alpha = 1 and
    no stop-gradient. ``KL(y)`` is the sequential KL(ref || pi) summed over the
    response tokens.
    """
    kl_w = mx.stop_gradient(kl_chosen) if stop_chosen_kl else kl_chosen
    return -nn.log_sigmoid(beta * (margin - alpha * (kl_rejected - kl_w)))


def simpo_loss(avg_logp_margin: mx.array, beta: float, gamma: float) -> mx.array:
    """SimPO (no reference): ``-log sigmoid(beta_s (avg logp_w - avg logp_l) - gamma_s)``.

    Takes the difference of per-token mean log-probs, computed once by the
    caller (which also reports it): MLX's compile fails on a gradient whose
    function returns the same difference computed a second time.
    """
    return -nn.log_sigmoid(beta * avg_logp_margin - gamma)


def sequence_kl(policy_logprobs: mx.array, ref_logprobs: mx.array, mask: mx.array) -> mx.array:
    """``KL(y) = sum_t KL(ref(.|x, y_<t) || pi(.|x, y_<t))`` over the full vocabulary.

    Inputs are log-softmax outputs (B, R, V). The reference formula; training
    computes the same sums chunk by chunk over the vocabulary head
    (``logprobs.token_logprobs_kl``), never holding (B, R, V).
    """
    per_token = (mx.exp(ref_logprobs) * (ref_logprobs - policy_logprobs)).sum(axis=-1)
    return (per_token * mask).sum(axis=-1)


def triplet_distance(rho_a: mx.array, mask_a: mx.array, rho_b: mx.array, mask_b: mx.array) -> mx.array:
    """``d(a, b) = sum_t (rho_a,t - rho_b,t)^2`` over the overlapping positions ``t < min(len_a, len_b)``.

    Masks are prefix masks (right-padded responses), so their product marks the overlap.
    """
    return (mx.square(rho_a - rho_b) * mask_a * mask_b).sum(axis=-1)


def triplet_loss(
    rho_anchor: mx.array,
    mask_anchor: mx.array,
    rho_chosen: mx.array,
    mask_chosen: mx.array,
    rho_rejected: mx.array,
    mask_rejected: mx.array,
    margin: float,
) -> mx.array:
    """``L_trip = max(0, d(a, y_w) - d(a, y_l) + margin)`` (unweighted)."""
    d_pos = triplet_distance(rho_anchor, mask_anchor, rho_chosen, mask_chosen)
    d_neg = triplet_distance(rho_anchor, mask_anchor, rho_rejected, mask_rejected)
    return mx.maximum(d_pos - d_neg + margin, 0.0)


@dataclass(frozen=True)
class PairTerms:
    """Per-pair quantities (B,) a preference loss may read; the objective fills what the loss needs.

    ``margin`` is ``m_w - m_l`` (weighted sums of rho), ``avg_margin`` the
    difference of weighted per-token means of rho, ``kl_*`` the sequential
    KLs (tdpo only), ``avg_logp_margin`` the difference of the per-token
    mean policy log-probs (simpo only).
    """

    margin: mx.array | None = None
    avg_margin: mx.array | None = None
    kl_chosen: mx.array | None = None
    kl_rejected: mx.array | None = None
    avg_logp_margin: mx.array | None = None


@dataclass(frozen=True)
class LossSpec:
    """One ``loss_type``: its loss of :class:`PairTerms` and what it needs.

    ``reference``: uses the reference model (rho); ``full_kl``: needs the
    full-vocabulary sequential KL; ``token_weights``: accepts TI-DPO weights
    (every reference-based loss, docs/method.md section 8); ``label_smoothing``: reads
    ``label_smoothing``. ``loss(terms, keys)`` reads its scalar keys (``beta``,
    ``alpha``, ...) as attributes of ``keys`` (the run's Config).
    """

    loss: Callable[[PairTerms, Any], mx.array]
    reference: bool = True
    full_kl: bool = False
    label_smoothing: bool = False

    @property
    def token_weights(self) -> bool:
        """Whether TI-DPO token weights apply (they replace the sums of rho)."""
        return self.reference


LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(lambda t, k: dpo_loss(t.margin, k.beta, k.label_smoothing), label_smoothing=True),
    "ipo": LossSpec(lambda t, k: ipo_loss(t.avg_margin, k.beta)),
    "tdpo1": LossSpec(
        lambda t, k: tdpo_loss(t.margin, t.kl_chosen, t.kl_rejected, k.beta, 1.0, stop_chosen_kl=False), full_kl=True
    ),
    "tdpo2": LossSpec(
        lambda t, k: tdpo_loss(t.margin, t.kl_chosen, t.kl_rejected, k.beta, k.alpha, stop_chosen_kl=True), full_kl=True
    ),
    "simpo": LossSpec(
        lambda t, k: simpo_loss(t.avg_logp_margin, k.simpo_beta, k.simpo_gamma), reference=False
    ),
}
"""Every ``loss_type`` (docs/method.md sections 4 and 8); config validation derives what is allowed from it."""
