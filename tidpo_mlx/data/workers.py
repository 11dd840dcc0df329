"""Encoding many rows: chunks of :data:`BATCH` rows, in worker processes from :data:`PARALLEL_FROM` rows on.

The processes are spawned (a fork would copy MLX's threads), so a script
that loads data must guard its entry point with ``if __name__ == "__main__":``,
as for any spawned pool. The order of the rows and every id are those of one
process.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from array import array
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterator, Sequence

from tidpo_mlx.config import Config
from tidpo_mlx.data.encoder import PairEncoder
from tidpo_mlx.data.example import Example, reindexed
from tidpo_mlx.sources import Problem, SplitRows, position

BATCH = 512
"""Rows rendered and tokenised together (one batched fast-tokenizer call per chunk)."""
PROGRESS_FROM = 2000
"""Encoding more rows than this shows a progress bar (stderr)."""
PARALLEL_FROM = 16_000
"""Encoding at least this many rows uses worker processes (``dataset_num_proc``, auto); fewer do not repay
their start (importing the tokenizer libraries in each)."""
TOKEN_FIELDS = ("prompt", "chosen", "rejected", "anchor")


def workers(cfg: Config, rows: int) -> int:
    """Processes that encode ``rows`` rows: ``dataset_num_proc`` (TRL's key) when set, else the CPU count
    (at most 8) from :data:`PARALLEL_FROM` rows on, else 1."""
    if cfg.dataset_num_proc is not None:
        return cfg.dataset_num_proc
    return min(os.cpu_count() or 1, 8) if rows >= PARALLEL_FROM else 1


@contextlib.contextmanager
def processes(encoder: PairEncoder, rows: int) -> Iterator[ProcessPoolExecutor | None]:
    """The :func:`workers` processes that encode ``rows`` rows in all with ``encoder`` (None: this one)."""
    n = workers(encoder.cfg, rows)
    if n <= 1:
        yield None
        return
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_start,
                             initargs=(encoder,)) as pool:
        yield pool


def encode_rows(encoder: PairEncoder, rows: SplitRows,
                pool: ProcessPoolExecutor | None = None) -> tuple[list[Example], list[Problem]]:
    """Encode every readable row, in chunks of :data:`BATCH` (in ``pool`` when given, from :func:`processes`);
    the invalid ones come back as problems, in file order."""
    chunks = [rows.rows[i:i + BATCH] for i in range(0, len(rows.rows), BATCH)]
    examples, problems = [], list(rows.problems)
    bar = _progress(len(rows.rows))
    if pool is not None:
        results = ((_with_tokens(done, array.tolist), bad) for done, bad in pool.map(_worker_chunk, chunks))
    else:
        results = map(encoder.encode_chunk, chunks)
    for chunk, (done, bad) in zip(chunks, results):
        examples += done
        problems += bad
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return reindexed(examples), sorted(problems, key=lambda p: position(p.where))


_WORKER: PairEncoder | None = None
"""The encoder of a worker process (set by :func:`_worker_start`)."""


def _worker_start(encoder: PairEncoder) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _WORKER = encoder


def _worker_chunk(rows: Sequence[tuple[str, dict[str, Any]]]) -> tuple[list[Example], list[Problem]]:
    """Encode a chunk in a worker; token lists travel back as ``array('i')`` (one bytes blob each: unpickling
    millions of int objects would load the parent, which shares the cores with the workers)."""
    assert _WORKER is not None, "_worker_start runs first"
    examples, problems = _WORKER.encode_chunk(rows)
    return _with_tokens(examples, lambda ids: array("i", ids)), problems


def _with_tokens(examples: list[Example], convert: Callable[[Any], Any]) -> list[Example]:
    """``examples`` with each token sequence (:data:`TOKEN_FIELDS`) replaced by ``convert`` of it."""
    for ex in examples:
        for name in TOKEN_FIELDS:
            value = getattr(ex, name)
            if value is not None:
                setattr(ex, name, convert(value))
    return examples


def _progress(total: int) -> Any:
    """A tqdm bar on stderr for encoding more than :data:`PROGRESS_FROM` rows, else None."""
    if total <= PROGRESS_FROM:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="encode", unit="pair", dynamic_ncols=True, leave=False)
