"""Activation memory of a training micro-step, and trading it for time (``grad_checkpoint``).

:func:`recompute_blocks` wraps every transformer block of a model in
``mx.checkpoint``: the backward pass keeps only each block's input and
recomputes the block, so activations cost one block's worth instead of all of
them, for about one more forward pass. It swaps the blocks' class for a
subclass (``swap.CallSwap``, as the attention swap of the CPU backend does),
so it is undone per model (:func:`restore_blocks`), unlike mlx-lm's
``grad_checkpoint``, which patches the block class for the whole process.

``grad_checkpoint: auto`` (:func:`decide`) turns it on when
:func:`activation_bytes`, the estimated activations of the largest micro-step
of the run, exceed :data:`SHARE` of the memory MLX may use
(``mx.get_memory_limit``). The estimate's constants were fitted to measured
peaks (``benchmarks/grad_checkpoint.py``; numbers in ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from tidpo_mlx.swap import CallSwap

SHARE = 0.5
"""``auto`` recomputes when the estimated activations exceed this share of MLX's memory limit (the rest holds
the weights, the optimizer state, the logits chunks and MLX's buffer cache)."""
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


def activation_bytes(model: nn.Module, rows: int, length: int, plain_attention: bool) -> int:
    """Estimated activations of a micro-step's backward over ``rows`` whole rows of ``length`` tokens.

    Per block and token: :data:`PER_TOKEN_HIDDEN` x hidden +
    :data:`PER_TOKEN_INTERMEDIATE` x intermediate values, plus the attention
    scores of plain-op attention; in the model's compute dtype (float32 on CPU, where the base is dequantized).
    """
    hidden, intermediate, heads = _dims(model)
    itemsize = _compute_itemsize(model)
    per_token = PER_TOKEN_HIDDEN * hidden + PER_TOKEN_INTERMEDIATE * intermediate
    scores = (PER_SCORE if plain_attention else FUSED_SCORE) * heads * length
    return len(model.layers) * rows * length * (per_token + scores) * itemsize


def decide(setting: str, model: nn.Module, rows: int, length: int, plain_attention: bool) -> tuple[bool, str]:
    """Whether to recompute blocks for ``grad_checkpoint: setting``, and the log line saying why."""
    if setting in ("true", "false"):
        return setting == "true", f"grad_checkpoint: {setting}"
    need = activation_bytes(model, rows, length, plain_attention)
    limit = mx.get_memory_limit()
    on = need > SHARE * limit
    return on, (f"grad_checkpoint auto: {'on' if on else 'off'} (estimated activations {need / 1e9:.2f} GB for "
                f"{rows} rows x {length} tokens; {'over' if on else 'within'} {SHARE:.0%} of the "
                f"{limit / 1e9:.1f} GB MLX may use)")
