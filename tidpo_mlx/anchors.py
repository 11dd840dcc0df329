"""Triplet anchors (docs/method.md section 5): responses sampled from the current policy.

The released code samples a fresh anchor every step with top-k 50, top-p 0.95,
temperature 0.8 and at most 64 new tokens (``anchor_every: 1``), applied in
Hugging Face ``generate``'s order: temperature, top-k, top-p. With
``anchor_every: K > 1`` (amortised, a documented departure) the anchors of the
next K steps' pairs are sampled in one batched call from the policy of that
moment: a decode step of many prompts costs little more than one of a few on a CPU (numbers in
``benchmarks/RESULTS.md``). Sampling uses mlx-lm's batched generation on the policy module (the runtime's
``model``: its plain-op attention hands a KV cache to the block's own implementation); nothing flows back
through it (the tokens are data).
A sampled anchor is templated like any response: after the same prompt,
closed by the template, truncated the same way.

Only the first ``max(len(y_w), len(y_l))`` anchor tokens can reach the triplet
distance (docs/method.md section 5 sums over the overlap; see ``Example.overlap``), so
decoding of each pair stops :data:`SLACK` tokens past its overlap instead of
at ``anchor_max_tokens`` (whichever comes first). Each pair's token t is drawn with its own
key ``(seed, t)``, so the kept tokens are the ones the full-length sample would
have had; the slack keeps re-tokenisation of the cut text away from them.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import BatchGenerator

from tidpo_mlx import memory_guard
from tidpo_mlx.config import Config
from tidpo_mlx.data import Example, PairEncoder
from tidpo_mlx.interrupts import check
from tidpo_mlx.models import eval_mode
from tidpo_mlx.seeds import anchor_seed, derive_seed


SLACK = 8
"""Tokens decoded past a pair's overlap (see the module docstring)."""


def filter_logits(logits: mx.array, top_k: int, top_p: float) -> tuple[mx.array, mx.array | None]:
    """Top-k, then top-p, of tempered logits (n, V), in Hugging Face ``generate``'s order.

    Returns the kept candidates' logits (``-inf`` where top-p drops one) and
    their vocabulary ids (None: the candidates are the whole vocabulary in
    order). Top-k picks the k largest with ``argpartition`` (linear in V), so
    the top-p sort runs over k values instead of the 49k vocabulary. Top-p
    keeps a candidate when the probability of the candidates strictly more
    likely is below ``top_p`` (the most likely one always stays), as
    ``TopPLogitsWarper`` does.
    """
    ids = None
    if 0 < top_k < logits.shape[-1]:
        ids = mx.argpartition(-logits, top_k - 1, axis=-1)[..., :top_k]
        logits = mx.take_along_axis(logits, ids, axis=-1)
    if 0 < top_p < 1.0:
        order = mx.argsort(-logits, axis=-1)
        logits = mx.take_along_axis(logits, order, axis=-1)
        ids = order if ids is None else mx.take_along_axis(ids, order, axis=-1)
        probs = mx.softmax(logits, axis=-1)
        before = mx.cumsum(probs, axis=-1) - probs
        logits = mx.where(before < top_p, logits, -mx.inf)
    return logits, ids


def keyed_sampler(cfg: Config, seed: int) -> Callable[[mx.array], mx.array]:
    """The released sampler (temperature, top-k, top-p) with its own random key per pair.

    Token ``t`` of the pair is drawn with the key ``derive_seed(0, t, seed)``.
    """
    counter = [0]

    def sampler(logprobs: mx.array) -> mx.array:
        if cfg.anchor_temperature == 0:
            return mx.argmax(logprobs, axis=-1)
        key = mx.random.key(derive_seed(0, counter[0], seed))
        counter[0] += 1
        logits, ids = filter_logits(logprobs * (1.0 / cfg.anchor_temperature), cfg.anchor_top_k, cfg.anchor_top_p)
        pick = mx.random.categorical(logits, key=key)
        return pick if ids is None else mx.take_along_axis(ids, pick[..., None], axis=-1)[..., 0]

    return sampler


