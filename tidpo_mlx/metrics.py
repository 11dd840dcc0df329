"""Metric definitions (SPEC.md section 10), computed once per step, and the JSONL log.

TRL's names where TRL has the quantity. Rewards are ``beta * sum_t rho_t``,
unweighted, so TI-DPO and DPO runs compare; accuracies count pairs (ties are
wrong).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from tidpo_mlx.errors import TrainingError
from tidpo_mlx.files import WriteError, atomic_write_text, jsonl_text


NAMES = {
    "loss": "loss",
    "loss_pref": "loss/pref",
    "loss_triplet": "loss/triplet",
    "reward_chosen": "rewards/chosen",
    "reward_rejected": "rewards/rejected",
    "logp_chosen": "logps/chosen",
    "logp_rejected": "logps/rejected",
    "weights_entropy": "weights/entropy",
    "kl_chosen": "kl/chosen",
    "kl_rejected": "kl/rejected",
}
"""Per-pair array (``objective.batch_objective``) -> metric name, SPEC section 10 (TRL's where TRL has one)."""


def pair_metrics(per_pair: dict[str, Any]) -> dict[str, float]:
    """Means over pairs of whichever per-pair quantities are given, under their metric names.

    With rewards: ``rewards/margins`` (chosen - rejected) and ``rewards/accuracies``
    (share of pairs with the chosen reward strictly above the rejected one).
    """
    a = {k: np.asarray(v, dtype=np.float64) for k, v in per_pair.items()}
    out = {}
    for key, name in NAMES.items():
        if key in a:
            out[name] = float(a[key].mean())
        if key == "reward_rejected" and key in a:
            out["rewards/margins"] = float((a["reward_chosen"] - a["reward_rejected"]).mean())
            out["rewards/accuracies"] = float((a["reward_chosen"] > a["reward_rejected"]).mean())
    return out


def held_out_metrics(per_pair: dict[str, Any]) -> dict[str, float]:
    """:func:`pair_metrics` plus ``policy_preference_accuracy`` (held-out only).

    ``policy_preference_accuracy``: share of pairs whose summed policy log-prob
    of the chosen response is strictly above the rejected one's.
    """
    chosen, rejected = np.asarray(per_pair["logp_chosen"]), np.asarray(per_pair["logp_rejected"])
    return {"policy_preference_accuracy": float((chosen > rejected).mean()), **pair_metrics(per_pair)}


def peak_memory_gb() -> float:
    """Peak memory MLX has allocated, in GB (Metal and CPU alike)."""
    return mx.get_peak_memory() / 1e9


def all_finite(values: dict[str, float]) -> bool:
    """Whether every metric is a finite number."""
    return all(math.isfinite(v) for v in values.values())


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended as steps complete.

    A fresh run starts the file empty; a resumed one keeps the records up to
    its checkpoint's step and rewrites the file atomically. A torn last line
    (a crash during a write) is dropped with a note; any other unreadable
    line stops the resume naming ``file:line``.
    """

    def __init__(self, path: Path, keep_until: int | None = None, log: Callable[[str], None] = print):
        self.path = path
        records = read_metrics(path, log) if keep_until is not None and path.exists() else []
        atomic_write_text(path, jsonl_text(r for r in records if r.get("step", 0) <= (keep_until or 0)))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record."""
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            raise WriteError(f"{self.path}: could not append a record ({err.strerror or err})") from None


def read_metrics(path: Path, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a torn last line is dropped with a note in ``log``."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problem = None if isinstance(record, dict) else "not a JSON object"
        except ValueError as err:
            problem = f"not a JSON record ({err})"
        if problem is None:
            records.append(record)
        elif number == len(lines):
            log(f"note: {path}:{number}: torn last line dropped ({len(line)} characters, a write cut short)")
        else:
            raise TrainingError(f"{path}:{number}: {problem}; move the file away to start it anew")
    return records
