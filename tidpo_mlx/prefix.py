"""Shared-prefix forward: each pair's prompt runs once for all of its rows.

The chosen, rejected (and anchor) sequences of a pair share the prompt
``x``; on the bundled data it is ~40 of ~57 tokens. In the shared layout of
``data.collate(..., shared_prefix=True)`` the prompt minus its last token
runs once per pair (the *prompt pass*, recording every block's keys and
values), and each row runs only its *chunk*: the prompt's last token
followed by the response, attending over the recorded prompt keys and its
own (the *response pass*). Every logit a response token needs sits in the
chunk, so per-token log-probs are those of the full sequence (up to float
rounding of the shorter softmax sums).

The gradient attribution ``I_i = ||d target / d E_i||_1`` (SPEC section 1)
is needed at response positions only with ``weight_span: response``. A
response embedding reaches only positions at or after it (causal model),
so the attribution differentiates the response pass alone, with the prompt
keys/values as constants: its backward covers the chunk (~18 tokens), not
the whole sequence. The loss differentiates both passes, so gradients reach
the LoRA weights through the prompt positions exactly as before.
(``weighting: random`` draws one number per position of a row, so it draws
other numbers than whole rows would, from the same distribution.)

Needs the plain-op attention (``plain_attention.py``) in every block of an
mlx-lm llama / qwen2 / mistral model without sliding-window layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from tidpo_mlx.config import Config, ConfigError
from tidpo_mlx.data import Example, collate
from tidpo_mlx.plain_attention import SUPPORTED, PrefixContext, PromptKV, plain_classes


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


def active(model: nn.Module, cfg: Config) -> bool:
    """Whether training/eval batches use the shared layout for this model and config.

    ``shared_prefix: auto`` turns it on wherever it is exact and supported:
    token weights over the response span (or none at all), no gradient
    checkpointing (it would recompute the prompt pass apart from its keys).
    ``true`` insists (an error when impossible), ``false`` keeps full rows.
    """
    if cfg.shared_prefix == "false":
        return False
    reasons = []
    if not supported(model):
        reasons.append("the model has no plain-op attention in every block (plain_attention)")
    if cfg.weight_span != "response" and cfg.weighting != "none":
        reasons.append("weight_span: sequence needs the prompt in every row")
    if cfg.grad_checkpoint:
        reasons.append("grad_checkpoint is on")
    if reasons and cfg.shared_prefix == "true":
        raise ConfigError(f"shared_prefix: true is not possible here: {'; '.join(reasons)}")
    return not reasons


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


def max_difference(model: nn.Module) -> float:
    """Largest hidden-state difference, shared-prefix vs full rows, on fixed token ids, relative to their scale."""
    ids = [(7 * i + 3) % 97 + 1 for i in range(24)]
    pair = Example(index=0, source="check", messages=[], prompt=ids[:11], chosen=ids[11:17], rejected=ids[:10:-1])
    full = {k: mx.array(v) for k, v in collate([pair], 0).items()}
    shared = {k: mx.array(v) for k, v in collate([pair], 0, shared_prefix=True).items()}
    want = model.model(full["tokens"])
    want = mx.take_along_axis(want, full["resp_pos"][..., None] - 1, axis=1)
    embed = model.model.embed_tokens
    prefix = Prefix(prompt_pass(model, embed(shared["prompt_tokens"])), shared["positions"], shared["attn_mask"])
    got = response_hidden_states(model, embed(shared["tokens"]), prefix)
    got = mx.take_along_axis(got, shared["resp_pos"][..., None] - 1, axis=1)
    keep = full["resp_mask"][..., None]
    scale = max(float(mx.abs(want * keep).max()), 1e-6)
    return float(mx.abs((got - want) * keep).max()) / scale
