"""Dataset encoding speed (issue 13): cold pairs/s and the warm (cached) load time.

    python benchmarks/encode_speed.py [--pairs 160000] [--keep DIR]

Generates ``--pairs`` multi-turn Anthropic-HH-like rows (implicit prompt:
``chosen``/``rejected`` transcripts sharing 1-3 earlier turns; median about 180
tokens per templated pair) as ``train.jsonl`` plus a ``valid.jsonl`` of 5 %
more, then loads them with ``tidpo_mlx.data.load_dataset`` and the tokenizer of
the built-in ``smollm2-135m-instruct`` twice into a fresh encoded-dataset cache:
the first load encodes (cold), then three fresh processes, like later runs, read
the cache (warm). Prints pairs/s of the cold load, the warm load time and the
machine's load average (the figures move with whatever else runs on the machine).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tidpo_mlx

tidpo_mlx.setup()  # the fast BLAS, before the first import of mlx

from chat_data import hh_row  # noqa: E402


def write_data(folder: Path, pairs: int, seed: int = 0) -> None:
    """``train.jsonl`` of ``pairs`` rows and ``valid.jsonl`` of 5 % more."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", pairs), ("valid", max(8, pairs // 20))):
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(n):
                f.write(json.dumps(hh_row(rng)) + "\n")


WARM = """
import sys, time, hashlib
import tidpo_mlx
tidpo_mlx.setup()
from mlx_lm.utils import load_tokenizer
from tidpo_mlx.config import Config
from tidpo_mlx.data import load_dataset
from tidpo_mlx.models import resolve_model
tokenizer = load_tokenizer(resolve_model("smollm2-135m-instruct"))
t0 = time.perf_counter()
data = load_dataset(sys.argv[1], tokenizer, Config(max_length=1024, max_prompt_length=512))
print(time.perf_counter() - t0, hashlib.sha256(repr([e.chosen for e in data.train]).encode()).hexdigest())
"""


WARM_RUNS = 3
"""Warm loads measured, each in a new process: the first, right after the cold load, is the slowest (in a
VM, memory the cold load just freed is slow to fault back in)."""


def warm_load(folder: Path) -> tuple[float, str]:
    """Seconds a second run (a fresh process) takes to load the data from the cache, and a digest of it."""
    out = subprocess.run([sys.executable, "-c", WARM, str(folder)], check=True, capture_output=True, text=True)
    seconds, digest = out.stdout.split()
    return float(seconds), digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=160_000, help="train pairs to generate (valid: 5 %% more)")
    parser.add_argument("--keep", type=Path, help="write the data here (kept) instead of a temporary folder")
    args = parser.parse_args()

    from mlx_lm.utils import load_tokenizer

    from tidpo_mlx.config import Config
    from tidpo_mlx.data import load_dataset
    from tidpo_mlx.models import resolve_model

    tokenizer = load_tokenizer(resolve_model("smollm2-135m-instruct"))
    cfg = Config(max_length=1024, max_prompt_length=512)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp) / "data"
        write_data(folder, args.pairs)
        os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")
        os.environ.pop("TIDPO_MLX_NO_ENCODE_CACHE", None)
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        cold = load_dataset(str(folder), tokenizer, cfg)
        t1 = time.perf_counter()
        digest = hashlib.sha256(repr([e.chosen for e in cold.train]).encode()).hexdigest()
        total, train, valid = len(cold.train) + len(cold.valid), len(cold.train), len(cold.valid)
        lengths = [e.length for e in cold.train]
        del cold  # the second run does not hold the first one's data
        warm = [warm_load(folder) for _ in range(WARM_RUNS)]
        load1 = os.getloadavg()
    assert all(d == digest for _, d in warm), "the cached dataset differs"
    print(f"pairs: {total} ({train} train + {valid} valid), median "
          f"{statistics.median(lengths):.0f} tokens per pair (prompt + longer response)")
    print(f"cold encode: {t1 - t0:.1f} s = {total / (t1 - t0):.0f} pairs/s")
    seconds = [s for s, _ in warm]
    print(f"warm (cached) load, a fresh process each: {', '.join(f'{s:.2f}' for s in seconds)} s "
          f"(first right after the cold load; median {statistics.median(seconds):.2f} s)")
    print(f"load average (1/5/15 min) before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
          f"after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
