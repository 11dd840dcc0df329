"""GGUF (llama family) -> MLX folder that ``mlx_lm.load`` opens.

``mx.load`` reads GGUF natively: Q4_0, Q4_1 and Q8_0 blocks arrive as MLX
affine ``weight``/``scales``/``biases`` (group size 32) and are kept quantized
at their own bits per tensor (e.g. token embedding at 8 bits, the rest at 4).
llama.cpp permutes the q/k rows for interleaved RoPE; we invert that
permutation (exact: quantization groups run along the input dimension, so a
row permutation of weight, scales and biases is a permutation of the matrix),
which gives the Hugging Face layout with standard RoPE. The tokenizer
(byte-level BPE, vocabulary, merges, chat template) is rebuilt from the
metadata with the ``tokenizers`` library.

    folder = gguf_to_mlx("model.Q8_0.gguf", "model-mlx")
    folder = cached_mlx_folder("model.Q8_0.gguf")   # converted once, then reused
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

# Bump when the output of ``gguf_to_mlx`` changes: old cache entries are then ignored.
CONVERTER_VERSION = 1

GROUP_SIZE = 32  # MLX's GGUF reader always uses 32 (the GGUF block size)

# GGML tensor types by id (ggml.h), for messages.
# fmt: off
GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
    24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0",
    35: "TQ2_0", 39: "MXFP4",
}
# fmt: on
# Kept quantized (MLX affine, group size 32): type -> bits.
QUANTIZED_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
# Loaded as float: F32 as is; F16 as is; BF16 as float16 (MLX's reader);
# Q2_K and Q6_K dequantized to float16 by MLX's reader (checked against
# gguf-py's reference dequantization). Q4_K is not here on purpose: MLX 0.32
# decodes half of its sub-blocks wrongly, silently.
FLOAT_TYPES = {"F32", "F16", "BF16", "Q2_K", "Q6_K"}
SUPPORTED = sorted(QUANTIZED_BITS) + sorted(FLOAT_TYPES)

# GGUF tensor name (inside blk.N) -> Hugging Face module name (inside model.layers.N)
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

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


# --------------------------------------------------------------------------- reading


_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NUMPY = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}


def read_gguf_header(gguf_path) -> tuple[dict, dict]:
    """``(metadata, tensors)`` of a GGUF file, read without loading any tensor.

    ``metadata`` maps keys to Python values (numeric arrays as lists);
    ``tensors`` maps tensor names to ``(type_name, shape)`` with the shape in
    row-major order (as ``mx.load`` gives it, before any quantization packing).
    """
    with open(gguf_path, "rb") as f:
        data = f.read(8)
        if len(data) < 8 or data[:4] != b"GGUF":
            raise ValueError(f"{gguf_path}: not a GGUF file (no GGUF magic)")
        version = struct.unpack("<I", data[4:8])[0]
        if version < 2:
            raise ValueError(f"{gguf_path}: GGUF version {version} is too old (need 2 or 3)")

        def read(fmt):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def read_str():
            return f.read(read("<Q")).decode("utf-8", errors="replace")

        def read_value(vtype):
            if vtype == 8:
                return read_str()
            if vtype == 9:
                etype, count = read("<I"), read("<Q")
                if etype == 8:
                    return [read_str() for _ in range(count)]
                if etype in _NUMPY:
                    dt = np.dtype(_NUMPY[etype])
                    return np.frombuffer(f.read(dt.itemsize * count), dtype=dt).tolist()
                return [read_value(etype) for _ in range(count)]
            if vtype in _SCALARS:
                return read(_SCALARS[vtype])
            raise ValueError(f"{gguf_path}: unknown GGUF metadata value type {vtype}")

        n_tensors, n_kv = read("<Q"), read("<Q")
        metadata = {}
        for _ in range(n_kv):
            key = read_str()
            metadata[key] = read_value(read("<I"))
        tensors = {}
        for _ in range(n_tensors):
            name = read_str()
            dims = [read("<Q") for _ in range(read("<I"))]
            ttype = read("<I")
            read("<Q")  # offset
            tensors[name] = (GGML_TYPES.get(ttype, f"type {ttype}"), tuple(reversed(dims)))
    return metadata, tensors


def _hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in TOP_NAMES:
        return f"{TOP_NAMES[parts[0]]}.{parts[1]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no llama counterpart (not supported)")


def _unpermute_rows(n_heads: int, rows: int) -> np.ndarray:
    """Row indices that undo llama.cpp's q/k permutation (``LlamaModel.permute``).

    llama.cpp writes ``w.reshape(n, 2, d/2, ...).swapaxes(1, 2)``, i.e. row
    ``perm[i]`` of the Hugging Face matrix lands at row ``i``; the inverse
    gathers with ``argsort(perm)``.
    """
    head_dim = rows // n_heads
    perm = np.arange(rows).reshape(n_heads, 2, head_dim // 2).swapaxes(1, 2).reshape(-1)
    return np.argsort(perm)


def _float(metadata, key, default):
    """A float32 metadata value, printed short (1e-05, not 9.999999747378752e-06)."""
    return float(f"{float(metadata.get(key, default)):.7g}")


def _int(metadata, key, default=None):
    value = metadata.get(key, default)
    if value is None:
        raise ValueError(f"GGUF metadata has no {key!r}")
    return int(value)


def _model_config(metadata: dict, tensors: dict) -> dict:
    """The mlx-lm / Hugging Face ``config.json`` of a llama GGUF."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    p = "llama."
    if _int(metadata, p + "expert_count", 0) > 0:
        raise ValueError("GGUF llama mixture-of-experts models are not supported")
    hidden = _int(metadata, p + "embedding_length")
    n_heads = _int(metadata, p + "attention.head_count")
    n_kv = _int(metadata, p + "attention.head_count_kv", n_heads)
    head_dim = _int(metadata, p + "attention.key_length", hidden // n_heads)
    if _int(metadata, p + "attention.value_length", head_dim) != head_dim:
        raise ValueError("GGUF key_length != value_length is not supported for llama")
    if _int(metadata, p + "rope.dimension_count", head_dim) != head_dim:
        raise ValueError("GGUF partial rotary embedding (rope.dimension_count != head_dim) is not supported")
    vocab = tensors["token_embd.weight"][1][0]
    theta = _float(metadata, p + "rope.freq_base", 10000.0)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": _int(metadata, p + "block_count"),
        "intermediate_size": _int(metadata, p + "feed_forward_length"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": _float(metadata, p + "attention.layer_norm_rms_epsilon", 1e-5),
        "vocab_size": vocab,
        "max_position_embeddings": _int(metadata, p + "context_length", 2048),
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "rope_traditional": False,
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
        "hidden_act": "silu",
    }
    scaling = metadata.get(p + "rope.scaling.type", "none")
    if scaling == "linear":
        factor = _float(metadata, p + "rope.scaling.factor", 1.0)
        config["rope_scaling"] = {"type": "linear", "rope_type": "linear", "factor": factor}
        config["rope_parameters"] = {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    elif scaling != "none":
        raise ValueError(f"GGUF RoPE scaling {scaling!r} is not supported (only linear)")
    for name in ("bos", "eos", "padding"):
        key = f"tokenizer.ggml.{name}_token_id"
        if key in metadata:
            config[f"{'pad' if name == 'padding' else name}_token_id"] = int(metadata[key])
    return config


def _llama3_rope_scaling(factors: np.ndarray, theta: float, head_dim: int) -> dict:
    """Llama 3.1+ ``rope_scaling`` recovered from llama.cpp's ``rope_freqs`` tensor.

    The file stores only the per-frequency factors; we try the usual
    parameters and keep the ones that reproduce them (else a clear error).
    """
    factors = np.asarray(factors, dtype=np.float64)
    factor = float(factors.max())
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    for original in (8192, 4096, 16384, 32768, 2048, 65536, 131072):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0)):
            smooth = (original / wavelen - low) / (high - low)
            want = np.where(
                wavelen < original / high,
                1.0,
                np.where(wavelen > original / low, factor, 1.0 / ((1 - smooth) / factor + smooth)),
            )
            if want.shape == factors.shape and np.allclose(want, factors, rtol=1e-4, atol=1e-6):
                return {
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low,
                    "high_freq_factor": high,
                    "original_max_position_embeddings": original,
                }
    raise ValueError("GGUF rope_freqs tensor does not match Llama 3 RoPE scaling (not supported)")


