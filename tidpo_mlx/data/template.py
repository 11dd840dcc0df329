"""Chat templates: which one applies, what it renders (roles, system turns), and where content lies in its text.

The template is the tokenizer's (``chat_template: auto``), a Jinja file's
(``chat_template: path``) or none (``chat_template: none``: the encoder joins
contents itself). Probes at the start show whether the template renders a
``tool`` role and a ``system`` role; a system message it refuses is merged
into the first user turn. Rendered texts are kept per chunk of rows, filled
by one batched ``apply_chat_template`` call per kind.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any, Sequence

from tidpo_mlx.data.example import Messages
from tidpo_mlx.errors import DataError

ROLES = ("system", "user", "assistant")


def _probe(render: Any, messages: Messages, marker: str) -> bool:
    """Whether the template renders ``messages`` and shows ``marker`` (a probe of what it supports)."""
    try:
        return marker in render(messages, False)
    except Exception:  # a template refusing a role raises whatever its author chose
        return False


class ChatTemplate:
    """The chat template of a run (``chat_template``), its probed roles, and the texts rendered with it."""

    def __init__(self, hf: Any, setting: str):
        self.hf = hf
        self.text: str | None = None
        """A template file's text (None: the tokenizer's own, or none)."""
        self.notes: list[str] = []
        self.roles = ROLES + ("tool",)
        self.system_ok = True
        self.rendered: dict[tuple[bool, str], str] = {}
        """Templated texts of the chunk being encoded, by (generation prompt, messages)."""
        if setting not in ("auto", "none"):
            path = Path(setting).expanduser()
            try:
                self.text = path.read_text(encoding="utf-8-sig")
            except (OSError, UnicodeDecodeError) as err:
                raise DataError(f"chat_template: cannot read {path} ({err})") from None
        elif setting == "auto" and not getattr(hf, "chat_template", None):
            raise DataError(
                "the tokenizer has no chat template: set 'chat_template: none' for a base model, "
                "or 'chat_template: path/to/template.jinja'"
            )
        if setting != "none":
            user = {"role": "user", "content": "probe-user"}
            if not _probe(self.render, [user, {"role": "assistant", "content": "a"},
                                        {"role": "tool", "content": "probe-tool-7f3a"}], "probe-tool-7f3a"):
                self.roles = ROLES
            self.system_ok = _probe(self.render, [{"role": "system", "content": "probe-system-91c"}, user],
                                    "probe-system-91c")
            if not self.system_ok:
                self.notes.append("the chat template refuses a system role: system text is merged into the "
                                  "first user turn (separated by a blank line)")

    def __getstate__(self) -> dict[str, Any]:
        """A worker process gets the template without the rendered texts."""
        return dict(self.__dict__, rendered={})

    @property
    def _kwargs(self) -> dict[str, str]:
        return {"chat_template": self.text} if self.text is not None else {}

    def render(self, messages: Messages, generation_prompt: bool) -> str:
        """The templated text of ``messages`` (kept for the chunk); a refusal raises the template's error."""
        key = (generation_prompt, repr(messages))
        hit = self.rendered.get(key)
        if hit is None:
            hit = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                              **self._kwargs)
            self.rendered[key] = hit
        return hit

    def render_batch(self, conversations: Sequence[Messages], generation_prompt: bool) -> None:
        """Render the conversations not rendered yet in one batched call.

        A batch the template refuses is left to :meth:`render` of each (which names the pair).
        """
        todo: dict[str, Messages] = {}
        for messages in conversations:
            key = repr(messages)
            if (generation_prompt, key) not in self.rendered:
                todo.setdefault(key, messages)
        if not todo:
            return
        try:
            texts = self.hf.apply_chat_template(list(todo.values()), tokenize=False,
                                                add_generation_prompt=generation_prompt, **self._kwargs)
        except Exception:  # a conversation the template refuses: render meets it alone
            return
        self.rendered.update({(generation_prompt, k): t for k, t in zip(todo, texts)})

    def rendered_text(self, where: str, messages: Messages, generation_prompt: bool) -> str:
        """:meth:`render`, a refusal reported as a ``DataError`` naming the pair."""
        try:
            return self.render(messages, generation_prompt)
        except Exception as err:  # jinja's TemplateError, or raise_exception() of the template
            raise DataError(f"{where}: the chat template refused these messages ({err})") from None

    def check_roles(self, where: str, messages: Messages) -> None:
        """Every role is one the template renders (system/user/assistant, and tool where a probe shows it)."""
        for m in messages:
            if m["role"] not in self.roles:
                raise DataError(f"{where}: unknown role '{m['role']}' (allowed: {', '.join(self.roles)})")

    def renderable(self, where: str, messages: Messages) -> Messages:
        """The prompt messages as the template takes them: roles checked, and a system message merged into
        the first user turn where the template refuses a system role."""
        self.check_roles(where, messages)
        if not self.system_ok and messages and messages[0]["role"] == "system":
            system, rest = messages[0], messages[1:]
            if rest and rest[0]["role"] == "user":
                merged = dict(rest[0], content=f"{system['content']}\n\n{rest[0]['content']}")
                return [merged] + rest[1:]
            return [dict(system, role="user")] + rest
        return messages


def content_spans(text: str, contents: Sequence[str], start: int) -> list[tuple[int, int] | None]:
    """Where each of ``contents`` lies in ``text`` (searched in order from ``start``; None if absent)."""
    spans: list[tuple[int, int] | None] = []
    cursor = start
    for content in contents:
        pos = text.find(content, cursor) if content else -1
        spans.append((pos, pos + len(content)) if pos >= 0 else None)
        if pos >= 0:
            cursor = pos + len(content)
    return spans


def content_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int] | None]) -> list[bool]:
    """True for tokens lying wholly inside one of ``spans`` (the tokens truncation may cut).

    The spans of :func:`content_spans` are in order and do not overlap, so
    the only one that can hold a token is the last starting at or before it.
    """
    real = [s for s in spans if s is not None]
    starts = [s for s, _ in real]
    out = []
    for a, b in offsets:
        i = bisect.bisect_right(starts, a) - 1
        out.append(a < b and i >= 0 and b <= real[i][1])
    return out
