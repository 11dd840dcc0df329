"""Metric definitions (docs/method.md section 10), computed once per step, and the JSONL log.

TRL's names where TRL has the quantity. Rewards are ``beta * sum_t rho_t``,
unweighted, so TI-DPO and DPO runs compare; accuracies count pairs (ties are
wrong).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import mlx.core as mx
import numpy as np

from tidpo_mlx.errors import TrainingError
from tidpo_mlx.files import append_line, atomic_write_text, jsonl_text


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
"""Per-pair array (``objective.batch_objective``) -> metric name, docs/method.md section 10 (TRL's where TRL has one)."""


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


def _statm_reader() -> Callable[[], int]:
    """Linux: resident pages (the second field of ``/proc/self/statm``) times the page size."""
    page = os.sysconf("SC_PAGE_SIZE")

    def read() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    return read


class _MachTaskBasicInfo(ctypes.Structure):
    """``struct mach_task_basic_info`` (``<mach/task_info.h>``)."""

    _fields_ = [
        ("virtual_size", ctypes.c_uint64), ("resident_size", ctypes.c_uint64), ("resident_size_max", ctypes.c_uint64),
        ("user_time", ctypes.c_int32 * 2), ("system_time", ctypes.c_int32 * 2),
        ("policy", ctypes.c_int32), ("suspend_count", ctypes.c_int32),
    ]


def _mach_reader() -> Callable[[], int]:
    """macOS: ``resident_size`` of ``task_info(mach_task_self(), MACH_TASK_BASIC_INFO)``."""
    libc = ctypes.CDLL("/usr/lib/libSystem.B.dylib")
    task = ctypes.c_uint32.in_dll(libc, "mach_task_self_").value
    libc.task_info.argtypes = [ctypes.c_uint32, ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
    flavor = 20  # MACH_TASK_BASIC_INFO

    def read() -> int:
        info = _MachTaskBasicInfo()
        count = ctypes.c_uint32(ctypes.sizeof(info) // 4)
        if libc.task_info(task, flavor, ctypes.byref(info), ctypes.byref(count)) != 0:
            raise OSError("task_info(MACH_TASK_BASIC_INFO) failed")
        return info.resident_size

    return read


def resident_reader() -> tuple[Callable[[], int] | None, str]:
    """How to read this process's current resident memory in bytes (not the ``ru_maxrss`` peak), and from
    where; ``(None, why)`` where the platform offers neither source."""
    if sys.platform.startswith("linux"):
        source, make = "/proc/self/statm", _statm_reader
    elif sys.platform == "darwin":
        source, make = "mach task_info", _mach_reader
    else:
        return None, f"no current resident-memory source on {sys.platform}"
    try:
        read = make()
        read()
    except (OSError, ValueError, IndexError, AttributeError) as err:
        return None, f"{source} cannot be read ({err})"
    return read, source


class MemoryReadings:
    """Memory metrics of the process, read after each step (before ``clear_cache_threshold`` applies).

    ``memory/active_gb`` (arrays MLX holds), ``memory/cache_gb`` (freed
    buffers MLX keeps for reuse, the step's among them),
    ``peak_memory_gb`` (MLX's peak since start) and ``memory/rss_gb`` (the
    process's current resident memory, which also counts what MLX's figures
    miss). Where the platform gives no resident figure the field is absent
    and ``log`` says so once.
    """

    def __init__(self, log: Callable[[str], None]):
        self._resident, where = resident_reader()
        if self._resident is None:
            log(f"note: memory/rss_gb is not recorded ({where})")

    def __call__(self) -> dict[str, float]:
        """The readings now, in GB."""
        out = {
            "memory/active_gb": mx.get_active_memory() / 1e9,
            "memory/cache_gb": mx.get_cache_memory() / 1e9,
            "peak_memory_gb": peak_memory_gb(),
        }
        if self._resident is not None:
            out["memory/rss_gb"] = self._resident() / 1e9
        return out


def all_finite(values: dict[str, float]) -> bool:
    """Whether every metric is a finite number."""
    return all(math.isfinite(v) for v in values.values())


class Sink(Protocol):
    """Somewhere else every record goes (``reporting.py``: W&B, TensorBoard)."""

    def write(self, record: dict[str, Any]) -> None:
        """Take one record, as written to ``metrics.jsonl``."""

    def close(self) -> None:
        """Flush and finish."""


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended as steps complete, and the same records to
    each of ``sinks`` (``report_to``).

    A fresh run starts the file empty; a resumed one keeps the records up to
    its checkpoint's step and rewrites the file atomically. A torn last line
    (a crash during a write) is dropped with a note; any other unreadable
    line stops the resume naming ``file:line``. A failed append (a full
    disk) leaves the file as it was and raises a ``WriteError`` naming it.
    """

    def __init__(self, path: Path, keep_until: int | None = None, log: Callable[[str], None] = print,
                 sinks: Sequence[Sink] = ()):
        self.path = path
        self.sinks = list(sinks)
        records = read_metrics(path, log) if keep_until is not None and path.exists() else []
        atomic_write_text(path, jsonl_text(r for r in records if r.get("step", 0) <= (keep_until or 0)))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record, then hand it to each sink."""
        append_line(self.path, json.dumps(record))
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        """Close the sinks (the file needs nothing); a second call does nothing."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()


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
