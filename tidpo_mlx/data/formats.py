"""Rows in the forms TRL reads, parsed into prompt messages and completions (no tokenizer here).

Forms (TRL's dataset-format guide), detected per row:

- standard: ``prompt``, ``chosen``, ``rejected`` strings (optional ``system``);
- conversational: the same keys holding message lists (a completion may be
  several messages, e.g. assistant + tool turns, where the template renders them);
- implicit prompt: only ``chosen`` and ``rejected``, each the whole
  conversation as a message list; the prompt is their longest common prefix
  of whole messages (TRL's ``extract_prompt``). Anthropic HH transcripts
  (strings starting with ``"\\n\\nHuman:"`` and containing ``"\\n\\nAssistant:"``)
  are parsed into messages first, so the model's own template applies. Other
  implicit-prompt strings are split at their longest common character prefix
  only with ``chat_template: none``: that split (TRL's) moves a shared start of
  both answers into the prompt.

Other fields (``score_chosen``, ids, ...) are ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from tidpo_mlx.data.example import Messages
from tidpo_mlx.errors import DataError

HH_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass
class Pair:
    """A row in one form: prompt messages and the completions (message lists) by key."""

    where: str
    prompt: Messages
    completions: dict[str, Messages]


def parse_hh(text: str) -> Messages | None:
    """Messages of an Anthropic HH transcript (``\\n\\nHuman: ... \\n\\nAssistant: ...``), else None."""
    if not text.startswith("\n\nHuman:") or "\n\nAssistant:" not in text:
        return None
    parts = HH_TURN.split(text)[1:]
    return [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
            for who, body in zip(parts[::2], parts[1::2])]


def _messages(where: str, key: str, value: Any) -> Messages:
    """A message list, checked for ``role`` and ``content`` strings (extra message keys kept)."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: '{key}' must be a string or a non-empty list of messages")
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: '{key}' messages need 'role' and 'content' strings")
    return [dict(m) for m in value]


def _common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def parse_row(where: str, row: dict[str, Any], plain: bool) -> Pair:
    """The prompt and completions of a row in any supported form (``plain``: ``chat_template: none``)."""
    for key in ("chosen", "rejected"):
        if key not in row:
            raise DataError(f"{where}: missing field '{key}'")
    extra = {"anchor": row["anchor"]} if row.get("anchor") is not None else {}
    if "prompt" in row:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise DataError(f"{where}: 'prompt' is empty")
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = _messages(where, "prompt", prompt)
            if not any(m["content"].strip() for m in messages):
                raise DataError(f"{where}: 'prompt' is empty")
        completions = {k: _completion(where, k, v) for k, v in
                       {"chosen": row["chosen"], "rejected": row["rejected"], **extra}.items()}
    else:
        messages, completions = _implicit(where, row["chosen"], row["rejected"], plain)
    system = row.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise DataError(f"{where}: 'system' must be a string")
        messages = [{"role": "system", "content": system}] + messages
    for key, value in completions.items():
        if not any(m["content"].strip() for m in value) and not any(m.get("tool_calls") for m in value):
            raise DataError(f"{where}: '{key}' is empty")
    if completions["chosen"] == completions["rejected"]:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical")
    return Pair(where, messages, completions)


def _completion(where: str, key: str, value: Any) -> Messages:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, list):
        return _messages(where, key, value)
    raise DataError(f"{where}: '{key}' must be a string or a list of messages")


def _implicit(where: str, chosen: Any, rejected: Any, plain: bool) -> tuple[Messages, dict[str, Messages]]:
    """TRL's implicit prompt: the longest common prefix of whole messages (HH strings parsed first)."""
    if isinstance(chosen, str) and isinstance(rejected, str):
        hh = parse_hh(chosen), parse_hh(rejected)
        if hh[0] is not None and hh[1] is not None:
            chosen, rejected = hh
        elif plain:
            n = _common_prefix(chosen, rejected)
            if not chosen[:n].strip():
                raise DataError(f"{where}: no 'prompt' and 'chosen'/'rejected' share no text to take as the prompt")
            return ([{"role": "user", "content": chosen[:n]}],
                    {"chosen": [{"role": "assistant", "content": chosen[n:]}],
                     "rejected": [{"role": "assistant", "content": rejected[n:]}]})
        else:
            raise DataError(
                f"{where}: missing field 'prompt' (implicit-prompt strings that are not HH transcripts are split "
                "at their longest common prefix only with chat_template: none, and that split moves a shared "
                "start of both answers into the prompt; give a 'prompt' field or message lists instead)")
    chosen, rejected = _messages(where, "chosen", chosen), _messages(where, "rejected", rejected)
    n = _common_prefix(chosen, rejected)
    if n == 0:
        raise DataError(f"{where}: no 'prompt' and 'chosen'/'rejected' share no leading messages to take as the prompt")
    if n == len(chosen) and n == len(rejected):
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical")
    return chosen[:n], {"chosen": chosen[n:], "rejected": rejected[n:]}
