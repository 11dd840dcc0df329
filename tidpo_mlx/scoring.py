"""Response log-probs of many pairs without gradient: the held-out pass, the audit's scores and evidence.

Per response token the policy's ``log pi(y_t | x, y_<t)`` and, asked for,
the reference's ``log ref(y_t | x, y_<t)`` (docs/method.md section 4's ``rho_t`` is
their difference), from ``objective.batch_logprobs``, the function the loss
uses. Batches are length-sorted, padded to :func:`~tidpo_mlx.batching.bucket`
lengths and as large as :data:`~tidpo_mlx.batching.EVAL_TOKENS` allows, and
each layout is compiled once (a new bucket retraces). Compiled with the
reference in the same graph, the blocks without adapters run once for both
(CSE), so the two passes cost less than two where LoRA is on only the last
blocks. Every pass compiles with the runtime's state
(:meth:`~tidpo_mlx.runtime.Runtime.compile`), the reference's weights included.

The mode (policy, reference, both) and eval mode are entered inside the
compiled function, so a trace never bakes in the caller's mode.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterable, Literal, Sequence

import mlx.core as mx
import numpy as np

from tidpo_mlx.batching import EVAL_TOKENS, Layout, bucket, collate, eval_batches
from tidpo_mlx.config import Config
from tidpo_mlx.data import Example
from tidpo_mlx.models import eval_mode
from tidpo_mlx.objective import batch_logprobs
from tidpo_mlx.runtime import Runtime

Which = Literal["policy", "reference", "both"]
"""What a pass computes: the current policy's log-probs, the reference's, or both."""


class Scorer:
    """Compiled per-token response log-probs of pairs, with the model in eval mode (see the module docstring)."""

    def __init__(self, rt: Runtime, cfg: Config, pad_id: int):
        self.rt = rt
        self.cfg = cfg
        self.pad_id = pad_id
        self._compiled: dict[tuple[Layout, Which], Callable] = {}

    def batches(self, examples: Sequence[Example], batch_size: int, limit: int = -1) -> list[list[Example]]:
        """Length-sorted batches of at least ``batch_size`` pairs (``limit`` batches' worth at most)."""
        return eval_batches(examples, batch_size, limit, max_tokens=EVAL_TOKENS)

    def _traced(self, batch: dict[str, mx.array], layout: Layout, which: Which) -> tuple[mx.array, ...]:
        rt = self.rt
        with eval_mode(rt.model):
            if which == "reference":
                with rt.reference():
                    logp, _ = batch_logprobs(rt, batch, rt.embed(batch), layout, chunk=self.cfg.logits_chunk)
                return (logp,)
            logp, ref = batch_logprobs(rt, batch, rt.embed(batch), layout, chunk=self.cfg.logits_chunk,
                                       reference=which == "both")
        return (logp,) if ref is None else (logp, ref[0])

    def tokens(self, examples: Sequence[Example], which: Which) -> tuple[mx.array, ...]:
        """Per-token log-probs (2B, R) of one batch: chosen rows then rejected, padding 0; one array per
        model (``both``: policy, reference)."""
        batch, layout = self.rt.layout_batch(collate(examples, self.pad_id, pad_to=bucket))
        key = (layout, which)
        if key not in self._compiled:
            self._compiled[key] = self.rt.compile(partial(self._traced, layout=layout, which=which))
        out = self._compiled[key](batch)
        mx.eval(out)
        return out

    def sums(self, batches: Iterable[list[Example]], which: Which,
             done: Callable[[int], object] | None = None) -> np.ndarray:
        """Summed response log-probs (models, 2, pairs): per model (``both``: policy, reference), chosen and
        rejected of every pair, in the order of ``batches``; ``done(n)`` after each batch of ``n`` pairs
        (a progress bar's ``update``)."""
        parts = []
        for exs in batches:
            values = np.stack([np.array(t.sum(axis=-1), dtype=np.float64) for t in self.tokens(exs, which)])
            parts.append(values.reshape(len(values), 2, len(exs)))
            if done is not None:
                done(len(exs))
        return np.concatenate(parts, axis=-1)
