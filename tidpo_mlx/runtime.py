"""The runtime: the model as this run computes it, one object that every part of a run asks.

A backend (``tidpo_mlx.backend.select``) returns a :class:`Runtime` for a
model and a config. It owns:

- the model and its reference ``ref`` (:meth:`Runtime.reference`: a switch
  read while a function is traced, so it works inside ``mx.compile``);
- what every compiled function of the model takes as state
  (:attr:`Runtime.compile_state`, :meth:`Runtime.compile`), so no compiled
  path bakes the reference's weights in as constants;
- typed facts about how it computes (:class:`Facts`): the row layout, whether
  attention keeps a score matrix, whether the frozen base computes quantized,
  how many blocks the backward goes through. The trainer, the memory
  estimate, scoring, evaluation and the audit read these instead of
  re-deriving them from the config;
- the forward the objective, the attribution and evaluation call:

  - ``layout_batch(rows) -> (batch, layout)``: NumPy whole rows to MLX arrays
    of this runtime's layout. The keys the core reads mean the same in every
    layout: ``tokens``, ``seq_mask``, ``resp_span``, ``resp_pos``,
    ``resp_mask``, ``last``, ``pair_index`` (positions index the layout's rows).
  - ``embed(batch) -> inputs``: the array the attribution differentiates, the
    input embeddings ``E`` of the rows (docs/method.md section 1). The loss
    forward runs from the very same array.
  - ``hidden(inputs, batch, rows) -> h``: final hidden states (after the last
    norm) of the batch rows ``rows``, given the ``inputs`` of exactly those rows.
  - ``logits(h)``: the model's own head (tied or not) with its post-head
    transforms, on hidden states of any leading shape (gathered positions).
  - ``token_count(batch, layout)``: non-pad tokens of the whole sequences.
  - ``whole_rows()``: the same runtime over whole rows (views that need
    every position, recomputed blocks).

This class is the portable implementation, mlx-lm's own forward with its
fused kernels (the ``portable`` backend, used on Metal); the CPU backend
(``backend/cpu``) subclasses it with plain-op attention and a shared prompt
prefix. :func:`check` proves a runtime reproduces ``model(tokens)``.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Sequence

import mlx.core as mx
import mlx.nn as nn

from tidpo_mlx.batching import Layout, Rows
from tidpo_mlx.config import Config
from tidpo_mlx.errors import ModelError, first_line
from tidpo_mlx.forward import given_output, token_embedding
from tidpo_mlx.models import Reference

CHECK_TOKENS = [1, 2, 3, 4]
"""Token ids of the load-time check that a runtime reproduces ``model(tokens)``."""


class RowLayout(str, enum.Enum):
    """How a batch's rows run: whole sequences, or each pair's prompt once for its rows (the shared prefix)."""

    ROWS = "rows"
    SHARED_PREFIX = "shared-prefix"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Facts:
    """How a runtime computes, as the rest of a run needs to know it."""

    backend: str
    """The registered backend that built it (``tidpo_mlx.backend``)."""
    layout: RowLayout
    """The rows its batches run (:meth:`Runtime.layout_batch`)."""
    score_matrix: bool
    """Whether attention keeps a (queries x keys) score matrix per head for the backward: plain-op attention does,
    a fused attention kernel does not. The memory estimate counts it (``memory.activation_bytes``)."""
    quantized: bool
    """Whether the frozen base computes with quantized weights (``dequantize``)."""
    backward_blocks: int
    """Blocks whose activations a training step's backward keeps (:func:`backward_blocks`)."""

    @classmethod
    def of(cls, model: nn.Module, cfg: Config, backend: str, layout: RowLayout, score_matrix: bool) -> Facts:
        """The facts of ``model`` run by ``backend`` in ``layout`` for ``cfg``."""
        quantized = any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
        blocks = backward_blocks(model, cfg.num_layers, cfg.uses_attribution)
        return cls(backend, layout, score_matrix, quantized, blocks)


def backward_blocks(model: nn.Module, num_layers: int, attribution: bool) -> int:
    """Blocks whose activations the backward keeps: every block when the attribution differentiates to the
    input embeddings E, else the last ``num_layers`` (-1: all) that carry the trainable weights."""
    count = len(model.layers)
    return count if attribution or num_layers == -1 else min(num_layers, count)


