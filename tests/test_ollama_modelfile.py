"""The Ollama Modelfile of ``to-gguf --ollama``: its TEMPLATE, rendered, is the tokenizer's own chat text.

For each family we translate (ChatML, Llama 3, Gemma, Phi-3, Mistral), a
tokenizer carries a Jinja template in that family's style; a multi-turn
conversation rendered by transformers (less the BOS the GGUF tokenizer adds)
must equal our TEMPLATE rendered the way Ollama renders it (Go's
``text/template`` with the conversation as ``.Messages``). ``render_go``
below evaluates the part of Go's template language the TEMPLATE lines use
(``range``, ``if`` / ``else if`` / ``else``, ``:=``, ``eq ne and or not len
slice index``, fields) and fails on anything else. Then: a template we do not
know gets no TEMPLATE line and a note, the default system prompt becomes
SYSTEM, and the CLI writes the Modelfile beside the GGUF.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import CHATML_TEMPLATE, write_tokenizer
from tidpo_mlx.convert.ollama import TEMPLATES, modelfile, template_kind

transformers = pytest.importorskip("transformers")

JINJA = {
    "chatml": CHATML_TEMPLATE,
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set prefix = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + message['content'] | trim"
        " + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    "phi3": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + (system + '\n\n' if loop.first and system else '') + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
}
CONVERSATION = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "What is 12 plus 30?"},
    {"role": "assistant", "content": "The answer is 42."},
    {"role": "user", "content": "And 3 km in metres?"},
]


# ----------------------------------------------------------------------------- Go templates (the subset we emit)

_ACTION = re.compile(r"\{\{(.*?)\}\}", re.S)
_TOKEN = re.compile(r'\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+')


def _value(token: str, scope: dict):
    if token.startswith('"'):
        return token[1:-1]
    if token.isdigit():
        return int(token)
    path = token.split(".")
    if token.startswith("$."):
        obj, fields = scope["$"], path[1:]
    elif token.startswith("$"):
        obj, fields = scope[path[0]], path[1:]
    elif token.startswith("."):
        obj, fields = scope["."], path[1:]
    else:
        raise AssertionError(f"unsupported Go template token {token!r}")
    for f in fields:
        obj = obj[f]
    return obj


FUNCS = {
    "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "and": lambda *a: all(a), "or": lambda *a: any(a),
    "not": lambda a: not a, "len": len, "slice": lambda x, i: x[i:], "index": lambda x, i: x[i],
}  # fmt: skip


def _expr(tokens: list[str], scope: dict):
    """A Go template pipeline of one command: a function call or a single value (parenthesized ones too)."""

    def term(i: int):
        if tokens[i] == "(":
            depth, j = 1, i + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(tokens[j], 0)
                j += 1
            value = _expr(tokens[i + 1 : j - 1], scope)
            if j < len(tokens) and tokens[j].startswith("."):  # (index $.Messages 0).Role
                for f in tokens[j].split(".")[1:]:
                    value = value[f]
                j += 1
            return value, j
        return _value(tokens[i], scope), i + 1

    if tokens[0] in FUNCS:
        args, i = [], 1
        while i < len(tokens):
            value, i = term(i)
            args.append(value)
        return FUNCS[tokens[0]](*args)
    value, i = term(0)
    assert i == len(tokens), f"unsupported Go template pipeline {' '.join(tokens)!r}"
    return value


def render_go(template: str, messages: list[dict]) -> str:
    """Render ``template`` as Ollama does for ``messages`` (``.Messages``, fields ``Role`` / ``Content``)."""
    parts, pos = [], 0
    for m in _ACTION.finditer(template):
        parts += [("text", template[pos : m.start()]), ("action", m.group(1).strip())]
        pos = m.end()
    parts.append(("text", template[pos:]))
    data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}

    def block(i: int, scope: dict, out: list[str] | None) -> tuple[int, str]:
        """Run parts from ``i`` until an ``end`` / ``else`` at this level; ``out`` None: skip (not taken)."""
        while i < len(parts):
            kind, body = parts[i]
            if kind == "text":
                if out is not None:
                    out.append(body)
                i += 1
                continue
            words = _TOKEN.findall(body)
            if words[0] in ("end", "else"):
                return i, body
            if words[0] == "if":
                taken = out is not None and bool(_expr(words[1:], scope))
                done = taken
                i, stop = block(i + 1, scope, out if taken else None)
                while stop != "end":
                    rest = _TOKEN.findall(stop)[1:]
                    take = out is not None and not done and (not rest or bool(_expr(rest[1:], scope)))
                    done = done or take
                    i, stop = block(i + 1, scope, out if take else None)
                i += 1
            elif words[0] == "range":
                assert words[1:4] == ["$i,", "$_", ":="], body
                items = _expr(words[4:], scope) if out is not None else []
                end = None
                for n, item in enumerate(items):
                    end, _ = block(i + 1, {**scope, ".": item, "$i": n}, out)
                if end is None:
                    end, _ = block(i + 1, scope, None)
                i = end + 1
            elif len(words) > 2 and words[1] == ":=":
                if out is not None:
                    scope[words[0]] = _expr(words[2:], scope)
                i += 1
            else:
                if out is not None:
                    out.append(str(_expr(words, scope)))
                i += 1
        return i, ""

    out: list[str] = []
    block(0, {"$": data, ".": data}, out)
    return "".join(out)


# ----------------------------------------------------------------------------- tests


def tokenizer_with(tmp_path: Path, template: str):
    """A fast tokenizer (the test BPE) with BOS / EOS tokens and ``template``."""
    write_tokenizer(tmp_path)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"),
                                               bos_token="<s>", eos_token="</s>")
    tok.chat_template = template
    return tok


def jinja_text(tok, messages: list[dict]) -> str:
    """The tokenizer's chat text with the generation prompt, less the BOS the GGUF tokenizer adds itself."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text[len(tok.bos_token):] if text.startswith(tok.bos_token) else text


