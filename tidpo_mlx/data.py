"""Preference pairs: the formats TRL reads, chat templates, response masks (batches: ``batching.py``).

Formats (TRL's dataset-format guide), detected per row:

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

Tokenisation follows SPEC.md: the response tokens of a pair are the tokens of
the templated conversation (prompt messages + the completion) after the tokens
of the prompt templated with the generation prompt, i.e. the response text plus
whatever the template closes it with. A templated prompt that is not a token
prefix of the templated conversation is an error for that pair. A prompt too
long for ``max_prompt_length`` loses its earliest (user, assistant) turns first
(a system message and the last user turn stay), then content from the left;
responses are cut from the right to ``max_length``; truncation never removes a
template token.

Loading checks every row and reports every invalid one at once (count per
reason, the first few ``file:line``); ``skip_invalid`` trains on the valid rows
and records what it dropped.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import multiprocessing
import os
import re
from array import array
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from tidpo_mlx import data_cache
from tidpo_mlx.config import Config
from tidpo_mlx.data_cache import Encoded
from tidpo_mlx.errors import DataError
from tidpo_mlx.sources import Problem, Rows, Source, bundled_folder, position, read_jsonl, resolve_source

Messages = list[dict[str, Any]]
ROLES = ("system", "user", "assistant")
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
MIN_VALID = 8
"""Fewest held-out pairs a made split gets (when the train split has room for them)."""
SHOWN = 3
"""``file:line`` s shown per reason in an invalid-row report."""
BATCH = 512
"""Rows rendered and tokenised together (one batched fast-tokenizer call per chunk)."""
PROGRESS_FROM = 2000
"""Encoding more rows than this shows a progress bar (stderr)."""
PARALLEL_FROM = 16_000
"""Encoding at least this many rows uses worker processes (``dataset_num_proc``, auto); fewer do not repay
their start (importing the tokenizer libraries in each)."""


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


@dataclass
class Pair:
    """A row in one form: prompt messages and the completions (message lists) by key."""

    where: str
    prompt: Messages
    completions: dict[str, Messages]


def resolve_data_dir(data: str) -> Path:
    """A folder path, or the name of a bundled dataset (``arith``)."""
    path = Path(data).expanduser()
    if path.is_dir():
        return path
    bundled = bundled_folder(data)
    if bundled is not None and not path.is_absolute():
        return bundled
    raise DataError(f"{data}: no such data folder (and no bundled dataset of that name)")


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


def _content_spans(text: str, contents: Sequence[str], start: int) -> list[tuple[int, int] | None]:
    """Where each of ``contents`` lies in ``text`` (searched in order from ``start``; None if absent)."""
    spans: list[tuple[int, int] | None] = []
    cursor = start
    for content in contents:
        pos = text.find(content, cursor) if content else -1
        spans.append((pos, pos + len(content)) if pos >= 0 else None)
        if pos >= 0:
            cursor = pos + len(content)
    return spans


def _mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int] | None]) -> list[bool]:
    """True for tokens lying wholly inside one of ``spans``.

    The spans of :func:`_content_spans` are in order and do not overlap, so
    the only one that can hold a token is the last starting at or before it.
    """
    real = [s for s in spans if s is not None]
    starts = [s for s, _ in real]
    out = []
    for a, b in offsets:
        i = bisect.bisect_right(starts, a) - 1
        out.append(a < b and i >= 0 and b <= real[i][1])
    return out


class Tokens:
    """A text's token ids, and their character offsets, read from the Rust encoding only when asked for
    (a truncation mask needs them; most pairs are not cut)."""

    __slots__ = ("ids", "_offsets", "_encoding", "_stop")

    def __init__(self, ids: list[int], offsets: list[tuple[int, int]] | None = None, encoding: Any = None,
                 stop: int | None = None):
        self.ids, self._offsets, self._encoding, self._stop = ids, offsets, encoding, stop

    @property
    def offsets(self) -> list[tuple[int, int]]:
        if self._offsets is None:
            self._offsets = self._encoding.offsets[: self._stop]
        return self._offsets

    def prefix(self, chars: int) -> Tokens | None:
        """The tokens of the first ``chars`` characters when a token starts exactly there (None otherwise)."""
        enc = self._encoding
        k = enc.char_to_token(chars) if enc is not None and self._stop is None else None
        if k is None or enc.token_to_chars(k)[0] != chars or (k and enc.token_to_chars(k - 1)[1] > chars):
            return None
        return Tokens(self.ids[:k], encoding=enc, stop=k)


def _probe(render: Any, messages: Messages, marker: str) -> bool:
    """Whether the template renders ``messages`` and shows ``marker`` (a probe of what it supports)."""
    try:
        return marker in render(messages, False)
    except Exception:  # a template refusing a role raises whatever its author chose
        return False


class PairEncoder:
    """Turns rows into :class:`Example` s with the tokenizer's (or a custom) chat template."""

    def __init__(self, tokenizer: Any, cfg: Config):
        self.tokenizer = tokenizer
        self.hf = getattr(tokenizer, "_tokenizer", tokenizer)
        self.cfg = cfg
        self.use_template = cfg.chat_template != "none"
        self.template: str | None = None
        self.notes: list[str] = []
        self.roles = ROLES + ("tool",)
        self.system_ok = True
        self.rendered: dict[tuple[bool, str], str] = {}
        """Templated texts of the chunk being encoded, by (generation prompt, messages)."""
        self.tokenized: dict[tuple[str, bool], Tokens] = {}
        """Tokens of the chunk's texts (one batched tokenizer call fills it)."""
        if cfg.chat_template not in ("auto", "none"):
            path = Path(cfg.chat_template).expanduser()
            try:
                self.template = path.read_text(encoding="utf-8-sig")
            except (OSError, UnicodeDecodeError) as err:
                raise DataError(f"chat_template: cannot read {path} ({err})") from None
        elif self.use_template and not getattr(self.hf, "chat_template", None):
            raise DataError(
                "the tokenizer has no chat template: set 'chat_template: none' for a base model, "
                "or 'chat_template: path/to/template.jinja'"
            )
        if self.use_template:
            user = {"role": "user", "content": "probe-user"}
            if not _probe(self._render, [user, {"role": "assistant", "content": "a"},
                                         {"role": "tool", "content": "probe-tool-7f3a"}], "probe-tool-7f3a"):
                self.roles = ROLES
            self.system_ok = _probe(self._render, [{"role": "system", "content": "probe-system-91c"}, user],
                                    "probe-system-91c")
            if not self.system_ok:
                self.notes.append("the chat template refuses a system role: system text is merged into the "
                                  "first user turn (separated by a blank line)")
        self.eos = tokenizer.eos_token_id
        self.pool: ProcessPoolExecutor | None = None
        """The worker processes while :meth:`processes` is open."""

    def _encode_texts(self, texts: list[str], special: bool) -> list[Tokens]:
        """Token ids and character offsets of each of ``texts``, in one batched call.

        Calls the Rust tokenizer under a transformers fast tokenizer directly
        when the settings that transformers sets per call (truncation, padding,
        splitting special tokens) are already as our calls want them: the same
        ids and offsets, without transformers' per-text conversion.
        """
        rust = getattr(self.hf, "_tokenizer", None)
        if (rust is not None and hasattr(rust, "encode_batch") and rust.truncation is None and rust.padding is None
                and rust.encode_special_tokens == bool(getattr(self.hf, "split_special_tokens", False))):
            return [Tokens(e.ids, encoding=e) for e in rust.encode_batch(texts, add_special_tokens=special)]
        enc = self.hf(texts, add_special_tokens=special, return_offsets_mapping=True)
        return [Tokens(list(ids), [tuple(o) for o in offs]) for ids, offs in zip(enc["input_ids"], enc["offset_mapping"])]

    def _tokens(self, text: str, special: bool = False) -> Tokens:
        hit = self.tokenized.get((text, special))
        return hit if hit is not None else self._encode_texts([text], special)[0]

    @property
    def _template_kwargs(self) -> dict[str, str]:
        return {"chat_template": self.template} if self.template is not None else {}

    def _render(self, messages: Messages, generation_prompt: bool) -> str:
        key = (generation_prompt, repr(messages))
        hit = self.rendered.get(key)
        if hit is None:
            hit = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                              **self._template_kwargs)
            self.rendered[key] = hit
        return hit

    def _render_all(self, pairs: Sequence[Pair]) -> None:
        """Fill ``rendered`` with each pair's prompt and conversations, one batched template call per kind.

        A batch the template refuses is left to the per-text renders (which name the pair).
        """
        todo: dict[bool, dict[str, Messages]] = {True: {}, False: {}}
        for pair in pairs:
            try:
                messages = self.prepare(pair.where, pair.prompt)
            except DataError:
                continue
            todo[True].setdefault(repr(messages), messages)
            for completion in pair.completions.values():
                todo[False].setdefault(repr(messages + completion), messages + completion)
        for generation_prompt, conversations in todo.items():
            keys = [k for k in conversations if (generation_prompt, k) not in self.rendered]
            if not keys:
                continue
            try:
                texts = self.hf.apply_chat_template([conversations[k] for k in keys], tokenize=False,
                                                    add_generation_prompt=generation_prompt,
                                                    **self._template_kwargs)
            except Exception:  # a conversation the template refuses: _render meets it alone
                continue
            self.rendered.update({(generation_prompt, k): t for k, t in zip(keys, texts)})

    def prefetch(self, pairs: Sequence[Pair]) -> None:
        """Render the texts the pairs' encoding tokenises and tokenise them all in one batched call per kind.

        :meth:`encode_pair` then finds them in ``tokenized`` (same ids as one call
        per text); a pair whose prompt is cut re-tokenises what it changes, and a
        pair that fails here fails the same way, with its message, in ``encode_pair``.
        A templated prompt is not tokenised on its own where the first
        conversation starts with it and has a token starting where it ends: its
        tokens are then that conversation's first ones (the tokens training
        sees), and :meth:`encode_response` checks the other completion's
        conversation against them.
        """
        texts: dict[bool, list[str]] = {False: [], True: []}
        prompts: list[tuple[str, str]] = []
        if self.use_template:
            self._render_all(pairs)
        for pair in pairs:
            try:
                messages = self.prepare(pair.where, pair.prompt)
                if self.use_template:
                    conversations = [self._render(messages + c, False) for c in pair.completions.values()]
                    prompts.append((self._render(messages, True), conversations[0]))
                    texts[False] += conversations
                else:
                    texts[True].append("\n\n".join(m["content"] for m in messages))
                    texts[False] += ["\n\n".join(m["content"] for m in c) for c in pair.completions.values()]
            except Exception:  # encode_pair meets and reports the same failure
                continue
        self._tokenize_all(texts[False], False)
        unaligned = []
        for prompt, conversation in prompts:
            head = self.tokenized[(conversation, False)].prefix(len(prompt)) if conversation.startswith(prompt) else None
            if head is not None:
                self.tokenized.setdefault((prompt, False), head)
            else:
                unaligned.append(prompt)
        self._tokenize_all(unaligned, False)
        self._tokenize_all(texts[True], True)

    def _tokenize_all(self, texts: list[str], special: bool) -> None:
        todo = [t for t in dict.fromkeys(texts) if (t, special) not in self.tokenized]
        if todo:
            self.tokenized.update(((t, special), e) for t, e in zip(todo, self._encode_texts(todo, special)))

    def _rendered(self, where: str, messages: Messages, generation_prompt: bool) -> str:
        try:
            return self._render(messages, generation_prompt)
        except Exception as err:  # jinja's TemplateError, or raise_exception() of the template
            raise DataError(f"{where}: the chat template refused these messages ({err})") from None

    def check_roles(self, where: str, messages: Messages) -> None:
        """Every role is one the template renders (system/user/assistant, and tool where a probe shows it)."""
        for m in messages:
            if m["role"] not in self.roles:
                raise DataError(f"{where}: unknown role '{m['role']}' (allowed: {', '.join(self.roles)})")

    def prepare(self, where: str, messages: Messages) -> Messages:
        """Check roles; merge a system message into the first user turn where the template refuses one."""
        self.check_roles(where, messages)
        if not self.system_ok and messages and messages[0]["role"] == "system":
            system, rest = messages[0], messages[1:]
            if rest and rest[0]["role"] == "user":
                merged = dict(rest[0], content=f"{system['content']}\n\n{rest[0]['content']}")
                return [merged] + rest[1:]
            return [dict(system, role="user")] + rest
        return messages

    def _prompt_tokens(self, where: str, messages: Messages) -> tuple[Tokens, str]:
        """Tokens of the templated prompt (generation prompt on) and the text."""
        if self.use_template:
            text = self._rendered(where, messages, True)
            return self._tokens(text), text
        text = "\n\n".join(m["content"] for m in messages)
        return self._tokens(text, special=True), text

    def fit_prompt(self, where: str, messages: Messages) -> tuple[Messages, list[int], int, bool]:
        """Prompt messages kept, their tokens, earliest messages dropped, and whether content was cut.

        Drops the earliest (user, assistant, ...) turns while the templated
        prompt exceeds ``max_prompt_length`` (a system message stays, the first
        kept turn is a user turn, the last user turn stays), then cuts content
        from the left.
        """
        limit = self.cfg.max_prompt_length
        dropped = 0
        tokens, text = self._prompt_tokens(where, messages)
        while len(tokens.ids) > limit:
            start = 1 if messages[0]["role"] == "system" else 0
            nxt = next((i for i in range(start + 1, len(messages)) if messages[i]["role"] == "user"), None)
            if nxt is None:
                break
            dropped += nxt - start
            messages = messages[:start] + messages[nxt:]
            tokens, text = self._prompt_tokens(where, messages)
        ids = list(tokens.ids)
        excess = len(ids) - limit
        if excess <= 0:
            return messages, ids, dropped, False
        spans = _content_spans(text, [m["content"] for m in messages], 0)
        cuttable = _mask(tokens.offsets, [s for s, m in zip(spans, messages) if m["role"] != "system"])
        cut = [i for i, c in enumerate(cuttable) if c][:excess]
        if len(cut) < excess:
            raise DataError(
                f"{where}: the prompt's template tokens alone exceed max_prompt_length ({limit}), even with "
                "only the last user turn left (a system message is kept whole)"
            )
        drop = set(cut)
        return messages, [t for i, t in enumerate(ids) if i not in drop], dropped, True

    def encode_prompt(self, where: str, messages: Messages) -> tuple[list[int], bool]:
        """Prompt tokens fitted to max_prompt_length (see :meth:`fit_prompt`) and whether they were cut."""
        _, ids, dropped, cut = self.fit_prompt(where, self.prepare(where, messages))
        return ids, cut or dropped > 0

    def encode_response(
        self, where: str, key: str, messages: Messages, prompt: list[int], text: str | Messages
    ) -> tuple[list[int], bool]:
        """Response tokens (completion + template closing), cut from the right to fit max_length.

        ``text`` is one assistant message's content or a completion of several messages.
        """
        completion = [{"role": "assistant", "content": text}] if isinstance(text, str) else text
        contents = [m["content"] for m in completion]
        if self.use_template:
            prompt_text = self._rendered(where, messages, True)
            full_text = self._rendered(where, messages + completion, False)
            tokens = self._tokens(full_text)
            full, head = tokens.ids, self._tokens(prompt_text).ids
            if full[: len(head)] != head:
                raise DataError(
                    f"{where}: the templated prompt is not a token prefix of the templated "
                    f"conversation with '{key}'"
                )
            spans = _content_spans(full_text, contents, len(prompt_text))
            missing = [m["role"] for m, s in zip(completion, spans) if s is None and m["content"]]
            if missing:
                raise DataError(f"{where}: the chat template does not render the '{missing[0]}' message of '{key}'")
            ids = full[len(head):]
        else:
            tokens = self._tokens("\n\n".join(contents))
            ids = list(tokens.ids)
            if self.eos is not None:
                ids = ids + [self.eos]
        if not ids:
            raise DataError(f"{where}: '{key}' has no tokens")
        excess = len(prompt) + len(ids) - self.cfg.max_length
        if excess <= 0:
            return ids, False
        if self.use_template:
            content = _mask(tokens.offsets, spans)[len(head):]
        else:
            content = [a < b for a, b in tokens.offsets] + [False] * (self.eos is not None)
        cut = [i for i, c in enumerate(content) if c][-excess:]
        if len(cut) < excess or len(cut) == sum(content):
            raise DataError(
                f"{where}: '{key}' is empty after truncation to max_length ({self.cfg.max_length})"
            )
        drop = set(cut)
        return [t for i, t in enumerate(ids) if i not in drop], True

    def encode_pair(self, index: int, pair: Pair) -> Example:
        """Tokenise one parsed pair."""
        where = pair.where
        for key, completion in pair.completions.items():
            self.check_roles(where, completion)
            if completion[0]["role"] != "assistant" or any(m["role"] not in ("assistant", "tool") for m in completion):
                raise DataError(f"{where}: '{key}' must start with an assistant message and hold only "
                                "assistant and tool messages")
        messages, prompt, dropped, prompt_cut = self.fit_prompt(where, self.prepare(where, pair.prompt))
        encoded = {}
        cuts = 0
        for key, completion in pair.completions.items():
            encoded[key], cut = self.encode_response(where, key, messages, prompt, completion)
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
            texts={k: "\n\n".join(m["content"] for m in v) for k, v in pair.completions.items()},
            dropped_turns=dropped,
        )

    def encode_row(self, index: int, where: str, row: dict[str, Any]) -> Example:
        """Validate and tokenise one JSON row (any supported form)."""
        return self.encode_pair(index, parse_row(where, row, not self.use_template))

    def encode_chunk(self, rows: Sequence[tuple[str, dict[str, Any]]]) -> tuple[list[Example], list[Problem]]:
        """Encode a chunk of rows (one batched render and tokenisation); invalid rows come back as problems."""
        parsed: list[tuple[str, Pair | DataError]] = []
        for where, row in rows:
            try:
                parsed.append((where, parse_row(where, row, not self.use_template)))
            except DataError as err:
                parsed.append((where, err))
        self.prefetch([p for _, p in parsed if isinstance(p, Pair)])
        examples, problems = [], []
        for where, item in parsed:
            try:
                if isinstance(item, DataError):
                    raise item
                examples.append(self.encode_pair(len(examples), item))
            except DataError as err:
                message = str(err)
                prefix = f"{where}: "
                problems.append(Problem(where, message[len(prefix):] if message.startswith(prefix) else message))
        self.rendered.clear()
        self.tokenized.clear()
        return examples, problems

    def __getstate__(self) -> dict[str, Any]:
        """What a worker process needs: the transformers tokenizer stands in for its mlx-lm wrapper."""
        return dict(self.__dict__, tokenizer=self.hf, rendered={}, tokenized={}, pool=None)

    @contextlib.contextmanager
    def processes(self, rows: int) -> Iterator[None]:
        """Inside this block :meth:`encode_rows` encodes in :func:`workers` processes (for ``rows`` rows in all).

        The processes are spawned (a fork would copy MLX's threads), so a
        script that loads data must guard its entry point with
        ``if __name__ == "__main__":``, as for any spawned pool.
        """
        n = workers(self.cfg, rows)
        if n <= 1:
            yield
            return
        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_start,
                                 initargs=(self,)) as pool:
            self.pool = pool
            try:
                yield
            finally:
                self.pool = None

    def encode_rows(self, rows: Rows) -> tuple[list[Example], list[Problem]]:
        """Encode every readable row, in chunks of :data:`BATCH`; the invalid ones come back as problems.

        Inside :meth:`processes` the chunks go to worker processes; the order
        of the rows and every id are those of one process.
        """
        chunks = [rows.rows[i:i + BATCH] for i in range(0, len(rows.rows), BATCH)]
        examples, problems = [], list(rows.problems)
        bar = _progress(len(rows.rows))
        if self.pool is not None:
            results = ((_with_tokens(done, array.tolist), bad) for done, bad in self.pool.map(_worker_chunk, chunks))
        else:
            results = map(self.encode_chunk, chunks)
        for chunk, (done, bad) in zip(chunks, results):
            examples += done
            problems += bad
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        return _reindexed(examples), sorted(problems, key=lambda p: position(p.where))

    def encode_file(self, path: Path) -> list[Example]:
        """All pairs of a JSONL file, in file order (the first invalid row raises)."""
        return [self.encode_row(i, where, row) for i, (where, row) in enumerate(read_jsonl(path))]


