"""Data-parallel training with two local ranks (mlx.launch, ring backend) equals one process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from conftest import arith_rows, write_jsonl

LAUNCH = shutil.which("mlx.launch")
pytestmark = pytest.mark.skipif(LAUNCH is None, reason="mlx.launch not on PATH")


def _train_args(model, data, out, batch_size, extra=()):
    return [sys.executable, "-m", "tidpo_mlx.cli", "train", "--quiet", "--model", str(model), "--data", str(data),
            "--adapter-path", str(out), "--iters", "4", "--batch-size", str(batch_size), "--num-layers", "2",
            "--learning-rate", "1e-3", "--warmup-steps", "1", "--steps-per-save", "2", *extra]


def _launch(args, timeout=300):
    return subprocess.run([LAUNCH, "-n", "2", "--backend", "ring", "--", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    rows = arith_rows(16, 0)
    for i, row in enumerate(rows):
        row["anchor"] = f"I think it is {i + 40}."
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "valid.jsonl", arith_rows(6, 1))
    return folder


def test_two_ranks_equal_one_process(tiny_model, data_dir, tmp_path):
    # SGD (not Adam, which is invariant to the gradient's scale) so a sum instead of an average would show
    sgd = ["--optimizer", "sgd", "--learning-rate", "0.1", "--max-grad-norm", "0"]
    single = subprocess.run(_train_args(tiny_model, data_dir, tmp_path / "one", 4, sgd), capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    double = _launch(_train_args(tiny_model, data_dir, tmp_path / "two", 4, sgd))
    assert double.returncode == 0, double.stdout[-2000:] + double.stderr[-2000:]
    assert "distributed: 2 ranks" in double.stdout

    def curve(folder):
        lines = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]
        return np.array([(r["loss"], r["rewards/accuracies"], r["grad_norm"]) for r in lines if "split" not in r])

    one, two = curve(tmp_path / "one"), curve(tmp_path / "two")
    # step 1 sees identical weights: equal up to float summation order
    np.testing.assert_allclose(one[0], two[0], rtol=1e-5)
    # later steps: float noise grows through the max-logit attribution target and the triplet hinge
    np.testing.assert_allclose(one, two, rtol=1e-3)

    a = mx.load(str(tmp_path / "one" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "two" / "adapters.safetensors"))
    for k in (k for k in a if k.endswith("lora_b")):  # lora_b starts at 0: its value is the whole update
        update = float(mx.abs(a[k]).max())
        assert update > 1e-3
        assert float(mx.abs(a[k] - b[k]).max()) < 1e-2 * update, k
    summary_one = json.loads((tmp_path / "one" / "summary.json").read_text())
    summary_two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary_two["ranks"] == 2
    for key in ("policy_preference_accuracy", "rewards/accuracies"):
        assert summary_one["after"][key] == pytest.approx(summary_two["after"][key], abs=1e-6)


def test_two_ranks_resume(tiny_model, data_dir, tmp_path):
    constant = ["--lr-schedule", "constant"]  # extending iters under a decaying schedule needs --force
    first = _launch(_train_args(tiny_model, data_dir, tmp_path / "r", 4, ["--iters", "2", *constant]))
    assert first.returncode == 0, first.stderr[-2000:]
    again = _launch(_train_args(tiny_model, data_dir, tmp_path / "r", 4, ["--iters", "4", "--resume", *constant]))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "start at step 2 of 4" in again.stdout
    steps = [json.loads(l)["step"] for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
             if "split" not in json.loads(l)]
    assert steps == [1, 2, 3, 4]


def test_a_failing_rank_stops_the_job_with_its_message(tiny_model, data_dir, tmp_path):
    result = _launch(_train_args(tiny_model, data_dir, tmp_path / "bad", 3), timeout=120)
    assert result.returncode != 0 or "rank" in result.stderr
    assert "batch_size 3 is not divisible by the 2 ranks" in result.stdout + result.stderr
