"""A real full disk: training into a small tmpfs that fills up while the run is going.

Each test mounts its own size-limited tmpfs (root on Linux; skipped with the
reason elsewhere) and fills it with a ballast file at a chosen moment, so
the writes meet a real ``ENOSPC`` from the kernel, not a simulated one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import tidpo_mlx  # noqa: F401

import mlx.core as mx
import numpy as np
import pytest

from tidpo_mlx.config import load_config
from tidpo_mlx.files import WriteError, atomic_save_safetensors, free_bytes, size_text
from tidpo_mlx.metrics import MetricsLog, read_metrics
from tidpo_mlx.trainer import train

from conftest import arith_folder

PAGE = 4096


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Callable[[int], Path]]:
    """``mount(size)``: a fresh tmpfs of ``size`` bytes under ``tmp_path``, unmounted afterwards."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        if not sys.platform.startswith("linux") or os.geteuid() != 0:
            pytest.skip("mounting a size-limited tmpfs needs root on Linux")
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """Write a ballast file until ``disk`` has about ``leave`` bytes free (to the page)."""
    ballast = disk / "ballast"
    chunk = b"\0" * (1 << 16)
    with open(ballast, "ab") as f:
        while (free := free_bytes(disk)) > leave:
            f.write(chunk[:max(PAGE, min(len(chunk), free - leave))])
            f.flush()
    assert leave - 2 * PAGE <= free_bytes(disk) <= leave
    return ballast


def _on_disk(folder: Path) -> int:
    """Bytes the files under ``folder`` take on their filesystem."""
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _quiet(_: str) -> None:
    return None


@pytest.fixture(scope="module")
def base(tiny_model, tmp_path_factory) -> dict[str, Any]:
    data = arith_folder(tmp_path_factory.mktemp("disk-pairs"), 16, 4)
    return {"model": str(tiny_model), "data": str(data), "iters": 6, "batch_size": 2, "num_layers": 2,
            "learning_rate": 1e-3, "warmup_steps": 1, "anchor": "none", "steps_per_save": 2, "save_total_limit": 3,
            "val_batches": 0, "lr_schedule": "constant"}


def _cfg(base: dict[str, Any], out: Path, **kw: Any):
    return load_config(None, {**base, **kw, "adapter_path": str(out)})


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory) -> Path:
    """The same run of 6 steps on an ordinary disk."""
    out = tmp_path_factory.mktemp("disk-reference") / "run"
    train(_cfg(base, out), log=_quiet, progress=False)
    return out


def _same_adapters(a: Path, b: Path) -> None:
    x, y = mx.load(str(a / "adapters.safetensors")), mx.load(str(b / "adapters.safetensors"))
    assert x.keys() == y.keys()
    for k in x:
        np.testing.assert_allclose(np.array(x[k]), np.array(y[k]), rtol=0, atol=1e-6, err_msg=k)


def _train_steps(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out / "metrics.jsonl", _quiet) if "split" not in r]


def test_checkpoint_on_a_full_disk_keeps_the_last_one_names_the_need_and_resumes_once_freed(
        base, reference, small_disk):
    disk = small_disk(4 << 20)
    out = disk / "run"
    kept: dict[str, bytes] = {}
    ballast: list[Path] = []

    def fill_after_step_3(step: int, record: dict[str, float]) -> None:
        if step == 3:
            kept.update(_files(out / "checkpoints" / "step-000002"))
            ballast.append(fill(disk, 4 * PAGE))

    with pytest.raises(WriteError) as err:
        train(_cfg(base, out), log=_quiet, progress=False, on_step=fill_after_step_3)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint {out}/checkpoints/step-000004 not written ({out}/checkpoints/.step-000004.tmp/")
    assert "no space left on device: the checkpoint needs " in message and f"free in {out}/checkpoints)" in message
    assert message.endswith(f"last good checkpoint: {out}/checkpoints/step-000002; make room, then continue with --resume")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"], "no temp folder left"
    assert _files(out / "checkpoints" / "step-000002") == kept
    assert _train_steps(out) == [1, 2, 3, 4]

    ballast[0].unlink()
    lines: list[str] = []
    train(_cfg(base, out), resume="", log=lines.append, progress=False)
    assert any("start at step 2 of 6" in line for line in lines), lines
    _same_adapters(reference, out)
    assert _train_steps(out) == [1, 2, 3, 4, 5, 6]


def test_final_adapters_on_a_full_disk_keep_the_previous_file(base, reference, small_disk, tmp_path):
    disk = small_disk(4 << 20)
    out = disk / "run"
    train(_cfg(base, out, iters=4, save_total_limit=10), log=_quiet, progress=False)
    previous = (out / "adapters.safetensors").read_bytes()
    checkpoint = _on_disk(out / "checkpoints" / "step-000004")
    adapters = (out / "adapters.safetensors").stat().st_blocks * 512
    ballast: list[Path] = []

    def fill_after_step_5(step: int, record: dict[str, float]) -> None:
        if step == 5:  # room for the step-6 checkpoint and the metrics lines, not for new adapters beside the old
            ballast.append(fill(disk, checkpoint + 2 * PAGE + adapters // 2))

    with pytest.raises(WriteError) as err:
        train(_cfg(base, out, steps_per_save=100, save_total_limit=10), resume="", log=_quiet, progress=False,
              on_step=fill_after_step_5)
    message = str(err.value)
    assert message.startswith(f"{out}/adapters.safetensors: could not write (no space left on device: it needs ")
    assert message.endswith(f"free in {out}); the previous file is unchanged")
    assert (out / "adapters.safetensors").read_bytes() == previous
    assert not [p.name for p in out.iterdir() if p.name.startswith(".adapters")], "no temp file left"
    assert (out / "checkpoints" / "step-000006").is_dir()

    ballast[0].unlink()
    train(_cfg(base, out, steps_per_save=100, save_total_limit=10), resume="", log=_quiet, progress=False)
    _same_adapters(reference, out)


def test_metrics_append_on_a_full_disk_leaves_no_torn_line(small_disk):
    disk = small_disk(1 << 20)
    log = MetricsLog(disk / "metrics.jsonl")
    log.write({"step": 1, "loss": 0.5})
    before = (disk / "metrics.jsonl").read_bytes()
    ballast = fill(disk, 0)
    with pytest.raises(WriteError) as err:
        log.write({"step": 2, "loss": 0.4, "note": "x" * 3 * PAGE})
    assert str(err.value).startswith(f"{disk}/metrics.jsonl: could not append a record (no space left on device: "
                                     "the record needs 12 kB, ")
    assert str(err.value).endswith("); the records before it are kept")
    assert (disk / "metrics.jsonl").read_bytes() == before
    ballast.unlink()
    log.write({"step": 2, "loss": 0.4})
    assert [r["step"] for r in read_metrics(disk / "metrics.jsonl")] == [1, 2]


def test_safetensors_on_a_full_disk_names_the_need_and_keeps_the_old_file(small_disk):
    disk = small_disk(1 << 20)
    path = disk / "w.safetensors"
    atomic_save_safetensors(path, {"w": mx.zeros((1000,))})
    old = path.read_bytes()
    fill(disk, 8 * PAGE)
    with pytest.raises(WriteError) as err:
        atomic_save_safetensors(path, {"w": mx.zeros((100_000,))})
    assert str(err.value) == (f"{path}: could not write (no space left on device: it needs 400 kB, "
                              f"{size_text(free_bytes(disk))} free in {disk}); the previous file is unchanged")
    assert path.read_bytes() == old
    assert sorted(p.name for p in disk.iterdir()) == ["ballast", "w.safetensors"]