def template_line(text: str) -> str:
    return re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)


@pytest.mark.parametrize("kind", list(JINJA))
def test_template_renders_the_conversation_as_the_tokenizer_does(kind, tmp_path):
    tok = tokenizer_with(tmp_path, JINJA[kind])
    assert template_kind(tok.chat_template) == kind
    text, notes = modelfile("./model.gguf", tok)
    assert notes == [] and text.startswith("FROM ./model.gguf\n")
    template = template_line(text)
    assert template == TEMPLATES[kind]
    for messages in (CONVERSATION, CONVERSATION[1:]):
        if kind == "chatml" and messages[0]["role"] != "system":
            continue  # the default system prompt: next test
        assert render_go(template, messages) == jinja_text(tok, messages), messages
    assert f'PARAMETER stop "{tok.eos_token}"' in text


def test_default_system_prompt_becomes_system(tmp_path):
    tok = tokenizer_with(tmp_path, CHATML_TEMPLATE)
    text, _ = modelfile("./model.gguf", tok)
    assert 'SYSTEM """You are a tiny test model."""' in text
    # Ollama puts SYSTEM first in .Messages when the conversation has no system message
    with_default = [{"role": "system", "content": "You are a tiny test model."}] + CONVERSATION[1:]
    assert render_go(template_line(text), with_default) == jinja_text(tok, CONVERSATION[1:])


def test_unknown_template_gets_no_template_line_and_a_note(tmp_path):
    tok = tokenizer_with(tmp_path, "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    text, notes = modelfile("./model.gguf", tok)
    assert "TEMPLATE" not in text and text == "FROM ./model.gguf\n"
    assert len(notes) == 1 and "no TEMPLATE line" in notes[0]


def test_lora_only_modelfile_has_adapter(tmp_path):
    tok = tokenizer_with(tmp_path, CHATML_TEMPLATE)
    text, _ = modelfile("/models/base.gguf", tok, adapter="./adapter.gguf")
    assert text.splitlines()[:2] == ["FROM /models/base.gguf", "ADAPTER ./adapter.gguf"]
