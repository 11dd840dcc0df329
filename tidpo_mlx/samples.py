"""``samples.jsonl``: the policy's greedy answers to fixed held-out prompts while a run trains.

Every ``sample_every`` steps the trainer calls :func:`log_samples` with the
first ``sample_prompts`` held-out pairs: one record per prompt, appended,
with the step, the greedy text (``eval --generate``'s prompts and decoding,
``max_tokens`` new tokens), its length and, when the pair's chosen and
rejected answers differ under the default answer rule, its answer and the
answer scores (docs/generation.md). TRL's ``LogCompletionsCallback`` does
the same for its trainers. On resume :func:`keep_samples` cuts the file back
to the checkpoint's step, as ``metrics.MetricsLog`` does for ``metrics.jsonl``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import mlx.nn as nn

from tidpo_mlx.answers import AnswerRule, answer_key, answer_scores
from tidpo_mlx.config import Config
from tidpo_mlx.data import Example
from tidpo_mlx.files import WriteError, atomic_write_text, jsonl_text
from tidpo_mlx.generation import Decoding, decode, generation_prompt
from tidpo_mlx.models import eval_mode

FILE = "samples.jsonl"
MAX_TOKENS = 64
"""New tokens per logged answer."""


def log_samples(model: nn.Module, tokenizer: Any, examples: Sequence[Example], cfg: Config, step: int,
                path: Path, max_tokens: int = MAX_TOKENS) -> list[dict[str, Any]]:
    """Append the current policy's greedy answers to ``examples``' prompts at ``step`` to ``path``; return them.

    The model runs in eval mode (no dropout) with its adapters on, as the
    weights stand at this step; the mode it was in comes back after.
    """
    if not examples:
        return []
    prompts = [generation_prompt(tokenizer, ex, cfg).ids for ex in examples]
    with eval_mode(model):
        tokens = decode(model, tokenizer, prompts, Decoding(max_tokens=max_tokens, seed=cfg.seed), [0] * len(prompts))
    rule = AnswerRule()
    records = []
    for ex, ids in zip(examples, tokens):
        text = tokenizer.decode(ids)
        record: dict[str, Any] = {"step": step, "index": ex.index, "source": ex.source, "prompt": ex.messages,
                                  "text": text, "length": len(ids)}
        key = answer_key(rule, ex.texts.get("chosen", ""), ex.texts.get("rejected", ""))
        if key.skip_reason is None:
            answer = rule.extract(text)
            record.update({"answer": answer, "chosen_answer": key.chosen, "rejected_answer": key.rejected,
                           **answer_scores([answer], key)})
        records.append(record)
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(jsonl_text(records))
    except OSError as err:
        raise WriteError(f"{path}: could not append samples ({err.strerror or err})") from None
    return records


def keep_samples(path: Path, keep_until: int | None, log: Callable[[str], None] = print) -> None:
    """Start ``samples.jsonl`` for a run: empty for a fresh one (``keep_until`` None), else its records up to
    step ``keep_until`` (a torn last line dropped with a note, as ``metrics.read_metrics`` does)."""
    from tidpo_mlx.metrics import read_metrics

    records = read_metrics(path, log) if keep_until is not None and path.exists() else []
    atomic_write_text(path, jsonl_text(r for r in records if r.get("step", 0) <= (keep_until or 0)))

