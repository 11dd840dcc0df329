"""The training objective on one collated batch: log-probs, weights, losses, metrics.

A batch stacks the chosen, rejected (and anchor) sequences of B pairs (see
``data.collate``), as whole rows or in the shared-prefix layout (each pair's
prompt run once, ``prefix.py``). The policy and the reference run from the
same input embeddings ``E``; the reference is the same model in
``reference_mode``. Logits are computed only at the positions that predict
response tokens.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from tidpo_mlx import losses
from tidpo_mlx.config import Config
from tidpo_mlx.importance import attribution, response_weights, span_weights, weights_entropy
from tidpo_mlx.models import embed, hidden_states, project, reference_mode
from tidpo_mlx.plain_attention import PromptKV
from tidpo_mlx.prefix import Prefix, prompt_pass


ROW_KEYS = ("tokens", "resp_pos", "resp_mask")
"""The batch arrays :func:`response_logprobs` reads, sliced per group of rows."""


def prompt_kv(model: nn.Module, batch: dict[str, mx.array]) -> list[PromptKV] | None:
    """The prompt pass of a shared-prefix batch in the model's current mode (None for whole rows)."""
    if "prompt_tokens" not in batch:
        return None
    return prompt_pass(model, embed(model, batch["prompt_tokens"]))


def row_prefix(kv: list[PromptKV] | None, batch: dict[str, mx.array], rows: slice) -> Prefix | None:
    """The prompts of a slice of a shared-prefix batch's rows (None for whole rows)."""
    return None if kv is None else Prefix(kv, batch["positions"][rows], batch["attn_mask"][rows])


def response_logprobs(
    model: nn.Module, embeddings: mx.array, batch: dict[str, mx.array], full: bool, prefix: Prefix | None = None
) -> tuple[mx.array, mx.array | None]:
    """Per-token ``log pi(y_t | x, y_<t)`` (N, R), and the full log-softmax (N, R, V) if ``full``.

    The logits for response token t come from the position before it; the
    hidden states are gathered there before the LM head.
    """
    h = hidden_states(model, embeddings, prefix)
    pos = batch["resp_pos"]
    h = mx.take_along_axis(h, (pos - 1)[..., None], axis=1)
    logits = project(model, h).astype(mx.float32)
    targets = mx.take_along_axis(batch["tokens"], pos, axis=1)
    logz = mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1) - logz
    logp = picked[..., 0] * batch["resp_mask"]
    return logp, (logits - logz if full else None)


def token_weights(
    model: nn.Module, cfg: Config, batch: dict[str, mx.array], embeddings: mx.array, rows: int
) -> dict[str, mx.array]:
    """The token weights of the first ``rows`` sequences, exactly as the loss uses them.

    Returns ``importance`` (the attribution I over positions, or None when the
    weighting needs none), ``span_weights`` (w over the span, (rows, L)) and
    ``weights`` (w at the response tokens, (rows, R)). Attribution runs on the
    current policy without dropout; nothing here carries gradient.
    """
    importance = None
    if cfg.uses_attribution:
        training = model.training
        model.train(False)
        prefix = row_prefix(prompt_kv(model, batch), batch, slice(0, rows))
        importance = attribution(model, embeddings[:rows], batch["last"][:rows], prefix)
        model.train(training)
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


def batch_logprobs(
    model: nn.Module, batch: dict[str, mx.array], embeddings: mx.array, groups: list[slice], full: bool
) -> tuple[mx.array, mx.array | None]:
    """Per-token log-probs of all rows (N, R), run as one forward per group of rows.

    Groups let the pair rows run as their own forward, the very one the
    attribution runs, so a compiled step computes it once; the anchor rows run
    apart. The full log-softmax (if ``full``) is that of the first group.
    """
    kv = prompt_kv(model, batch)
    outs = [
        response_logprobs(
            model, embeddings[r], {k: batch[k][r] for k in ROW_KEYS}, full and i == 0, row_prefix(kv, batch, r)
        )
        for i, r in enumerate(groups)
    ]
    return mx.concatenate([o[0] for o in outs]), outs[0][1]


