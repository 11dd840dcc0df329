"""The GGUF container: tensor types and a header reader that checks every field against the file.

``read_gguf_header`` parses the metadata and tensor infos of a GGUF without
loading any tensor, checking each length, count, dimension and data offset
against the file size before using it, so ``mx.load`` (C++) only ever sees a
file whose structure holds together; the ``meta_*`` helpers read typed
metadata values. Problems are ``GGUFProblem`` (a ``ConvertError``), named
with the file by ``naming``.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tidpo_mlx.errors import ConvertError, MissingFileError, first_line

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

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q"}
_UINT32, _STRING, _ARRAY, _FLOAT64 = 4, 8, 9, 12
_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata entry count
_MIN_ENTRY = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR_INFO = 8 + 4 + 8 + 4 + 8  # name length, dimension count, one dimension, type, offset
_MAX_DIMS = 4  # GGML_MAX_DIMS: MLX's GGUF reader aborts the process on more
_MAX_LEN = 2**31 - 1  # MLX's GGUF reader holds string lengths, array counts and dimensions in an int
_DEFAULT_ALIGNMENT = 32


class GGUFProblem(ConvertError):
    """A malformed or unsupported GGUF, said without the file name (``naming`` adds it)."""


@contextmanager
def naming(gguf_path) -> Iterator[None]:
    """Re-raise a ``GGUFProblem`` inside the block as a one-line ``ConvertError`` starting with the file name."""
    try:
        yield
    except GGUFProblem as e:
        raise ConvertError(f"{gguf_path}: {first_line(e)}") from None


def show(value) -> str:
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
            raise GGUFProblem(
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
            raise GGUFProblem(f"corrupt GGUF: {what} has length {n} (more than MLX's limit {_MAX_LEN})")
        self.need(n * item_bytes, f"{what} ({n} items)" if item_bytes != 1 else what)
        return n

    def string(self, what: str, *, strict: bool = False) -> str:
        """A length-prefixed UTF-8 string (``strict``: invalid UTF-8 is an error, else replaced)."""
        raw = self.take(self.count(what, 1), what)
        try:
            return raw.decode("utf-8", errors="strict" if strict else "replace")
        except UnicodeDecodeError:
            raise GGUFProblem(f"corrupt GGUF: {what} at offset {self.pos - len(raw)} is not UTF-8") from None


def _value_type_problem(vtype: int, key: str) -> GGUFProblem:
    """The error for a metadata value type we do not read."""
    if vtype == _FLOAT64:
        return GGUFProblem(f"metadata {key!r} is float64, which MLX's GGUF reader misreads (it crashes)")
    if vtype == _ARRAY:
        return GGUFProblem(f"metadata {key!r} is an array of arrays, which MLX's GGUF reader does not load")
    return GGUFProblem(f"corrupt GGUF: metadata {key!r} has unknown value type {vtype}")


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
            raise GGUFProblem(f"corrupt GGUF: metadata key {key!r} appears twice")
        vtype = cur.scalar("<I", f"the value type of metadata {key!r}")
        metadata[key] = value = _read_value(cur, vtype, key)
        if key == "general.alignment" and (vtype != _UINT32 or value < 1 or value & (value - 1)):
            raise GGUFProblem(f"GGUF general.alignment must be a uint32 power of two, not {show(value)}")
    return metadata


def _read_tensor_info(cur: _Cursor) -> _TensorInfo:
    """One tensor info: name, dimensions (innermost first in the file), type and data offset."""
    name = cur.string("a tensor name", strict=True)
    n_dims = cur.scalar("<I", f"the dimension count of tensor {name!r}")
    if not 1 <= n_dims <= _MAX_DIMS:
        raise GGUFProblem(f"corrupt GGUF: tensor {name!r} has {n_dims} dimensions (1 to {_MAX_DIMS} are valid)")
    dims = struct.unpack(f"<{n_dims}Q", cur.take(8 * n_dims, f"the dimensions of tensor {name!r}"))
    ttype = cur.scalar("<I", f"the type of tensor {name!r}")
    offset = cur.scalar("<Q", f"the data offset of tensor {name!r}")
    if ttype not in GGML_TYPES:
        raise GGUFProblem(f"corrupt GGUF: tensor {name!r} has unknown GGML type {ttype}")
    shape = tuple(reversed(dims))
    if not all(1 <= d <= _MAX_LEN for d in shape):
        raise GGUFProblem(f"corrupt GGUF: tensor {name!r} has shape {shape} (each dimension 1 to {_MAX_LEN})")
    return _TensorInfo(name, GGML_TYPES[ttype], shape, offset)


def _nbytes(info: _TensorInfo) -> int:
    """Bytes of a tensor's data: whole blocks of its type along each row."""
    block, block_bytes = info.type.block_size, info.type.block_bytes
    if info.shape[-1] % block:
        raise GGUFProblem(
            f"corrupt GGUF: tensor {info.name!r} ({info.type.name}, shape {info.shape}) has rows of "
            f"{info.shape[-1]} values, not whole blocks of {block}"
        )
    return math.prod(info.shape) // block * block_bytes


