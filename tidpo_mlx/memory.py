"""Activation memory of a training micro-step, and trading it for time (``grad_checkpoint``).

:func:`recompute_blocks` wraps every transformer block of a model in
``mx.checkpoint``: the backward pass keeps only each block's input and
recomputes the block, so activations cost one block's worth instead of all of
them, for about one more forward pass. It swaps the blocks' class for a
subclass (``swap.CallSwap``, as the attention swap of the CPU backend does),
so it is undone per model (:func:`restore_blocks`), unlike mlx-lm's
``grad_checkpoint``, which patches the block class for the whole process.

``grad_checkpoint: auto`` (:func:`decide`) turns it on when the resident
weights plus :func:`activation_bytes`, the estimated activations of the
largest micro-step of the run, and the optimizer state would exceed
:data:`SHARE` of the memory MLX may use (``mx.get_memory_limit``). The
estimate counts what the backward keeps: only the blocks it goes through
(:func:`backward_blocks`: the adapted ones, or all when the attribution
differentiates to the input embeddings) and the token positions and attention
scores the layout runs (:class:`Extent`: with the shared prefix each pair's
prompt once). Its constants were fitted to measured
peaks (``benchmarks/grad_checkpoint.py``; numbers in ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from tidpo_mlx.batching import round_up
from tidpo_mlx.data import Example
from tidpo_mlx.swap import CallSwap

SHARE = 0.8
"""``auto`` recomputes when what is resident (the loaded weights), plus the estimated activations and
optimizer state of the run, would exceed this share of MLX's memory limit (the rest is headroom for the
logits chunks, temporaries and the estimate's error)."""
OPTIMIZER_COPIES = 3
"""Arrays the size of the trainable weights that training adds: their gradients and AdamW's two moments."""
PER_TOKEN_HIDDEN = 20
"""Activation values kept per token and block, per unit of the hidden size (fitted)."""
PER_TOKEN_INTERMEDIATE = 4
"""... per unit of the MLP's intermediate size (fitted)."""
PER_SCORE = 3
"""... per attention score (rows x heads x queries x keys) where attention runs as plain ops (CPU; fitted)."""
FUSED_SCORE = 0
"""Per attention score with the fused kernel (Metal's ``scaled_dot_product_attention`` keeps no score matrix)."""


def _recomputed_call(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The block's own ``__call__`` under ``mx.checkpoint`` (its trainable parameters passed in, as mlx-lm does)."""
    own = type(self).__mro__[1].__call__

    def inner(params: Any, *a: Any) -> Any:
        self.update(params)
        return own(self, *a, **kwargs)

    return mx.checkpoint(inner)(self.trainable_parameters(), *args)


RECOMPUTE = CallSwap("Recomputed", _recomputed_call)


def recompute_blocks(model: nn.Module) -> int:
    """Wrap every block of ``model.layers`` in ``mx.checkpoint``; returns how many."""
    for layer in model.layers:
        RECOMPUTE.apply(layer)
    return len(model.layers)


def restore_blocks(model: nn.Module) -> None:
    """Undo :func:`recompute_blocks`."""
    for layer in model.layers:
        RECOMPUTE.undo(layer)


def recomputing(model: nn.Module) -> bool:
    """Whether :func:`recompute_blocks` is in effect on ``model``."""
    return any(RECOMPUTE.applied(layer) for layer in model.layers)


def _dims(model: nn.Module) -> tuple[int, int, int]:
    """Hidden size, MLP intermediate size and attention heads of ``model`` (from its mlx-lm ``args``)."""
    args = getattr(model, "args", None)
    get = (lambda k: getattr(args, k, None)) if args is not None else (lambda k: None)
    hidden = get("hidden_size") or get("d_model") or get("n_embd") or 0
    intermediate = get("intermediate_size") or get("ffn_dim") or get("n_inner") or 4 * hidden
    heads = get("num_attention_heads") or get("n_head") or get("num_heads") or 1
    return int(hidden), int(intermediate), int(heads)


def _compute_itemsize(model: nn.Module) -> int:
    """Bytes per value the model computes in: its first floating-point parameter's (a norm's, when quantized)."""
    return next((a.itemsize for _, a in tree_flatten(model.parameters()) if mx.issubdtype(a.dtype, mx.floating)), 4)


@dataclass(frozen=True)
class Extent:
    """What one micro-step's blocks run: token positions, and query-key pairs of attention (per head)."""

    tokens: int
    scores: int

    @classmethod
    def of(cls, batch: Sequence[Example], rows_per_pair: int, shared: bool) -> Extent:
        """The extent of ``batch`` collated with ``rows_per_pair`` rows per pair (lengths padded as training pads).

        Whole rows run every row's full sequence; the shared prefix runs each
        pair's prompt once and each row's response against prompt and response
        keys (``backend/cpu/prefix.py``). Plain-op attention scores every
        query against every key of its pass (masked, not skipped).
        """
        pairs, rows = len(batch), rows_per_pair * len(batch)
        if shared:
            prompt = round_up(max(len(ex.prompt) for ex in batch))
            response = round_up(max(ex.overlap for ex in batch))
            return cls(pairs * prompt + rows * response, pairs * prompt * prompt + rows * response * (prompt + response))
        length = round_up(max(ex.length for ex in batch))
        return cls(rows * length, rows * length * length)


def backward_blocks(model: nn.Module, num_layers: int, attribution: bool) -> int:
    """Blocks whose activations the backward keeps: every block when the attribution differentiates to the
    input embeddings E, else the last ``num_layers`` (-1: all) that carry the trainable weights."""
    count = len(model.layers)
    return count if attribution or num_layers == -1 else min(num_layers, count)


def activation_bytes(model: nn.Module, blocks: int, extent: Extent, plain_attention: bool) -> int:
    """Estimated activations kept for the backward of ``blocks`` blocks over ``extent``.

    Per block and token position: :data:`PER_TOKEN_HIDDEN` x hidden +
    :data:`PER_TOKEN_INTERMEDIATE` x intermediate values, plus the attention
    scores of plain-op attention; in the model's compute dtype (float32 on CPU, where the base is dequantized).
    """
    hidden, intermediate, heads = _dims(model)
    itemsize = _compute_itemsize(model)
    per_token = PER_TOKEN_HIDDEN * hidden + PER_TOKEN_INTERMEDIATE * intermediate
    per_score = (PER_SCORE if plain_attention else FUSED_SCORE) * heads
    return blocks * (extent.tokens * per_token + extent.scores * per_score) * itemsize


def decide(setting: str, model: nn.Module, blocks: int, extent: Extent, plain_attention: bool,
           trainable_bytes: int = 0) -> tuple[bool, str]:
    """Whether to recompute blocks for ``grad_checkpoint: setting``, and the log line saying why."""
    if setting in ("true", "false"):
        return setting == "true", f"grad_checkpoint: {setting}"
    activations = activation_bytes(model, blocks, extent, plain_attention)
    resident, limit = mx.get_active_memory(), mx.get_memory_limit()
    total = resident + activations + OPTIMIZER_COPIES * trainable_bytes
    on = total > SHARE * limit
    return on, (f"grad_checkpoint auto: {'on' if on else 'off'} (estimated activations {activations / 1e9:.2f} GB "
                f"for {blocks} blocks x {extent.tokens} token positions, {total / 1e9:.2f} GB in all with the weights "
                f"and optimizer state; {'over' if on else 'within'} {SHARE:.0%} of the {limit / 1e9:.1f} GB MLX may use)")
