"""Long runs: memory that can be seen and stays bounded, output-folder locks, what changes between runs.

The run-level tests drive the real trainer on the tiny fixture model; the
lock tests take real ``fcntl`` locks from separate processes.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tidpo_mlx  # noqa: F401  (conftest sets the process up)

import mlx.core as mx
import pytest
from click.testing import CliRunner

from tidpo_mlx import memory_guard
from tidpo_mlx.checkpoint import claim_output, lock_path
from tidpo_mlx.cli import main
from tidpo_mlx.config import build_config, load_config
from tidpo_mlx.errors import ConfigError, TrainingError
from tidpo_mlx.files import FileLock
from tidpo_mlx.metrics import MemoryReadings, read_metrics, resident_reader
from tidpo_mlx.trainer import train

from conftest import arith_rows, write_jsonl

MEMORY_KEYS = ("memory/active_gb", "memory/cache_gb", "memory/rss_gb", "peak_memory_gb")


def _quiet(_: str) -> None:
    return None


@pytest.fixture(scope="module")
def base(tiny_model, tmp_path_factory) -> dict[str, Any]:
    """Keys of a short run whose pairs fall in several length buckets (prompts of 1 to 40 repeated words)."""
    data = tmp_path_factory.mktemp("long-pairs")
    rows = arith_rows(24, 0)
    for i, row in enumerate(rows):
        row["prompt"] = " ".join(["Please"] * (1 + (i * 7) % 40)) + " " + row["prompt"]
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "valid.jsonl", arith_rows(4, 1))
    return {"model": str(tiny_model), "data": str(data), "iters": 6, "batch_size": 2, "num_layers": 2,
            "learning_rate": 1e-3, "warmup_steps": 1, "anchor": "none", "steps_per_save": 3, "val_batches": 0}


def _cfg(base: dict[str, Any], out: Path, **kw: Any):
    return load_config(None, {**base, **kw, "adapter_path": str(out)})


def _flags(values: dict[str, Any]) -> list[str]:
    return [w for k, v in values.items() for w in ("--" + k.replace("_", "-"), str(v))]


# memory you can see


def test_resident_memory_is_current_not_the_peak():
    read, source = resident_reader()
    if read is None:
        pytest.skip(f"no resident-memory source here: {source}")
    before = read()
    # An anonymous mapping of its own: malloc (tuned for MLX to keep freed memory) could hand back pages
    # that are resident already; these pages become resident when touched and leave when unmapped.
    block = mmap.mmap(-1, 200_000_000)
    block[::4096] = b"x" * len(block[::4096])
    during = read()
    block.close()
    after = read()
    assert during - before > 150e6
    assert during - after > 150e6, "the reading must fall again when memory is freed (ru_maxrss would not)"


def test_memory_readings_carry_mlx_and_process_figures():
    lines: list[str] = []
    readings = MemoryReadings(lines.append)
    a = mx.ones((1000, 1000))
    mx.eval(a)
    now = readings()
    assert now["memory/active_gb"] >= 4e-3 and now["peak_memory_gb"] >= now["memory/active_gb"]
    if resident_reader()[0] is not None:
        assert set(now) == set(MEMORY_KEYS) and now["memory/rss_gb"] > now["memory/active_gb"] and not lines
    else:
        assert set(now) == set(MEMORY_KEYS) - {"memory/rss_gb"}
        assert len(lines) == 1 and "memory/rss_gb is not recorded" in lines[0]


def _fill_cache() -> None:
    """Arrays of several sizes, evaluated and dropped: MLX keeps their buffers in its cache."""
    arrays = [mx.ones((n, 1000)) * 2 for n in (100, 200, 300, 400)]
    mx.eval(arrays)
    del arrays


def test_after_step_clears_the_cache_only_above_the_threshold():
    memory_guard.after_step(0)
    _fill_cache()
    cached = mx.get_cache_memory()
    assert cached > 0
    assert memory_guard.after_step(cached) is False and mx.get_cache_memory() == cached
    assert memory_guard.after_step(cached - 1) is True and mx.get_cache_memory() == 0
    assert memory_guard.after_step(0) is False


def test_every_step_records_memory_and_the_default_keeps_the_cache_empty_between_steps(base, tmp_path):
    seen: list[int] = []
    train(_cfg(base, tmp_path / "run"), log=_quiet, progress=False,
          on_step=lambda step, record: seen.append(mx.get_cache_memory()))
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "split" not in r]
    expected = set(MEMORY_KEYS) if resident_reader()[0] else set(MEMORY_KEYS) - {"memory/rss_gb"}
    assert all(expected <= set(r) for r in records)
    assert all(r["memory/active_gb"] > 0 and r["peak_memory_gb"] >= r["memory/active_gb"] for r in records)
    assert seen == [0] * base["iters"], "clear_cache_threshold 0 empties the cache after every step"


def test_a_large_threshold_lets_the_cache_hold_buffers(base, tmp_path):
    seen: list[int] = []
    train(_cfg(base, tmp_path / "run", clear_cache_threshold=10**12), log=_quiet, progress=False,
          on_step=lambda step, record: seen.append(mx.get_cache_memory()))
    assert max(seen) > 0


def test_the_new_keys_are_checked_and_left_out_of_the_fingerprint():
    with pytest.raises(ConfigError, match=r"^r.yaml: 'clear_cache_threshold' must be >= 0"):
        build_config({"clear_cache_threshold": -1}, where="r.yaml")
    with pytest.raises(ConfigError, match=r"^r.yaml: 'report_to' names 'mlflow': choose from wandb, tensorboard"):
        build_config({"report_to": "wandb,mlflow"}, where="r.yaml")
    assert build_config({"report_to": "TensorBoard, wandb"}).report_to == "TensorBoard, wandb"
    from tidpo_mlx.checkpoint import OPERATIONAL

    assert {"clear_cache_threshold", "report_to", "project_name"} <= set(OPERATIONAL)


# one run per folder: the lock


_HOLD = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from tidpo_mlx.checkpoint import claim_output\n"
    "out, lock, note = claim_output(Path(sys.argv[1]), sys.argv[2], False)\n"
    "print(out, flush=True)\n"
    "time.sleep(float(sys.argv[3]))\n"
)


def _holder(folder: Path, existing: str, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _HOLD, str(folder), existing, str(seconds)],
                            stdout=subprocess.PIPE, text=True)


def test_a_folder_another_run_holds_is_refused_and_a_killed_runs_lock_frees_itself(tmp_path):
    out = tmp_path / "run"
    proc = _holder(out, "refuse", 60)
    assert proc.stdout.readline().strip() == str(out)
    for existing, resuming in (("refuse", False), ("move", False), ("remove", False), ("refuse", True)):
        with pytest.raises(TrainingError, match=rf"^{out} is in use by another run \(process {proc.pid}\): "):
            claim_output(out, existing, resuming)
    proc.kill()
    proc.wait()
    assert lock_path(out).exists(), "a killed holder leaves its lock file behind, unlocked"
    taken, lock, note = claim_output(out, "refuse", False)
    assert taken == out and note is None
    lock.release()
    assert not lock_path(out).exists()


def test_fresh_skips_a_folder_in_use_and_one_that_holds_a_run(tmp_path):
    out = tmp_path / "adapters"
    proc = _holder(out, "fresh", 60)
    try:
        assert proc.stdout.readline().strip() == str(out)
        (tmp_path / "adapters-2").mkdir()
        (tmp_path / "adapters-2" / "adapters.safetensors").write_bytes(b"x")
        taken, lock, note = claim_output(out, "fresh", False)
        assert taken == tmp_path / "adapters-3"
        assert note == f"{out} is in use by another run (process {proc.pid}); this run writes to {taken}"
        lock.release()
    finally:
        proc.kill()
        proc.wait()


def test_many_fresh_claims_at_once_get_different_folders(tmp_path):
    procs = [_holder(tmp_path / "adapters", "fresh", 5) for _ in range(4)]
    folders = [p.stdout.readline().strip() for p in procs]
    for p in procs:
        p.wait()
    assert sorted(folders) == [str(tmp_path / n) for n in ("adapters", "adapters-2", "adapters-3", "adapters-4")]


def test_file_lock_is_exclusive_within_one_process_too(tmp_path):
    first = FileLock.take(tmp_path / "x.lock")
    assert first is not None and FileLock.take(tmp_path / "x.lock") is None
    assert FileLock.holder(tmp_path / "x.lock") == f"process {os.getpid()}"
    first.release()
    again = FileLock.take(tmp_path / "x.lock")
    assert again is not None
    again.release()


def _cli(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tidpo_mlx.cli", "train", "--quiet", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_bare_runs_started_at_once_write_to_different_folders(base, tmp_path):
    flags = _flags({**base, "iters": 2})
    procs = [_cli(flags, tmp_path) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    folders = sorted(p.name for p in tmp_path.iterdir() if (p / "adapters.safetensors").exists())
    assert folders == ["adapters", "adapters-2"], outputs
    assert not list(tmp_path.glob(".*.lock")), "finished runs remove their lock files"


def test_a_second_run_into_a_running_folder_is_refused(base, tmp_path):
    out = tmp_path / "run"
    first = _cli(_flags({**base, "iters": 40}) + ["--adapter-path", str(out)], tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        result = CliRunner().invoke(main, ["train", *_flags(base), "--adapter-path", str(out), "--resume"])
        assert result.exit_code == 1
        assert f"Error: {out} is in use by another run (process {first.pid})" in result.output
    finally:
        first.kill()
        first.wait()


# what changes between runs


def test_edited_training_data_is_refused_naming_the_file(base, tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", arith_rows(12, 0))
    write_jsonl(data / "valid.jsonl", arith_rows(4, 1))
    out = tmp_path / "run"
    train(_cfg(base, out, data=str(data), iters=3), log=_quiet, progress=False)
    rows = arith_rows(12, 0)
    rows[5]["chosen"] = "The answer is 7."
    write_jsonl(data / "train.jsonl", rows)
    with pytest.raises(TrainingError) as err:
        train(_cfg(base, out, data=str(data), iters=3), resume="", log=_quiet, progress=False)
    assert f"the training pairs differ from the checkpoint's: {data / 'train.jsonl'} (edited)" in str(err.value)
    assert "held-out pairs" not in str(err.value)


def test_edited_held_out_split_is_refused_naming_the_file_and_moved_data_resumes(base, tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", arith_rows(12, 0))
    write_jsonl(data / "valid.jsonl", arith_rows(4, 1))
    out = tmp_path / "run"
    train(_cfg(base, out, data=str(data), iters=3, steps_per_save=1), log=_quiet, progress=False)
    write_jsonl(data / "valid.jsonl", arith_rows(5, 1))
    with pytest.raises(TrainingError) as err:
        train(_cfg(base, out, data=str(data), iters=3), resume="step-000002", log=_quiet, progress=False)
    assert f"the held-out pairs differ from the checkpoint's: {data / 'valid.jsonl'} (edited)" in str(err.value)
    write_jsonl(data / "valid.jsonl", arith_rows(4, 1))
    moved = tmp_path / "moved"
    data.rename(moved)
    train(_cfg(base, out, data=str(moved), iters=3), resume="step-000002", log=_quiet, progress=False)
    state = json.loads((out / "checkpoints" / "step-000003" / "state.json").read_text())["run"]
    assert set(state["train_files"]) == {str(moved / "train.jsonl")}
    assert set(state["valid_files"]) == {str(moved / "valid.jsonl")}
