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
estimate counts what the backward keeps, as the run's runtime computes it
(:class:`~tidpo_mlx.runtime.Facts`): only the blocks the backward goes through
(``backward_blocks``: the adapted ones, or all when the attribution
differentiates to the input embeddings), the token positions the layout runs
(:class:`Extent`: with the shared prefix each pair's prompt once) and the
attention scores where attention keeps a score matrix (``score_matrix``:
plain-op attention). Its constants were fitted to measured peaks
(``benchmarks/grad_checkpoint.py``; numbers in ``benchmarks/RESULTS.md``).
The decision is a :class:`Checkpointing`, its log line :attr:`Checkpointing.note`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from tidpo_mlx.batching import round_up
from tidpo_mlx.config import Switch
from tidpo_mlx.data import Example
from tidpo_mlx.runtime import Facts, RowLayout
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
"""... per attention score (rows x heads x queries x keys) where attention keeps a score matrix (plain ops; fitted)."""
FUSED_SCORE = 0
"""Per attention score with a fused kernel (``scaled_dot_product_attention`` keeps no score matrix)."""


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


def activation_bytes(model: nn.Module, blocks: int, extent: Extent, score_matrix: bool) -> int:
    """Estimated activations kept for the backward of ``blocks`` blocks over ``extent``.

    Per block and token position: :data:`PER_TOKEN_HIDDEN` x hidden +
    :data:`PER_TOKEN_INTERMEDIATE` x intermediate values, plus the attention
    scores where attention keeps a ``score_matrix``; in the model's compute
    dtype (float32 where the base is dequantized).
    """
    hidden, intermediate, heads = _dims(model)
    itemsize = _compute_itemsize(model)
    per_token = PER_TOKEN_HIDDEN * hidden + PER_TOKEN_INTERMEDIATE * intermediate
    per_score = (PER_SCORE if score_matrix else FUSED_SCORE) * heads
    return blocks * (extent.tokens * per_token + extent.scores * per_score) * itemsize


@dataclass(frozen=True)
class Estimate:
    """What ``grad_checkpoint: auto`` weighs (bytes): the activations, everything with them, and MLX's limit."""

    activations: int
    total: int
    limit: int
    blocks: int
    tokens: int

    @property
    def over(self) -> bool:
        """Whether the total exceeds :data:`SHARE` of the limit."""
        return self.total > SHARE * self.limit


@dataclass(frozen=True)
class Checkpointing:
    """Whether a run recomputes its blocks in the backward (``grad_checkpoint``), and why (:attr:`note`)."""

    on: bool
    setting: Switch
    estimate: Estimate | None = None
    """``auto``'s estimate (None where the setting insists)."""
    leaves_shared_prefix: bool = False
    """On where the runtime runs the shared prefix: the run goes over whole rows (recomputation needs them)."""
    held_off: bool = False
    """``auto``'s estimate is over, but ``shared_prefix: true`` keeps the shared prefix, so no recomputation."""

    @property
    def note(self) -> str:
        """The log line."""
        e = self.estimate
        if e is None:
            text = f"grad_checkpoint: {self.setting}"
        else:
            text = (f"grad_checkpoint auto: {'on' if self.on else 'off'} (estimated activations "
                    f"{e.activations / 1e9:.2f} GB for {e.blocks} blocks x {e.tokens} token positions, "
                    f"{e.total / 1e9:.2f} GB in all with the weights and optimizer state; "
                    f"{'over' if e.over else 'within'} {SHARE:.0%} of the {e.limit / 1e9:.1f} GB MLX may use)")
        if self.leaves_shared_prefix:
            text += "; whole rows instead of the shared prefix"
        if self.held_off:
            text += "; kept off for shared_prefix: true"
        return text


def decide(setting: Switch, model: nn.Module, facts: Facts, extent: Extent, trainable_bytes: int = 0,
           keep_shared_prefix: bool = False) -> Checkpointing:
    """Whether to recompute the blocks of ``model`` as its runtime's ``facts`` run it, for ``grad_checkpoint:
    setting`` and the largest micro-step ``extent``.

    ``auto`` recomputes when the resident memory plus the estimated
    activations and ``trainable_bytes`` x :data:`OPTIMIZER_COPIES` exceed
    :data:`SHARE` of MLX's memory limit, unless the runtime runs the shared
    prefix and ``keep_shared_prefix`` (``shared_prefix: true``) holds it.
    """
    shared = facts.layout is RowLayout.SHARED_PREFIX
    if setting is not Switch.AUTO:
        on = setting.resolve(False)
        return Checkpointing(on, setting, leaves_shared_prefix=on and shared)
    activations = activation_bytes(model, facts.backward_blocks, extent, facts.score_matrix)
    resident, limit = mx.get_active_memory(), mx.get_memory_limit()
    total = resident + activations + OPTIMIZER_COPIES * trainable_bytes
    estimate = Estimate(activations, total, limit, facts.backward_blocks, extent.tokens)
    held = estimate.over and shared and keep_shared_prefix
    on = estimate.over and not held
    return Checkpointing(on, setting, estimate, leaves_shared_prefix=on and shared, held_off=held)
