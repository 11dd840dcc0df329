"""Attention as plain ops for MLX's CPU backend, so compiled steps share work.

TI-DPO runs the policy forward twice on the same inputs: once inside
``mx.grad`` for the attribution and once for the loss. ``mx.compile`` merges
the two (common subexpression elimination) only when every op and constant
of the forward is the same in both. ``mx.fast.rope`` and
``mx.fast.scaled_dot_product_attention(mask="causal")`` block that merge
(measured: TI-DPO / DPO step time 1.46 instead of 1.23), so on the CPU the
attention of llama-style blocks is computed here with plain ops whose
constants (cos/sin tables, causal mask) are built once per length and shared.
On Metal the fused kernels stay. With a KV cache (generation) or any other
mask the block's own implementation runs.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

SUPPORTED = ("mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.mistral")

_tables: dict[tuple[int, float, int], tuple[mx.array, mx.array, mx.array]] = {}
_classes: dict[type, type] = {}


def rope_tables(dims: int, base: float, length: int) -> tuple[mx.array, mx.array, mx.array]:
    """cos, sin (length, dims/2) and the additive causal mask (length, length); built once, shared."""
    key = (dims, base, length)
    if key not in _tables:
        inv_freq = 1.0 / (base ** (np.arange(0, dims, 2, dtype=np.float64) / dims))
        angles = np.arange(length, dtype=np.float64)[:, None] * inv_freq[None, :]
        mask = np.triu(np.full((length, length), -np.inf, dtype=np.float32), k=1)
        arrays = tuple(mx.array(a.astype(np.float32)) for a in (np.cos(angles), np.sin(angles), mask))
        mx.eval(*arrays)
        _tables[key] = arrays
    return _tables[key]


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Non-traditional (half-split) rotary embedding of ``x`` (B, H, L, D) at positions 0..L-1."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


def _plain_call(self: nn.Module, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
    parent = type(self).__mro__[1]
    if cache is not None or not (mask is None or isinstance(mask, str)):
        return parent.__call__(self, x, mask, cache)
    b, length, _ = x.shape
    q = self.q_proj(x).reshape(b, length, self.n_heads, -1).transpose(0, 2, 1, 3)
    k = self.k_proj(x).reshape(b, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
    v = self.v_proj(x).reshape(b, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
    cos, sin, causal = rope_tables(q.shape[-1], float(self.rope.base), length)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    rep = self.n_heads // self.n_kv_heads
    q = q.reshape(b, self.n_kv_heads, rep, length, -1)
    scores = (q * self.scale) @ mx.expand_dims(k, 2).swapaxes(-1, -2)
    if mask is not None:
        scores = scores + causal
    probs = mx.softmax(scores.astype(mx.float32), axis=-1).astype(v.dtype)
    out = (probs @ mx.expand_dims(v, 2)).reshape(b, self.n_heads, length, -1)
    return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, length, -1))


def _eligible(attn: nn.Module) -> bool:
    rope = getattr(attn, "rope", None)
    head_dim = attn.q_proj.weight.shape[0] // attn.n_heads if hasattr(attn, "q_proj") else 0
    return (
        type(attn).__module__ in SUPPORTED
        and type(rope) is nn.RoPE
        and not rope.traditional
        and rope.scale == 1.0
        and rope.dims == head_dim
    )


def use_plain_attention(model: nn.Module) -> int:
    """Swap every eligible block's attention to the plain-op version; return how many.

    The swap changes only the class (a subclass overriding ``__call__``), so
    parameter names and adapter files are unchanged. The caller should check
    the logits against the fused model (see :func:`check_plain_attention`).
    """
    count = 0
    for layer in model.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not _eligible(attn):
            continue
        cls = type(attn)
        if cls not in _classes:
            _classes[cls] = type(f"Plain{cls.__name__}", (cls,), {"__call__": _plain_call})
        attn.__class__ = _classes[cls]
        count += 1
    return count


def restore_fused_attention(model: nn.Module) -> None:
    """Undo :func:`use_plain_attention`."""
    for layer in model.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is not None and type(attn) in _classes.values():
            attn.__class__ = type(attn).__mro__[1]


def max_logit_difference(model: nn.Module) -> float:
    """Largest |logit| difference, plain vs fused attention, on a fixed input, relative to the logit scale."""
    tokens = mx.array([[(7 * i + 3) % 97 + 1 for i in range(19)]])
    plain = model(tokens)
    restore_fused_attention(model)
    fused = model(tokens)
    use_plain_attention(model)
    scale = max(float(mx.abs(fused).max()), 1e-6)
    return float(mx.abs(plain - fused).max()) / scale if math.isfinite(scale) else math.inf