def data_anchors(examples: Sequence[Example], cfg: Config) -> list[list[int] | None]:
    """Each pair's anchor from its data: its ``anchor`` field, or None (to be sampled) without one or
    with ``anchor: policy``."""
    return [e.anchor if cfg.anchor == "sample" else None for e in examples]


def anchor_origins(examples: Sequence[Example], cfg: Config) -> tuple[int, int]:
    """How many of ``examples``' anchors come from the data and how many are sampled from the policy."""
    sampled = sum(a is None for a in data_anchors(examples, cfg))
    return len(examples) - sampled, sampled


def sample_anchors(
    model: nn.Module,
    tokenizer: Any,
    encoder: PairEncoder,
    examples: Sequence[Example],
    cfg: Config,
    step: int,
) -> list[list[int]]:
    """One anchor per pair: a data-provided ``anchor`` wins (unless ``anchor: policy``), the others
    are sampled from the policy.

    Sampling is batched (mlx-lm's BatchGenerator) with one keyed sampler per
    pair, seeded by :func:`anchor_seed`. The model is put in eval mode (no
    dropout) with its adapters on, i.e. the current policy, and restored.
    A Ctrl-C or SIGTERM stops decoding at the next token (``interrupts.check``);
    afterwards the buffer cache is bounded (``clear_cache_threshold``).
    """
    anchors = data_anchors(examples, cfg)
    todo = [i for i, a in enumerate(anchors) if a is None]
    if not todo:
        return anchors
    with eval_mode(model):
        gen = BatchGenerator(
            model,
            stop_tokens=[[t] for t in tokenizer.eos_token_ids],
            completion_batch_size=len(todo),
            prefill_batch_size=len(todo),
        )
        try:
            uids = gen.insert(
                [examples[i].prompt for i in todo],
                max_tokens=[min(cfg.anchor_max_tokens, examples[i].overlap + SLACK) for i in todo],
                samplers=[keyed_sampler(cfg, anchor_seed(cfg.seed, step, examples[i].index)) for i in todo],
            )
            tokens: dict[int, list[int]] = {uid: [] for uid in uids}
            while responses := gen.next_generated():
                for r in responses:
                    if r.finish_reason != "stop":
                        tokens[r.uid].append(r.token)
                check()
        finally:
            gen.close()
    memory_guard.after_step(cfg.clear_cache_threshold)
    for i, uid in zip(todo, uids):
        ex = examples[i]
        text = tokenizer.decode(tokens[uid])
        anchors[i] = encoder.encode_response(ex.source, "anchor", ex.messages, ex.prompt, text)[0]
    return anchors


class AnchorSource:
    """Anchors for each micro-batch: data anchors win (unless ``anchor: policy``); the rest sampled every
    step or every K steps."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        encoder: PairEncoder,
        cfg: Config,
        upcoming: Callable[[int, int], list[list[Example]]],
    ):
        self.model, self.tokenizer, self.encoder, self.cfg = model, tokenizer, encoder, cfg
        self.upcoming = upcoming
        self.cache: dict[int, list[int]] = {}

    def for_batch(self, step: int, micro: int, examples: Sequence[Example]) -> list[list[int]]:
        """Anchor tokens for ``examples``, the micro-batch number ``micro`` of optimizer step ``step``."""
        cfg = self.cfg
        if cfg.anchor_every == 1:
            return sample_anchors(self.model, self.tokenizer, self.encoder, examples, cfg, step)
        if (step - 1) % cfg.anchor_every == 0 and micro % cfg.grad_accumulation_steps == 0 or not self.cache:
            left = cfg.anchor_every - (step - 1) % cfg.anchor_every
            block = [e for batch in self.upcoming(micro, left * cfg.grad_accumulation_steps) for e in batch]
            unique = list({e.index: e for e in block}.values())
            tokens = sample_anchors(self.model, self.tokenizer, self.encoder, unique, cfg, step)
            self.cache = {e.index: t for e, t in zip(unique, tokens)}
        return [self.cache[e.index] for e in examples]
