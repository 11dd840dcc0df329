"""Chosen-token log-probs and the per-token KL from hidden states, a chunk of positions at a time.

The objective needs, for every response token, ``log pi(y_t | x, y_<t) =
logits[y_t] - logsumexp(logits)`` and, for the tdpo losses, the per-token
``KL(ref(. | x, y_<t) || pi(. | x, y_<t))`` over the full vocabulary (docs/method.md
section 4). Computed from whole (N, R, V) float32 logits, autodiff keeps
those alive from the forward to the backward pass, several arrays of them
(a Qwen2.5 vocabulary of 151936 at 4 x 1024 positions: 2.5 GB each).

With ``chunk > 0`` the head runs over ``chunk`` positions at a time inside an
``mx.custom_function`` whose VJP recomputes each chunk's logits (one more head
pass in the backward): only one chunk of logits is alive at a time.
``chunk = 0`` (or a chunk covering every position) is the plain computation,
differentiated by autodiff; both give the same values and gradients.

A custom function treats arrays it captures as constants, so the head's
trainable parameters are inputs of it (:class:`Head`); the gradient reaches
them and the hidden states. The recomputation's inputs depend on the
cotangents (``mx.depends``), so a compiled step neither merges it with the
forward's logits (CSE) nor runs it before the backward needs it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

Logits = Callable[[mx.array], mx.array]
"""A head: hidden states (n, D) -> logits (n, V), post-head transforms included (``Runtime.logits``)."""


def head_parameters(model: nn.Module) -> dict[str, mx.array]:
    """The trainable parameters of ``model`` outside its blocks: all its head can read (none under LoRA)."""
    in_blocks = {id(a) for block in model.layers for _, a in tree_flatten(block.trainable_parameters())}
    return {k: a for k, a in tree_flatten(model.trainable_parameters()) if id(a) not in in_blocks}


@contextlib.contextmanager
def bound(module: nn.Module | None, params: dict[str, mx.array]) -> Iterator[None]:
    """Inside this block ``module`` holds ``params`` (flat names); its own arrays come back after."""
    if module is None or not params:
        yield
        return
    own = {k: a for k, a in tree_flatten(module.parameters()) if k in params}
    module.update(tree_unflatten(list(params.items())))
    try:
        yield
    finally:
        module.update(tree_unflatten(list(own.items())))


@dataclass(frozen=True)
class Head:
    """A head ``logits`` and the trainable parameters ``params`` of ``module`` it reads.

    Calling it with explicit parameters computes float32 logits with those
    bound in ``module``, so gradients reach them through a custom function.
    """

    logits: Logits
    module: nn.Module | None = None
    params: dict[str, mx.array] = field(default_factory=dict)

    def __call__(self, params: dict[str, mx.array], hidden: mx.array) -> mx.array:
        """Float32 logits of ``hidden`` with ``params`` in place of the module's own."""
        with bound(self.module, params):
            return self.logits(hidden).astype(mx.float32)


def _terms(
    head: Head,
    params: dict[str, mx.array],
    hidden: mx.array,
    targets: mx.array,
    ref_head: Logits | None,
    ref_hidden: mx.array | None,
) -> tuple[mx.array, ...]:
    """``(log pi(y_t),)`` of flat positions, and with a reference ``(.., log ref(y_t), KL_t(ref || pi))``."""
    logits = head(params, hidden)
    logz = mx.logsumexp(logits, axis=-1, keepdims=True)
    logp = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0] - logz[:, 0]
    if ref_head is None:
        return (logp,)
    ref_logits = ref_head(ref_hidden).astype(mx.float32)
    ref_logsm = mx.stop_gradient(ref_logits - mx.logsumexp(ref_logits, axis=-1, keepdims=True))
    ref_logp = mx.take_along_axis(ref_logsm, targets[:, None], axis=-1)[:, 0]
    kl = (mx.exp(ref_logsm) * (ref_logsm - (logits - logz))).sum(axis=-1)
    return logp, ref_logp, kl


