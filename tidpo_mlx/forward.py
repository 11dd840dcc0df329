"""Running mlx-lm's own model from given arrays: the mechanics under every runtime's forward.

The attribution differentiates with respect to the input embeddings ``E``
and the loss needs logits at a few gathered positions, but mlx-lm's models
take token ids and return logits of every position. :func:`given_output`
makes one module of a model answer a given array (the token embedding
answering ``E``, the inner model answering hidden states), so the model's
own code runs around it; :func:`token_embedding` finds the module to give
``E`` to. :class:`~tidpo_mlx.runtime.Runtime` builds its forward on these.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn

from tidpo_mlx.errors import ModelError

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
