"""Fuzzed GGUF files: ``gguf_to_mlx`` converts each one or fails with a one-line ``ConvertError`` naming it.

The cases (seeded) start from two tiny llama GGUFs (mixed tensor types and a
custom data alignment; K-quants and tied embeddings): truncations at every structural boundary (header
fields, each part of each metadata entry, the first and last items of every
array, each tensor info field, the data start, each tensor's data) and at
random lengths; random byte flips and garbled runs in the header / metadata /
tensor-info region (a few in the tensor data); crafted huge or absurd lengths,
counts, value types, dimension counts, dimensions, tensor types, data offsets
and alignments. ``gguf_to_mlx`` is what ``tidpo-mlx convert gguf-to-mlx`` and
loading a ``.gguf`` model run. The cases run in a child process under an
address-space limit, each under an alarm: a crash by signal (``mx.load``, which
is C++, on a file the reader let through), a hang, a MemoryError or any
exception other than a ``TidpoError`` fails the test and names the case.
"""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from test_gguf import MIXED, k_quant_blocks, tiny_llama

gguf = pytest.importorskip("gguf")

SEED = 1234
ALIGNMENT = 64
MEMORY_LIMIT = 2 * 2**30  # a clean conversion peaks at about 0.7 GiB of address space (MLX, tokenizers)
CASE_SECONDS = 20  # alarm per case; the tiny file converts in ~10 ms
BUDGET_SECONDS = 45  # per base file

# argv: the source file. stdin: one case a line, {"path", "cut", "patches": [[offset, hex]]}: the
# case file is written, converted and deleted (one on disk at a time). stdout: one outcome a line.
HARNESS = textwrap.dedent(
    """
    import json, resource, shutil, signal, sys, traceback
    from pathlib import Path
    resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
    from tidpo_mlx.convert.gguf import gguf_to_mlx
    from tidpo_mlx.errors import TidpoError

    source = Path(sys.argv[1]).read_bytes()
    for line in sys.stdin:
        case = json.loads(line)
        path, data = Path(case["path"]), bytearray(source[: case["cut"]])
        for offset, new in case["patches"]:
            data[offset : offset + len(new) // 2] = bytes.fromhex(new)
        path.write_bytes(data)
        signal.alarm({seconds})  # default action: the process dies by SIGALRM
        try:
            gguf_to_mlx(path, f"{{path}}.mlx")
            result = {{"ok": True}}
        except TidpoError as e:
            result = {{"error": str(e)}}
        except BaseException:
            result = {{"exception": traceback.format_exc()}}
        signal.alarm(0)
        shutil.rmtree(f"{{path}}.mlx", ignore_errors=True)
        path.unlink()
        print(json.dumps(result), flush=True)
    """
)


class Case(NamedTuple):
    """A mutation of the source file: its first ``cut`` bytes (``None``: all) with ``patches`` written over them."""

    name: str
    cut: int | None = None
    patches: tuple[tuple[int, bytes], ...] = ()  # (offset, new bytes)
    must_fail: bool = False  # no valid file can come out of this mutation
    message: str = ""  # what the error message must then contain


class Layout(NamedTuple):
    """Where the base file's fields are (from gguf-py's own reader, not ours)."""

    boundaries: list[int]  # byte offsets where one field or field part ends and the next starts
    u64: dict[str, int]  # name -> offset of a 64-bit length, count, dimension or data offset
    u32: dict[str, int]  # name -> offset of a 32-bit value type, dimension count or tensor type
    data_start: int
    data_end: int  # end of the last tensor's data


def part_offsets(field) -> list[int]:
    """The file offset of each part of a gguf-py ``ReaderField``."""
    offsets, pos = [], field.offset
    for part in field.parts:
        offsets.append(pos)
        pos += part.nbytes
    return offsets + [pos]


