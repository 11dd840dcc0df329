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

import hashlib
import json
import math
import mmap
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tidpo_mlx.errors import ConvertError, MissingFileError, first_line
from tidpo_mlx.files import cache_root, locked

# Bump when the output of ``gguf_to_mlx`` changes: old cache entries are then ignored.
CONVERTER_VERSION = 1

GROUP_SIZE = 32  # MLX's GGUF reader always uses 32 (the GGUF block size)


class GGMLType(NamedTuple):
    """A GGML tensor type: its name and storage (``block_size`` values in ``block_bytes`` bytes)."""

    name: str
    block_size: int
    block_bytes: int


# GGML tensor types by id (ggml.h) with their block layout (ggml.c type_traits).
# fmt: off
GGML_TYPES = {
    0: GGMLType("F32", 1, 4), 1: GGMLType("F16", 1, 2), 2: GGMLType("Q4_0", 32, 18),
    3: GGMLType("Q4_1", 32, 20), 6: GGMLType("Q5_0", 32, 22), 7: GGMLType("Q5_1", 32, 24),
    8: GGMLType("Q8_0", 32, 34), 9: GGMLType("Q8_1", 32, 40), 10: GGMLType("Q2_K", 256, 84),
    11: GGMLType("Q3_K", 256, 110), 12: GGMLType("Q4_K", 256, 144), 13: GGMLType("Q5_K", 256, 176),
    14: GGMLType("Q6_K", 256, 210), 15: GGMLType("Q8_K", 256, 292), 16: GGMLType("IQ2_XXS", 256, 66),
    17: GGMLType("IQ2_XS", 256, 74), 18: GGMLType("IQ3_XXS", 256, 98), 19: GGMLType("IQ1_S", 256, 50),
    20: GGMLType("IQ4_NL", 32, 18), 21: GGMLType("IQ3_S", 256, 110), 22: GGMLType("IQ2_S", 256, 82),
    23: GGMLType("IQ4_XS", 256, 136), 24: GGMLType("I8", 1, 1), 25: GGMLType("I16", 1, 2),
    26: GGMLType("I32", 1, 4), 27: GGMLType("I64", 1, 8), 28: GGMLType("F64", 1, 8),
    29: GGMLType("IQ1_M", 256, 56), 30: GGMLType("BF16", 1, 2), 34: GGMLType("TQ1_0", 256, 54),
    35: GGMLType("TQ2_0", 256, 66), 39: GGMLType("MXFP4", 32, 17), 40: GGMLType("NVFP4", 64, 36),
    41: GGMLType("Q1_0", 128, 18),
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

# GGUF metadata value types: fixed-size scalars (struct / numpy format), string, array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q"}
_UINT32, _STRING, _ARRAY, _FLOAT64 = 4, 8, 9, 12
_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata entry count
_MIN_ENTRY = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR_INFO = 8 + 4 + 8 + 4 + 8  # name length, dimension count, one dimension, type, offset
_MAX_DIMS = 4  # GGML_MAX_DIMS: MLX's GGUF reader aborts the process on more
_MAX_LEN = 2**31 - 1  # MLX's GGUF reader holds string lengths, array counts and dimensions in an int
_DEFAULT_ALIGNMENT = 32


class _Problem(ConvertError):
    """A malformed or unsupported GGUF, said without the file name (``_naming`` adds it)."""


@contextmanager
def _naming(gguf_path) -> Iterator[None]:
    """Re-raise a ``_Problem`` inside the block as a one-line ``ConvertError`` starting with the file name."""
    try:
        yield
    except _Problem as e:
        raise ConvertError(f"{gguf_path}: {first_line(e)}") from None


def _show(value) -> str:
    """A metadata value for a message: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _TensorInfo(NamedTuple):
    """A tensor as the GGUF header describes it; ``shape`` is row-major (``mx.load``'s order)."""

    name: str
    type: GGMLType
    shape: tuple[int, ...]
    offset: int  # from the start of the data section


class _Cursor:
    """Little-endian fields of a mapped GGUF, each checked against the bytes left before it is read."""

    def __init__(self, data: mmap.mmap) -> None:
        self.data, self.pos = data, 0

    def need(self, n: int, what: str) -> None:
        """Fail unless ``n`` more bytes are left for ``what``."""
        left = len(self.data) - self.pos
        if n > left:
            raise _Problem(
                f"truncated or corrupt GGUF: {what} needs {n} bytes at offset {self.pos}, the file has {left} left"
            )

    def take(self, n: int, what: str) -> bytes:
        """The next ``n`` bytes (checked first)."""
        self.need(n, what)
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def scalar(self, fmt: str, what: str):
        """The next value of struct format ``fmt``."""
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def count(self, what: str, item_bytes: int) -> int:
        """A 64-bit length or count of items of at least ``item_bytes`` bytes that all fit in the file."""
        n = self.scalar("<Q", f"the length of {what}")
        if n > _MAX_LEN:
            raise _Problem(f"corrupt GGUF: {what} has length {n} (more than MLX's limit {_MAX_LEN})")
        self.need(n * item_bytes, f"{what} ({n} items)" if item_bytes != 1 else what)
        return n

    def string(self, what: str, *, strict: bool = False) -> str:
        """A length-prefixed UTF-8 string (``strict``: invalid UTF-8 is an error, else replaced)."""
        raw = self.take(self.count(what, 1), what)
        try:
            return raw.decode("utf-8", errors="strict" if strict else "replace")
        except UnicodeDecodeError:
            raise _Problem(f"corrupt GGUF: {what} at offset {self.pos - len(raw)} is not UTF-8") from None


def _value_type_problem(vtype: int, key: str) -> _Problem:
    """The error for a metadata value type we do not read."""
    if vtype == _FLOAT64:
        return _Problem(f"metadata {key!r} is float64, which MLX's GGUF reader misreads (it crashes)")
    if vtype == _ARRAY:
        return _Problem(f"metadata {key!r} is an array of arrays, which MLX's GGUF reader does not load")
    return _Problem(f"corrupt GGUF: metadata {key!r} has unknown value type {vtype}")


def _read_array(cur: _Cursor, key: str) -> list:
    """A metadata array: strings or fixed-size scalars (MLX loads no other kind)."""
    etype = cur.scalar("<I", f"the element type of metadata {key!r}")
    what = f"metadata {key!r}"
    if etype == _STRING:
        return [cur.string(what) for _ in range(cur.count(what, 8))]
    if etype not in _SCALARS:
        raise _value_type_problem(etype, key)
    dtype = np.dtype(_SCALARS[etype])
    n = cur.count(what, dtype.itemsize)
    return np.frombuffer(cur.take(n * dtype.itemsize, what), dtype).tolist()


def _read_value(cur: _Cursor, vtype: int, key: str):
    """A metadata value of type ``vtype``."""
    if vtype == _STRING:
        return cur.string(f"metadata {key!r}")
    if vtype == _ARRAY:
        return _read_array(cur, key)
    if vtype in _SCALARS:
        return cur.scalar(_SCALARS[vtype], f"metadata {key!r}")
    raise _value_type_problem(vtype, key)


def _read_metadata(cur: _Cursor, count: int) -> dict:
    """``count`` metadata entries; a key may appear once, ``general.alignment`` must be a power of two."""
    metadata = {}
    for _ in range(count):
        key = cur.string("a metadata key", strict=True)
        if key in metadata:
            raise _Problem(f"corrupt GGUF: metadata key {key!r} appears twice")
        vtype = cur.scalar("<I", f"the value type of metadata {key!r}")
        metadata[key] = value = _read_value(cur, vtype, key)
        if key == "general.alignment" and (vtype != _UINT32 or value < 1 or value & (value - 1)):
            raise _Problem(f"GGUF general.alignment must be a uint32 power of two, not {_show(value)}")
    return metadata


def _read_tensor_info(cur: _Cursor) -> _TensorInfo:
    """One tensor info: name, dimensions (innermost first in the file), type and data offset."""
    name = cur.string("a tensor name", strict=True)
    n_dims = cur.scalar("<I", f"the dimension count of tensor {name!r}")
    if not 1 <= n_dims <= _MAX_DIMS:
        raise _Problem(f"corrupt GGUF: tensor {name!r} has {n_dims} dimensions (1 to {_MAX_DIMS} are valid)")
    dims = struct.unpack(f"<{n_dims}Q", cur.take(8 * n_dims, f"the dimensions of tensor {name!r}"))
    ttype = cur.scalar("<I", f"the type of tensor {name!r}")
    offset = cur.scalar("<Q", f"the data offset of tensor {name!r}")
    if ttype not in GGML_TYPES:
        raise _Problem(f"corrupt GGUF: tensor {name!r} has unknown GGML type {ttype}")
    shape = tuple(reversed(dims))
    if not all(1 <= d <= _MAX_LEN for d in shape):
        raise _Problem(f"corrupt GGUF: tensor {name!r} has shape {shape} (each dimension 1 to {_MAX_LEN})")
    return _TensorInfo(name, GGML_TYPES[ttype], shape, offset)


def _nbytes(info: _TensorInfo) -> int:
    """Bytes of a tensor's data: whole blocks of its type along each row."""
    block, block_bytes = info.type.block_size, info.type.block_bytes
    if info.shape[-1] % block:
        raise _Problem(
            f"corrupt GGUF: tensor {info.name!r} ({info.type.name}, shape {info.shape}) has rows of "
            f"{info.shape[-1]} values, not whole blocks of {block}"
        )
    return math.prod(info.shape) // block * block_bytes


def _check_data(infos: list[_TensorInfo], data_start: int, size: int, alignment: int) -> None:
    """Every tensor's data aligned, inside the file after ``data_start``, and overlapping no other."""
    if data_start > size:
        raise _Problem(f"truncated GGUF: the tensor data would start at byte {data_start}, the file has {size}")
    end, previous = 0, None
    for info in sorted(infos, key=lambda i: i.offset):
        if info.offset % alignment:
            raise _Problem(
                f"corrupt GGUF: tensor {info.name!r} data offset {info.offset} "
                f"is not a multiple of the alignment {alignment}"
            )
        if info.offset < end:
            raise _Problem(f"corrupt GGUF: the data of tensors {previous!r} and {info.name!r} overlap")
        end, previous = info.offset + _nbytes(info), info.name
        if data_start + end > size:
            raise _Problem(
                f"truncated GGUF: tensor {info.name!r} ({info.type.name}, shape {info.shape}) ends at byte "
                f"{data_start + end}, the file has {size}"
            )


def _read_tensor_infos(cur: _Cursor, count: int, alignment: int) -> dict[str, _TensorInfo]:
    """``count`` tensor infos by name, with their data checked to lie inside the file."""
    infos = {}
    for _ in range(count):
        info = _read_tensor_info(cur)
        if info.name in infos:
            raise _Problem(f"corrupt GGUF: tensor {info.name!r} appears twice")
        infos[info.name] = info
    data_start = cur.pos + (-cur.pos) % alignment
    _check_data(list(infos.values()), data_start, len(cur.data), alignment)
    return infos


def _parse_header(cur: _Cursor) -> tuple[dict, dict]:
    """``(metadata, tensors)`` of the GGUF under ``cur``, every length, count and offset checked."""
    magic, version, n_tensors, n_kv = _HEADER.unpack(cur.take(_HEADER.size, "the GGUF header"))
    if magic != b"GGUF":
        raise _Problem("not a GGUF file (no GGUF magic)")
    if version not in (2, 3):
        raise _Problem(f"GGUF version {version} is not supported (need 2 or 3, little-endian)")
    cur.need(n_kv * _MIN_ENTRY + n_tensors * _MIN_TENSOR_INFO, f"{n_kv} metadata entries and {n_tensors} tensor infos")
    metadata = _read_metadata(cur, n_kv)
    infos = _read_tensor_infos(cur, n_tensors, metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    return metadata, {name: (info.type.name, info.shape) for name, info in infos.items()}


def read_gguf_header(gguf_path) -> tuple[dict, dict]:
    """``(metadata, tensors)`` of a GGUF file, read without loading any tensor.

    ``metadata`` maps keys to Python values (numeric arrays as lists);
    ``tensors`` maps tensor names to ``(type_name, shape)`` with the shape in
    row-major order (as ``mx.load`` gives it, before any quantization packing).
    Every length, count, dimension and data offset is checked against the file
    size before it is used, so nothing is allocated for a corrupt value and
    ``mx.load`` (C++) only ever sees a file whose structure holds together;
    anything else is a one-line ``ConvertError`` naming the file.
    """
    path = Path(gguf_path)
    if not path.is_file():
        raise MissingFileError(f"GGUF file not found: {path}")
    with _naming(path):
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < _HEADER.size:
                    raise _Problem(f"not a GGUF file ({size} bytes, shorter than a GGUF header)")
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                    return _parse_header(_Cursor(data))
        except OSError as e:
            raise _Problem(f"cannot read the file: {e.strerror or e}") from None


def _hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in TOP_NAMES:
        return f"{TOP_NAMES[parts[0]]}.{parts[1]}"
    raise _Problem(f"GGUF tensor {gguf_name!r} has no llama counterpart (not supported)")


def _unpermute_rows(n_heads: int, rows: int) -> np.ndarray:
    """Row indices that undo llama.cpp's q/k permutation (``LlamaModel.permute``).

    llama.cpp writes ``w.reshape(n, 2, d/2, ...).swapaxes(1, 2)``, i.e. row
    ``perm[i]`` of the Hugging Face matrix lands at row ``i``; the inverse
    gathers with ``argsort(perm)``.
    """
    head_dim = rows // n_heads
    perm = np.arange(rows).reshape(n_heads, 2, head_dim // 2).swapaxes(1, 2).reshape(-1)
    return np.argsort(perm)


def _is_number(value) -> bool:
    """An int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _float(metadata: dict, key: str, default: float) -> float:
    """A positive finite float32 metadata value, printed short (1e-05, not 9.999999747378752e-06)."""
    value = metadata.get(key, default)
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise _Problem(f"GGUF metadata {key!r} is {_show(value)}, not a positive number")
    return float(f"{float(value):.7g}")


def _int(metadata: dict, key: str, default: int | None = None, minimum: int = 1) -> int:
    """An integer metadata value of at least ``minimum``; ``default`` when absent (``None``: required)."""
    if key not in metadata:
        if default is None:
            raise _Problem(f"GGUF metadata has no {key!r}")
        return default
    value = metadata[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _Problem(f"GGUF metadata {key!r} is {_show(value)}, not an integer >= {minimum}")
    return value


def _str(metadata: dict, key: str, default: str | None = None) -> str | None:
    """A string metadata value (``default`` when absent)."""
    value = metadata.get(key, default)
    if value is not None and not isinstance(value, str):
        raise _Problem(f"GGUF metadata {key!r} is {_show(value)}, not a string")
    return value


def _list(metadata: dict, key: str, kind: type) -> list:
    """A metadata array whose items are all ``kind`` (empty when absent)."""
    value = metadata.get(key, [])
    if not isinstance(value, list) or not all(type(v) is kind for v in value):
        raise _Problem(f"GGUF metadata {key!r} is {_show(value)}, not an array of {kind.__name__}")
    return value


def _attention(metadata: dict) -> dict:
    """Head counts and head size of a llama GGUF, checked to fit together."""
    p = "llama.attention."
    hidden = _int(metadata, "llama.embedding_length")
    n_heads = _int(metadata, p + "head_count")
    n_kv = _int(metadata, p + "head_count_kv", n_heads)
    head_dim = _int(metadata, p + "key_length", hidden // n_heads)
    if head_dim < 2 or head_dim % 2 or n_heads % n_kv:
        raise _Problem(
            f"GGUF attention does not fit together: {n_heads} heads, {n_kv} KV heads, head size {head_dim} "
            "(need an even head size and heads a multiple of KV heads)"
        )
    if _int(metadata, p + "value_length", head_dim) != head_dim:
        raise _Problem("GGUF key_length != value_length is not supported for llama")
    if _int(metadata, "llama.rope.dimension_count", head_dim) != head_dim:
        raise _Problem("GGUF partial rotary embedding (rope.dimension_count != head_dim) is not supported")
    return {"hidden_size": hidden, "num_attention_heads": n_heads, "num_key_value_heads": n_kv, "head_dim": head_dim}


def _rope(metadata: dict) -> dict:
    """``rope_theta``, ``rope_parameters`` and (linear scaling) ``rope_scaling`` of a llama GGUF."""
    theta = _float(metadata, "llama.rope.freq_base", 10000.0)
    scaling = _str(metadata, "llama.rope.scaling.type", "none")
    if scaling == "none":
        return {"rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    if scaling != "linear":
        raise _Problem(f"GGUF RoPE scaling {scaling!r} is not supported (only linear)")
    factor = _float(metadata, "llama.rope.scaling.factor", 1.0)
    return {
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "linear", "rope_theta": theta, "factor": factor},
        "rope_scaling": {"type": "linear", "rope_type": "linear", "factor": factor},
    }


def _model_config(metadata: dict, tensors: dict) -> dict:
    """The mlx-lm / Hugging Face ``config.json`` of a llama GGUF."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise _Problem(f"GGUF architecture {_show(arch)} is not supported (only 'llama')")
    p = "llama."
    if _int(metadata, p + "expert_count", 0, minimum=0) > 0:
        raise _Problem("GGUF llama mixture-of-experts models are not supported")
    if "token_embd.weight" not in tensors:
        raise _Problem("GGUF has no tensor 'token_embd.weight'")
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        **_attention(metadata),
        "num_hidden_layers": _int(metadata, p + "block_count"),
        "intermediate_size": _int(metadata, p + "feed_forward_length"),
        "rms_norm_eps": _float(metadata, p + "attention.layer_norm_rms_epsilon", 1e-5),
        "vocab_size": tensors["token_embd.weight"][1][0],
        "max_position_embeddings": _int(metadata, p + "context_length", 2048),
        **_rope(metadata),
        "rope_traditional": False,
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
        "hidden_act": "silu",
    }
    for name in ("bos", "eos", "padding"):
        key = f"tokenizer.ggml.{name}_token_id"
        if key in metadata:
            config[f"{'pad' if name == 'padding' else name}_token_id"] = _int(metadata, key, minimum=0)
    return config


def _expected_shapes(config: dict, tensors: dict) -> dict[str, tuple[int, ...]]:
    """The row-major shape of every tensor a llama GGUF with ``config`` holds."""
    h, hd, ffn, vocab = config["hidden_size"], config["head_dim"], config["intermediate_size"], config["vocab_size"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    layer = {
        "attn_q": (q, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, q), "ffn_gate": (ffn, h),
        "ffn_up": (ffn, h), "ffn_down": (h, ffn), "attn_norm": (h,), "ffn_norm": (h,),
    }  # fmt: skip
    biases = ["attn_q", "attn_k", "attn_v", "attn_output"] * config["attention_bias"]
    biases += ["ffn_gate", "ffn_up", "ffn_down"] * config["mlp_bias"]
    shapes = {"token_embd.weight": (vocab, h), "output_norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["output.weight"] = (vocab, h)
    if "rope_freqs.weight" in tensors:
        shapes["rope_freqs.weight"] = (hd // 2,)
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"blk.{i}.{short}.weight": shape for short, shape in layer.items()})
        shapes.update({f"blk.{i}.{short}.bias": layer[short][:1] for short in biases})
    return shapes


def _check_tensors(config: dict, tensors: dict) -> None:
    """Every tensor a llama of ``config`` needs, no other, each of its shape and a supported type.

    Run before ``mx.load``: what the (slow, C++) load gives back then fits the model.
    """
    n_layers = config["num_hidden_layers"]
    if n_layers * len(LAYER_NAMES) > len(tensors):
        raise _Problem(f"GGUF block_count is {n_layers}, but the file has only {len(tensors)} tensors")
    want = _expected_shapes(config, tensors)
    for name, (ttype, shape) in tensors.items():
        if name not in want:
            raise _Problem(f"GGUF tensor {name!r} has no llama counterpart (not supported)")
        if shape != want[name]:
            raise _Problem(f"GGUF tensor {name!r} has shape {shape}, the metadata needs {want[name]}")
        if ttype not in QUANTIZED_BITS and ttype not in FLOAT_TYPES:
            raise _Problem(
                f"GGUF tensor {name!r} has type {ttype}, which is not supported (supported: {', '.join(SUPPORTED)})"
            )
    missing = sorted(set(want) - set(tensors))
    if missing:
        raise _Problem(f"GGUF has no tensor {missing[0]!r} ({len(missing)} missing)")


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
    raise _Problem("GGUF rope_freqs tensor does not match Llama 3 RoPE scaling (not supported)")


def read_gguf(gguf_path, *, unpermute: bool = True) -> tuple[dict, dict]:
    """``(weights, config)``: a llama GGUF's tensors under Hugging Face names.

    Quantized tensors come as MLX affine ``weight``/``scales``/``biases``;
    ``config`` is the ``config.json`` (with ``"quantization"`` when any tensor
    is quantized, per-module overrides where a tensor's bits differ from the
    most common). ``unpermute=False`` keeps llama.cpp's q/k row order, which
    needs ``rope_traditional=True`` (for comparisons only; do not train on it).
    A malformed or unsupported file is a one-line ``ConvertError`` naming it.
    """
    metadata, tensors = read_gguf_header(gguf_path)
    with _naming(gguf_path):
        return _load_weights(gguf_path, metadata, tensors, unpermute)


def _quantized_parts(raw: dict, name: str, ttype: str, shape: tuple, module: str) -> tuple[dict, int]:
    """``({module}.scales / .biases: array}, bits)`` of a quantized tensor as ``mx.load`` gave it."""
    base = name.rsplit(".", 1)[0]
    w, scales = raw[name], raw[f"{base}.scales"]
    got = w.shape[-1] // scales.shape[-1] if scales.shape[-1] * GROUP_SIZE == shape[-1] else None
    if got != QUANTIZED_BITS[ttype]:
        raise _Problem(
            f"GGUF tensor {name!r} ({ttype}, shape {shape}) loaded as weight {w.shape}, "
            f"scales {scales.shape}: not {QUANTIZED_BITS[ttype]}-bit groups of {GROUP_SIZE}"
        )
    return {f"{module}.scales": scales, f"{module}.biases": raw[f"{base}.biases"]}, got


def _quantization_config(bits: dict[str, int]) -> dict:
    """``quantization`` / ``quantization_config``: the most common bits, overrides for the other modules."""
    counts = {}
    for b in bits.values():
        counts[b] = counts.get(b, 0) + 1
    default = max(counts, key=lambda b: (counts[b], -b))
    quant = {"group_size": GROUP_SIZE, "bits": default, "mode": "affine"}
    for module, b in sorted(bits.items()):
        if b != default:
            quant[module] = {"group_size": GROUP_SIZE, "bits": b, "mode": "affine"}
    return {"quantization": quant, "quantization_config": quant}


def _load_weights(gguf_path, metadata: dict, tensors: dict, unpermute: bool) -> tuple[dict, dict]:
    """``(weights, config)`` of a GGUF whose header is ``(metadata, tensors)``, checked before ``mx.load``."""
    import mlx.core as mx

    config = _model_config(metadata, tensors)
    _check_tensors(config, tensors)
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
        hf = _hf_name(name)
        module = hf.rsplit(".", 1)[0]
        parts = {hf: raw[name]}
        if ttype in QUANTIZED_BITS:
            extra, bits[module] = _quantized_parts(raw, name, ttype, shape, module)
            parts.update(extra)
        elif ttype == "BF16" and not mx.all(mx.isfinite(raw[name])).item():
            raise _Problem(f"GGUF tensor {name!r} (BF16) overflows float16 when loaded")
        kind = name.split(".")[2] if name.startswith("blk.") else None
        if unpermute and kind in n_heads:
            rows = mx.array(_unpermute_rows(n_heads[kind], shape[0]))
            parts = {k: mx.take(v, rows, axis=0) for k, v in parts.items()}
        weights.update(parts)

    if bits:
        config.update(_quantization_config(bits))
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
    """The text of the ``tokenizer.ggml.{key}_token_id`` token (``None``: no such id, or out of range)."""
    token_id = _int(metadata, f"tokenizer.ggml.{key}_token_id", -1, minimum=0)
    tokens = metadata["tokenizer.ggml.tokens"]
    return tokens[token_id] if 0 <= token_id < len(tokens) else None


def _tokenizer_metadata(metadata: dict) -> tuple[list[str], list[int], list[tuple[str, str]], str | None]:
    """``(tokens, token types, merges, pre-tokenizer)`` of a byte-level BPE GGUF, each checked."""
    kind = _str(metadata, "tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in metadata:
        raise _Problem("GGUF has no tokenizer (no tokenizer.ggml.model / tokens metadata)")
    if kind != "gpt2":
        raise _Problem(
            f"GGUF tokenizer {_show(kind)} is not supported (only byte-level BPE 'gpt2'); "
            "convert the model from its Hugging Face folder instead"
        )
    pre = _str(metadata, "tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZERS:
        known = ", ".join(sorted(k for k in PRE_TOKENIZERS if k))
        raise _Problem(f"GGUF pre-tokenizer {_show(pre)} is not supported (known: {known})")
    tokens = _list(metadata, "tokenizer.ggml.tokens", str)
    types = _list(metadata, "tokenizer.ggml.token_type", int) or [1] * len(tokens)
    if len(types) != len(tokens):
        raise _Problem(f"GGUF has {len(tokens)} tokens but {len(types)} token types")
    merges = [tuple(m.split(" ", 1)) for m in _list(metadata, "tokenizer.ggml.merges", str)]
    if any(len(m) != 2 for m in merges):
        raise _Problem("GGUF tokenizer.ggml.merges has an entry that is not two tokens separated by a space")
    _str(metadata, "tokenizer.chat_template")  # written to tokenizer_config.json as it is
    return tokens, types, merges, pre


@contextmanager
def _tokenizers_errors() -> Iterator[None]:
    """The ``tokenizers`` library's errors about its input (bare exceptions) as a ``_Problem``."""
    try:
        yield
    except Exception as e:
        raise _Problem(f"GGUF tokenizer metadata is inconsistent: {first_line(e)}") from None


def _post_processor(metadata: dict):
    """``TemplateProcessing`` that adds BOS / EOS as the file (or its pre-tokenizer's default) asks."""
    from tokenizers import processors

    add_bos, add_eos = _add_bos_eos(metadata)
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
    spelling = _bytes_to_unicode()
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


def _add_bos_eos(metadata: dict) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS: the file's flags, else llama.cpp's default for its pre-tokenizer."""
    default_bos = PRE_TOKENIZERS.get(metadata.get("tokenizer.ggml.pre"), (None, False, False))[2]
    return (
        bool(metadata.get("tokenizer.ggml.add_bos_token", default_bos)),
        bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
    )


def _write_tokenizer(tokenizer, metadata: dict, config: dict, folder: Path) -> None:
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
    an empty folder. A malformed or unsupported GGUF is a one-line
    ``ConvertError`` naming the file, raised before anything is written.
    """
    import mlx.core as mx

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise MissingFileError(f"GGUF file not found: {gguf_path}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"output folder exists and is not empty: {out_dir}")
    metadata, tensors = read_gguf_header(gguf_path)
    with _naming(gguf_path):
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
    with locked(root / f"{folder.name}.lock"):
        if not (folder / "config.json").is_file():
            if folder.exists():  # not ours: a folder without config.json
                shutil.rmtree(folder)
            gguf_to_mlx(gguf_path, folder)
    return folder


__all__ = [
    "gguf_to_mlx",
    "cached_mlx_folder",
    "read_gguf",
    "read_gguf_header",
    "build_tokenizer",
    "cache_root",
]