def read_gguf(gguf_path, *, unpermute: bool = True) -> tuple[dict, dict]:
    """``(weights, config)``: a llama GGUF's tensors under Hugging Face names.

    Quantized tensors come as MLX affine ``weight``/``scales``/``biases``;
    ``config`` is the ``config.json`` (with ``"quantization"`` when any tensor
    is quantized, per-module overrides where a tensor's bits differ from the
    most common). ``unpermute=False`` keeps llama.cpp's q/k row order, which
    needs ``rope_traditional=True`` (for comparisons only; do not train on it).
    """
    metadata, tensors = read_gguf_header(gguf_path)
    return _load_weights(gguf_path, metadata, tensors, unpermute)


def _load_weights(gguf_path, metadata: dict, tensors: dict, unpermute: bool) -> tuple[dict, dict]:
    import mlx.core as mx

    config = _model_config(metadata, tensors)
    for name, (ttype, _) in tensors.items():
        if ttype not in QUANTIZED_BITS and ttype not in FLOAT_TYPES:
            raise ValueError(
                f"GGUF tensor {name!r} has type {ttype}, which is not supported "
                f"(supported: {', '.join(SUPPORTED)})"
            )
        if name != "rope_freqs.weight":
            _hf_name(name)  # unknown names fail before the (slow) load
    raw = mx.load(str(gguf_path))

    weights, bits = {}, {}
    if "rope_freqs.weight" in tensors:  # Llama 3.1+: factors, not a weight
        factors = np.array(raw.pop("rope_freqs.weight").astype(mx.float32))
        scaling = _llama3_rope_scaling(factors, config["rope_theta"], config["head_dim"])
        config["rope_scaling"] = scaling
        config["rope_parameters"] = {**scaling, "rope_theta": config["rope_theta"]}
    n_heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for name, (ttype, shape) in tensors.items():
        if name == "rope_freqs.weight":
            continue
        base = name.rsplit(".", 1)[0]
        hf = _hf_name(name)
        module = hf.rsplit(".", 1)[0]
        parts = {hf: raw[name]}
        if ttype in QUANTIZED_BITS:
            w, scales = raw[name], raw[f"{base}.scales"]
            got = w.shape[-1] // scales.shape[-1] if scales.shape[-1] * GROUP_SIZE == shape[-1] else None
            if got != QUANTIZED_BITS[ttype]:
                raise ValueError(
                    f"GGUF tensor {name!r} ({ttype}, shape {shape}) loaded as weight {w.shape}, "
                    f"scales {scales.shape}: not {QUANTIZED_BITS[ttype]}-bit groups of {GROUP_SIZE}"
                )
            bits[module] = got
            parts[f"{module}.scales"] = scales
            parts[f"{module}.biases"] = raw[f"{base}.biases"]
        elif ttype == "BF16" and not mx.all(mx.isfinite(raw[name])).item():
            raise ValueError(f"GGUF tensor {name!r} (BF16) overflows float16 when loaded")
        kind = name.split(".")[2] if name.startswith("blk.") else None
        if unpermute and kind in n_heads:
            rows = mx.array(_unpermute_rows(n_heads[kind], shape[0]))
            parts = {k: mx.take(v, rows, axis=0) for k, v in parts.items()}
        weights.update(parts)

    if bits:
        counts = {}
        for b in bits.values():
            counts[b] = counts.get(b, 0) + 1
        default = max(counts, key=lambda b: (counts[b], -b))
        quant = {"group_size": GROUP_SIZE, "bits": default, "mode": "affine"}
        for module, b in sorted(bits.items()):
            if b != default:
                quant[module] = {"group_size": GROUP_SIZE, "bits": b, "mode": "affine"}
        config["quantization"] = quant
        config["quantization_config"] = quant
    floats = [v.dtype for k, v in weights.items() if not k.endswith(("norm.weight", ".biases"))]
    config["torch_dtype"] = "float32" if all(d == mx.float32 for d in floats if d != mx.uint32) else "float16"
    return weights, config


