"""The training objective on one batch: log-probs, token weights, losses, metrics (docs/method.md sections 1-6).

A batch stacks the chosen, rejected (and anchor) sequences of B pairs; its
:class:`~tidpo_mlx.batching.Layout` says which. The policy ``pi`` and the
reference ``ref`` run from the same input embeddings ``E``; the reference is
the same model in reference mode (``Runtime.reference``). Logits are computed only at the
positions that predict response tokens, ``logits_chunk`` of them at a time
(``logprobs.py``), so the (N, R, V) log-softmax is never materialised. How
the model runs is its runtime's business (``runtime.py``).
"""

from __future__ import annotations

import mlx.core as mx

from tidpo_mlx import losses
from tidpo_mlx.batching import Layout
from tidpo_mlx.config import Config
from tidpo_mlx.importance import attribution, response_weights, span_weights, weights_entropy
from tidpo_mlx.logprobs import Head, head_parameters, token_logprobs, token_logprobs_kl
from tidpo_mlx.models import eval_mode
from tidpo_mlx.runtime import Runtime

PER_PAIR_KEYS = (
    "loss",
    "loss_pref",
    "loss_triplet",
    "reward_chosen",
    "reward_rejected",
    "weighted_margin",
    "logp_chosen",
    "logp_rejected",
    "kl_chosen",
    "kl_rejected",
)
"""Per-pair arrays :func:`batch_objective` returns (``kl_*`` for tdpo losses only)."""


def response_hidden(rt: Runtime, inputs: mx.array, batch: dict[str, mx.array], rows: slice) -> mx.array:
    """Final hidden states (N, R, D) of the rows ``rows`` at the positions that predict their response tokens.

    The logits for response token t come from the position before it; the
    hidden states are gathered there before the LM head.
    """
    h = rt.hidden(inputs, batch, rows)
    return mx.take_along_axis(h, (batch["resp_pos"][rows] - 1)[..., None], axis=1)


def response_logprobs(
    rt: Runtime,
    inputs: mx.array,
    batch: dict[str, mx.array],
    rows: slice,
    full: bool = False,
    chunk: int = 0,
    reference: bool = False,
) -> tuple[mx.array, tuple[mx.array, mx.array | None] | None]:
    """Per-token ``log pi(y_t | x, y_<t)`` (N, R) of the rows ``rows``, in the model's current mode.

    With ``reference`` (or ``full``) also ``(log ref(y_t | x, y_<t), KL_t)``:
    the reference's per-token log-probs (no gradient) and, with ``full``, the
    per-token ``KL(ref || pi)`` over the full vocabulary (N, R) whose sum is
    docs/method.md section 4's ``KL(y)``; else None. The LM head runs over ``chunk``
    response positions at a time (``logprobs.py``; 0: all at once), so the
    (N, R, V) logits are never all alive. Padding positions are 0.
    """
    mask = batch["resp_mask"][rows]
    targets = mx.take_along_axis(batch["tokens"][rows], batch["resp_pos"][rows], axis=1)
    h = response_hidden(rt, inputs, batch, rows)
    head = Head(rt.logits, rt.model, head_parameters(rt.model))
    if not (reference or full):
        return token_logprobs(head, h, targets, chunk) * mask, None
    with rt.reference():
        h_ref = mx.stop_gradient(response_hidden(rt, inputs, batch, rows))

    def ref_head(x: mx.array) -> mx.array:
        with rt.reference():
            return rt.logits(x)

    if full:
        logp, ref_logp, kl = token_logprobs_kl(head, h, ref_head, h_ref, targets, chunk)
        return logp * mask, (ref_logp * mask, kl * mask)
    ref_logp = mx.stop_gradient(token_logprobs(ref_head, h_ref, targets, chunk))
    return token_logprobs(head, h, targets, chunk) * mask, (ref_logp * mask, None)


def batch_logprobs(
    rt: Runtime,
    batch: dict[str, mx.array],
    inputs: mx.array,
    layout: Layout,
    full: bool = False,
    chunk: int = 0,
    reference: bool = False,
) -> tuple[mx.array, tuple[mx.array, mx.array | None] | None]:
    """:func:`response_logprobs` of all rows (N, R), one forward per row group of the layout.

    The pair rows run as their own forward, the very one the attribution
    runs, so a compiled step computes it once; the anchor rows run apart.
    The per-token KL (if ``full``) is that of the pair rows only.
    """
    outs = [
        response_logprobs(rt, inputs[r], batch, r, full and i == 0, chunk, reference or full)
        for i, r in enumerate(layout.groups)
    ]
    logp = mx.concatenate([o[0] for o in outs])
    if not (reference or full):
        return logp, None
    return logp, (mx.concatenate([o[1][0] for o in outs]), outs[0][1][1])


