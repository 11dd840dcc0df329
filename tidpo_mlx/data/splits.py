"""From encoded splits to what a run uses: invalid rows stopped on or left out, and the held-out split.

Loading checks every row and reports every invalid one at once (count per
reason, the first few ``file:line``); ``skip_invalid`` trains on the valid rows
and records what it dropped. Data without a valid split gets a seeded
held-out split made from train, grouped by prompt (:func:`held_out_split`).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Sequence

from tidpo_mlx.config import Config
from tidpo_mlx.data.example import Dataset, Example, prompt_key, reindexed
from tidpo_mlx.data_cache import Encoded
from tidpo_mlx.errors import DataError
from tidpo_mlx.sources import Problem

MIN_VALID = 8
"""Fewest held-out pairs a made split gets (when the train split has room for them)."""
SHOWN = 3
"""``file:line`` s shown per reason in an invalid-row report."""


def invalid_report(problems: Sequence[Problem], total: int, option: bool = True) -> str:
    """One line: the first problem, then the count per reason with the first few places, then the way out."""
    reasons = Counter(p.reason for p in problems)
    parts = []
    for reason, count in reasons.most_common():
        places = [p.where for p in problems if p.reason == reason][:SHOWN]
        more = ", ..." if count > SHOWN else ""
        parts.append(f"{count} x {reason} ({', '.join(places)}{more})")
    first = problems[0]
    text = f"{first.where}: {first.reason}; {len(problems)} invalid of {total} rows: " + "; ".join(parts)
    if option:
        text += (f"; set 'skip_invalid: true' (--skip-invalid) to train on the {total - len(problems)} valid rows "
                 "(what is dropped is logged and counted)")
    return text


def invalid_rows(problems: Sequence[Problem], total: int, cfg: Config) -> tuple[Counter, list[str]]:
    """Invalid rows raise one report, or with ``skip_invalid`` are left out: the count by reason and the note."""
    if not problems:
        return Counter(), []
    if not cfg.skip_invalid:
        raise DataError(invalid_report(problems, total))
    return Counter(p.reason for p in problems), ["skip_invalid: left out " + invalid_report(problems, total, option=False)]


def held_out_split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded held-out split grouped by prompt (:func:`~tidpo_mlx.data.example.prompt_key`; no prompt in
    both): ``(train, valid)``, each in input order.

    The valid split gets whole prompt groups, in a seeded order, until it holds
    ``max(MIN_VALID, fraction * n)`` pairs; the train split keeps at least one group.
    """
    keys = [prompt_key(ex) for ex in examples]
    groups = Counter(keys)
    if len(groups) < 2:
        raise DataError(f"{examples[0].source if examples else 'data'}: too few distinct prompts "
                        f"({len(groups)}) to make a held-out split: give a valid file")
    order = sorted(groups, key=lambda k: hashlib.sha256(f"{seed}\0{k}".encode()).hexdigest())
    target = max(MIN_VALID, round(fraction * len(examples)))
    valid_keys: set[str] = set()
    count = 0
    for key in order[:-1]:
        if count >= target:
            break
        valid_keys.add(key)
        count += groups[key]
    train = [ex for ex, key in zip(examples, keys) if key not in valid_keys]
    valid = [ex for ex, key in zip(examples, keys) if key in valid_keys]
    return train, valid


def checked(encoded: Encoded, cfg: Config, names: Sequence[str]) -> tuple[Counter, list[str]]:
    """:func:`invalid_rows` over the splits ``names`` of ``encoded`` (stop, or count and note what is left
    out); a split that is used needs no valid pair, except ``train``."""
    problems = [p for name in names for p in encoded.problems.get(name, [])]
    total = sum(len(encoded.splits.get(name, [])) + len(encoded.problems.get(name, [])) for name in names)
    invalid, notes = invalid_rows(problems, total, cfg)
    if "train" in names and not encoded.splits.get("train"):
        reasons = "; ".join(f"{n} x {reason}" for reason, n in invalid.most_common(SHOWN))
        raise DataError(f"{encoded.name}: no valid training pairs" + (f" (invalid: {reasons})" if reasons else ""))
    return invalid, notes


def hold_out(train: list[Example], cfg: Config) -> tuple[list[Example], list[Example], str]:
    """The held-out split made from ``train`` (:func:`held_out_split` with ``valid_fraction`` and ``seed``):
    ``(train, valid, note)``."""
    kept, valid = held_out_split(train, cfg.valid_fraction, cfg.seed)
    note = (f"no valid split: held out {len(valid)} of {len(train)} pairs, grouped by prompt "
            f"(valid_fraction {cfg.valid_fraction}, seed {cfg.seed})")
    return kept, valid, note


def assemble(encoded: Encoded, cfg: Config) -> Dataset:
    """The Dataset of encoded splits, each indexed from 0; makes a held-out split when there is none."""
    invalid, skipped = checked(encoded, cfg, list(encoded.splits))
    splits, notes = dict(encoded.splits), list(encoded.notes) + skipped
    if "valid" not in splits:
        splits["train"], splits["valid"], note = hold_out(splits["train"], cfg)
        notes.append(note)
    every = [ex for split in splits.values() for ex in split]
    return Dataset(
        train=reindexed(splits["train"]),
        valid=reindexed(splits["valid"]),
        test=reindexed(splits.get("test", [])),
        truncated_prompts=sum(e.prompt_truncated for e in every),
        truncated_responses=sum(e.responses_truncated for e in every),
        dropped_turns=sum(e.dropped_turns for e in every),
        pairs_with_dropped_turns=sum(e.dropped_turns > 0 for e in every),
        invalid=dict(invalid),
        notes=notes,
        source=f"{encoded.name} ({encoded.kind})",
    )
