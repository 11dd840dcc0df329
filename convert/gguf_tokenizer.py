"""The tokenizer of a byte-level BPE GGUF, rebuilt with the ``tokenizers`` library, and its Hugging Face files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tidpo_mlx.convert.gguf_format import GGUFProblem, meta_int, meta_list, meta_str, show
from tidpo_mlx.errors import first_line

# tokenizer.ggml.pre -> (split regex run before the byte-level step, ignore_merges,
# add BOS when the file has no tokenizer.ggml.add_bos_token), as in llama.cpp's llama-vocab.cpp.
_GPT2 = None  # GPT-2's own regex (ByteLevel use_regex)
_DIGITS = "digits"  # every \p{N} character its own piece, then GPT-2's regex (StarCoder family)
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    None: (_GPT2, False, False),
    "default": (_GPT2, False, False),
    "gpt-2": (_GPT2, False, False),
    "gpt2": (_GPT2, False, False),
    "smollm": (_DIGITS, False, False),
    "starcoder": (_DIGITS, False, False),
    "refact": (_DIGITS, False, False),
    "llama3": (_LLAMA3, True, True),
    "llama-v3": (_LLAMA3, True, True),
    "llama-bpe": (_LLAMA3, True, True),
    "falcon3": (_LLAMA3, True, True),
    "pixtral": (_LLAMA3, True, True),
    "tekken": (_TEKKEN, True, True),
}



def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _token(metadata: dict, key: str) -> str | None:
    """The text of the ``tokenizer.ggml.{key}_token_id`` token (``None``: no such id, or out of range)."""
    token_id = meta_int(metadata, f"tokenizer.ggml.{key}_token_id", -1, minimum=0)
    tokens = metadata["tokenizer.ggml.tokens"]
    return tokens[token_id] if 0 <= token_id < len(tokens) else None


def _tokenizer_metadata(metadata: dict) -> tuple[list[str], list[int], list[tuple[str, str]], str | None]:
    """``(tokens, token types, merges, pre-tokenizer)`` of a byte-level BPE GGUF, each checked."""
    kind = meta_str(metadata, "tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in metadata:
        raise GGUFProblem("GGUF has no tokenizer (no tokenizer.ggml.model / tokens metadata)")
    if kind != "gpt2":
        raise GGUFProblem(
            f"GGUF tokenizer {show(kind)} is not supported (only byte-level BPE 'gpt2'); "
            "convert the model from its Hugging Face folder instead"
        )
    pre = meta_str(metadata, "tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZERS:
        known = ", ".join(sorted(k for k in PRE_TOKENIZERS if k))
        raise GGUFProblem(f"GGUF pre-tokenizer {show(pre)} is not supported (known: {known})")
    tokens = meta_list(metadata, "tokenizer.ggml.tokens", str)
    types = meta_list(metadata, "tokenizer.ggml.token_type", int) or [1] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFProblem(f"GGUF has {len(tokens)} tokens but {len(types)} token types")
    merges = [tuple(m.split(" ", 1)) for m in meta_list(metadata, "tokenizer.ggml.merges", str)]
    if any(len(m) != 2 for m in merges):
        raise GGUFProblem("GGUF tokenizer.ggml.merges has an entry that is not two tokens separated by a space")
    meta_str(metadata, "tokenizer.chat_template")  # written to tokenizer_config.json as it is
    return tokens, types, merges, pre


@contextmanager
def _tokenizers_errors() -> Iterator[None]:
    """The ``tokenizers`` library's errors about its input (bare exceptions) as a ``GGUFProblem``."""
    try:
        yield
    except Exception as e:
        raise GGUFProblem(f"GGUF tokenizer metadata is inconsistent: {first_line(e)}") from None


def _post_processor(metadata: dict):
    """``TemplateProcessing`` that adds BOS / EOS as the file (or its pre-tokenizer's default) asks."""
    from tokenizers import processors

    add_bos, add_eos = add_bos_eos(metadata)
    before, after, special = [], [], []
    for add, key, side in ((add_bos, "bos", before), (add_eos, "eos", after)):
        token = _token(metadata, key)
        if add and token is not None:
            side.append(token)
            special.append((token, metadata[f"tokenizer.ggml.{key}_token_id"]))
    single = [f"{t}:0" for t in before] + ["$A:0"] + [f"{t}:0" for t in after]
    pair = single + [f"{t}:1" for t in before] + ["$B:1"] + [f"{t}:1" for t in after]
    with _tokenizers_errors():
        return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(dict.fromkeys(special)))


def _pre_tokenizer(split: str | None):
    """The pre-tokenizer for a ``PRE_TOKENIZERS`` split: GPT-2's regex, digits first, or a regex."""
    from tokenizers import Regex, pre_tokenizers

    if split is _GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split == _DIGITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def build_tokenizer(metadata: dict):
    """A ``tokenizers.Tokenizer`` for a GGUF's byte-level BPE (``tokenizer.ggml.model == 'gpt2'``).

    Built the way transformers' own GGUF loader builds it (same vocabulary
    respelling, control tokens as special added tokens, user-defined tokens as
    plain added tokens), with llama.cpp's pre-tokenizer, ``ignore_merges`` and
    default BOS for ``tokenizer.ggml.pre`` (transformers has no ``smollm`` entry
    and so keeps runs of non-ASCII numerals such as ``½²`` together; llama.cpp
    and SmolLM2's own tokenizer split them).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models

    tokens, types, merges, pre = _tokenizer_metadata(metadata)
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")), i)

    split, ignore_merges, _ = PRE_TOKENIZERS[pre]
    with _tokenizers_errors():
        tok = Tokenizer(
            models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges)
        )
    tok.pre_tokenizer = _pre_tokenizer(split)
    tok.decoder = decoders.ByteLevel()

    control = [t for t, ty in zip(tokens, types) if ty == 3 and set(t) <= alphabet]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, ty in zip(tokens, types) if ty == 4 and t in vocab]
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    tok.post_processor = _post_processor(metadata)
    return tok


def add_bos_eos(metadata: dict) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS: the file's flags, else llama.cpp's default for its pre-tokenizer."""
    default_bos = PRE_TOKENIZERS.get(metadata.get("tokenizer.ggml.pre"), (None, False, False))[2]
    return (
        bool(metadata.get("tokenizer.ggml.add_bos_token", default_bos)),
        bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
    )


def write_tokenizer_files(tokenizer, metadata: dict, config: dict, folder: Path) -> None:
    """``tokenizer.json``, ``tokenizer_config.json`` (chat template included) and the special token files."""
    tokenizer.save(str(folder / "tokenizer.json"))
    special = {
        name: _token(metadata, key)
        for name, key in (
            ("bos_token", "bos"),
            ("eos_token", "eos"),
            ("pad_token", "padding"),
            ("unk_token", "unknown"),
        )
    }
    special = {k: v for k, v in special.items() if v is not None}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": add_bos_eos(metadata)[0],
        "add_eos_token": add_bos_eos(metadata)[1],
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    if "tokenizer.chat_template" in metadata:
        tokenizer_config["chat_template"] = metadata["tokenizer.chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False))
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))

