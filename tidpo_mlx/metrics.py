"""Metric definitions (SPEC.md section 10), computed once per step, and the JSONL log.

TRL's names where TRL has the quantity. Rewards are ``beta * sum_t rho_t``,
unweighted, so TI-DPO and DPO runs compare; accuracies count pairs (ties are
wrong).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np


def pair_metrics(aux: dict[str, Any]) -> dict[str, float]:
    """Batch means of the per-pair quantities returned by ``batch_objective``."""
    a = {k: np.asarray(v, dtype=np.float64) for k, v in aux.items()}
    out = {
        "loss": float(a["loss"].mean()),
        "loss/pref": float(a["loss_pref"].mean()),
        "loss/triplet": float(a["loss_triplet"].mean()),
        "rewards/chosen": float(a["reward_chosen"].mean()),
        "rewards/rejected": float(a["reward_rejected"].mean()),
        "rewards/margins": float((a["reward_chosen"] - a["reward_rejected"]).mean()),
        "rewards/accuracies": float((a["reward_chosen"] > a["reward_rejected"]).mean()),
        "logps/chosen": float(a["logp_chosen"].mean()),
        "logps/rejected": float(a["logp_rejected"].mean()),
    }
    if "weights_entropy" in a:
        out["weights/entropy"] = float(a["weights_entropy"].mean())
    if "kl_chosen" in a:
        out["kl/chosen"] = float(a["kl_chosen"].mean())
        out["kl/rejected"] = float(a["kl_rejected"].mean())
    return out


def preference_metrics(logp_chosen: np.ndarray, logp_rejected: np.ndarray,
                       ref_chosen: np.ndarray | None, ref_rejected: np.ndarray | None,
                       beta: float) -> dict[str, float]:
    """Held-out metrics from summed log-probs: reward accuracy and policy preference accuracy.

    ``policy_preference_accuracy``: share of pairs whose summed policy log-prob of
    the chosen response is strictly above the rejected one's.
    """
    out = {"policy_preference_accuracy": float((logp_chosen > logp_rejected).mean())}
    if ref_chosen is not None:
        rc = beta * (logp_chosen - ref_chosen)
        rr = beta * (logp_rejected - ref_rejected)
        out.update({
            "rewards/chosen": float(rc.mean()),
            "rewards/rejected": float(rr.mean()),
            "rewards/margins": float((rc - rr).mean()),
            "rewards/accuracies": float((rc > rr).mean()),
        })
    out["logps/chosen"] = float(logp_chosen.mean())
    out["logps/rejected"] = float(logp_rejected.mean())
    return out


def peak_memory_gb() -> float:
    """Peak memory MLX has allocated, in GB (Metal and CPU alike)."""
    return mx.get_peak_memory() / 1e9


def all_finite(values: dict[str, float]) -> bool:
    """Whether every metric is a finite number."""
    return all(math.isfinite(v) for v in values.values())


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, written as steps complete."""

    def __init__(self, path: Path, keep_until: int | None = None):
        self.path = path
        if keep_until is not None and path.exists():
            kept = [l for l in path.read_text().splitlines() if json.loads(l).get("step", 0) <= keep_until]
            path.write_text("".join(l + "\n" for l in kept))
        elif keep_until is None:
            path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        """Append one record."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
