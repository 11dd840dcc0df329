"""Malformed GGUF files: one-line ``ConvertError`` naming the file, before anything is allocated or loaded.

Each test here is a case the converter got wrong before its header reader
checked every length, count and offset against the file: a cut file reported
without its name (or as MLX's RuntimeError), garbled metadata raising
``OverflowError``, a crafted length allocating a gigabyte, values ``mx.load``
crashes on (SIGFPE, SIGABRT, SIGSEGV), metadata of the wrong type or range.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from test_gguf import MIXED, tiny_llama
from test_gguf_fuzz import ALIGNMENT, Case, case_path, layout, packed, put, run_cases
from tidpo_mlx.convert import gguf as conv
from tidpo_mlx.convert.gguf_format import GGML_TYPES
from tidpo_mlx.convert.cli import convert as convert_cli
from tidpo_mlx.errors import ConvertError, MissingFileError

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A valid tiny llama GGUF (mixed tensor types, data aligned to 64)."""
    path = tmp_path_factory.mktemp("untrusted") / "tiny.gguf"
    return tiny_llama(path, MIXED, metadata={"general.alignment": ALIGNMENT})[0]


def variant(tmp_path: Path, data: bytes, name: str = "bad.gguf") -> Path:
    """``data`` written to ``tmp_path / name``."""
    path = tmp_path / name
    path.write_bytes(data)
    return path


def convert_error(path: Path, tmp_path: Path) -> str:
    """The one-line ConvertError ``gguf_to_mlx`` raises for ``path`` (which it names); nothing is written."""
    with pytest.raises(ConvertError) as err:
        conv.gguf_to_mlx(path, tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    assert not (tmp_path / "out").exists()
    return message


def test_ggml_type_table_matches_gguf_py():
    """Block sizes and bytes per block, by type id, as gguf-py (llama.cpp's own package) has them."""
    for type_id, ggml_type in GGML_TYPES.items():
        qtype = gguf.GGMLQuantizationType(type_id)
        assert qtype.name == ggml_type.name
        assert gguf.GGML_QUANT_SIZES[qtype] == (ggml_type.block_size, ggml_type.block_bytes)


def test_truncated_gguf_names_the_file(tiny, tmp_path):
    path = variant(tmp_path, tiny.read_bytes()[: tiny.stat().st_size // 2])
    message = convert_error(path, tmp_path)
    assert "truncated GGUF: tensor" in message and "ends at byte" in message
    result = CliRunner().invoke(convert_cli, ["gguf-to-mlx", str(path), str(tmp_path / "out")])
    assert result.exit_code == 1 and result.output == f"Error: {message}\n"


def test_garbled_metadata_is_a_convert_error(tiny, tmp_path):
    """20 bytes of 0xff over the first metadata key: once an ``OverflowError`` from the read."""
    data = bytearray(tiny.read_bytes())
    data[24:44] = b"\xff" * 20
    assert "a metadata key has length 18446744073709551615" in convert_error(variant(tmp_path, bytes(data)), tmp_path)


HUGE = [
    ("tokenizer.chat_template: string length", 2**30),
    ("tokenizer.ggml.tokens: array count", 2**30),
    ("tokenizer.ggml.tokens: first item length", 2**30),
    ("GGUF.kv_count", 2**40),
    ("GGUF.tensor_count", 2**40),
    ("token_embd.weight: first dimension", 2**30),
]


@pytest.mark.parametrize("field, value", HUGE, ids=[f for f, _ in HUGE])
def test_huge_lengths_and_counts_are_refused_without_allocating(tiny, tmp_path, field, value):
    path = variant(tmp_path, put(tiny.read_bytes(), layout(tiny).u64[field], "<Q", value))
    tracemalloc.start()
    try:
        message = convert_error(path, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "truncated" in message and str(value) in message, message
    assert peak < 16 * 2**20, f"{peak} bytes allocated"


def test_inputs_mx_load_crashes_on_are_refused_first(tiny, tmp_path):
    """Alignment 0 (SIGFPE), 9 dimensions (SIGABRT) and a float64 value (SIGSEGV) inside ``mx.load``."""
    lay = layout(tiny)
    float64, _ = tiny_llama(tmp_path / "float64.gguf", {}, metadata={"general.x": np.float64(0.5)})
    runs = [
        (tiny, Case("alignment 0", patches=packed(lay.u32["alignment value"], "<I", 0)), "general.alignment"),
        (tiny, Case("9 dims", patches=packed(lay.u32["output.weight: dimension count"], "<I", 9)), "9 dimensions"),
        (float64, Case("float64 value"), "float64"),
    ]
    for i, (source, case, words) in enumerate(runs):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        [outcome] = run_cases(source, [case], folder)
        message = outcome.get("error", str(outcome))
        assert message.startswith(f"{case_path(folder, 0)}: ") and words in message, message


BAD_METADATA = [
    ({"llama.attention.head_count": 0}, "'llama.attention.head_count' is 0, not an integer >= 1"),
    ({"llama.block_count": "two"}, "'llama.block_count' is 'two', not an integer"),
    ({"llama.block_count": 3}, "block_count is 3, but the file has only 21 tensors"),
    ({"llama.rope.freq_base": -1.0}, "'llama.rope.freq_base' is -1.0, not a positive number"),
    ({"llama.attention.head_count_kv": 3}, "4 heads, 3 KV heads"),
    ({"llama.feed_forward_length": 96}, "'blk.0.ffn_gate.weight' has shape (128, 64), the metadata needs (96, 64)"),
    ({"llama.rope.scaling.type": "yarn"}, "RoPE scaling 'yarn' is not supported"),
]


@pytest.mark.parametrize("metadata, words", BAD_METADATA, ids=[str(m) for m, _ in BAD_METADATA])
def test_bad_metadata_values_are_named(tmp_path, metadata, words):
    path, _ = tiny_llama(tmp_path / "bad.gguf", MIXED, metadata=metadata)
    message = convert_error(path, tmp_path)
    assert words in message, message


def test_missing_and_non_gguf_files(tmp_path):
    with pytest.raises(MissingFileError, match="GGUF file not found"):
        conv.gguf_to_mlx(tmp_path / "none.gguf", tmp_path / "out")
    assert "not a GGUF file (no GGUF magic)" in convert_error(variant(tmp_path, b"PK\x03\x04" + bytes(60)), tmp_path)
    assert "shorter than a GGUF header" in convert_error(variant(tmp_path, b"GGUF"), tmp_path)
    version = variant(tmp_path, b"GGUF" + (3 << 24).to_bytes(4, "little") + bytes(16))  # big-endian
    assert "GGUF version 50331648 is not supported" in convert_error(version, tmp_path)


@pytest.mark.slow
def test_smollm2_cut_after_5_mb_names_the_file(tmp_path):
    from tidpo_mlx import builtin

    source = builtin.builtin_gguf("smollm2-135m-instruct")
    with open(source, "rb") as f:
        path = variant(tmp_path, f.read(5 * 2**20), "smol.gguf")
    message = convert_error(path, tmp_path)
    assert "truncated GGUF: tensor 'token_embd.weight'" in message, message
