"""``exp`` and the functions built on it, as fused polynomials for MLX's CPU backend.

MLX's CPU ``exp`` (and ``sigmoid``, ``softmax``) runs far slower than its
additions and multiplications, enough for SiLU to be a large share of a
forward pass. Here ``exp(x) = 2^n * p(f)`` with ``n = round(x log2 e)`` and a
degree-7 Taylor polynomial ``p`` of ``2^f`` on ``|f| <= 1/2``: a dozen
multiply-adds that ``mx.compile`` fuses into one kernel (relative error
< 1e-6 against ``mx.exp``, 0 below about -88; speeds in
``benchmarks/RESULTS.md``). Nothing here is compiled on its own: a nested
``mx.compile`` keeps the step's compile from merging the attribution forward
with the loss forward; eager callers (generation) run the dozen ops unfused.

Used by the CPU path's SiLU and attention softmax (``attention.py``);
on Metal the fused kernels stay. The log-softmax over the vocabulary keeps
``mx.logsumexp``: differentiating through the polynomial there keeps
vocabulary-sized intermediates alive (a higher peak memory per step), and a
custom gradient did not bring it back down.
"""

from __future__ import annotations

import math

import mlx.core as mx

LOG2E = 1.0 / math.log(2.0)
COEFFS = tuple(math.log(2.0) ** k / math.factorial(k) for k in range(8))
"""Taylor coefficients of ``2^f = exp(f ln 2)``, constant term first."""


def exp(x: mx.array) -> mx.array:
    """``e^x`` elementwise (float32 result for float32 input); inputs below ~-88 give 0.

    Inputs must be finite (masks add a large negative number, not ``-inf``).
    The value is the polynomial's; the gradient is that value times the
    cotangent (``d e^x = e^x``), written as ``e + (x - sg(x)) * e`` with ``e``
    cut from the graph: plain ops only, which ``mx.compile`` can merge between
    two identical forwards (an ``mx.custom_function`` it does not merge).
    """
    t = mx.clip(x * LOG2E, -127.0, 127.0)
    n = mx.round(t)
    f = t - n
    p = COEFFS[-1]
    for c in reversed(COEFFS[:-1]):
        p = p * f + c
    e = mx.stop_gradient((p * ((n.astype(mx.int32) + 127) << 23).view(mx.float32)).astype(x.dtype))
    return e + (x - mx.stop_gradient(x)) * e


def silu(x: mx.array) -> mx.array:
    """``x * sigmoid(x)`` with ``sigmoid(x) = 1 / (1 + e^-x)``."""
    return x * mx.reciprocal(1.0 + exp(-x))


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """The SwiGLU of llama-style MLPs: ``silu(gate) * up``."""
    return silu(gate) * up


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """Softmax along ``axis`` of finite inputs (mask with a large negative number, not ``-inf``)."""
    e = exp(x - mx.stop_gradient(x.max(axis=axis, keepdims=True)))
    return e / e.sum(axis=axis, keepdims=True)