def layout(path: Path) -> Layout:
    """Field positions of a GGUF as gguf-py reads it."""
    reader = gguf.GGUFReader(str(path))
    boundaries, u64, u32 = [], {}, {}
    for name, field in reader.fields.items():
        offsets = part_offsets(field)
        boundaries += offsets if len(offsets) <= 16 else offsets[:10] + offsets[-4:]
        if name.startswith("GGUF."):
            if name != "GGUF.version":
                u64[name] = field.offset
            continue
        u64[f"{name}: key length"], u32[f"{name}: value type"] = offsets[0], offsets[2]
        if field.types[0] == gguf.GGUFValueType.STRING:
            u64[f"{name}: string length"] = offsets[3]
        elif field.types[0] == gguf.GGUFValueType.ARRAY:
            u32[f"{name}: element type"], u64[f"{name}: array count"] = offsets[3], offsets[4]
            if field.types[1] == gguf.GGUFValueType.STRING:
                u64[f"{name}: first item length"] = offsets[5]
        elif name == "general.alignment":
            u32["alignment value"] = offsets[3]
    for tensor in reader.tensors:
        offsets = part_offsets(tensor.field)
        boundaries += offsets
        name = tensor.name
        u64[f"{name}: name length"], u32[f"{name}: dimension count"] = offsets[0], offsets[2]
        u64[f"{name}: first dimension"], u64[f"{name}: last dimension"] = offsets[3], offsets[4] - 8
        u32[f"{name}: type"], u64[f"{name}: data offset"] = offsets[4], offsets[5]
        boundaries += [tensor.data_offset, tensor.data_offset + tensor.n_bytes]
    data_end = max(t.data_offset + t.n_bytes for t in reader.tensors)
    return Layout(sorted(set(boundaries)), u64, u32, reader.data_offset, data_end)


