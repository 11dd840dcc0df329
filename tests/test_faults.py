"""Fault injection: kill -9, Ctrl-C, torn and truncated files, full disks, reused folders, edited resumes.

Each test drives the real trainer on the tiny fixture model, mostly as
``python3 -m tidpo_mlx.cli train`` subprocesses, and checks that no finished
work is lost and that a resumed run ends where an uninterrupted one does.
"""

from __future__ import annotations

import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tidpo_mlx  # noqa: F401

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from tidpo_mlx.cli import main
from tidpo_mlx.config import Config, build_config, load_config
from tidpo_mlx.errors import ConfigError, TrainingError
from tidpo_mlx.files import WriteError
from tidpo_mlx.metrics import read_metrics
from tidpo_mlx.trainer import train

from conftest import arith_rows, write_jsonl

ITERS = 12


@pytest.fixture(scope="module")
def base(tiny_model, tmp_path_factory) -> dict[str, Any]:
    """The keys every run here sets on top of the quickstart recipe (data written here)."""
    data = tmp_path_factory.mktemp("fault-pairs")
    write_jsonl(data / "train.jsonl", arith_rows(16, 0))
    write_jsonl(data / "valid.jsonl", arith_rows(4, 1))
    return {"model": str(tiny_model), "data": str(data), "iters": ITERS, "batch_size": 2, "num_layers": 2,
            "learning_rate": 1e-3, "warmup_steps": 1, "anchor": "none", "steps_per_save": 2, "save_total_limit": 3}


def _flags(values: dict[str, Any]) -> list[str]:
    """The ``train`` flags of these keys."""
    return [w for k, v in values.items() for w in ("--" + k.replace("_", "-"), str(v))]


def _cfg(base: dict[str, Any], out: Path, **kw: Any) -> Config:
    """The Config the CLI resolves from the same keys (so in-process and subprocess runs agree)."""
    return load_config(None, {**base, **kw, "adapter_path": str(out)})


def _quiet(_: str) -> None:
    return None


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory) -> Path:
    """An uninterrupted run of ITERS steps (in-process)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(_cfg(base, out), log=_quiet, progress=False)
    return out


@pytest.fixture(scope="module")
def short(base, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("short") / "run"
    train(_cfg(base, out, iters=4), log=_quiet, progress=False)
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name))


def _assert_same_adapters(a: Path, b: Path) -> None:
    x, y = mx.load(str(a / "adapters.safetensors")), mx.load(str(b / "adapters.safetensors"))
    assert x.keys() == y.keys()
    for k in x:
        np.testing.assert_allclose(np.array(x[k]), np.array(y[k]), rtol=0, atol=1e-6, err_msg=k)


def _train_steps(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out / "metrics.jsonl", _quiet) if "split" not in r]


def _cli(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tidpo_mlx.cli", "train", "--quiet", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 120) -> bool:
    """Wait until metrics.jsonl records ``step``; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if (out / "metrics.jsonl").exists() and max(_train_steps(out) or [0]) >= step:
            return True
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def test_kill9_at_random_moments_then_resume_equals_uninterrupted(base, reference, tmp_path):
    rng = random.Random(15)
    out = tmp_path / "run"
    args = _flags(base) + ["--adapter-path", str(out)]
    proc = _cli(args, tmp_path)
    first = 3  # step 2 is checkpointed once step 3 is logged
    for high in (6, ITERS - 2):
        if not _wait_for_step(proc, out, rng.randint(min(first, high), high)):
            break  # it finished first: the checks below still hold
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first = max(int(p.name[5:]) for p in (out / "checkpoints").glob("step-*")) + 1
        proc = _cli(args + ["--resume"], tmp_path)
    code, text = _finish(proc)
    assert code == 0, text
    _assert_same_adapters(reference, out)
    assert _train_steps(out) == list(range(1, ITERS + 1))


