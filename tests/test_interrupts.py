"""Interrupted anywhere: Ctrl-C or SIGTERM during a held-out pass, anchor sampling or the first compilation.

Each run is a real ``tidpo-mlx train`` subprocess on the tiny fixture model.
The held-out case sends SIGTERM from outside while a long held-out pass
runs; the anchor and compilation cases send the signal from inside the
process at a chosen moment (a wrapper around mlx-lm's decode step or the
first micro-step, which only sends the signal and counts what ran after it),
so the moment is exact. Each stop must come within 10 s, checkpoint the
last finished step, print the resume command, and resume to the adapters
of an uninterrupted run.
"""

from __future__ import annotations

import os
import re
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

from tidpo_mlx.config import load_config
from tidpo_mlx.interrupts import StopRequest, Stopped, check
from tidpo_mlx.metrics import read_metrics
from tidpo_mlx.trainer import train

from conftest import arith_rows, write_jsonl

DRIVER = r'''
import os, signal, sys, threading, time
from tidpo_mlx import cli

trigger, argv = sys.argv[1], sys.argv[2:]


def note(what):
    print(f"@@ {what} {time.monotonic():.3f}", flush=True)


def send():
    note("signal")
    os.kill(os.getpid(), signal.SIGINT)


if trigger == "anchors":  # SIGINT after the 2nd decode step of step 3's anchor sampling
    from mlx_lm.generate import BatchGenerator
    from tidpo_mlx import anchors

    state = {"step": 0, "decodes": 0}
    for_batch = anchors.AnchorSource.for_batch

    def counted_for_batch(self, step, micro, examples):
        state["step"] = step
        return for_batch(self, step, micro, examples)

    next_generated = BatchGenerator.next_generated

    def counted_next(self):
        out = next_generated(self)
        if state["step"] == 3:
            state["decodes"] += 1
            if state["decodes"] == 2:
                send()
            elif state["decodes"] > 2:
                note("decoded after the signal")
        return out

    anchors.AnchorSource.for_batch = counted_for_batch
    BatchGenerator.next_generated = counted_next
elif trigger == "compile":  # SIGINT 50 ms into the first micro-step (tracing and compiling it)
    from tidpo_mlx import trainer

    compile_steps = trainer.compile_steps

    def counted_compile_steps(*args):
        grad_step, apply_step = compile_steps(*args)
        calls = [0]

        def counted_grad_step(*batch):
            calls[0] += 1
            if calls[0] == 1:
                threading.Timer(0.05, send).start()
            else:
                note("micro-step after the signal")
            return grad_step(*batch)

        return counted_grad_step, apply_step

    trainer.compile_steps = counted_compile_steps

sys.argv = ["tidpo-mlx", "train", "--quiet", *argv]
cli.main()
'''


def _quiet(_: str) -> None:
    return None


@pytest.fixture(scope="module")
def base(tiny_model, tmp_path_factory) -> dict[str, Any]:
    data = tmp_path_factory.mktemp("interrupt-pairs")
    write_jsonl(data / "train.jsonl", arith_rows(16, 0))
    write_jsonl(data / "valid.jsonl", arith_rows(300, 1))
    return {"model": str(tiny_model), "data": str(data), "iters": 6, "batch_size": 2, "num_layers": 2,
            "learning_rate": 1e-3, "warmup_steps": 1, "anchor": "none", "steps_per_save": 100, "val_batches": 0}


def _flags(values: dict[str, Any]) -> list[str]:
    return [w for k, v in values.items() for w in ("--" + k.replace("_", "-"), str(v))]


def _reference(base: dict[str, Any], out: Path, **kw: Any) -> Path:
    train(load_config(None, {**base, **kw, "adapter_path": str(out)}), log=_quiet, progress=False)
    return out


def _start(args: list[str], cwd: Path, trigger: str = "none") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, trigger, *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _notes(text: str, what: str) -> list[float]:
    return [float(t) for t in re.findall(rf"^@@ {what} ([0-9.]+)$", text, re.M)]


def _records(out: Path) -> list[dict[str, Any]]:
    return read_metrics(out / "metrics.jsonl", _quiet)


def _train_steps(out: Path) -> list[int]:
    return [r["step"] for r in _records(out) if "split" not in r]


def _resume_command(text: str) -> list[str]:
    found = re.search(r"^  tidpo-mlx train (.*)$", text, re.M)
    assert found, text
    return found.group(1).split()