class Runtime:
    """The portable runtime: whole rows through mlx-lm's model (see the module docstring).

    Works for any mlx-lm decoder whose token embedding ``forward.token_embedding``
    finds: :meth:`hidden` runs the model's own inner forward on the token ids
    with the embedding layer answering the given ``E`` (so the attribution
    differentiates exactly with respect to ``E``, as with an
    ``input_embeddings`` argument, and whatever the model does after its
    embedding, e.g. Gemma's and Granite's scaling, still happens); :meth:`logits`
    runs the model's own ``__call__`` with the inner model answering the given
    hidden states, so its head and post-head transforms (tied or not, Gemma 2's
    final softcap, Cohere's ``logit_scale``, Granite's ``logits_scaling``) apply.
    """

    def __init__(self, model: nn.Module, reference: Reference, facts: Facts, notes: Sequence[str] = ()):
        self.model = model
        self.facts = facts
        self.notes = list(notes)
        """What building it did, for the log."""
        self._reference = reference
        self.inner, self.embedding_name = token_embedding(model)

    def reference(self) -> ContextManager[None]:
        """Inside this block the model computes the reference ``ref`` (in a traced function too)."""
        return self._reference.active()

    @property
    def compile_state(self) -> list[Any]:
        """What ``mx.compile`` of any function of this model takes as inputs: the model's state, the global
        random state (dropout, ``weighting: random``) and the reference's weights (full fine-tuning)."""
        return [self.model.state, mx.random.state, self._reference.state]

    def compile(self, fn: Callable, state: Sequence[Any] = ()) -> Callable:
        """``mx.compile(fn)`` with :attr:`compile_state` and ``state`` (e.g. the optimizer's) as inputs, and what a
        call may update (the model's state, the random state, ``state``) as outputs."""
        return mx.compile(fn, inputs=[*self.compile_state, *state], outputs=[self.model.state, mx.random.state, *state])

    def layout_batch(self, rows: Rows) -> tuple[dict[str, mx.array], Layout]:
        """MLX arrays of the whole rows, and their layout."""
        return {k: mx.array(v) for k, v in rows.arrays.items()}, dataclasses.replace(rows.layout, kind=self.facts.layout)

    def embed_tokens(self, tokens: mx.array) -> mx.array:
        """The model's own token embedding of ``tokens`` (before any scaling the model applies after it)."""
        return self.inner[self.embedding_name](tokens)

    def embed(self, batch: dict[str, mx.array]) -> mx.array:
        """Input embeddings ``E = embed(s)`` of every row (N, L, D)."""
        return self.embed_tokens(batch["tokens"])

    def hidden(self, inputs: mx.array, batch: dict[str, mx.array], rows: slice) -> mx.array:
        """Final hidden states of the rows ``rows``: the inner model on their tokens, its embedding answering ``inputs``."""
        tokens = batch["tokens"][rows]
        with given_output(self.inner[self.embedding_name], inputs, tokens.shape):
            return self.inner(tokens)

    def logits(self, hidden: mx.array) -> mx.array:
        """The model's own head and post-head transforms on ``hidden`` (any leading shape, e.g. gathered positions)."""
        with given_output(self.inner, hidden, hidden.shape):
            return self.model(hidden)

    def token_count(self, batch: dict[str, mx.array], layout: Layout) -> mx.array:
        """Non-pad tokens of all rows as whole sequences (as mlx-lm counts)."""
        return batch["seq_mask"].sum()

    def whole_rows(self) -> Runtime:
        """This runtime over whole rows (itself)."""
        return self


def check(rt: Runtime, name: str) -> None:
    """Fail clearly unless ``logits(hidden(embed(x)))`` of ``rt`` over whole rows reproduces ``model(x)``.

    Proves, per loaded model, that the inner model's output is what the head
    takes and that :meth:`Runtime.logits` reproduces the head with its
    post-head transforms (any family, any quantization). Run it in eval mode
    (``backend.select`` does), or LoRA dropout makes the two differ.
    """
    model = rt.model
    model_type = getattr(model, "model_type", type(model).__module__)
    tokens = mx.array([CHECK_TOKENS])
    base = rt.whole_rows()
    batch = {"tokens": tokens}
    try:
        ours = base.logits(base.hidden(base.embed(batch), batch, slice(None)))
    except (TypeError, ValueError, AttributeError) as err:
        raise ModelError(f"{name}: model type {model_type!r}: tidpo-mlx cannot run its forward ({first_line(err)})") from None
    theirs = model(tokens)
    scale = mx.abs(theirs).max().item() + 1e-6
    if ours.shape != theirs.shape or mx.abs(ours - theirs).max().item() > 1e-3 * scale:
        raise ModelError(
            f"{name}: model type {model_type!r}: logits from its hidden states differ from its own forward "
            "(the inner model's output is not what its head takes)"
        )