def token_weights(rt: Runtime, cfg: Config, batch: dict[str, mx.array], inputs: mx.array, rows: int) -> dict[str, mx.array]:
    """The token weights of the first ``rows`` sequences, exactly as the loss uses them (docs/method.md sections 1-3).

    Returns ``importance`` (the attribution I over positions, or None when the
    weighting needs none), ``span_weights`` (w over the span, (rows, L)) and
    ``weights`` (w at the response tokens, (rows, R)). Attribution runs on the
    current policy without dropout; nothing here carries gradient.
    """
    importance = None
    if cfg.uses_attribution:
        with eval_mode(rt.model):
            importance = attribution(rt, inputs[:rows], batch, slice(0, rows))
    span = batch["resp_span" if cfg.weight_span == "response" else "seq_mask"][:rows]
    w_span = span_weights(
        cfg.weighting,
        span,
        importance,
        cfg.lam,
        cfg.sigma_div,
        cfg.weight_norm,
        random=lambda shape: mx.random.uniform(shape=shape),
    )
    w = response_weights(w_span, batch["resp_pos"][:rows], batch["resp_mask"][:rows])
    return {"importance": importance, "span_weights": w_span, "weights": mx.stop_gradient(w)}


def batch_objective(
    rt: Runtime, cfg: Config, batch: dict[str, mx.array], layout: Layout
) -> tuple[mx.array, dict[str, mx.array]]:
    """Loss ``L = mean over pairs of (L_pref + gamma * L_trip)`` and per-pair/per-batch metrics.

    Works for every ``loss_type`` (``losses.LOSSES``) and ``weighting`` of the
    config. With anchor rows in the layout the triplet term is on; without it is 0.
    """
    b = layout.pairs
    spec = losses.LOSSES[cfg.loss_type]
    mask = batch["resp_mask"]
    m_c, m_r = mask[:b], mask[b: 2 * b]
    inputs = rt.embed(batch)
    logp, ref = batch_logprobs(rt, batch, inputs, layout, spec.full_kl, cfg.logits_chunk, spec.reference)

    aux: dict[str, mx.array] = {}
    trip = mx.zeros((b,))
    if spec.reference:
        ref_logp, kl_tokens = ref
        rho = logp - ref_logp
        w = token_weights(rt, cfg, batch, inputs, 2 * b)["weights"]
        w_c, w_r = w[:b], w[b:]
        rho_c, rho_r = rho[:b], rho[b: 2 * b]
        margin = losses.weighted_sum(rho_c, w_c, m_c) - losses.weighted_sum(rho_r, w_r, m_r)
        avg_margin = losses.weighted_mean(rho_c, w_c, m_c) - losses.weighted_mean(rho_r, w_r, m_r)
        terms = {"margin": margin, "avg_margin": avg_margin}  # lazy: a loss that reads neither costs nothing
        if spec.full_kl:
            kl = kl_tokens.sum(axis=-1)
            terms["kl_chosen"], terms["kl_rejected"] = aux["kl_chosen"], aux["kl_rejected"] = kl[:b], kl[b:]
        pref = spec.loss(losses.PairTerms(**terms), cfg)
        sum_rho = (rho * mask).sum(axis=-1)
        aux["reward_chosen"] = cfg.beta * sum_rho[:b]
        aux["reward_rejected"] = cfg.beta * sum_rho[b: 2 * b]
        aux["weighted_margin"] = margin
        aux["weights_entropy"] = weights_entropy(w, mask[: 2 * b])
        if layout.anchors:
            trip = losses.triplet_loss(rho[2 * b:], mask[2 * b:], rho_c, m_c, rho_r, m_r, cfg.triplet_margin)
    else:
        avg_lp = logp.sum(axis=-1) / mx.maximum(mask.sum(axis=-1), 1.0)
        terms = losses.PairTerms(avg_logp_margin=avg_lp[:b] - avg_lp[b: 2 * b])
        pref = spec.loss(terms, cfg)
        aux["reward_chosen"] = cfg.simpo_beta * avg_lp[:b]
        aux["reward_rejected"] = cfg.simpo_beta * avg_lp[b: 2 * b]
        aux["weighted_margin"] = terms.avg_logp_margin
    per_pair = pref + cfg.gamma * trip
    sums = logp.sum(axis=-1)
    aux.update(
        loss=per_pair,
        loss_pref=pref,
        loss_triplet=trip,
        logp_chosen=sums[:b],
        logp_rejected=sums[b: 2 * b],
        ntoks=rt.token_count(batch, layout),
    )
    return per_pair.mean(), aux