def put(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    """``data`` with the little-endian ``fmt`` value at ``offset`` replaced."""
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def packed(offset: int, fmt: str, value: int) -> tuple[tuple[int, bytes]]:
    """The patch that writes ``value`` (little-endian struct format ``fmt``) at ``offset``."""
    return ((offset, struct.pack(fmt, value)),)


def truncations(base: bytes, lay: Layout, rng: random.Random) -> list[Case]:
    """Cut at every structural boundary, just around them, and at random lengths."""
    cuts = {0, 3, 4, 23} | {b + d for b in lay.boundaries for d in (-1, 0, 1)}
    cuts |= {rng.randrange(len(base)) for _ in range(40)}
    cuts = sorted(c for c in cuts if 0 <= c < lay.data_end)
    return [Case(f"truncated at {c}", cut=c, must_fail=True, message="GGUF") for c in cuts]


def flips(base: bytes, lay: Layout, rng: random.Random) -> list[Case]:
    """Random bytes changed in the header region (and a few in the tensor data); garbled runs of 4-32 bytes."""
    cases = []
    for i in range(140):
        end = lay.data_start if i < 120 else len(base)
        patches = tuple((rng.randrange(end), rng.randbytes(1)) for _ in range(rng.randint(1, 4)))
        cases.append(Case(f"flip {i}", patches=patches))
    for _ in range(60):
        n = rng.randint(4, 32)
        start = rng.randrange(lay.data_start - n)
        cases.append(Case(f"garbled {n} bytes at {start}", patches=((start, rng.randbytes(n)),)))
    return cases


def u64_values(base: bytes, offset: int) -> list[tuple[int, bool]]:
    """``(value, must_fail)`` to write in a 64-bit field: neighbours of its value, and sizes no file this big holds."""
    old = struct.unpack_from("<Q", base, offset)[0]
    near = [(v, False) for v in (0, 1, old - 1, old + 1) if 0 <= v < 2**64]
    huge = [2**31, 2**32 + old, 2**63, 2**64 - 1, len(base) + 1]
    return near + [(v, True) for v in huge]


U32_VALUES = [0, 1, 4, 5, 8, 9, 12, 13, 39, 42, 100, 2**31, 2**32 - 1]


def crafted(base: bytes, lay: Layout) -> list[Case]:
    """Every named 64-bit field set to huge values (must fail) and neighbours; 32-bit fields to other types."""
    cases = []
    for name, offset in lay.u64.items():
        for value, must_fail in u64_values(base, offset):
            cases.append(Case(f"{name} = {value}", patches=packed(offset, "<Q", value), must_fail=must_fail))
    for name, offset in lay.u32.items():
        for value in U32_VALUES:
            cases.append(Case(f"{name} = {value}", patches=packed(offset, "<I", value)))
    for value in (0, 3, 48, 2**31) if "alignment value" in lay.u32 else ():  # not a power of two, or too big
        patches = packed(lay.u32["alignment value"], "<I", value)
        cases.append(Case(f"alignment = {value}", patches=patches, must_fail=True))
    return cases


def overlapping(base: bytes, lay: Layout) -> list[Case]:
    """One tensor's data offset moved onto another's, misaligned, or to the end of the data."""
    names = [n.removesuffix(": data offset") for n in lay.u64 if n.endswith(": data offset")]
    first = struct.unpack_from("<Q", base, lay.u64[f"{names[0]}: data offset"])[0]
    cases = []
    for name in names[1:]:
        offset = lay.u64[f"{name}: data offset"]
        old = struct.unpack_from("<Q", base, offset)[0]
        for label, value in (("onto the first", first), ("misaligned", old + 8), ("past the end", len(base))):
            cases.append(Case(f"{name} data offset {label}", patches=packed(offset, "<Q", value), must_fail=True))
    return cases


def all_cases(base: bytes, lay: Layout) -> list[Case]:
    """The seeded fuzz set."""
    rng = random.Random(SEED)
    return truncations(base, lay, rng) + flips(base, lay, rng) + crafted(base, lay) + overlapping(base, lay)


def case_path(folder: Path, index: int) -> Path:
    """Where case ``index`` is written (and named in its error message)."""
    return folder / f"case{index:04d}.gguf"


def run_cases(source: Path, cases: list[Case], folder: Path) -> list[dict]:
    """The harness's outcome for each case; a case that killed its process is ``{"died": how}``, the rest rerun."""
    script = HARNESS.format(limit=MEMORY_LIMIT, seconds=CASE_SECONDS)
    lines = [
        json.dumps({"path": str(case_path(folder, i)), "cut": c.cut, "patches": [[o, b.hex()] for o, b in c.patches]})
        for i, c in enumerate(cases)
    ]
    outcomes = []
    while len(outcomes) < len(lines):
        proc = subprocess.run(
            [sys.executable, "-c", script, str(source)],
            input="\n".join(lines[len(outcomes) :]) + "\n",
            capture_output=True,
            text=True,
            timeout=BUDGET_SECONDS * 2,
        )
        assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
        outcomes += [json.loads(line) for line in proc.stdout.splitlines()]
        if len(outcomes) < len(lines):
            outcomes.append({"died": f"exit status {proc.returncode}: {proc.stderr[-2000:]}"})
    return outcomes


def problem(case: Case, path: Path, outcome: dict) -> str | None:
    """What is wrong with one case's outcome (``None``: a conversion, or a clean error)."""
    if "error" not in outcome:
        if outcome.get("ok") and not case.must_fail:
            return None
        return f"{case.name}: {outcome}"
    message = outcome["error"]
    if "\n" in message or not message.startswith(f"{path}: ") or case.message not in message:
        return f"{case.name}: error message not one line naming the file: {message!r}"
    return None


@pytest.fixture(scope="module", params=["mixed", "k-quants"])
def base_file(request, tmp_path_factory) -> Path:
    """A tiny llama GGUF the cases mutate: Q8_0, Q4_0, Q4_1, F16, F32 and BF16 tensors with the data
    aligned to 64, or tied embeddings, Q2_K and Q6_K tensors and the default alignment (32)."""
    path = tmp_path_factory.mktemp("fuzz") / f"{request.param}.gguf"
    if request.param == "mixed":
        return tiny_llama(path, MIXED, metadata={"general.alignment": ALIGNMENT})[0]
    extra = {
        "blk.0.ffn_down.weight": ((k_quant_blocks("Q2_K", [80, 82]), "Q2_K"), "raw"),
        "blk.1.ffn_down.weight": ((k_quant_blocks("Q6_K", [208]), "Q6_K"), "raw"),
    }
    return tiny_llama(path, {"token_embd": "F16"}, tied=True, ffn=256, extra=extra)[0]


def test_base_file_converts_under_the_memory_limit(base_file, tmp_path):
    """The limit leaves room for a clean conversion, so a failure below is the file's doing."""
    assert run_cases(base_file, [Case("unchanged")], tmp_path) == [{"ok": True}]


def test_fuzzed_gguf_files_fail_cleanly(base_file, tmp_path):
    cases = all_cases(base_file.read_bytes(), layout(base_file))
    assert len(cases) >= 500
    start = time.monotonic()
    outcomes = run_cases(base_file, cases, tmp_path)
    elapsed = time.monotonic() - start
    problems = [p for i, case in enumerate(cases) if (p := problem(case, case_path(tmp_path, i), outcomes[i]))]
    assert not problems, f"{len(problems)} of {len(cases)} cases:\n" + "\n".join(problems[:20])
    print(f"{len(cases)} fuzz cases in {elapsed:.1f} s")
    assert elapsed < BUDGET_SECONDS
