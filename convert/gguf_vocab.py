"""A Hugging Face tokenizer as GGUF tokenizer metadata (what llama.cpp's ``convert_hf_to_gguf.py`` writes).

Byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen 2/3, ...) are
written as ``tokenizer.ggml.model = "gpt2"`` with their merges and the
llama.cpp pre-tokenizer whose split regex is the tokenizer's own
(``tokenizer.ggml.pre``); SentencePiece-style BPE (byte fallback, ``▁`` for
spaces: Llama 2, Mistral, Gemma, Phi-3) as ``"llama"`` with scores, through
the ``gguf`` package's ``LlamaHfVocab``. Token types: special added tokens
are control tokens, other added tokens user-defined, ids past the tokenizer's
end up to the embedding's rows ``[PAD{i}]`` unused tokens. BOS / EOS / UNK /
PAD ids, whether encoding adds BOS, and the chat template go along.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tidpo_mlx.errors import ConvertError

# The split regex of each llama.cpp pre-tokenizer we write (as the Hugging Face tokenizer.json spells it).
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_REGEXES = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}


def _pieces(pre: dict | None) -> list[dict]:
    """The pre-tokenizer steps of a tokenizer.json (a ``Sequence`` flattened)."""
    if pre is None:
        return []
    if pre.get("type") == "Sequence":
        return [p for step in pre.get("pretokenizers", []) for p in _pieces(step)]
    return [pre]


def bpe_pre_name(tokenizer_json: dict) -> str:
    """The llama.cpp ``tokenizer.ggml.pre`` that splits text as this byte-level BPE tokenizer does.

    GPT-2's regex (``ByteLevel`` with ``use_regex``) is ``gpt-2``; single
    digits first, then GPT-2's regex, is ``smollm``; a ``Split`` with Llama 3's
    or Qwen 2's regex before a plain ``ByteLevel`` is ``llama-bpe`` / ``qwen2``.
    Any other pre-tokenizer (or a normalizer other than Qwen's NFC) is an error
    naming it: llama.cpp would split text differently.
    """
    steps = _pieces(tokenizer_json.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]
    normalizer = tokenizer_json.get("normalizer")
    name = None
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        name = "gpt-2"
    elif kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        name = "smollm"
    elif kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = SPLIT_REGEXES.get((steps[0].get("pattern") or {}).get("Regex"))
    if name is None:
        raise ConvertError(
            f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) has no llama.cpp counterpart "
            "we write (supported: GPT-2, SmolLM, Llama 3 and Qwen 2 byte-level BPE, and SentencePiece-style BPE)"
        )
    if normalizer is not None and not (name == "qwen2" and normalizer.get("type") == "NFC"):
        raise ConvertError(f"the tokenizer's normalizer {normalizer.get('type')!r} has no llama.cpp counterpart")
    return name


def _is_sentencepiece_style(tokenizer_json: dict) -> bool:
    """BPE with byte fallback and ``▁`` for spaces (Llama 2 / Mistral / Gemma / Phi-3 ``tokenizer.json``)."""
    model = tokenizer_json.get("model") or {}
    text = json.dumps([tokenizer_json.get("normalizer"), tokenizer_json.get("pre_tokenizer")])
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and "\u2581" in text


def _merges(model: dict) -> list[str]:
    """BPE merges as ``"a b"`` strings (tokenizer.json stores strings or pairs)."""
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _gpt2_tokens(tokenizer_json: dict, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their GGUF token types (normal, control, user-defined, unused padding)."""
    from gguf import TokenType

    vocab = tokenizer_json["model"]["vocab"]
    by_id: dict[int, tuple[str, int]] = {i: (t, TokenType.NORMAL) for t, i in vocab.items()}
    for added in tokenizer_json.get("added_tokens", []):
        by_id[added["id"]] = (added["content"], TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    if max(by_id) >= n_vocab:
        raise ConvertError(f"the tokenizer has token id {max(by_id)}, but the model's embedding has {n_vocab} rows")
    tokens, types = [], []
    for i in range(n_vocab):
        text, kind = by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED))
        tokens.append(text)
        types.append(int(kind))
    return tokens, types


def _sentencepiece_tokens(tokenizer_json: dict, config: dict, n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    """Tokens, scores and types of a SentencePiece-style ``tokenizer.json``, read by gguf's ``LlamaHfVocab``."""
    from gguf import TokenType
    from gguf.vocab import LlamaHfVocab

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(tokenizer_json))
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(config))
        entries = list(LlamaHfVocab(Path(tmp)).all_tokens())
    if len(entries) > n_vocab:
        raise ConvertError(f"the tokenizer has {len(entries)} tokens, but the model's embedding has {n_vocab} rows")
    entries += [(f"[PAD{i}]".encode(), -1000.0, TokenType.UNUSED) for i in range(len(entries), n_vocab)]
    return [e[0] for e in entries], [float(e[1]) for e in entries], [int(e[2]) for e in entries]


def _adds(hf_tokenizer, token_id: int | None, first: bool) -> bool:
    """Whether encoding plain text puts ``token_id`` first (``first``) or last."""
    if token_id is None:
        return False
    ids = hf_tokenizer("a")["input_ids"]
    return bool(ids) and ids[0 if first else -1] == token_id


def write_tokenizer(writer, hf_tokenizer, n_vocab: int) -> None:
    """Add the tokenizer of ``hf_tokenizer`` (a transformers fast tokenizer) to the GGUF ``writer``.

    ``n_vocab`` is the model's embedding rows.
    """
    tokenizer_json = json.loads(hf_tokenizer.backend_tokenizer.to_str())
    model = tokenizer_json.get("model") or {}
    if _is_sentencepiece_style(tokenizer_json):
        tokens, scores, types = _sentencepiece_tokens(tokenizer_json, {}, n_vocab)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
    elif model.get("type") == "BPE":
        pre = bpe_pre_name(tokenizer_json)
        tokens, types = _gpt2_tokens(tokenizer_json, n_vocab)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(_merges(model))
    else:
        raise ConvertError(
            f"the tokenizer's model {model.get('type')!r} is not supported for GGUF export "
            "(byte-level BPE or SentencePiece-style BPE)"
        )
    eos = hf_tokenizer.eos_token_id
    specials = {
        "bos": hf_tokenizer.bos_token_id, "eos": eos, "unk": hf_tokenizer.unk_token_id,
        "pad": hf_tokenizer.pad_token_id,
    }  # fmt: skip
    for kind, token_id in specials.items():
        if token_id is not None:
            if not 0 <= token_id < n_vocab:
                raise ConvertError(f"the tokenizer's {kind} token id {token_id} is outside the vocabulary ({n_vocab})")
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(_adds(hf_tokenizer, specials["bos"], first=True))
    writer.add_add_eos_token(_adds(hf_tokenizer, eos, first=False))
    template = hf_tokenizer.chat_template if isinstance(hf_tokenizer.chat_template, str) else None
    if template:
        writer.add_chat_template(template)
