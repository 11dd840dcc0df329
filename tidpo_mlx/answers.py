"""Answers in text: extraction, normalisation, and the three answer scores of a generation.

The default rule takes the *last* answer-like span of a text: an ``H:MM``
time, a month-and-day date (``August 11``, ``11 August``), a weekday or a
number. A user pattern (``--answer-pattern REGEX``) takes the first group
of its last match instead. Both normalise the span (:func:`normalize`), so
``09:08`` equals ``9:08``, ``Aug 11`` equals ``August 11`` and ``1,000``
equals ``1000``. docs/generation.md defines the scores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Sequence

from tidpo_mlx.errors import ConfigError

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTH_NAMES = {m for name in MONTHS for m in (name, name[:3])} | {"Sept"}
_MONTH = r"(?:" + "|".join(sorted(_MONTH_NAMES, key=len, reverse=True)) + r")"
_DAY = r"\d{1,2}(?:st|nd|rd|th)?"
_NUMBER = r"(?<!\w)-?\d+(?:,\d{3})*(?:\.\d+)?"
DEFAULT_PATTERN = (
    rf"(?<!\d)(?P<time>\d{{1,2}}:\d{{2}})(?!\d)"
    rf"|\b(?P<month_day>{_MONTH}\.?\s+{_DAY})\b"
    rf"|\b(?P<day_month>{_DAY}\s+(?:of\s+)?{_MONTH})\b"
    rf"|\b(?P<weekday>{'|'.join(WEEKDAYS)})\b"
    rf"|(?P<number>{_NUMBER})"
)
"""The default rule's answer-like spans, tried in this order at each position."""
_DEFAULT = re.compile(DEFAULT_PATTERN, re.IGNORECASE)
_NUMERIC = re.compile(rf"\s*{_NUMBER}\s*")
NONE_SETTING = "none"
"""``--answer-pattern none``: no answer scores (free-form data)."""


def _month(name: str) -> str:
    key = name.rstrip(".")[:3].lower()
    return next(m for m in MONTHS if m[:3].lower() == key)


def _number(text: str) -> str:
    """A number's canonical text: no thousands commas, no trailing fractional zeros (``72.0`` -> ``72``)."""
    try:
        value = Decimal(text.replace(",", "").strip())
    except InvalidOperation:
        return text.strip()
    value = value.normalize()
    return f"{value:f}" if value != 0 else "0"


def normalize(span: str) -> str:
    """The comparable form of an answer span: times ``H:MM``, dates ``Month D``, weekdays capitalised,
    numbers canonical, anything else case-folded with single spaces."""
    span = span.strip()
    match = _DEFAULT.fullmatch(span)
    if match is None:
        if _NUMERIC.fullmatch(span):
            return _number(span)
        return " ".join(span.split()).casefold()
    kind, text = next((k, v) for k, v in match.groupdict().items() if v is not None)
    if kind == "time":
        hours, minutes = text.split(":")
        return f"{int(hours)}:{minutes}"
    if kind in ("month_day", "day_month"):
        words = text.replace(".", " ").split()
        day = next(w for w in words if w[0].isdigit())
        month = next(w for w in words if w[0].isalpha() and w.lower() != "of")
        return f"{_month(month)} {int(day.rstrip('stndrh'))}"
    if kind == "weekday":
        return text.capitalize()
    return _number(text)


@dataclass(frozen=True)
class AnswerRule:
    """How answers are read from text: the default rule, or a user pattern's first group."""

    pattern: re.Pattern | None = None
    """``None``: the default rule (:data:`DEFAULT_PATTERN`)."""

    @property
    def label(self) -> str:
        """The rule as it is shown and recorded."""
        return "default (last time, date, weekday or number)" if self.pattern is None else self.pattern.pattern

    def extract(self, text: str) -> str | None:
        """The normalised answer of ``text`` (the last match), or None when there is none."""
        if self.pattern is None:
            found = [m.group() for m in _DEFAULT.finditer(text)]
        else:
            found = [m.group(1) for m in self.pattern.finditer(text) if m.group(1) is not None]
        found = [f for f in found if f.strip()]
        return normalize(found[-1]) if found else None


def answer_rule(pattern: str | None) -> AnswerRule | None:
    """The rule of ``--answer-pattern``: None (no answers) for ``none``, the default rule for no pattern."""
    if pattern is None:
        return AnswerRule()
    if pattern.strip().lower() == NONE_SETTING:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"--answer-pattern {pattern!r}: not a valid regular expression ({err})") from None
    if compiled.groups < 1:
        raise ConfigError(f"--answer-pattern {pattern!r}: has no group; put the answer in parentheses, "
                          r"e.g. '#### (-?[\d,.]+)'")
    return AnswerRule(compiled)


@dataclass(frozen=True)
class AnswerKey:
    """The answers of a pair's chosen and rejected responses, and whether the pair can be scored."""

    chosen: str | None
    rejected: str | None

    @property
    def skip_reason(self) -> str | None:
        """Why the pair is left out of the answer scores (``absent``, ``equal``), or None."""
        if self.chosen is None or self.rejected is None:
            return "absent"
        if self.chosen == self.rejected:
            return "equal"
        return None


def answer_key(rule: AnswerRule, chosen: str, rejected: str) -> AnswerKey:
    """The answer key of a pair from its chosen and rejected response texts."""
    return AnswerKey(rule.extract(chosen), rule.extract(rejected))


def answer_scores(answers: Sequence[str | None], key: AnswerKey) -> dict[str, float]:
    """``answer/correct``, ``answer/rejected``, ``answer/none``: shares of a prompt's generations whose
    answer equals the chosen one's, equals the rejected one's, or is missing."""
    n = len(answers)
    return {
        "answer/correct": sum(a == key.chosen for a in answers) / n,
        "answer/rejected": sum(a == key.rejected for a in answers) / n,
        "answer/none": sum(a is None for a in answers) / n,
    }
