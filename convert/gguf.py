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

The jobs live in their own modules: ``gguf_format`` (the checked header
reader), ``gguf_config`` (metadata -> ``config.json``, expected tensors),
``gguf_weights`` (tensors under Hugging Face names), ``gguf_tokenizer``
(tokenizer files); this one writes the folder and keeps the cache.

    folder = gguf_to_mlx("model.Q8_0.gguf", "model-mlx")
    folder = cached_mlx_folder("model.Q8_0.gguf")   # converted once, then reused
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from tidpo_mlx.convert.gguf_config import model_config
from tidpo_mlx.convert.gguf_format import naming, read_gguf_header
from tidpo_mlx.convert.gguf_tokenizer import build_tokenizer, write_tokenizer_files
from tidpo_mlx.convert.gguf_weights import load_weights, read_gguf
from tidpo_mlx.errors import MissingFileError
from tidpo_mlx.files import cache_root, locked

# Bump when the output of ``gguf_to_mlx`` changes: old cache entries are then ignored.
CONVERTER_VERSION = 1


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
    with naming(gguf_path):
        model_config(metadata, tensors)  # architecture first, then tokenizer, then tensors
        tokenizer = build_tokenizer(metadata)
        weights, config = load_weights(gguf_path, metadata, tensors, unpermute=True)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2))
        write_tokenizer_files(tokenizer, metadata, config, tmp)
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
