"""Preference pairs: JSONL reading, chat templates, response masks (batches: ``batching.py``).

Tokenisation follows SPEC.md: the response tokens of a pair are the tokens of
the templated conversation (prompt messages + the assistant response) after
the tokens of the prompt templated with the generation prompt, i.e. the
response text plus whatever the template closes it with. A templated prompt
that is not a token prefix of the templated conversation is an error for that
pair. Truncation cuts message content only (prompt from the left, response
from the right), never a template token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from tidpo_mlx.config import Config
from tidpo_mlx.errors import DataError


Messages = list[dict[str, str]]


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

    @property
    def overlap(self) -> int:
        """Anchor tokens the triplet distance can reach: ``max(len(y_w), len(y_l))``.

        ``d(a, y)`` sums over ``t < min(len_a, len_y)`` (SPEC section 5) and the
        model is causal, so anchor tokens past this never change the loss.
        """
        return max(len(self.chosen), len(self.rejected))

    @property
    def length(self) -> int:
        """Longest sequence of the pair as collated (for length bucketing)."""
        return len(self.prompt) + self.overlap


@dataclass
class Dataset:
    """The encoded splits of a data folder, with truncation counts."""

    train: list[Example]
    valid: list[Example]
    test: list[Example] = field(default_factory=list)
    truncated_prompts: int = 0
    truncated_responses: int = 0


def resolve_data_dir(data: str) -> Path:
    """A folder path, or the name of a bundled dataset (``arith``)."""
    path = Path(data).expanduser()
    if path.is_dir():
        return path
    bundled = Path(str(resources.files("tidpo_mlx.datasets") / data))
    if not path.is_absolute() and "/" not in data and bundled.is_dir():
        return bundled
    raise DataError(f"{data}: no such data folder (and no bundled dataset of that name)")


def read_jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a JSONL file, each with its ``file:line`` for error messages."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: malformed JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: each line must be a JSON object")
            rows.append((where, row))
    if not rows:
        raise DataError(f"{path}: no pairs")
    return rows


def _response_text(where: str, key: str, value: Any) -> str:
    """The assistant text of a response given as a string or a message list."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise DataError(f"{where}: '{key}' must be one assistant message")
        value = value[0].get("content")
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a string or a list with one assistant message")
    if not value.strip():
        raise DataError(f"{where}: '{key}' is empty")
    return value


def _prompt_messages(where: str, row: dict[str, Any]) -> Messages:
    """System (optional) + prompt, as chat messages."""
    if "prompt" not in row:
        raise DataError(f"{where}: missing field 'prompt'")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: 'prompt' is empty")
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt:
        for m in prompt:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
                raise DataError(f"{where}: 'prompt' messages need 'role' and 'content' strings")
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
        if not any(m["content"].strip() for m in messages):
            raise DataError(f"{where}: 'prompt' is empty")
    else:
        raise DataError(f"{where}: 'prompt' must be a string or a non-empty list of messages")
    system = row.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise DataError(f"{where}: 'system' must be a string")
        messages = [{"role": "system", "content": system}] + messages
    return messages


def _content_mask(text: str, offsets: Sequence[tuple[int, int]], contents: list[str], start: int) -> list[bool]:
    """True for tokens lying wholly inside one of ``contents`` (searched in order from ``start``)."""
    spans = []
    cursor = start
    for content in contents:
        pos = text.find(content, cursor) if content else -1
        if pos >= 0:
            spans.append((pos, pos + len(content)))
            cursor = pos + len(content)
    return [any(s <= a and b <= e and a < b for s, e in spans) for a, b in offsets]


