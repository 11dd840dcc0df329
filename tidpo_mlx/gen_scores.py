"""Scores of generations per prompt, and their means over prompts with standard errors.

Per prompt and arm: the answer scores (``answers.answer_scores``) when the
pair has an answer key, ``length`` always, and the diversity scores with two
samples or more (``diversity.diversity_scores``). Over prompts: the mean, its
standard error ``sd / sqrt(n)`` (``sd`` with ``n - 1``), and for two arms the
paired difference ``tuned - base`` over the prompts that have both
(docs/generation.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from tidpo_mlx.answers import AnswerKey, AnswerRule, answer_scores
from tidpo_mlx.diversity import diversity_scores

ANSWER_SCORES = ("answer/correct", "answer/rejected", "answer/none")
DIVERSITY_SCORES = ("distinct-1", "distinct-2", "self-bleu-2")
SCORES = ANSWER_SCORES + ("length",) + DIVERSITY_SCORES


def prompt_scores(tokens: Sequence[Sequence[int]], answers: Sequence[str | None] | None,
                  key: AnswerKey | None) -> dict[str, float | None]:
    """The scores of one prompt's samples in one arm (answer scores only for a pair with a usable key)."""
    out: dict[str, float | None] = {}
    if answers is not None and key is not None and key.skip_reason is None:
        out.update(answer_scores(answers, key))
    out.update(diversity_scores(tokens))
    return out


def row_scores(generations: dict[str, list[list[int]]], texts: dict[str, list[str]], rule: AnswerRule | None,
               key: AnswerKey | None) -> tuple[dict[str, list[str | None]] | None, dict[str, dict[str, float | None]]]:
    """Answers (by arm) and scores (by arm) of one pair's generations."""
    answers = {arm: [rule.extract(t) for t in texts[arm]] for arm in texts} if rule is not None else None
    scores = {arm: prompt_scores(generations[arm], answers[arm] if answers else None, key) for arm in generations}
    return answers, scores


@dataclass(frozen=True)
class Stat:
    """A mean over prompts with its standard error (nan for fewer than two prompts) and its count."""

    mean: float
    se: float
    n: int

    def show(self, signed: bool = False) -> str:
        if self.n == 0:
            return "n/a"
        sign = "+" if signed else ""
        se = f" ± {self.se:.3f}" if math.isfinite(self.se) else ""
        return f"{self.mean:{sign}.3f}{se}"

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "se": self.se if math.isfinite(self.se) else None, "n": self.n}


def mean_se(values: Sequence[float]) -> Stat:
    """Mean, standard error ``sd / sqrt(n)`` and count of ``values``."""
    n = len(values)
    if n == 0:
        return Stat(math.nan, math.nan, 0)
    mean = sum(values) / n
    if n < 2:
        return Stat(mean, math.nan, n)
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return Stat(mean, math.sqrt(var / n), n)


def summarize(rows: Sequence[dict[str, Any]], arms: Sequence[str]) -> dict[str, dict[str, Stat]]:
    """For each score that any row has: its :class:`Stat` per arm, and ``tuned - base`` (paired) with both arms."""
    out: dict[str, dict[str, Stat]] = {}
    for name in SCORES:
        per_arm = {arm: [r["scores"][arm].get(name) for r in rows] for arm in arms}
        if not any(v is not None for values in per_arm.values() for v in values):
            continue
        out[name] = {arm: mean_se([v for v in values if v is not None]) for arm, values in per_arm.items()}
        if "base" in arms and "tuned" in arms:
            diffs = [t - b for b, t in zip(per_arm["base"], per_arm["tuned"]) if b is not None and t is not None]
            out[name]["tuned - base"] = mean_se(diffs)
    return out