def test_sigint_checkpoints_the_step_and_prints_the_resume_command(base, reference, tmp_path):
    out = tmp_path / "run"
    proc = _cli(_flags({**base, "steps_per_save": 100}) + ["--adapter-path", str(out)], tmp_path)
    assert _wait_for_step(proc, out, 3)
    proc.send_signal(signal.SIGINT)
    code, text = _finish(proc)
    assert code == 130, text
    step = max(_train_steps(out))
    assert (out / "checkpoints" / f"step-{step:06d}").is_dir()
    assert _train_steps(out) == list(range(1, step + 1))
    command = re.search(r"^  tidpo-mlx train (.*)$", text, re.M)
    assert command and f"--resume step-{step:06d}" in command.group(1), text
    proc = subprocess.Popen([sys.executable, "-m", "tidpo_mlx.cli", "train", "--quiet",
                             *command.group(1).split()], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    code, text = _finish(proc)
    assert code == 0, text
    _assert_same_adapters(reference, out)
    assert _train_steps(out) == list(range(1, ITERS + 1))


def test_second_ctrl_c_exits_at_once(tmp_path):
    script = (
        "import os, signal, time\n"
        "from tidpo_mlx.interrupts import StopRequest\n"
        "with StopRequest(print) as stop:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(0.2)\n"
        "    assert stop.signal_name == 'SIGINT'\n"
        "    print('first handled', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(5)\n"
        "    print('not reached')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130
    assert "first handled" in proc.stdout and "not reached" not in proc.stdout


def test_torn_metrics_line_is_dropped_and_a_named_checkpoint_resumes(base, short, tmp_path):
    out = _copy(short, tmp_path)
    final = (out / "adapters.safetensors").read_bytes()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.6')
    lines: list[str] = []
    train(_cfg(base, out, iters=4), resume="step-000002", log=lines.append, progress=False)
    assert any("torn last line dropped" in line and "metrics.jsonl" in line for line in lines)
    assert any("step-000004" in line and "moved to" in line for line in lines)
    assert _train_steps(out) == [1, 2, 3, 4]
    assert (out / "adapters.safetensors").read_bytes() == final
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000002", "step-000004"]
    assert [p.name for p in out.glob("set-aside-*/*")] == ["step-000004"]


def test_truncated_newest_optimizer_falls_back_to_the_previous_checkpoint(base, short, tmp_path):
    out = _copy(short, tmp_path)
    final = mx.load(str(out / "adapters.safetensors"))
    broken = out / "checkpoints" / "step-000004" / "optimizer.safetensors"
    os.truncate(broken, 100)
    with pytest.raises(TrainingError, match=r"--resume step-000004: cannot load .*step-000004/optimizer.safetensors"):
        train(_cfg(base, out, iters=4), resume="step-000004", log=_quiet, progress=False)
    lines: list[str] = []
    train(_cfg(base, out, iters=4), resume="", log=lines.append, progress=False)
    assert any(line.startswith("warning: checkpoint") and str(broken) in line for line in lines), lines
    assert any("start at step 2" in line for line in lines)
    again = mx.load(str(out / "adapters.safetensors"))
    for k in final:
        np.testing.assert_allclose(np.array(final[k]), np.array(again[k]), rtol=0, atol=1e-6)
    assert mx.load(str(out / "checkpoints" / "step-000004" / "optimizer.safetensors"))


def test_named_folder_with_a_run_is_refused_then_overwrite_moves_it(base, short, tmp_path):
    out = _copy(short, tmp_path)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = CliRunner().invoke(main, ["train", *_flags({**base, "iters": 2}), "--adapter-path", str(out)])
    assert result.exit_code == 1
    assert f"Error: {out} holds another run (checkpoints up to step-000004): continue it with --resume, " \
           "or pass --overwrite" in result.output
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    result = CliRunner().invoke(main, ["train", *_flags({**base, "iters": 2}), "--adapter-path", str(out),
                                       "--overwrite", "--quiet"])
    assert result.exit_code == 0, result.output
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and f"earlier run moved to {aside[0]}" in result.output
    assert {aside[0] / p.relative_to(out): b for p, b in before.items()} == \
           {p: p.read_bytes() for p in aside[0].rglob("*") if p.is_file()}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert _train_steps(out) == [1, 2]


def test_default_folder_goes_to_a_fresh_one_and_config_prints_only_with_verbose(base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = _flags({**base, "iters": 1, "steps_per_save": 0}) + ["--quiet"]
    first = CliRunner().invoke(main, ["train", *flags])
    assert first.exit_code == 0, first.output
    assert "resolved config:" not in first.output and "lora_parameters" not in first.output
    kept = (tmp_path / "adapters" / "adapters.safetensors").read_bytes()
    second = CliRunner().invoke(main, ["train", *flags, "--verbose"])
    assert second.exit_code == 0, second.output
    assert "adapters holds an earlier run; this run writes to adapters-2" in second.output
    assert "resolved config:" in second.output and "lora_parameters" in second.output
    assert (tmp_path / "adapters" / "adapters.safetensors").read_bytes() == kept
    assert (tmp_path / "adapters-2" / "adapters.safetensors").exists()
    assert "adapters-2" in (tmp_path / "adapters-2" / "config.yaml").read_text()


def test_resume_with_other_settings_stops_and_lists_the_keys(base, short, tmp_path):
    out = _copy(short, tmp_path)
    flags = _flags({**base, "iters": 4}) + ["--adapter-path", str(out), "--quiet", "--resume"]
    result = CliRunner().invoke(main, ["train", *flags, "--loss-type", "ipo", "--beta", "0.3"])
    assert result.exit_code == 1
    assert "--resume with settings that differ from the run that wrote it: beta 1.0 -> 0.3, " \
           "loss_type 'dpo' -> 'ipo'; use that run's settings, or add --force" in result.output
    longer = _flags({**base, "iters": 5}) + ["--adapter-path", str(out), "--quiet", "--resume"]
    result = CliRunner().invoke(main, ["train", *longer])
    assert result.exit_code == 1 and "iters 4 -> 5 (lr_schedule cosine decays to 0 at iters" in result.output
    result = CliRunner().invoke(main, ["train", *longer, "--force"])
    assert result.exit_code == 0, result.output
    assert "--force: continuing" in result.output and "iters 4 -> 5" in result.output
    assert _train_steps(out) == [1, 2, 3, 4, 5]


def test_constant_schedule_extends_iters_without_force(base, tmp_path):
    out = tmp_path / "run"
    train(_cfg(base, out, iters=2, lr_schedule="constant"), log=_quiet, progress=False)
    lines: list[str] = []
    train(_cfg(base, out, iters=3, lr_schedule="constant"), resume="", log=lines.append, progress=False)
    assert any("iters 2 -> 3 (constant schedule" in line for line in lines)
    assert _train_steps(out) == [1, 2, 3]


def test_full_disk_names_the_path_and_keeps_the_last_checkpoint(base, tiny_model, tmp_path):
    from tidpo_mlx.checkpoint import checkpoint_dirs, save_checkpoint
    from tidpo_mlx.models import attach_trainable, load_base
    from tidpo_mlx.trainer import build_optimizer

    cfg = _cfg(base, tmp_path / "run")
    model, _, _ = load_base(tiny_model)
    attach_trainable(model, cfg)
    opt = build_optimizer(cfg)
    opt.init(model.trainable_parameters())
    out = tmp_path / "run"
    good = save_checkpoint(out, 2, model, opt, {}, 3, {"seed": 0})
    files = {p.name: p.read_bytes() for p in good.iterdir()}
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))
    try:
        with pytest.raises(WriteError, match=rf"checkpoint {out}/checkpoints/step-000004 not written \(.*\); "
                                             rf"last good checkpoint: {good}"):
            save_checkpoint(out, 4, model, opt, {}, 3, {"seed": 0})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert checkpoint_dirs(out) == [good]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == files
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]


