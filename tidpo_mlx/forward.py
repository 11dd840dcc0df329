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
- ``logits(h)``: the model's own head (tied or not) with its post-head
  transforms, on hidden states of any leading shape (gathered positions).
- ``token_count(batch, layout)``: non-pad tokens of the whole sequences.
- ``whole_rows()``: the same model's forward over whole rows (views that need
  every position).

This module is the portable implementation: mlx-lm's own forward with its
fused kernels, used on Metal. The CPU backend (``backend/cpu``) implements
the same contract with plain-op attention and a shared prompt prefix;
:func:`make_forward` picks one and checks it against ``model(tokens)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn

from tidpo_mlx.batching import Layout, Rows
from tidpo_mlx.config import Config
from tidpo_mlx.errors import ModelError, first_line
from tidpo_mlx.models import on_cpu

CHECK_TOKENS = [1, 2, 3, 4]
"""Token ids of the load-time check that a forward reproduces ``model(tokens)``."""


EMBEDDING_NAMES = (
    "embed_tokens", "wte", "tok_embeddings", "word_embeddings", "token_embeddings", "embed_in", "embeddings",
    "embedding", "embed",
)
"""Attribute names mlx-lm's decoders give the token embedding of their inner model."""

_GIVEN = "_tidpo_given_output"
_given_classes: dict[type, type] = {}


class _GivenOutput:
    """Mixin: ``__call__`` returns the array :func:`given_output` put in the instance ``__dict__``.

    Only the class changes (a subclass of the module's own class), so
    parameter names, ``as_linear`` of tied heads and compiled state are
    untouched; the array lives in ``__dict__``, never as a module attribute
    (which MLX would take for a parameter).
    """

    def __call__(self, inputs: mx.array, *args: object, **kwargs: object) -> mx.array:
        value, shape = self.__dict__[_GIVEN]
        if tuple(inputs.shape) != shape:
            raise ModelError(
                f"model calls its {type(self).__mro__[2].__name__} on inputs of shape {tuple(inputs.shape)}, "
                f"not the rows' {shape}: tidpo-mlx cannot attribute through it"
            )
        return value


@contextlib.contextmanager
def given_output(module: nn.Module, value: mx.array, input_shape: tuple[int, ...]) -> Iterator[None]:
    """Inside this block, ``module(x)`` returns ``value`` (``x`` must have shape ``input_shape``).

    The module's class is swapped for a subclass overriding ``__call__`` and
    swapped back after; tracing (``mx.grad``, ``mx.compile``) runs the Python
    code, so the swap holds for a traced call.
    """
    cls = type(module)
    given = _given_classes.get(cls)
    if given is None:
        given = _given_classes[cls] = type(cls.__name__, (_GivenOutput, cls), {"__module__": cls.__module__})
    module.__dict__[_GIVEN] = (value, tuple(input_shape))
    module.__class__ = given
    try:
        yield
    finally:
        module.__class__ = cls
        del module.__dict__[_GIVEN]


def token_embedding(model: nn.Module) -> tuple[nn.Module, str]:
    """The inner model (the child of ``model`` that runs the blocks) and its token embedding's attribute name.

    Raises a one-line :class:`ModelError` naming the model type when there is none.
    """
    for child in model.values():
        if isinstance(child, nn.Module):
            for name in EMBEDDING_NAMES:
                if isinstance(child.get(name), (nn.Embedding, nn.QuantizedEmbedding)):
                    return child, name
    raise ModelError(
        f"model type {getattr(model, 'model_type', type(model).__module__)!r}: no token embedding found "
        f"(an inner model with one of {', '.join(EMBEDDING_NAMES)}): tidpo-mlx cannot attribute through it"
    )


class Forward:
    """The portable forward: whole rows through mlx-lm's model (see the module docstring).

    Works for any mlx-lm decoder whose token embedding :func:`token_embedding`
    finds: :meth:`hidden` runs the model's own inner forward on the token ids
    with the embedding layer answering the given ``E`` (so the attribution
    differentiates exactly with respect to ``E``, as with an
    ``input_embeddings`` argument, and whatever the model does after its
    embedding, e.g. Gemma's and Granite's scaling, still happens); :meth:`logits`
    runs the model's own ``__call__`` with the inner model answering the given
    hidden states, so its head and post-head transforms (tied or not, Gemma 2's
    final softcap, Cohere's ``logit_scale``, Granite's ``logits_scaling``) apply.
    """

    kind = "rows"

    def __init__(self, model: nn.Module):
        self.model = model
        self.inner, self.embedding_name = token_embedding(model)

    def prepare(self, rows: Rows) -> tuple[dict[str, mx.array], Layout]:
        """MLX arrays of the whole rows, and their layout."""
        return {k: mx.array(v) for k, v in rows.arrays.items()}, dataclasses.replace(rows.layout, kind=self.kind)

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

    def whole_rows(self) -> "Forward":
        """This forward over whole rows (itself)."""
        return self


def check_forward(fwd: Forward, name: str) -> None:
    """Fail clearly unless ``logits(hidden(embed(x)))`` reproduces ``model(x)``.

    Proves, per loaded model, that the inner model's output is what the head
    takes and that :meth:`Forward.logits` reproduces the head with its
    post-head transforms (any family, any quantization).
    """
    model = fwd.model
    model_type = getattr(model, "model_type", type(model).__module__)
    tokens = mx.array([CHECK_TOKENS])
    base = fwd.whole_rows()
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
