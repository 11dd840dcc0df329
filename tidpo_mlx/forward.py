"""The forward seam: how the objective, importance, evaluation and anchors run the model.

A :class:`Forward` turns collated whole rows into the arrays the model runs
on and computes, for any group of those rows, the final hidden states and
the vocabulary logits. The core only ever calls these methods:

- ``prepare(rows) -> (batch, layout)``: NumPy whole rows to MLX arrays of this
  forward's layout. The keys the core reads mean the same in every layout:
  ``tokens``, ``seq_mask``, ``resp_span``, ``resp_pos``, ``resp_mask``,
  ``last``, ``pair_index`` (positions index the layout's rows).
- ``embed(batch) -> inputs``: the array the attribution differentiates, the
  input embeddings ``E`` of the rows (SPEC section 1). The loss forward runs
  from the very same array.
- ``hidden(inputs, batch, rows) -> h``: final hidden states (after the last
  norm) of the batch rows ``rows``, given the ``inputs`` of exactly those rows.
- ``logits(h)``: the model's own head (tied or not).
- ``sequence_kl(policy, ref, mask)``: ``sum_t KL(ref || pi)`` over response
  tokens, from log-softmax arrays (N, R, V).
- ``token_count(batch, layout)``: non-pad tokens of the whole sequences.
- ``whole_rows()``: the same model's forward over whole rows (views that need
  every position).

This module is the portable implementation: mlx-lm's own forward with its
fused kernels, used on Metal. The CPU backend (``backend/cpu``) implements
the same contract with plain-op attention and a shared prompt prefix;
:func:`make_forward` picks one and checks it against ``model(tokens)``.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tuner.losses import kl_div_loss

from tidpo_mlx.batching import Layout, Rows
from tidpo_mlx.config import Config
from tidpo_mlx.errors import ModelError
from tidpo_mlx.models import on_cpu

CHECK_TOKENS = [1, 2, 3, 4]
"""Token ids of the load-time check that a forward reproduces ``model(tokens)``."""


class Forward:
    """The portable forward: whole rows through mlx-lm's model (see the module docstring)."""

    kind = "rows"

    def __init__(self, model: nn.Module):
        self.model = model

    def prepare(self, rows: Rows) -> tuple[dict[str, mx.array], Layout]:
        """MLX arrays of the whole rows, and their layout."""
        return {k: mx.array(v) for k, v in rows.arrays.items()}, dataclasses.replace(rows.layout, kind=self.kind)

    def embed(self, batch: dict[str, mx.array]) -> mx.array:
        """Input embeddings ``E = embed(s)`` of every row (N, L, D)."""
        return self.model.model.embed_tokens(batch["tokens"])

    def hidden(self, inputs: mx.array, batch: dict[str, mx.array], rows: slice) -> mx.array:
        """Final hidden states of the rows ``rows`` from their input embeddings."""
        return self.model.model(None, input_embeddings=inputs)

    def logits(self, hidden: mx.array) -> mx.array:
        """The LM head: hidden states to vocabulary logits."""
        model = self.model
        if getattr(model.args, "tie_word_embeddings", False) or not hasattr(model, "lm_head"):
            return model.model.embed_tokens.as_linear(hidden)
        return model.lm_head(hidden)

    def sequence_kl(self, policy_logprobs: mx.array, ref_logprobs: mx.array, mask: mx.array) -> mx.array:
        """``KL(y) = sum_t KL(ref(.|x, y_<t) || pi(.|x, y_<t))`` with mlx-lm's (Metal-fused) kernel."""
        return (kl_div_loss(policy_logprobs, ref_logprobs) * mask).sum(axis=-1)

    def token_count(self, batch: dict[str, mx.array], layout: Layout) -> mx.array:
        """Non-pad tokens of all rows as whole sequences (as mlx-lm counts)."""
        return batch["seq_mask"].sum()

    def whole_rows(self) -> "Forward":
        """This forward over whole rows (itself)."""
        return self


def check_forward(fwd: Forward, name: str) -> None:
    """Fail clearly unless ``logits(hidden(embed(x)))`` reproduces ``model(x)``.

    Attribution differentiates with respect to the input embeddings, so the
    model must accept ``input_embeddings`` and add nothing between the final
    hidden states and the head that :meth:`Forward.logits` leaves out.
    """
    from mlx_lm.utils import does_model_support_input_embeddings

    model = fwd.model
    if not does_model_support_input_embeddings(model) or not hasattr(model, "model"):
        raise ModelError(f"{name}: model type {model.model_type!r} does not accept input embeddings")
    tokens = mx.array([CHECK_TOKENS])
    base = fwd.whole_rows()
    batch = {"tokens": tokens}
    ours = base.logits(base.hidden(base.embed(batch), batch, slice(None)))
    theirs = model(tokens)
    scale = mx.abs(theirs).max().item() + 1e-6
    if mx.abs(ours - theirs).max().item() > 1e-3 * scale:
        raise ModelError(
            f"{name}: model type {model.model_type!r} transforms its hidden states before the "
            "LM head in a way tidpo-mlx does not reproduce"
        )


def make_forward(model: nn.Module, cfg: Config, name: str = "model") -> tuple[Forward, list[str]]:
    """The forward for this device and config, checked at load time; plus notes for the log.

    On the CPU (or with ``plain_attention: true``) the CPU backend's forward,
    else the portable one. ``name`` labels error messages.
    """
    if cfg.plain_attention == "true" or (cfg.plain_attention == "auto" and on_cpu()):
        from tidpo_mlx.backend.cpu.forward import cpu_forward

        fwd, notes = cpu_forward(model, cfg, name)
    else:
        fwd, notes = Forward(model), []
    check_forward(fwd, name)
    return fwd, notes