# --------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
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
    token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
    tokens = metadata["tokenizer.ggml.tokens"]
    return tokens[int(token_id)] if token_id is not None and 0 <= int(token_id) < len(tokens) else None


def build_tokenizer(metadata: dict):
    """A ``tokenizers.Tokenizer`` for a GGUF's byte-level BPE (``tokenizer.ggml.model == 'gpt2'``).

    Built the way transformers' own GGUF loader builds it (same vocabulary
    respelling, control tokens as special added tokens, user-defined tokens as
    plain added tokens), with llama.cpp's pre-tokenizer, ``ignore_merges`` and
    default BOS for ``tokenizer.ggml.pre`` (transformers has no ``smollm`` entry
    and so keeps runs of non-ASCII numerals such as ``½²`` together; llama.cpp
    and SmolLM2's own tokenizer split them).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = metadata.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in metadata:
        raise ValueError("GGUF has no tokenizer (no tokenizer.ggml.model / tokens metadata)")
    if kind != "gpt2":
        raise ValueError(
            f"GGUF tokenizer {kind!r} is not supported (only byte-level BPE 'gpt2'); "
            "convert the model from its Hugging Face folder instead"
        )
    pre = metadata.get("tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZERS:
        known = ", ".join(sorted(k for k in PRE_TOKENIZERS if k))
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (known: {known})")
    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")), i)
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]

    split, ignore_merges, _ = PRE_TOKENIZERS[pre]
    try:
        tok = Tokenizer(
            models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges)
        )
    except Exception as e:  # tokenizers raises a bare Exception
        raise ValueError(f"GGUF tokenizer metadata is inconsistent: {e}") from None
    if split is _GPT2:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == _DIGITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()

    control = [t for t, ty in zip(tokens, types) if ty == 3 and set(t) <= alphabet]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, ty in zip(tokens, types) if ty == 4 and t in vocab]
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    add_bos, add_eos = _add_bos_eos(metadata)
    before, after, special = [], [], []
    for add, key, side in ((add_bos, "bos", before), (add_eos, "eos", after)):
        token = _token(metadata, key)
        if add and token is not None:
            side.append(token)
            special.append((token, int(metadata[f"tokenizer.ggml.{key}_token_id"])))
    single = [f"{t}:0" for t in before] + ["$A:0"] + [f"{t}:0" for t in after]
    pair = single + [f"{t}:1" for t in before] + ["$B:1"] + [f"{t}:1" for t in after]
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=list(dict.fromkeys(special))
    )
    return tok


def _add_bos_eos(metadata: dict) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS: the file's flags, else llama.cpp's default for its pre-tokenizer."""
    default_bos = PRE_TOKENIZERS.get(metadata.get("tokenizer.ggml.pre"), (None, False, False))[2]
    return (
        bool(metadata.get("tokenizer.ggml.add_bos_token", default_bos)),
        bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
    )


