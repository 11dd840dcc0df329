"""Parsed pairs to token ids: the response tokens of a pair and truncation to the length limits.

The response tokens of a pair are the tokens of the templated conversation
(prompt messages + the completion) after the tokens of the prompt templated
with the generation prompt, i.e. the response text plus whatever the template
closes it with (``docs/method.md``, Notation). A templated prompt that is not
a token prefix of the templated conversation is an error for that pair. A
prompt too long for ``max_prompt_length`` loses its earliest (user, assistant)
turns first (a system message and the last user turn stay), then content from
the left; responses are cut from the right to ``max_length``; truncation never
removes a template token.
"""

from __future__ import annotations

from typing import Any, Sequence

from tidpo_mlx.config import Config
from tidpo_mlx.data.example import Example, Messages
from tidpo_mlx.data.formats import Pair, parse_row
from tidpo_mlx.data.template import ChatTemplate, content_mask, content_spans
from tidpo_mlx.data.tokens import TokenCache, Tokens
from tidpo_mlx.errors import DataError
from tidpo_mlx.sources import Problem


def joined(messages: Messages) -> str:
    """The contents of ``messages`` separated by blank lines (``chat_template: none``)."""
    return "\n\n".join(m["content"] for m in messages)


class PairEncoder:
    """Turns rows into :class:`Example` s with the tokenizer's (or a custom) chat template."""

    def __init__(self, tokenizer: Any, cfg: Config):
        self.tokenizer = tokenizer
        self.hf = getattr(tokenizer, "_tokenizer", tokenizer)
        self.cfg = cfg
        self.use_template = cfg.chat_template != "none"
        self.chat = ChatTemplate(self.hf, cfg.chat_template)
        self.tokens = TokenCache(self.hf)
        self.eos = tokenizer.eos_token_id

    @property
    def notes(self) -> list[str]:
        """What the encoder decided for the user (a merged system turn)."""
        return self.chat.notes

    @property
    def template(self) -> str | None:
        """The text of a ``chat_template`` file (None: the tokenizer's own template, or none)."""
        return self.chat.text

    def __getstate__(self) -> dict[str, Any]:
        """What a worker process needs: the transformers tokenizer stands in for its mlx-lm wrapper."""
        return dict(self.__dict__, tokenizer=self.hf)

    def prefetch(self, pairs: Sequence[Pair]) -> None:
        """Render the texts the pairs' encoding tokenises and tokenise them all in one batched call per kind.

        :meth:`encode_pair` then finds them in the token cache (same ids as one
        call per text); a pair whose prompt is cut re-tokenises what it changes,
        and a pair that fails here fails the same way, with its message, in
        ``encode_pair``. A templated prompt is not tokenised on its own where
        the first conversation starts with it and has a token starting where it
        ends: its tokens are then that conversation's first ones (the tokens
        training sees), and :meth:`encode_response` checks the other
        completion's conversation against them.
        """
        texts: dict[bool, list[str]] = {False: [], True: []}
        prompts: list[tuple[str, str]] = []
        if self.use_template:
            self._render_batches(pairs)
        for pair in pairs:
            try:
                messages = self.chat.renderable(pair.where, pair.prompt)
                if self.use_template:
                    conversations = [self.chat.render(messages + c, False) for c in pair.completions.values()]
                    prompts.append((self.chat.render(messages, True), conversations[0]))
                    texts[False] += conversations
                else:
                    texts[True].append(joined(messages))
                    texts[False] += [joined(c) for c in pair.completions.values()]
            except Exception:  # encode_pair meets and reports the same failure
                continue
        self.tokens.fill(texts[False], False)
        unaligned = []
        kept = self.tokens.tokenized
        for prompt, conversation in prompts:
            head = kept[(conversation, False)].prefix(len(prompt)) if conversation.startswith(prompt) else None
            if head is not None:
                kept.setdefault((prompt, False), head)
            else:
                unaligned.append(prompt)
        self.tokens.fill(unaligned, False)
        self.tokens.fill(texts[True], True)

    def _render_batches(self, pairs: Sequence[Pair]) -> None:
        """Render every pair's prompt and conversations, one batched template call per kind."""
        prompts: list[Messages] = []
        conversations: list[Messages] = []
        for pair in pairs:
            try:
                messages = self.chat.renderable(pair.where, pair.prompt)
            except DataError:
                continue
            prompts.append(messages)
            conversations += [messages + completion for completion in pair.completions.values()]
        self.chat.render_batch(prompts, True)
        self.chat.render_batch(conversations, False)

    def _prompt_tokens(self, where: str, messages: Messages) -> tuple[Tokens, str]:
        """Tokens of the templated prompt (generation prompt on) and the text."""
        if self.use_template:
            text = self.chat.rendered_text(where, messages, True)
            return self.tokens.get(text), text
        text = joined(messages)
        return self.tokens.get(text, special=True), text

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
        spans = content_spans(text, [m["content"] for m in messages], 0)
        cuttable = content_mask(tokens.offsets, [s for s, m in zip(spans, messages) if m["role"] != "system"])
        cut = [i for i, c in enumerate(cuttable) if c][:excess]
        if len(cut) < excess:
            raise DataError(
                f"{where}: the prompt's template tokens alone exceed max_prompt_length ({limit}), even with "
                "only the last user turn left (a system message is kept whole)"
            )
        drop = set(cut)
        return messages, [t for i, t in enumerate(ids) if i not in drop], dropped, True

    def encode_response(
        self, where: str, key: str, messages: Messages, prompt: list[int], text: str | Messages
    ) -> tuple[list[int], bool]:
        """Response tokens (completion + template closing), cut from the right to fit max_length.

        ``text`` is one assistant message's content or a completion of several messages.
        """
        completion = [{"role": "assistant", "content": text}] if isinstance(text, str) else text
        contents = [m["content"] for m in completion]
        if self.use_template:
            prompt_text = self.chat.rendered_text(where, messages, True)
            full_text = self.chat.rendered_text(where, messages + completion, False)
            tokens = self.tokens.get(full_text)
            full, head = tokens.ids, self.tokens.get(prompt_text).ids
            if full[: len(head)] != head:
                raise DataError(
                    f"{where}: the templated prompt is not a token prefix of the templated "
                    f"conversation with '{key}'"
                )
            spans = content_spans(full_text, contents, len(prompt_text))
            missing = [m["role"] for m, s in zip(completion, spans) if s is None and m["content"]]
            if missing:
                raise DataError(f"{where}: the chat template does not render the '{missing[0]}' message of '{key}'")
            ids = full[len(head):]
        else:
            tokens = self.tokens.get(joined(completion))
            ids = list(tokens.ids)
            if self.eos is not None:
                ids = ids + [self.eos]
        if not ids:
            raise DataError(f"{where}: '{key}' has no tokens")
        excess = len(prompt) + len(ids) - self.cfg.max_length
        if excess <= 0:
            return ids, False
        if self.use_template:
            content = content_mask(tokens.offsets, spans)[len(head):]
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
            self.chat.check_roles(where, completion)
            if completion[0]["role"] != "assistant" or any(m["role"] not in ("assistant", "tool") for m in completion):
                raise DataError(f"{where}: '{key}' must start with an assistant message and hold only "
                                "assistant and tool messages")
        messages, prompt, dropped, prompt_cut = self.fit_prompt(where, self.chat.renderable(where, pair.prompt))
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
            texts={k: joined(v) for k, v in pair.completions.items()},
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
        self.chat.rendered.clear()
        self.tokens.tokenized.clear()
        return examples, problems
