"""An Ollama ``Modelfile`` beside an exported GGUF (``ollama create NAME -f Modelfile``).

``FROM`` names the GGUF (or, for a ``--lora-only`` export, the base GGUF, with
``ADAPTER`` the LoRA file). The chat template is translated into Ollama's Go
template language for the five families whose Jinja templates we recognise by
their markers: ChatML (``<|im_start|>``), Llama 3 (``<|start_header_id|>``),
Gemma (``<start_of_turn>``), Phi-3 (``<|user|>`` / ``<|end|>``) and Mistral
(``[INST]``). Ollama passes the conversation as ``.Messages`` (a default
system prompt, the ``SYSTEM`` line, arrives as its first message); BOS is not
in the template (the GGUF's tokenizer adds it). A default system prompt that
the Jinja template inserts is carried as ``SYSTEM``. Any other template gets
no ``TEMPLATE`` line and a note saying so (Ollama then uses the GGUF's own).
"""

from __future__ import annotations

from pathlib import Path

from tidpo_mlx.errors import ConvertError

# `$last`: whether this is the conversation's last message (the idiom of Ollama's own templates).
_LAST = "{{ $last := eq (len (slice $.Messages $i)) 1 }}"
_AFTER_SYSTEM = '(and (eq $i 1) (eq (index $.Messages 0).Role "system"))'
TEMPLATES = {
    "chatml": (
        "{{ range $i, $_ := .Messages }}" + _LAST + "<|im_start|>{{ .Role }}\n{{ .Content }}"
        '{{ if or (ne .Role "assistant") (not $last) }}<|im_end|>\n{{ end }}'
        '{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}{{ end }}'
    ),
    "llama3": (
        "{{ range $i, $_ := .Messages }}" + _LAST
        + "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}"
        '{{ if or (ne .Role "assistant") (not $last) }}<|eot_id|>{{ end }}'
        '{{ if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}{{ end }}'
    ),
    "gemma": (
        "{{ range $i, $_ := .Messages }}" + _LAST
        + '{{ if eq .Role "system" }}<start_of_turn>user\n{{ .Content }}\n\n'
        '{{ else if eq .Role "user" }}{{ if not ' + _AFTER_SYSTEM + " }}<start_of_turn>user\n{{ end }}"
        "{{ .Content }}<end_of_turn>\n{{ if $last }}<start_of_turn>model\n{{ end }}"
        "{{ else }}<start_of_turn>model\n{{ .Content }}{{ if not $last }}<end_of_turn>\n{{ end }}{{ end }}{{ end }}"
    ),
    "phi3": (
        "{{ range $i, $_ := .Messages }}" + _LAST + "<|{{ .Role }}|>\n{{ .Content }}"
        '{{ if or (ne .Role "assistant") (not $last) }}<|end|>\n{{ end }}'
        '{{ if and $last (ne .Role "assistant") }}<|assistant|>\n{{ end }}{{ end }}'
    ),
    "mistral": (
        '{{ range $i, $_ := .Messages }}{{ if eq .Role "user" }}[INST] '
        "{{ if " + _AFTER_SYSTEM + " }}{{ (index $.Messages 0).Content }}\n\n{{ end }}{{ .Content }} [/INST]"
        '{{ else if eq .Role "assistant" }}{{ .Content }}</s>{{ end }}{{ end }}'
    ),
}
STOPS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "gemma": ["<start_of_turn>", "<end_of_turn>"],
    "phi3": ["<|end|>", "<|user|>", "<|assistant|>"],
    "mistral": ["[INST]", "[/INST]"],
}
MARKERS = [
    ("chatml", ("<|im_start|>",)),
    ("llama3", ("<|start_header_id|>",)),
    ("gemma", ("<start_of_turn>",)),
    ("phi3", ("<|user|>", "<|end|>")),
    ("mistral", ("[INST]",)),
]
# How a system message opens and closes, for reading a template's default system prompt.
SYSTEM_BLOCKS = {
    "chatml": ("<|im_start|>system\n", "<|im_end|>"),
    "llama3": ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
}