def _write_tokenizer(tokenizer, metadata: dict, config: dict, folder: Path) -> None:
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
        "add_bos_token": _add_bos_eos(metadata)[0],
        "add_eos_token": _add_bos_eos(metadata)[1],
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    if "tokenizer.chat_template" in metadata:
        tokenizer_config["chat_template"] = metadata["tokenizer.chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False))
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))


# --------------------------------------------------------------------------- writing


def gguf_to_mlx(gguf_path, out_dir) -> Path:
    """Convert a llama-family GGUF to an MLX folder (Hugging Face layout); return ``out_dir``.

    The folder is built beside ``out_dir`` and moved into place at the end,
    so a crash never leaves half a folder. ``out_dir`` must not exist, or be
    an empty folder.
    """
    import mlx.core as mx

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"output folder exists and is not empty: {out_dir}")
    metadata, tensors = read_gguf_header(gguf_path)
    _model_config(metadata, tensors)  # architecture first, then tokenizer, then tensors
    tokenizer = build_tokenizer(metadata)
    weights, config = _load_weights(gguf_path, metadata, tensors, unpermute=True)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2))
        _write_tokenizer(tokenizer, metadata, config, tmp)
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def cache_root() -> Path:
    """``$TIDPO_MLX_CACHE``, else ``$XDG_CACHE_HOME/tidpo-mlx``, else ``~/.cache/tidpo-mlx``."""
    root = os.environ.get("TIDPO_MLX_CACHE")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tidpo-mlx"


def cached_mlx_folder(gguf_path) -> Path:
    """The MLX folder for ``gguf_path``, converted once into the cache.

    Key: file name, size and mtime (and the converter version). A file lock
    makes concurrent processes (distributed ranks) wait for one conversion.
    """
    gguf_path = Path(gguf_path).resolve()
    st = gguf_path.stat()
    digest = hashlib.sha256(
        f"{gguf_path.name}:{st.st_size}:{st.st_mtime_ns}:{CONVERTER_VERSION}".encode()
    ).hexdigest()
    root = cache_root() / "gguf"
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"{gguf_path.stem}-{digest[:12]}"
    if (folder / "config.json").is_file():
        return folder
    with open(root / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (folder / "config.json").is_file():
                if folder.exists():  # not ours: a folder without config.json
                    shutil.rmtree(folder)
                gguf_to_mlx(gguf_path, folder)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return folder


__all__ = [
    "gguf_to_mlx",
    "cached_mlx_folder",
    "read_gguf",
    "read_gguf_header",
    "build_tokenizer",
    "cache_root",
]
