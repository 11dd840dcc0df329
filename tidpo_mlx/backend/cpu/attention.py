"""Attention and SwiGLU as plain ops for MLX's CPU backend, so compiled steps share work.

TI-DPO runs the policy forward twice on the same inputs: once inside
``mx.grad`` for the attribution and once for the loss. ``mx.compile`` merges
the two (common subexpression elimination) only when every op and constant
of the forward is the same in both. ``mx.fast.rope`` and
``mx.fast.scaled_dot_product_attention(mask="causal")`` block that merge,
so on the CPU the attention of llama-style blocks is computed here with
plain ops whose constants (cos/sin tables, causal mask) are built once per
length and shared. Softmax and SiLU use the polynomial ``exp`` of
``fastmath.py`` (faster than MLX's CPU ``exp``; numbers in
``benchmarks/RESULTS.md``). The rules these follow are the compile contract of
``backend/cpu/__init__.py``. On Metal the fused kernels stay. With a KV cache (generation) or any other
mask the block's own implementation runs; the shared-prefix forward
(``prefix.py``) passes :class:`PromptKV` / :class:`PrefixContext` as the cache.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from tidpo_mlx.backend.cpu import fastmath
from tidpo_mlx.swap import CallSwap

SUPPORTED = ("mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.mistral")

MASKED = -1e9
"""Additive attention-mask value of a blocked key: finite, as ``fastmath.exp`` needs, and exp gives 0."""

_tables: dict[tuple[int, float, int], tuple[mx.array, mx.array, mx.array]] = {}


def rope_tables(dims: int, base: float, length: int) -> tuple[mx.array, mx.array, mx.array]:
    """cos, sin (length, dims/2) and the additive causal mask (length, length); built once, shared."""
    key = (dims, base, length)
    if key not in _tables:
        inv_freq = 1.0 / (base ** (np.arange(0, dims, 2, dtype=np.float64) / dims))
        angles = np.arange(length, dtype=np.float64)[:, None] * inv_freq[None, :]
        mask = np.triu(np.full((length, length), MASKED, dtype=np.float32), k=1)
        arrays = tuple(mx.array(a.astype(np.float32)) for a in (np.cos(angles), np.sin(angles), mask))
        mx.eval(*arrays)
        _tables[key] = arrays
    return _tables[key]


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Non-traditional (half-split) rotary embedding of ``x`` (B, H, L, D) at positions 0..L-1."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


class PromptKV:
    """One block's prompt keys (after RoPE) and values, one row per pair.

    Passed as the block's ``cache`` on the prompt pass of a shared-prefix
    forward (``prefix.py``): the attention records them there.
    """

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None


class PrefixContext:
    """Passed as the block's ``cache`` on the response pass of a shared-prefix forward.

    ``kv`` holds the block's prompt keys/values (B pairs); the N = g * B rows
    being run are g groups of the B pairs in order (chosen, rejected, anchor).
    ``positions`` (N, Rc) are the rows' absolute positions (for RoPE) and
    ``mask`` (N, Rc, P + Rc) the additive mask over prompt keys then row keys.
    """

    def __init__(self, kv: PromptKV, positions: mx.array, mask: mx.array):
        self.kv, self.positions, self.mask = kv, positions, mask


def _attend(self: nn.Module, q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None) -> mx.array:
    """Softmax attention of q (B, H, Lq, D) over k, v (B, Hkv, Lk, D) with an additive mask; then o_proj."""
    b, _, length, _ = q.shape
    rep = self.n_heads // self.n_kv_heads
    q = q.reshape(b, self.n_kv_heads, rep, length, -1)
    scores = (q * self.scale) @ mx.expand_dims(k, 2).swapaxes(-1, -2)
    if mask is not None:
        scores = scores + mask
    probs = fastmath.softmax(scores.astype(mx.float32), axis=-1).astype(v.dtype)
    out = (probs @ mx.expand_dims(v, 2)).reshape(b, self.n_heads, length, -1)
    return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, length, -1))


def _plain_mlp_call(self: nn.Module, x: mx.array) -> mx.array:
    """The llama/qwen2 MLP with the polynomial-exp SwiGLU."""
    return self.down_proj(fastmath.swiglu(self.gate_proj(x), self.up_proj(x)))


def _plain_call(self: nn.Module, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
    """Causal self-attention of whole rows, or a prompt / response pass of the shared-prefix forward;
    any other cache or mask goes to the block's own implementation."""
    parent = type(self).__mro__[1]
    shared = isinstance(cache, (PromptKV, PrefixContext))
    if not shared and (cache is not None or not (mask is None or isinstance(mask, str))):
        return parent.__call__(self, x, mask, cache)
    b, length, _ = x.shape
    q = self.q_proj(x).reshape(b, length, self.n_heads, -1).transpose(0, 2, 1, 3)
    k = self.k_proj(x).reshape(b, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
    v = self.v_proj(x).reshape(b, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
    if isinstance(cache, PrefixContext):
        prompt = cache.kv.keys.shape[2]
        cos, sin, _ = rope_tables(q.shape[-1], float(self.rope.base), prompt + length)
        cos, sin = (mx.expand_dims(mx.take(t, cache.positions, axis=0), 1) for t in (cos, sin))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        groups = b // cache.kv.keys.shape[0]
        k = mx.concatenate([mx.concatenate([cache.kv.keys] * groups), k], axis=2)
        v = mx.concatenate([mx.concatenate([cache.kv.values] * groups), v], axis=2)
        return _attend(self, q, k, v, cache.mask[:, None, None])
    cos, sin, causal = rope_tables(q.shape[-1], float(self.rope.base), length)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if isinstance(cache, PromptKV):
        cache.keys, cache.values = k, v
        mask = "causal"
    return _attend(self, q, k, v, causal if mask is not None else None)


def _eligible(attn: nn.Module) -> bool:
    rope = getattr(attn, "rope", None)
    q_proj = getattr(attn, "q_proj", None)
    base = getattr(q_proj, "linear", q_proj)  # under LoRA the Linear is wrapped
    head_dim = base.weight.shape[0] // attn.n_heads if base is not None else 0
    return (
        type(attn).__module__ in SUPPORTED
        and type(rope) is nn.RoPE
        and not rope.traditional
        and rope.scale == 1.0
        and rope.dims == head_dim
    )


PLAIN_ATTENTION = CallSwap("Plain", _plain_call)
PLAIN_MLP = CallSwap("Plain", _plain_mlp_call)


def _eligible_mlp(mlp: nn.Module | None) -> bool:
    return (
        mlp is not None
        and type(mlp).__module__ in SUPPORTED
        and all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj"))
        and "swiglu" in type(mlp).__call__.__code__.co_names
    )


def use_plain_attention(model: nn.Module) -> int:
    """Swap every eligible block's attention (and SwiGLU MLP) to the plain-op version; return how many blocks
    run it (blocks swapped before count too).

    The swap changes only the class (a subclass overriding ``__call__``), so
    parameter names and adapter files are unchanged. The caller should check
    the logits against the fused model (see :func:`max_logit_difference`).
    """
    count = 0
    for layer in model.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not (PLAIN_ATTENTION.applied(attn) or _eligible(attn)):
            continue
        PLAIN_ATTENTION.apply(attn)
        if _eligible_mlp(getattr(layer, "mlp", None)):
            PLAIN_MLP.apply(layer.mlp)
        count += 1
    return count


def plain_classes() -> set[type]:
    """The plain-op attention classes made so far (one per fused class swapped)."""
    return PLAIN_ATTENTION.classes()


def restore_fused_attention(model: nn.Module) -> None:
    """Undo :func:`use_plain_attention`."""
    for layer in model.layers:
        for swap, name in ((PLAIN_ATTENTION, "self_attn"), (PLAIN_MLP, "mlp")):
            if getattr(layer, name, None) is not None:
                swap.undo(getattr(layer, name))


def max_logit_difference(model: nn.Module) -> float:
    """Largest |logit| difference, plain vs fused attention, on a fixed input, relative to the logit scale."""
    tokens = mx.array([[(7 * i + 3) % 97 + 1 for i in range(19)]])
    plain = model(tokens)
    restore_fused_attention(model)
    fused = model(tokens)
    use_plain_attention(model)
    scale = max(float(mx.abs(fused).max()), 1e-6)
    return float(mx.abs(plain - fused).max()) / scale if math.isfinite(scale) else math.inf
