"""Triplet anchors (SPEC.md section 5): responses sampled from the current policy.

The released code samples a fresh anchor every step with top-k 50, top-p 0.95,
temperature 0.8 and at most 64 new tokens (``anchor_every: 1``). With
``anchor_every: K > 1`` (amortised, a documented departure) the anchors of the
next K steps' pairs are sampled in one batched call from the policy of that
moment: decoding costs about the same for 2 or 40 prompts on a CPU. Sampling uses mlx-lm's batched
generation and samplers; nothing flows back through it (the tokens are data).
A sampled anchor is templated like any response: after the same prompt,
closed by the template, truncated the same way.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import batch_generate
from mlx_lm.sample_utils import make_sampler

from tidpo_mlx.config import Config
from tidpo_mlx.data import Example, PairEncoder


def anchor_seed(seed: int, step: int, first_index: int) -> int:
    """Seed of one sampling call, derived from the run seed, the step and the batch's first pair."""
    return (seed * 1_000_003 + step * 10_007 + first_index) % (2**31)


def sample_anchors(
    model: nn.Module,
    tokenizer: Any,
    encoder: PairEncoder,
    examples: Sequence[Example],
    cfg: Config,
    seed: int,
) -> list[list[int]]:
    """One anchor per pair: a data-provided ``anchor`` wins, the others are sampled from the policy.

    The model is put in eval mode (no dropout) with its adapters on, i.e. the
    current policy, and restored to its previous mode afterwards.
    """
    todo = [i for i, e in enumerate(examples) if e.anchor is None]
    anchors = [e.anchor for e in examples]
    if todo:
        training = model.training
        model.eval()
        mx.random.seed(seed)
        sampler = make_sampler(temp=cfg.anchor_temperature, top_p=cfg.anchor_top_p, top_k=cfg.anchor_top_k)
        result = batch_generate(
            model,
            tokenizer,
            [examples[i].prompt for i in todo],
            max_tokens=cfg.anchor_max_tokens,
            sampler=sampler,
        )
        model.train(training)
        for i, text in zip(todo, result.texts):
            ex = examples[i]
            anchors[i] = encoder.encode_response(ex.source, "anchor", ex.messages, ex.prompt, text)[0]
    return anchors


class AnchorSource:
    """Anchors for each micro-batch: data anchors win; the rest sampled every step or every K steps."""

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
            seed = anchor_seed(cfg.seed, step, examples[0].index)
            return sample_anchors(self.model, self.tokenizer, self.encoder, examples, cfg, seed)
        if (step - 1) % cfg.anchor_every == 0 and micro % cfg.grad_accumulation_steps == 0 or not self.cache:
            left = cfg.anchor_every - (step - 1) % cfg.anchor_every
            block = [e for batch in self.upcoming(micro, left * cfg.grad_accumulation_steps) for e in batch]
            unique = list({e.index: e for e in block}.values())
            tokens = sample_anchors(
                self.model, self.tokenizer, self.encoder, unique, cfg, anchor_seed(cfg.seed, step, 0)
            )
            self.cache = {e.index: t for e, t in zip(unique, tokens)}
        return [self.cache[e.index] for e in examples]