def _check_data(infos: list[_TensorInfo], data_start: int, size: int, alignment: int) -> None:
    """Every tensor's data aligned, inside the file after ``data_start``, and overlapping no other."""
    if data_start > size:
        raise GGUFProblem(f"truncated GGUF: the tensor data would start at byte {data_start}, the file has {size}")
    end, previous = 0, None
    for info in sorted(infos, key=lambda i: i.offset):
        if info.offset % alignment:
            raise GGUFProblem(
                f"corrupt GGUF: tensor {info.name!r} data offset {info.offset} "
                f"is not a multiple of the alignment {alignment}"
            )
        if info.offset < end:
            raise GGUFProblem(f"corrupt GGUF: the data of tensors {previous!r} and {info.name!r} overlap")
        end, previous = info.offset + _nbytes(info), info.name
        if data_start + end > size:
            raise GGUFProblem(
                f"truncated GGUF: tensor {info.name!r} ({info.type.name}, shape {info.shape}) ends at byte "
                f"{data_start + end}, the file has {size}"
            )


def _read_tensor_infos(cur: _Cursor, count: int, alignment: int) -> dict[str, _TensorInfo]:
    """``count`` tensor infos by name, with their data checked to lie inside the file."""
    infos = {}
    for _ in range(count):
        info = _read_tensor_info(cur)
        if info.name in infos:
            raise GGUFProblem(f"corrupt GGUF: tensor {info.name!r} appears twice")
        infos[info.name] = info
    data_start = cur.pos + (-cur.pos) % alignment
    _check_data(list(infos.values()), data_start, len(cur.data), alignment)
    return infos


def _parse_header(cur: _Cursor) -> tuple[dict, dict]:
    """``(metadata, tensors)`` of the GGUF under ``cur``, every length, count and offset checked."""
    magic, version, n_tensors, n_kv = _HEADER.unpack(cur.take(_HEADER.size, "the GGUF header"))
    if magic != b"GGUF":
        raise GGUFProblem("not a GGUF file (no GGUF magic)")
    if version not in (2, 3):
        raise GGUFProblem(f"GGUF version {version} is not supported (need 2 or 3, little-endian)")
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
    with naming(path):
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < _HEADER.size:
                    raise GGUFProblem(f"not a GGUF file ({size} bytes, shorter than a GGUF header)")
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                    return _parse_header(_Cursor(data))
        except OSError as e:
            raise GGUFProblem(f"cannot read the file: {e.strerror or e}") from None


def is_number(value) -> bool:
    """An int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def meta_float(metadata: dict, key: str, default: float) -> float:
    """A positive finite float32 metadata value, printed short (1e-05, not 9.999999747378752e-06)."""
    value = metadata.get(key, default)
    if not is_number(value) or not math.isfinite(value) or value <= 0:
        raise GGUFProblem(f"GGUF metadata {key!r} is {show(value)}, not a positive number")
    return float(f"{float(value):.7g}")


def meta_int(metadata: dict, key: str, default: int | None = None, minimum: int = 1) -> int:
    """An integer metadata value of at least ``minimum``; ``default`` when absent (``None``: required)."""
    if key not in metadata:
        if default is None:
            raise GGUFProblem(f"GGUF metadata has no {key!r}")
        return default
    value = metadata[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise GGUFProblem(f"GGUF metadata {key!r} is {show(value)}, not an integer >= {minimum}")
    return value


def meta_str(metadata: dict, key: str, default: str | None = None) -> str | None:
    """A string metadata value (``default`` when absent)."""
    value = metadata.get(key, default)
    if value is not None and not isinstance(value, str):
        raise GGUFProblem(f"GGUF metadata {key!r} is {show(value)}, not a string")
    return value


def meta_list(metadata: dict, key: str, kind: type) -> list:
    """A metadata array whose items are all ``kind`` (empty when absent)."""
    value = metadata.get(key, [])
    if not isinstance(value, list) or not all(type(v) is kind for v in value):
        raise GGUFProblem(f"GGUF metadata {key!r} is {show(value)}, not an array of {kind.__name__}")
    return value

