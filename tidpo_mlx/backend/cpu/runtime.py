"""The CPU backend's runtime: plain-op attention, optionally the shared-prefix layout.

Implements the forward of :class:`tidpo_mlx.runtime.Runtime` and keeps the
compile contract of this package's docstring. Built and checked by
:func:`build`, which the registry (``tidpo_mlx.backend``) calls where
:func:`applies`.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn

from tidpo_mlx.backend.cpu import attention
from tidpo_mlx.backend.cpu.prefix import Prefix, prompt_pass, response_hidden_states, shared_layout, supported
from tidpo_mlx.batching import Layout, Rows, collate
from tidpo_mlx.config import Config, Switch
from tidpo_mlx.data import Example
from tidpo_mlx.errors import ConfigError, ModelError
from tidpo_mlx.models import Reference, on_cpu
from tidpo_mlx.runtime import Facts, RowLayout, Runtime

NAME = "cpu"
TOLERANCE = 1e-4
"""Largest difference (relative to the scale) the load-time checks accept."""


class CpuRuntime(Runtime):
    """Plain-op attention (swapped in by :func:`build`) where ``facts.score_matrix``; with the shared-prefix layout
    where ``facts.layout`` says so."""

    @property
    def shared(self) -> bool:
        """Whether batches run in the shared-prefix layout."""
        return self.facts.layout is RowLayout.SHARED_PREFIX

    def layout_batch(self, rows: Rows) -> tuple[dict[str, mx.array], Layout]:
        """Whole rows, or their shared-prefix arrays (``prefix.shared_layout``)."""
        if not self.shared:
            return super().layout_batch(rows)
        arrays = shared_layout(rows)
        return {k: mx.array(v) for k, v in arrays.items()}, dataclasses.replace(rows.layout, kind=self.facts.layout)

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

    def whole_rows(self) -> Runtime:
        """The same plain-op runtime over whole rows."""
        if not self.shared:
            return self
        return CpuRuntime(self.model, self._reference, dataclasses.replace(self.facts, layout=RowLayout.ROWS), self.notes)


def shared_prefix_active(model: nn.Module, cfg: Config) -> bool:
    """Whether batches use the shared layout for this model and config.

    ``shared_prefix: auto`` turns it on wherever it is exact and supported:
    token weights over the response span (or none at all), no gradient
    checkpointing (it would recompute the prompt pass apart from its keys).
    ``true`` insists (an error when impossible), ``false`` keeps full rows.
    """
    if cfg.shared_prefix is Switch.FALSE:
        return False
    reasons = []
    if not supported(model):
        reasons.append("the model has no plain-op attention in every block (plain_attention)")
    if cfg.weight_span != "response" and cfg.weighting != "none":
        reasons.append("weight_span: sequence needs the prompt in every row")
    if cfg.grad_checkpoint is Switch.TRUE:
        reasons.append("grad_checkpoint is on")
    if reasons and cfg.shared_prefix is Switch.TRUE:
        raise ConfigError(f"shared_prefix: true is not possible here: {'; '.join(reasons)}")
    return not reasons


def shared_prefix_difference(rt: CpuRuntime) -> float:
    """Largest hidden-state difference, shared-prefix vs whole rows of ``rt``, on fixed token ids, relative to
    their scale."""
    ids = [(7 * i + 3) % 97 + 1 for i in range(24)]
    pair = Example(index=0, source="check", messages=[], prompt=ids[:11], chosen=ids[11:17], rejected=ids[:10:-1])
    rows = collate([pair], 0)
    whole, _ = rt.whole_rows().layout_batch(rows)
    chunks, _ = rt.layout_batch(rows)
    want = rt.model.model(whole["tokens"])
    want = mx.take_along_axis(want, whole["resp_pos"][..., None] - 1, axis=1)
    got = rt.hidden(rt.embed(chunks), chunks, slice(None))
    got = mx.take_along_axis(got, chunks["resp_pos"][..., None] - 1, axis=1)
    keep = whole["resp_mask"][..., None]
    scale = max(float(mx.abs(want * keep).max()), 1e-6)
    return float(mx.abs((got - want) * keep).max()) / scale


def applies(cfg: Config) -> bool:
    """Whether this backend runs the model: ``plain_attention`` on (``auto``: on MLX's CPU device)."""
    return cfg.plain_attention.resolve(on_cpu())


def build(model: nn.Module, cfg: Config, name: str, reference: Reference) -> CpuRuntime:
    """Swap in the plain-op attention, check it (and the shared prefix where used); undo on failure.

    A model type whose blocks cannot be swapped runs unswapped (its fused
    attention, whole rows), unless ``plain_attention: true`` insists: then a
    :class:`ModelError`, as when a check fails (the fused attention is
    restored first).
    """
    swapped = attention.use_plain_attention(model)
    if not swapped:
        if cfg.plain_attention is Switch.TRUE:
            raise ModelError(f"{name}: plain_attention: true, but no block of this model type supports it")
        return CpuRuntime(model, reference, Facts.of(model, cfg, NAME, RowLayout.ROWS, score_matrix=False))
    try:
        diff = attention.max_logit_difference(model)
        if diff > TOLERANCE:
            raise ModelError(f"{name}: plain-op attention differs from the fused one by {diff:.2e} of the logit scale")
        layout = RowLayout.SHARED_PREFIX if shared_prefix_active(model, cfg) else RowLayout.ROWS
        rt = CpuRuntime(model, reference, Facts.of(model, cfg, NAME, layout, score_matrix=True),
                        [f"attention as plain ops in {swapped} blocks (CPU; logits match fused to {diff:.1e})"])
        if rt.shared:
            diff = shared_prefix_difference(rt)
            if diff > TOLERANCE:
                raise ModelError(f"{name}: the shared-prefix forward differs from full rows by {diff:.2e}")
            rt.notes.append(f"shared prefix: each pair's prompt runs once for its rows (matches full rows to {diff:.1e})")
    except Exception:
        attention.restore_fused_attention(model)
        raise
    return rt
