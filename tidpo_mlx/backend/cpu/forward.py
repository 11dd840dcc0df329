"""The CPU backend's forward: plain-op attention, optionally the shared-prefix layout.

Implements the contract of :mod:`tidpo_mlx.forward` and keeps the compile
contract of this package's docstring. Built and checked by :func:`cpu_forward`.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn

from tidpo_mlx.backend.cpu import attention
from tidpo_mlx.backend.cpu.prefix import Prefix, prompt_pass, response_hidden_states, shared_layout, supported
from tidpo_mlx.batching import Layout, Rows, collate
from tidpo_mlx.config import Config
from tidpo_mlx.data import Example
from tidpo_mlx.errors import ConfigError, ModelError
from tidpo_mlx.forward import Forward

TOLERANCE = 1e-4
"""Largest difference (relative to the scale) the load-time checks accept."""


class CpuForward(Forward):
    """Plain-op attention (swapped in by :func:`cpu_forward`); with ``shared``, the shared-prefix layout."""

    def __init__(self, model: nn.Module, shared: bool):
        super().__init__(model)
        self.shared = shared
        self.kind = "shared-prefix" if shared else "rows"

    def prepare(self, rows: Rows) -> tuple[dict[str, mx.array], Layout]:
        """Whole rows, or their shared-prefix arrays (``prefix.shared_layout``)."""
        if not self.shared:
            return super().prepare(rows)
        arrays = shared_layout(rows)
        return {k: mx.array(v) for k, v in arrays.items()}, dataclasses.replace(rows.layout, kind=self.kind)

    def hidden(self, inputs: mx.array, batch: dict[str, mx.array], rows: slice) -> mx.array:
        """Whole rows as mlx-lm runs them, or the rows' chunks after their prompt pass.

        The prompt pass runs in the model's current mode (policy or reference);
        calls with the same mode share it in a compiled step (CSE).
        """
        if not self.shared:
            return super().hidden(inputs, batch, rows)
        kv = prompt_pass(self.model, self.embed_tokens(batch["prompt_tokens"]))
        return response_hidden_states(self.model, inputs, Prefix(kv, batch["positions"][rows], batch["attn_mask"][rows]))

    def token_count(self, batch: dict[str, mx.array], layout: Layout) -> mx.array:
        """Non-pad tokens of whole sequences: a shared prompt counts once per row."""
        ntoks = batch["seq_mask"].sum()
        if self.shared:
            ntoks = ntoks + batch["prompt_mask"].sum() * (layout.rows // layout.pairs)
        return ntoks

    def whole_rows(self) -> Forward:
        """The same plain-op forward over whole rows."""
        return CpuForward(self.model, shared=False) if self.shared else self


def shared_prefix_active(model: nn.Module, cfg: Config) -> bool:
    """Whether batches use the shared layout for this model and config.

    ``shared_prefix: auto`` turns it on wherever it is exact and supported:
    token weights over the response span (or none at all), no gradient
    checkpointing (it would recompute the prompt pass apart from its keys).
    ``true`` insists (an error when impossible), ``false`` keeps full rows.
    """
    if cfg.shared_prefix == "false":
        return False
    reasons = []
    if not supported(model):
        reasons.append("the model has no plain-op attention in every block (plain_attention)")
    if cfg.weight_span != "response" and cfg.weighting != "none":
        reasons.append("weight_span: sequence needs the prompt in every row")
    if cfg.grad_checkpoint == "true":
        reasons.append("grad_checkpoint is on")
    if reasons and cfg.shared_prefix == "true":
        raise ConfigError(f"shared_prefix: true is not possible here: {'; '.join(reasons)}")
    return not reasons


def shared_prefix_difference(model: nn.Module) -> float:
    """Largest hidden-state difference, shared-prefix vs full rows, on fixed token ids, relative to their scale."""
    ids = [(7 * i + 3) % 97 + 1 for i in range(24)]
    pair = Example(index=0, source="check", messages=[], prompt=ids[:11], chosen=ids[11:17], rejected=ids[:10:-1])
    rows = collate([pair], 0)
    whole, _ = CpuForward(model, shared=False).prepare(rows)
    fwd = CpuForward(model, shared=True)
    chunks, _ = fwd.prepare(rows)
    want = model.model(whole["tokens"])
    want = mx.take_along_axis(want, whole["resp_pos"][..., None] - 1, axis=1)
    got = fwd.hidden(fwd.embed(chunks), chunks, slice(None))
    got = mx.take_along_axis(got, chunks["resp_pos"][..., None] - 1, axis=1)
    keep = whole["resp_mask"][..., None]
    scale = max(float(mx.abs(want * keep).max()), 1e-6)
    return float(mx.abs((got - want) * keep).max()) / scale


def cpu_forward(model: nn.Module, cfg: Config, name: str) -> tuple[CpuForward, list[str]]:
    """Swap in the plain-op attention, check it (and the shared prefix where used); undo on failure.

    Raises a :class:`ModelError` when a check fails (the fused attention is
    restored first) or when ``plain_attention: true`` finds no block to swap.
    """
    swapped = attention.use_plain_attention(model)
    if not swapped:
        if cfg.plain_attention == "true":
            raise ModelError(f"{name}: plain_attention: true, but no block of this model type supports it")
        return CpuForward(model, shared=False), []
    notes = []
    try:
        diff = attention.max_logit_difference(model)
        if diff > TOLERANCE:
            raise ModelError(f"{name}: plain-op attention differs from the fused one by {diff:.2e} of the logit scale")
        notes.append(f"attention as plain ops in {swapped} blocks (CPU; logits match fused to {diff:.1e})")
        shared = shared_prefix_active(model, cfg)
        if shared:
            diff = shared_prefix_difference(model)
            if diff > TOLERANCE:
                raise ModelError(f"{name}: the shared-prefix forward differs from full rows by {diff:.2e}")
            notes.append(f"shared prefix: each pair's prompt runs once for its rows (matches full rows to {diff:.1e})")
    except Exception:
        attention.restore_fused_attention(model)
        raise
    return CpuForward(model, shared=shared), notes