class PairEncoder:
    """Turns rows into :class:`Example` s with the tokenizer's chat template."""

    def __init__(self, tokenizer: Any, cfg: Config):
        self.tokenizer = tokenizer
        self.hf = getattr(tokenizer, "_tokenizer", tokenizer)
        self.cfg = cfg
        self.use_template = cfg.chat_template == "auto"
        if self.use_template and not getattr(self.hf, "chat_template", None):
            raise DataError(
                "the tokenizer has no chat template: set 'chat_template: none' for a base model"
            )
        eos = tokenizer.eos_token_id
        self.eos = eos if eos is not None else None

    def _tokens(self, text: str, special: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.hf(text, add_special_tokens=special, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def _render(self, messages: Messages, generation_prompt: bool) -> str:
        return self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def encode_prompt(self, where: str, messages: Messages) -> tuple[list[int], bool]:
        """Prompt tokens, cut from the left (content only) to max_prompt_length."""
        if self.use_template:
            text = self._render(messages, True)
            ids, offsets = self._tokens(text)
            content = _content_mask(text, offsets, [m["content"] for m in messages], 0)
        else:
            text = "\n\n".join(m["content"] for m in messages)
            ids, offsets = self._tokens(text, special=True)
            content = _content_mask(text, offsets, [text], 0)
        excess = len(ids) - self.cfg.max_prompt_length
        if excess <= 0:
            return ids, False
        cut = [i for i, c in enumerate(content) if c][:excess]
        if len(cut) < excess:
            raise DataError(
                f"{where}: the prompt's template tokens alone exceed max_prompt_length "
                f"({self.cfg.max_prompt_length})"
            )
        drop = set(cut)
        return [t for i, t in enumerate(ids) if i not in drop], True

    def encode_response(
        self, where: str, key: str, messages: Messages, prompt: list[int], text: str
    ) -> tuple[list[int], bool]:
        """Response tokens (text + template closing), cut from the right to fit max_length."""
        if self.use_template:
            prompt_text = self._render(messages, True)
            full_text = self._render(messages + [{"role": "assistant", "content": text}], False)
            full, offsets = self._tokens(full_text)
            head, _ = self._tokens(prompt_text)
            if full[: len(head)] != head:
                raise DataError(
                    f"{where}: the templated prompt is not a token prefix of the templated "
                    f"conversation with '{key}'"
                )
            ids = full[len(head):]
            content = _content_mask(full_text, offsets, [text], len(prompt_text))[len(head):]
        else:
            ids, offsets = self._tokens(text)
            content = [a < b for a, b in offsets]
            if self.eos is not None:
                ids, content = ids + [self.eos], content + [False]
        if not ids:
            raise DataError(f"{where}: '{key}' has no tokens")
        excess = len(prompt) + len(ids) - self.cfg.max_length
        if excess <= 0:
            return ids, False
        cut = [i for i, c in enumerate(content) if c][-excess:]
        if len(cut) < excess or len(cut) == sum(content):
            raise DataError(
                f"{where}: '{key}' is empty after truncation to max_length ({self.cfg.max_length})"
            )
        drop = set(cut)
        return [t for i, t in enumerate(ids) if i not in drop], True

    def encode_row(self, index: int, where: str, row: dict[str, Any]) -> Example:
        """Validate and tokenise one JSON row."""
        messages = _prompt_messages(where, row)
        texts = {}
        for key in ("chosen", "rejected"):
            if key not in row:
                raise DataError(f"{where}: missing field '{key}'")
            texts[key] = _response_text(where, key, row[key])
        if texts["chosen"] == texts["rejected"]:
            raise DataError(f"{where}: 'chosen' and 'rejected' are identical")
        if row.get("anchor") is not None:
            texts["anchor"] = _response_text(where, "anchor", row["anchor"])
        prompt, prompt_cut = self.encode_prompt(where, messages)
        encoded = {}
        cuts = 0
        for key, text in texts.items():
            encoded[key], cut = self.encode_response(where, key, messages, prompt, text)
            cuts += cut
        return Example(
            index=index,
            source=where,
            messages=messages,
            prompt=prompt,
            chosen=encoded["chosen"],
            rejected=encoded["rejected"],
            anchor=encoded.get("anchor"),
            prompt_truncated=prompt_cut,
            responses_truncated=cuts,
            texts=texts,
        )

    def encode_file(self, path: Path) -> list[Example]:
        """All pairs of a JSONL file, in file order."""
        return [self.encode_row(i, where, row) for i, (where, row) in enumerate(read_jsonl(path))]


def load_dataset(data: str, tokenizer: Any, cfg: Config) -> Dataset:
    """Encode ``train.jsonl``, ``valid.jsonl`` and optional ``test.jsonl`` of a folder."""
    folder = resolve_data_dir(data)
    encoder = PairEncoder(tokenizer, cfg)
    splits = {}
    for split in ("train", "valid", "test"):
        path = folder / f"{split}.jsonl"
        if not path.exists():
            if split == "test":
                splits[split] = []
                continue
            raise DataError(f"{folder}: missing {split}.jsonl")
        splits[split] = encoder.encode_file(path)
    every = splits["train"] + splits["valid"] + splits["test"]
    return Dataset(
        **splits,
        truncated_prompts=sum(e.prompt_truncated for e in every),
        truncated_responses=sum(e.responses_truncated for e in every),
    )