def workers(cfg: Config, rows: int) -> int:
    """Processes that encode ``rows`` rows: ``dataset_num_proc`` (TRL's key) when set, else the CPU count
    (at most 8) from :data:`PARALLEL_FROM` rows on, else 1."""
    if cfg.dataset_num_proc is not None:
        return cfg.dataset_num_proc
    return min(os.cpu_count() or 1, 8) if rows >= PARALLEL_FROM else 1


_WORKER: PairEncoder | None = None
"""The encoder of a worker process (set by :func:`_worker_start`)."""


def _worker_start(encoder: PairEncoder) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _WORKER = encoder


TOKEN_FIELDS = ("prompt", "chosen", "rejected", "anchor")


def _worker_chunk(rows: Sequence[tuple[str, dict[str, Any]]]) -> tuple[list[Example], list[Problem]]:
    """Encode a chunk in a worker; token lists travel back as ``array('i')`` (one bytes blob each: unpickling
    millions of int objects would load the parent, which shares the cores with the workers)."""
    assert _WORKER is not None, "_worker_start runs first"
    examples, problems = _WORKER.encode_chunk(rows)
    return _with_tokens(examples, lambda ids: array("i", ids)), problems


def _with_tokens(examples: list[Example], convert: Callable[[Any], Any]) -> list[Example]:
    """``examples`` with each token sequence (:data:`TOKEN_FIELDS`) replaced by ``convert`` of it."""
    for ex in examples:
        for name in TOKEN_FIELDS:
            value = getattr(ex, name)
            if value is not None:
                setattr(ex, name, convert(value))
    return examples