def _chunked(
    head: Head,
    hidden: mx.array,
    targets: mx.array,
    chunk: int,
    ref_head: Logits | None,
    ref_hidden: mx.array | None,
) -> tuple[mx.array, ...]:
    """:func:`_terms` over flat positions (n, D), ``chunk`` at a time, with a recomputing VJP."""
    n = hidden.shape[0]
    if chunk <= 0 or chunk >= n:
        return _terms(head, head.params, hidden, targets, ref_head, ref_hidden)
    spans = [slice(a, min(a + chunk, n)) for a in range(0, n, chunk)]
    ref = () if ref_head is None else (mx.stop_gradient(ref_hidden),)

    def piece(s: slice, params: dict[str, mx.array], h: mx.array, ref_h: tuple[mx.array, ...]) -> tuple[mx.array, ...]:
        return _terms(head, params, h[s], targets[s], ref_head, ref_h[0][s] if ref_h else None)

    @mx.custom_function
    def run(h: mx.array, params: dict[str, mx.array], *ref_h: mx.array) -> tuple[mx.array, ...]:
        pieces: list[tuple[mx.array, ...]] = []
        for s in spans:
            if pieces:
                h, *ref_h = mx.depends([h, *ref_h], list(pieces[-1]))
            pieces.append(piece(s, params, h, tuple(ref_h)))
        return tuple(mx.concatenate(parts) for parts in zip(*pieces))

    @run.vjp
    def run_vjp(
        primals: tuple, cotangents: tuple[mx.array, ...], outputs: tuple[mx.array, ...]
    ) -> tuple:
        h, params, *ref_h = primals
        h, *ref_h = mx.depends([h, *ref_h], list(cotangents))
        names = list(params)
        d_hidden: list[mx.array] = []
        d_params = tree_map(mx.zeros_like, params)
        grads: list[mx.array] = []
        for s in spans:
            def fn(h_s: mx.array, *p: mx.array, s: slice = s) -> list[mx.array]:
                part = dict(zip(names, p))
                ref_s = tuple(r[s] for r in ref_h)
                return list(_terms(head, part, h_s, targets[s], ref_head, ref_s[0] if ref_s else None))

            h_s = mx.depends(h[s], grads) if grads else h[s]
            _, grads = mx.vjp(fn, [h_s, *params.values()], [c[s] for c in cotangents])
            d_hidden.append(grads[0])
            d_params = {k: d_params[k] + g for k, g in zip(names, grads[1:])}
        return (mx.concatenate(d_hidden), d_params, *(mx.zeros_like(r) for r in ref_h))

    return run(hidden, head.params, *ref)


def token_logprobs(head: Head | Logits, hidden: mx.array, targets: mx.array, chunk: int) -> mx.array:
    """``log pi(y_t | x, y_<t)`` of every position: hidden (..., D), targets (...) -> (...).

    The head runs over ``chunk`` flattened positions at a time (0: all at
    once). A plain callable head is a :class:`Head` without trainable
    parameters (what it captures gets no gradient when chunked).
    """
    head = head if isinstance(head, Head) else Head(head)
    shape = targets.shape
    (logp,) = _chunked(head, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1), chunk, None, None)
    return logp.reshape(shape)


def token_logprobs_kl(
    head: Head | Logits,
    hidden: mx.array,
    ref_head: Logits,
    ref_hidden: mx.array,
    targets: mx.array,
    chunk: int,
) -> tuple[mx.array, mx.array, mx.array]:
    """Per position: ``log pi(y_t)``, ``log ref(y_t)`` and ``KL(ref(.|x, y_<t) || pi(.|x, y_<t))`` (each of targets' shape).

    The reference (``ref_head`` on ``ref_hidden``) carries no gradient; the
    KL's gradient flows through the policy ``head`` and ``hidden`` only.
    Summed over response tokens the KL is docs/method.md section 4's sequential
    ``KL(y)``. Both heads run in the same chunks, so the policy logits serve
    the log-prob and the KL.
    """
    head = head if isinstance(head, Head) else Head(head)
    shape = targets.shape
    flat = hidden.shape[-1]
    out = _chunked(head, hidden.reshape(-1, flat), targets.reshape(-1), chunk, ref_head, ref_hidden.reshape(-1, flat))
    return tuple(o.reshape(shape) for o in out)
