"""Shared-prefix forward: each pair's prompt runs once for all of its rows.

The chosen, rejected (and anchor) sequences of a pair share the prompt
``x``, often most of each row's tokens. In the shared layout
(:func:`shared_layout`, derived from whole rows) the prompt minus its last token
runs once per pair (the *prompt pass*, recording every block's keys and
values), and each row runs only its *chunk*: the prompt's last token
followed by the response, attending over the recorded prompt keys and its
own (the *response pass*). Every logit a response token needs sits in the
chunk, so per-token log-probs are those of the full sequence (up to float
rounding of the shorter softmax sums).

The gradient attribution ``I_i = ||d target / d E_i||_1`` (docs/method.md section 1)
is needed at response positions only with ``weight_span: response``. A
response embedding reaches only positions at or after it (causal model),
so the attribution differentiates the response pass alone, with the prompt
keys/values as constants: its backward covers the chunk, not
the whole sequence. The loss differentiates both passes, so gradients reach
the LoRA weights through the prompt positions exactly as before.
(``weighting: random`` draws one number per position of a row, so it draws
other numbers than whole rows would, from the same distribution.)

Needs the plain-op attention (``attention.py``) in every block of an
mlx-lm llama / qwen2 / mistral model without sliding-window layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from tidpo_mlx.backend.cpu.attention import MASKED, SUPPORTED, PrefixContext, PromptKV, plain_classes
from tidpo_mlx.batching import Rows


@dataclass(frozen=True)
class Prefix:
    """What a response pass needs: every block's prompt keys/values and the rows' positions and mask."""

    kv: list[PromptKV]
    positions: mx.array
    mask: mx.array


def supported(model: nn.Module) -> bool:
    """Whether the model can run a shared-prefix forward (plain attention everywhere, no sliding window)."""
    layers = model.model.layers
    return (
        type(model.model).__module__ in SUPPORTED
        and all(type(layer.self_attn) in plain_classes() for layer in layers)
        and not any(getattr(layer, "use_sliding", False) for layer in layers)
    )


def shared_layout(rows: Rows) -> dict[str, np.ndarray]:
    """The shared-prefix arrays of a batch of whole rows.

    Each row becomes its *chunk* ``x[-1:] ++ y``: ``tokens``, ``seq_mask``,
    ``resp_span``, ``resp_pos``, ``resp_mask`` and ``last`` index the chunk;
    ``prompt_tokens`` / ``prompt_mask`` (B, P) hold ``x[:-1]`` of each pair
    (run once), ``positions`` (N, Lc) the chunk's absolute positions and
    ``attn_mask`` (N, Lc, P + Lc) is additive: 0 where a chunk position may
    attend to a prompt position, then to a chunk position, else :data:`MASKED`.
    """
    a, b = rows.arrays, rows.layout.pairs
    n = a["tokens"].shape[0]
    starts = a["prompt_len"] - 1
    ends = a["last"] + 1
    L = rows.pad_to(int((ends - starts).max()))
    R = a["resp_pos"].shape[1]
    tokens = np.full((n, L), rows.pad_id, dtype=np.int32)
    seq_mask = np.zeros((n, L), dtype=np.float32)
    resp_span = np.zeros((n, L), dtype=np.float32)
    resp_pos = np.ones((n, R), dtype=np.int32)
    for i in range(n):
        width = ends[i] - starts[i]
        tokens[i, :width] = a["tokens"][i, starts[i]: ends[i]]
        seq_mask[i, :width] = 1.0
        resp_span[i, 1:width] = 1.0
        resp_pos[i, : width - 1] = np.arange(1, width)
    P = rows.pad_to(max(1, int(starts[:b].max())))
    prompt_tokens = np.full((b, P), rows.pad_id, dtype=np.int32)
    prompt_mask = np.zeros((b, P), dtype=np.float32)
    for j in range(b):
        prompt_tokens[j, : starts[j]] = a["tokens"][j, : starts[j]]
        prompt_mask[j, : starts[j]] = 1.0
    chunk = np.arange(L)
    to_prompt = np.arange(P)[None, None, :] < starts[:, None, None]
    to_chunk = chunk[None, None, :] <= chunk[None, :, None]
    allowed = np.concatenate([np.broadcast_to(to_prompt, (n, L, P)), np.broadcast_to(to_chunk, (n, L, L))], axis=-1)
    return dict(
        pair_index=a["pair_index"],
        tokens=tokens,
        seq_mask=seq_mask,
        resp_span=resp_span,
        resp_pos=resp_pos,
        resp_mask=a["resp_mask"],
        last=(ends - starts - 1).astype(np.int32),
        prompt_tokens=prompt_tokens,
        prompt_mask=prompt_mask,
        positions=(starts[:, None] + chunk[None, :]).astype(np.int32),
        attn_mask=np.where(allowed, 0.0, MASKED).astype(np.float32),
    )


def prompt_pass(model: nn.Module, prompt_embeddings: mx.array) -> list[PromptKV]:
    """Run the prompts (B, P, D) through every block; return each block's keys and values.

    The last block's output is never used, so a lazy graph never computes it.
    """
    kv = [PromptKV() for _ in model.model.layers]
    h = prompt_embeddings
    for layer, cache in zip(model.model.layers, kv):
        h = layer(h, "causal", cache)
    return kv


def response_hidden_states(model: nn.Module, embeddings: mx.array, prefix: Prefix) -> mx.array:
    """Final hidden states (after the last norm) of the rows' chunks (N, Rc, D), given their prompts."""
    h = embeddings
    for layer, kv in zip(model.model.layers, prefix.kv):
        h = layer(h, None, PrefixContext(kv, prefix.positions, prefix.mask))
    return model.model.norm(h)