def template_kind(chat_template: str | None) -> str | None:
    """``chatml`` / ``llama3`` / ``gemma`` / ``phi3`` / ``mistral`` for a Jinja template with their markers, else ``None``."""
    for kind, markers in MARKERS:
        if chat_template and all(m in chat_template for m in markers):
            return kind
    return None


def default_system(hf_tokenizer, kind: str) -> str | None:
    """The system prompt the Jinja template inserts when the conversation has none (ChatML, Llama 3)."""
    if kind not in SYSTEM_BLOCKS:
        return None
    text = hf_tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    bos = hf_tokenizer.bos_token or ""
    text = text[len(bos):] if bos and text.startswith(bos) else text
    start, end = SYSTEM_BLOCKS[kind]
    if not text.startswith(start) or end not in text:
        return None
    return text[len(start) : text.index(end)]


def modelfile_path(out_file, overwrite: bool) -> Path:
    """``Modelfile`` beside ``out_file``; refused when it exists unless ``overwrite``."""
    path = Path(out_file).with_name("Modelfile")
    if path.exists() and not overwrite:
        raise ConvertError(f"{path} exists (pass --overwrite to replace it)")
    return path


def _quoted(text: str) -> str:
    if '"""' in text:
        raise ConvertError('the text contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile(from_: str, hf_tokenizer, adapter: str | None = None) -> tuple[str, list[str]]:
    """``(Modelfile text, notes)`` for the GGUF ``from_`` (and the LoRA GGUF ``adapter``)."""
    lines, notes = [f"FROM {from_}"], []
    if adapter is not None:
        lines.append(f"ADAPTER {adapter}")
    template = hf_tokenizer.chat_template if isinstance(hf_tokenizer.chat_template, str) else None
    kind = template_kind(template)
    if kind is None:
        notes.append(
            "no TEMPLATE line: the chat template is none of ChatML, Llama 3, Gemma, Phi-3, Mistral; "
            "Ollama will use the GGUF's own (check `ollama show --template`)"
        )
        return "\n".join(lines) + "\n", notes
    lines.append(f"TEMPLATE {_quoted(TEMPLATES[kind])}")
    system = default_system(hf_tokenizer, kind)
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    stops = list(STOPS[kind])
    if hf_tokenizer.eos_token and hf_tokenizer.eos_token not in stops:
        stops.append(hf_tokenizer.eos_token)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n", notes


def gguf_base(model_spec: str) -> Path:
    """The base GGUF a ``--lora-only`` Modelfile names in ``FROM``: a ``.gguf`` file or a built-in model's."""
    from tidpo_mlx import builtin

    if model_spec in builtin.BUILTIN_MODELS:
        return builtin.builtin_gguf(model_spec)
    if str(model_spec).endswith(".gguf"):
        return Path(model_spec).expanduser().resolve()
    raise ConvertError(
        f"--ollama with --lora-only needs the base as a GGUF (a .gguf file or a built-in name), not {model_spec!r}"
    )


def write_modelfile(out_file, model_spec: str, hf_tokenizer, *, lora_only: bool, overwrite: bool) -> tuple[Path, list[str]]:
    """Write the ``Modelfile`` beside ``out_file``; ``(its path, notes to print)``.

    For ``lora_only``, ``FROM`` names the base GGUF (:func:`gguf_base`) and ``ADAPTER`` the LoRA file.
    """
    from tidpo_mlx.files import atomic_write_text

    path = modelfile_path(out_file, overwrite)
    name = Path(out_file).name
    if lora_only:
        text, notes = modelfile(str(gguf_base(model_spec)), hf_tokenizer, adapter=f"./{name}")
    else:
        text, notes = modelfile(f"./{name}", hf_tokenizer)
    atomic_write_text(path, text)
    return path, notes