def processed_tokens(batch: dict[str, mx.array]) -> mx.array:
    """Non-pad tokens of all rows as whole sequences (a shared prompt counts once per row, as mlx-lm counts)."""
    ntoks = batch["seq_mask"].sum()
    if "prompt_mask" in batch:
        ntoks = ntoks + batch["prompt_mask"].sum() * (batch["tokens"].shape[0] // batch["pair_index"].shape[0])
    return ntoks


def batch_objective(model: nn.Module, cfg: Config, batch: dict[str, mx.array]) -> tuple[mx.array, dict[str, mx.array]]:
    """Loss ``L = mean over pairs of (L_pref + gamma * L_trip)`` and per-pair/per-batch metrics.

    Works for every ``loss_type`` and ``weighting`` of the config. With anchor
    rows in the batch (N = 3B) the triplet term is on; without (N = 2B) it is 0.
    """
    tokens = batch["tokens"]
    b = batch["pair_index"].shape[0]
    has_anchor = tokens.shape[0] == 3 * b
    mask = batch["resp_mask"]
    need_kl = cfg.loss_type in ("tdpo1", "tdpo2")
    e = embed(model, tokens)
    groups = [slice(0, 2 * b)] + ([slice(2 * b, 3 * b)] if has_anchor else [])
    logp, logp_full = batch_logprobs(model, batch, e, groups, need_kl)

    aux: dict[str, mx.array] = {}
    if cfg.uses_reference:
        with reference_mode(model):
            ref_logp, ref_full = batch_logprobs(model, batch, e, groups, need_kl)
        ref_logp = mx.stop_gradient(ref_logp)
        rho = logp - ref_logp
        w = token_weights(model, cfg, batch, e, 2 * b)["weights"]
        w_c, w_r = w[:b], w[b:]
        m_c, m_r = mask[:b], mask[b: 2 * b]
        rho_c, rho_r = rho[:b], rho[b: 2 * b]
        margin = losses.weighted_sum(rho_c, w_c, m_c) - losses.weighted_sum(rho_r, w_r, m_r)
        if cfg.loss_type == "dpo":
            pref = losses.dpo_loss(margin, cfg.beta, cfg.label_smoothing)
        elif cfg.loss_type == "ipo":
            avg = losses.weighted_mean(rho_c, w_c, m_c) - losses.weighted_mean(rho_r, w_r, m_r)
            pref = losses.ipo_loss(avg, cfg.beta)
        else:
            kl = losses.sequence_kl(logp_full[: 2 * b], mx.stop_gradient(ref_full[: 2 * b]), mask[: 2 * b])
            aux["kl_chosen"], aux["kl_rejected"] = kl[:b], kl[b:]
            tdpo1 = cfg.loss_type == "tdpo1"
            pref = losses.tdpo_loss(
                margin, kl[:b], kl[b:], cfg.beta, 1.0 if tdpo1 else cfg.alpha, stop_chosen_kl=not tdpo1
            )
        sum_rho = (rho * mask).sum(axis=-1)
        aux["reward_chosen"] = cfg.beta * sum_rho[:b]
        aux["reward_rejected"] = cfg.beta * sum_rho[b: 2 * b]
        aux["weighted_margin"] = margin
        aux["weights_entropy"] = weights_entropy(w, mask[: 2 * b])
        if has_anchor and cfg.uses_triplet:
            trip = losses.triplet_loss(rho[2 * b:], mask[2 * b:], rho_c, m_c, rho_r, m_r, cfg.triplet_margin)
        else:
            trip = mx.zeros((b,))
    else:
        avg_lp = logp.sum(axis=-1) / mx.maximum(mask.sum(axis=-1), 1.0)
        pref = losses.simpo_loss(avg_lp[:b], avg_lp[b: 2 * b], cfg.simpo_beta, cfg.simpo_gamma)
        aux["reward_chosen"] = cfg.simpo_beta * avg_lp[:b]
        aux["reward_rejected"] = cfg.simpo_beta * avg_lp[b: 2 * b]
        aux["weighted_margin"] = avg_lp[:b] - avg_lp[b: 2 * b]
        trip = mx.zeros((b,))
    per_pair = pref + cfg.gamma * trip
    sums = logp.sum(axis=-1)
    aux.update(
        loss=per_pair,
        loss_pref=pref,
        loss_triplet=trip,
        logp_chosen=sums[:b],
        logp_rejected=sums[b: 2 * b],
        ntoks=processed_tokens(batch),
    )
    return per_pair.mean(), aux


def to_mx(batch: dict[str, Any]) -> dict[str, mx.array]:
    """numpy batch arrays to MLX arrays."""
    return {k: mx.array(v) for k, v in batch.items()}