def test_bad_data_is_reported_before_the_weights_load(base, tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "model.safetensors").write_bytes(b"not weights")
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", arith_rows(4, 0) + [{"prompt": "only a prompt"}])
    write_jsonl(data / "valid.jsonl", arith_rows(2, 1))
    result = CliRunner().invoke(main, ["train", *_flags({**base, "model": str(model), "data": str(data)}),
                                       "--adapter-path", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "train.jsonl:5" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("keys,named", [
    ({"gamma": -0.1}, "'gamma' must be >= 0"),
    ({"triplet_margin": -1.0}, "'triplet_margin' must be >= 0"),
    ({"alpha": -0.5}, "'alpha' must be >= 0"),
    ({"anchor_top_p": 0.0}, "'anchor_top_p' must be in (0, 1]"),
    ({"anchor_top_p": 1.5}, "'anchor_top_p' must be in (0, 1]"),
    ({"num_layers": 0}, "'num_layers' must be >= 1, or -1 for every block"),
    ({"save_total_limit": 0}, "'save_total_limit' must be >= 1"),
    ({"loss_type": "simpo"}, "'weighting' must be none with loss_type simpo"),
    ({"loss_type": "ipo", "weighting": "none", "label_smoothing": 0.1}, "'label_smoothing' applies only to loss_type dpo"),
])
def test_config_holes_are_one_line_errors(keys, named):
    with pytest.raises(ConfigError) as err:
        build_config({"model": "x", **keys}, where="r.yaml")
    assert str(err.value).startswith("r.yaml: ") and named in str(err.value) and "\n" not in str(err.value)


def test_the_allowed_edges_of_those_keys_pass():
    build_config({"model": "x", "num_layers": -1, "anchor_top_p": 1.0, "gamma": 0.0, "save_total_limit": 1})
    build_config({"model": "x", "loss_type": "simpo", "weighting": "none"})
    build_config({"model": "x", "loss_type": "dpo", "label_smoothing": 0.2})
