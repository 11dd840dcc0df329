"""Loading ``--data``: found (``sources.py``), encoded once per data, tokenizer and settings (``data_cache.py``),
checked and split (``splits.py``).

Training takes the whole :class:`~tidpo_mlx.data.example.Dataset`
(:func:`load_dataset`); ``eval``, ``importance`` and the audit take one split
with the rows it was read from (:func:`load_split`). Both go through the same
cache, checks and held-out split, so a pair has the same tokens and index
everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tidpo_mlx import data_cache
from tidpo_mlx.config import Config
from tidpo_mlx.data.encoder import PairEncoder
from tidpo_mlx.data.example import Dataset, Example, reindexed
from tidpo_mlx.data.splits import assemble, checked, hold_out
from tidpo_mlx.data.workers import encode_rows, processes
from tidpo_mlx.data_cache import Encoded
from tidpo_mlx.errors import ConfigError, DataError
from tidpo_mlx.sources import SPLITS, Problem, Source, SplitRows, resolve_source


def hf_dataset_keys(cfg: Config) -> dict[str, Any] | None:
    """``hf_dataset`` as the plain mapping ``sources.resolve_source`` takes."""
    return cfg.to_dict().get("hf_dataset")


def encode_splits(encoder: PairEncoder, splits: dict[str, SplitRows]) -> tuple[dict[str, list[Example]], dict[str, list[Problem]]]:
    """Encode every split (in one set of worker processes): the examples and the invalid rows, by split.

    Nothing is decided here: ``splits.invalid_rows`` stops or (``skip_invalid``) drops.
    """
    encoded: dict[str, list[Example]] = {}
    problems: dict[str, list[Problem]] = {}
    with processes(encoder, sum(len(rows.rows) for rows in splits.values())) as pool:
        for split, rows in splits.items():
            encoded[split], problems[split] = encode_rows(encoder, rows, pool)
    return encoded, problems


def encode_source(source: Source, tokenizer: Any, cfg: Config) -> Encoded:
    """Encode every split of a found source (no held-out split made yet; invalid rows kept as problems)."""
    encoder = PairEncoder(tokenizer, cfg)
    splits, problems = encode_splits(encoder, source.splits)
    return Encoded(splits, problems, list(encoder.notes), source.name, source.kind)


def load_encoded(data: str, tokenizer: Any, cfg: Config, source: Source | None = None) -> Encoded:
    """Every split of ``data`` encoded (before the checks and the held-out split): the cache entry of its
    content, tokenizer and encoding settings, else encoded now (from ``source`` when already read) and stored."""
    hf = hf_dataset_keys(cfg)
    key = data_cache.cache_key(data, tokenizer, cfg, hf)
    return data_cache.cached(key, lambda: encode_source(source or resolve_source(data, hf), tokenizer, cfg), Example)


def load_dataset(data: str, tokenizer: Any, cfg: Config) -> Dataset:
    """Find ``data`` (folder, file, save_to_disk folder, bundled name, Hub id) and encode it (tokenizer only).

    The encoding is cached by the data's content, the tokenizer and the
    encoding settings (``data_cache.py``); a second load reads the cache.
    """
    return assemble(load_encoded(data, tokenizer, cfg), cfg)


@dataclass
class Split:
    """One split of ``--data`` as a run encodes it, with the rows it was read from."""

    name: str
    """What was read: a file, or a source and its split."""
    examples: list[Example]
    """The split's pairs, indexed from 0 in their order."""
    rows: list[dict[str, Any]]
    """Each example's row as read (same order)."""
    notes: list[str]
    source: Source


def load_split(data: str, tokenizer: Any, cfg: Config, split: str | None = None, limit: int | None = None) -> Split:
    """One split of ``data`` (its first ``limit`` pairs if given), encoded, checked and split as
    :func:`load_dataset` does.

    ``train``: every pair of the train split as read (a one-file source is all
    train), the pairs that training holds out of it included; ``valid``: the
    valid split, or the held-out split training makes from train when there is
    none (same ``valid_fraction`` and ``seed``); ``test``. Default: a file's
    every pair, else ``valid``. Invalid rows of the split read (of train for a
    made held-out split) stop the load as in training (``skip_invalid`` leaves
    them out).
    """
    if split is not None and split not in SPLITS:
        raise ConfigError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    source = resolve_source(data, hf_dataset_keys(cfg))
    split = split or ("train" if source.kind == "file" else "valid")
    if split == "test" and "test" not in source.splits:
        raise DataError(f"{source.name}: no test split (has {', '.join(source.splits)})")
    made = split == "valid" and "valid" not in source.splits
    encoded = load_encoded(data, tokenizer, cfg, source)
    _, skipped = checked(encoded, cfg, ["train"] if made else [split])
    notes = list(encoded.notes) + skipped
    if made:
        _, examples, note = hold_out(encoded.splits["train"], cfg)
        notes.append(note)
        name = f"{source.name} (held-out split made from train)"
    else:
        examples = encoded.splits[split]
        name = source.name if source.kind == "file" and split == "train" else f"{source.name} ({split} split)"
    examples = reindexed(examples)
    if limit is not None and limit >= 0:
        examples = examples[:limit]
    by_where = {where: row for rows in source.splits.values() for where, row in rows.rows}
    return Split(name, examples, [by_where[ex.source] for ex in examples], notes, source)