def _progress(total: int) -> Any:
    """A tqdm bar on stderr for encoding more than :data:`PROGRESS_FROM` rows, else None."""
    if total <= PROGRESS_FROM:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="encode", unit="pair", dynamic_ncols=True, leave=False)


def invalid_report(problems: Sequence[Problem], total: int, option: bool = True) -> str:
    """One line: the first problem, then the count per reason with the first few places, then the way out."""
    reasons = Counter(p.reason for p in problems)
    parts = []
    for reason, count in reasons.most_common():
        places = [p.where for p in problems if p.reason == reason][:SHOWN]
        more = ", ..." if count > SHOWN else ""
        parts.append(f"{count} x {reason} ({', '.join(places)}{more})")
    first = problems[0]
    text = f"{first.where}: {first.reason}; {len(problems)} invalid of {total} rows: " + "; ".join(parts)
    if option:
        text += (f"; set 'skip_invalid: true' (--skip-invalid) to train on the {total - len(problems)} valid rows "
                 "(what is dropped is logged and counted)")
    return text


def held_out_split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded held-out split grouped by prompt (no prompt in both): ``(train, valid)``.

    The valid split gets whole prompt groups, in a seeded order, until it holds
    ``max(MIN_VALID, fraction * n)`` pairs; the train split keeps at least one group.
    """
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(json.dumps(ex.messages, sort_keys=True), []).append(ex)
    if len(groups) < 2:
        raise DataError(f"{examples[0].source if examples else 'data'}: too few distinct prompts "
                        f"({len(groups)}) to make a held-out split: give a valid file")
    order = sorted(groups, key=lambda k: hashlib.sha256(f"{seed}\0{k}".encode()).hexdigest())
    target = max(MIN_VALID, round(fraction * len(examples)))
    valid_keys: set[str] = set()
    count = 0
    for key in order[:-1]:
        if count >= target:
            break
        valid_keys.add(key)
        count += len(groups[key])
    train = [ex for ex in examples if json.dumps(ex.messages, sort_keys=True) not in valid_keys]
    valid = [ex for ex in examples if json.dumps(ex.messages, sort_keys=True) in valid_keys]
    return train, valid


def _reindexed(examples: list[Example]) -> list[Example]:
    for i, ex in enumerate(examples):
        ex.index = i
    return examples


def hf_dataset_keys(cfg: Config) -> dict[str, Any] | None:
    """``hf_dataset`` as the plain mapping ``sources.resolve_source`` takes."""
    return cfg.to_dict().get("hf_dataset")


def encode_splits(encoder: PairEncoder, splits: dict[str, Rows]) -> tuple[dict[str, list[Example]], list[Problem], int]:
    """Encode every split: the examples by split, the invalid rows (all of them) and the rows read in all.

    Nothing is decided here: :func:`invalid_rows` stops or (``skip_invalid``) drops.
    """
    encoded: dict[str, list[Example]] = {}
    problems: list[Problem] = []
    total = 0
    with encoder.processes(sum(len(rows.rows) for rows in splits.values())):
        for split, rows in splits.items():
            encoded[split], bad = encoder.encode_rows(rows)
            problems += bad
            total += len(rows.rows) + len(rows.problems)
    return encoded, problems, total


def invalid_rows(problems: Sequence[Problem], total: int, cfg: Config) -> tuple[Counter, list[str]]:
    """Invalid rows raise one report, or with ``skip_invalid`` are left out: the count by reason and the note."""
    if not problems:
        return Counter(), []
    if not cfg.skip_invalid:
        raise DataError(invalid_report(problems, total))
    return Counter(p.reason for p in problems), ["skip_invalid: left out " + invalid_report(problems, total, option=False)]


def encode_checked(encoder: PairEncoder, splits: dict[str, Rows], cfg: Config) -> tuple[dict[str, list[Example]], list[str]]:
    """Encode every split and apply :func:`invalid_rows`: the examples by split and the notes to log."""
    encoded, problems, total = encode_splits(encoder, splits)
    return encoded, list(encoder.notes) + invalid_rows(problems, total, cfg)[1]


def encode_source(source: Source, tokenizer: Any, cfg: Config) -> Encoded:
    """Encode every split of a found source (no held-out split made yet; invalid rows kept as problems)."""
    encoder = PairEncoder(tokenizer, cfg)
    splits, problems, total = encode_splits(encoder, source.splits)
    return Encoded(splits, problems, total, list(encoder.notes), source.name, source.kind)


def assemble(encoded: Encoded, cfg: Config) -> Dataset:
    """The Dataset of encoded splits; makes a held-out split when there is none."""
    invalid, skipped = invalid_rows(encoded.problems, encoded.total, cfg)
    splits, notes = dict(encoded.splits), list(encoded.notes) + skipped
    if not splits.get("train"):
        reasons = "; ".join(f"{n} x {reason}" for reason, n in invalid.most_common(SHOWN))
        raise DataError(f"{encoded.name}: no valid training pairs" + (f" (invalid: {reasons})" if reasons else ""))
    if "valid" not in splits:
        n = len(splits["train"])
        splits["train"], splits["valid"] = held_out_split(splits["train"], cfg.valid_fraction, cfg.seed)
        notes.append(f"no valid split: held out {len(splits['valid'])} of {n} pairs, grouped by prompt "
                     f"(valid_fraction {cfg.valid_fraction}, seed {cfg.seed})")
    every = [ex for split in splits.values() for ex in split]
    return Dataset(
        train=_reindexed(splits["train"]),
        valid=_reindexed(splits["valid"]),
        test=_reindexed(splits.get("test", [])),
        truncated_prompts=sum(e.prompt_truncated for e in every),
        truncated_responses=sum(e.responses_truncated for e in every),
        dropped_turns=sum(e.dropped_turns for e in every),
        pairs_with_dropped_turns=sum(e.dropped_turns > 0 for e in every),
        invalid=dict(invalid),
        notes=notes,
        source=f"{encoded.name} ({encoded.kind})",
    )


def load_dataset(data: str, tokenizer: Any, cfg: Config) -> Dataset:
    """Find ``data`` (folder, file, save_to_disk folder, bundled name, Hub id) and encode it (tokenizer only).

    The encoding is cached by the data's content, the tokenizer and the
    encoding settings (``data_cache.py``); a second load reads the cache.
    """
    hf = hf_dataset_keys(cfg)
    key = data_cache.cache_key(data, tokenizer, cfg, hf)
    return assemble(data_cache.cached(key, lambda: encode_source(resolve_source(data, hf), tokenizer, cfg), Example),
                    cfg)