def _resume(words: list[str], cwd: Path, *extra: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "tidpo_mlx.cli", "train", "--quiet", *words, *extra], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _same_adapters(a: Path, b: Path) -> None:
    x, y = mx.load(str(a / "adapters.safetensors")), mx.load(str(b / "adapters.safetensors"))
    assert x.keys() == y.keys()
    for k in x:
        np.testing.assert_allclose(np.array(x[k]), np.array(y[k]), rtol=0, atol=1e-6, err_msg=k)


def test_check_raises_only_inside_a_stop_request_that_was_asked(tmp_path):
    check()  # outside training: nothing
    with StopRequest(_quiet) as stop:
        check()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        with pytest.raises(Stopped, match="stopped by SIGINT"):
            check()
        assert stop.signal_name == "SIGINT"
    check()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_distributed_run_stops_only_where_the_ranks_agree():
    class TwoRanks:
        @staticmethod
        def size() -> int:
            return 2

    with StopRequest(_quiet, TwoRanks()) as stop:
        stop.signal_name = "SIGTERM"
        check()  # a rank alone must not leave a collective the others wait in


def test_sigterm_during_a_held_out_pass_stops_within_10_s_and_resumes_exactly(base, tmp_path):
    reference = _reference(base, tmp_path / "reference")
    out = tmp_path / "run"
    proc = _start(_flags({**base, "steps_per_eval": 2, "val_batches": -1}) + ["--adapter-path", str(out)], tmp_path)
    deadline = time.monotonic() + 300
    while not ((out / "metrics.jsonl").exists() and 2 in _train_steps(out)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # the step-2 held-out pass of 300 pairs starts as step 2 is logged
    sent = time.monotonic()
    text, _ = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 10, text
    assert proc.returncode == 143, text
    assert "step 2 held-out" not in text and [r["step"] for r in _records(out) if "split" in r] == [0], \
        "the signal must land inside the step-2 held-out pass"
    assert "stopped by SIGTERM after step 2 of 6" in text
    assert (out / "checkpoints" / "step-000002").is_dir() and _train_steps(out) == [1, 2]
    words = _resume_command(text)
    assert words[-2:] == ["--resume", "step-000002"]
    _resume(words, tmp_path, "--val-batches", "0")
    _same_adapters(reference, out)
    assert _train_steps(out) == [1, 2, 3, 4, 5, 6]


def test_sigint_during_anchor_sampling_stops_at_the_next_token_and_resumes_exactly(base, tmp_path):
    keys = {**base, "iters": 4, "anchor": "policy", "gamma": 0.1}
    reference = _reference(keys, tmp_path / "reference")
    out = tmp_path / "run"
    proc = _start(_flags(keys) + ["--adapter-path", str(out)], tmp_path, "anchors")
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, text
    (sent,) = _notes(text, "signal")
    assert _notes(text, "decoded after the signal") == [], "decoding must stop at the next token"
    assert "stopped by SIGINT after step 2 of 4" in text
    assert (out / "checkpoints" / "step-000002").is_dir() and _train_steps(out) == [1, 2]
    _resume(_resume_command(text), tmp_path)
    _same_adapters(reference, out)


def test_signal_during_the_first_compilation_exits_when_mlx_returns_with_what_was_checkpointed(base, tmp_path):
    keys = {**base, "grad_accumulation_steps": 2}
    out = tmp_path / "run"
    proc = _start(_flags(keys) + ["--adapter-path", str(out)], tmp_path, "compile")
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, text
    assert _notes(text, "micro-step after the signal") == [], "no further micro-step after the compiled one returns"
    assert "stopped by SIGINT before step 1 of 6 finished; nothing to resume: run the same command again" in text
    assert _train_steps(out) == [] and not (out / "checkpoints").exists()

    constant = {**keys, "steps_per_save": 2, "lr_schedule": "constant"}
    reference = _reference(constant, tmp_path / "reference")
    again = _reference({**constant, "iters": 2}, tmp_path / "again")
    proc = _start(_flags(constant) + ["--adapter-path", str(again), "--resume"], tmp_path, "compile")
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, text
    assert f"stopped by SIGINT after step 2 of 6; checkpoint {again / 'checkpoints' / 'step-000002'}" in text
    words = _resume_command(text)
    assert words[-2:] == ["--resume", "step-000002"] and _train_steps(again) == [1, 2]
    _resume(words, tmp_path)
    _same_adapters(reference, again)
