"""The encoded preference pair (:class:`Example`), the encoded splits (:class:`Dataset`) and the prompt key."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

Messages = list[dict[str, Any]]


@dataclass
class Example:
    """One tokenised preference pair (responses include the template's closing tokens)."""

    index: int
    source: str
    messages: Messages
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    anchor: list[int] | None = None
    prompt_truncated: bool = False
    responses_truncated: int = 0
    texts: dict[str, str] = field(default_factory=dict)
    """The response texts before tokenisation, by key (``chosen``, ``rejected``, ``anchor``)."""
    dropped_turns: int = 0
    """Earliest prompt messages dropped to fit ``max_prompt_length``."""

    @property
    def overlap(self) -> int:
        """Anchor tokens the triplet distance can reach: ``max(len(y_w), len(y_l))``.

        ``d(a, y)`` sums over ``t < min(len_a, len_y)`` (``docs/method.md``
        section 5) and the model is causal, so anchor tokens past this never
        change the loss.
        """
        return max(len(self.chosen), len(self.rejected))

    @property
    def length(self) -> int:
        """Longest sequence of the pair as collated (for length bucketing)."""
        return len(self.prompt) + self.overlap


def prompt_key(ex: Example) -> str:
    """What groups pairs by prompt (the held-out split, the audit's folds): the prompt messages as encoded."""
    return json.dumps(ex.messages, sort_keys=True)


def reindexed(examples: list[Example]) -> list[Example]:
    """``examples`` with each ``index`` set to its position (in place)."""
    for i, ex in enumerate(examples):
        ex.index = i
    return examples


@dataclass
class Dataset:
    """The encoded splits of ``--data``, with truncation, dropped-turn and invalid-row counts."""

    train: list[Example]
    valid: list[Example]
    test: list[Example] = field(default_factory=list)
    truncated_prompts: int = 0
    truncated_responses: int = 0
    dropped_turns: int = 0
    """Prompt messages dropped (earliest turns) over all pairs."""
    pairs_with_dropped_turns: int = 0
    invalid: dict[str, int] = field(default_factory=dict)
    """Invalid rows skipped (``skip_invalid``), by reason."""
    notes: list[str] = field(default_factory=list)
    """What loading decided for the user (made held-out split, merged system turns, ...): log these."""
    source: str = ""

    @property
    def skipped(self) -> int:
        """Invalid rows left out (only with ``skip_invalid``)."""
        return sum(self.invalid.values())

    def summary(self) -> dict[str, Any]:
        """Counts for ``summary.json`` and the log."""
        return {
            "source": self.source, "train_pairs": len(self.train), "valid_pairs": len(self.valid),
            "test_pairs": len(self.test), "truncated_prompts": self.truncated_prompts,
            "truncated_responses": self.truncated_responses, "dropped_turns": self.dropped_turns,
            "pairs_with_dropped_turns": self.pairs_with_dropped_turns, "skipped_invalid": self.skipped,
            "invalid_by_reason": dict(self.invalid),
        }
