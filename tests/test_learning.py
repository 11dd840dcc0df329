"""Training learns: every loss, token weighting, the triplet and full fine-tuning lower the loss and train every tensor.

Each case trains the tiny fixture model ``ITERS`` steps on one fixed batch
(the same 4 pairs every optimizer step: one micro-batch of 4, or two of 2
accumulated) at a learning rate and ``beta`` that make the change visible, and asserts

- the loss falls: the last step's loss (after ``ITERS - 1`` updates) is below
  ``DROP`` times the first step's (policy = reference);
- every trained tensor changes after step 1: each tensor of the final
  ``adapters.safetensors`` differs from the step-1 checkpoint's. LoRA's
  ``lora_b`` starts at zero, so ``lora_a``'s first gradient is exactly zero and
  only steps 2.. can move it; each ``lora_b`` must also be non-zero after step 1.

A loss whose gradient is structurally zero (a stop-gradient in the wrong place,
the loss built from detached values) logs normal-looking metrics but fails
both: Adam moves no tensor whose gradient is exactly zero.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from tidpo_mlx.config import build_config
from tidpo_mlx.trainer import train

from conftest import arith_rows, write_jsonl

ITERS = 4
DROP = 0.8
"""The last step's loss must be below DROP x the first's."""
TRIPLET = dict(gamma=1.0, triplet_margin=10.0)
"""A triplet strong enough to steer training, with a margin that keeps the hinge ``max(0, .)`` open for a few steps
(at the margin of the paper preset it closes after one step and the triplet's gradient is 0)."""
BATCHING = {"one": dict(batch_size=4), "accumulated": dict(batch_size=2, grad_accumulation_steps=2)}
"""Each optimizer step sees the 4 training pairs: one micro-batch of 4, or two of 2 accumulated."""
LOSS_CASES = [
    ("dpo", "none"), ("dpo", "hybrid"),
    ("ipo", "none"), ("ipo", "hybrid"),
    ("tdpo1", "none"), ("tdpo1", "hybrid"),
    ("tdpo2", "none"), ("tdpo2", "hybrid"),
    ("simpo", "none"),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Two data folders of the same 4 training pairs: plain, and with an ``anchor`` field on every pair."""
    root = tmp_path_factory.mktemp("learning-data")
    rows = arith_rows(4, 0)
    plain, anchored = root / "plain", root / "anchored"
    write_jsonl(plain / "train.jsonl", rows)
    write_jsonl(anchored / "train.jsonl", [{**r, "anchor": "The answer is 3."} for r in rows])
    for folder in (plain, anchored):
        write_jsonl(folder / "valid.jsonl", arith_rows(2, 1))
    return {"plain": plain, "anchored": anchored}


def _load(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def _train(model: Path, data: Path, out: Path, **kw: Any) -> tuple[list[dict], dict, dict]:
    """Train; return the per-step records, the saved tensors after step 1 and at the end."""
    settings = dict(model=str(model), data=str(data), adapter_path=str(out), iters=ITERS, num_layers=2,
                    beta=1.0, learning_rate=5e-4, lr_schedule="constant", warmup_steps=0, anchor="none", val_batches=0,
                    steps_per_save=1, save_total_limit=ITERS)
    train(build_config({**settings, **kw}), log=lambda s: None, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "split" not in r]
    assert [r["step"] for r in steps] == list(range(1, ITERS + 1))
    first = _load(out / "checkpoints" / "step-000001" / "adapters.safetensors")
    return steps, first, _load(out / "adapters.safetensors")


def _assert_learns(steps: list[dict], first: dict, last: dict) -> None:
    losses = [r["loss"] for r in steps]
    assert losses[-1] < DROP * losses[0], f"loss did not fall: {losses}"
    assert last and first.keys() == last.keys()
    unchanged = sorted(k for k in last if np.array_equal(first[k], last[k]))
    assert not unchanged, f"{len(unchanged)} of {len(last)} tensors unchanged by steps 2-{ITERS}: {unchanged}"


def _assert_lora(first: dict, last: dict) -> None:
    """Both blocks' 7 linear layers carry a LoRA pair, and every ``lora_b`` has left zero by step 1."""
    modules = {k.rsplit(".", 1)[0] for k in last}
    assert len(modules) == 2 * 7 and set(last) == {f"{m}.{p}" for m in modules for p in ("lora_a", "lora_b")}
    assert {m.split(".")[2] for m in modules} == {"0", "1"}
    zero = sorted(k for k in first if k.endswith("lora_b") and not first[k].any())
    assert not zero, f"no gradient reached these at step 1: {zero}"


@pytest.mark.parametrize("batching", list(BATCHING))
@pytest.mark.parametrize("loss_type,weighting", LOSS_CASES)
def test_every_loss_lowers_the_loss_and_trains_every_adapter(tiny_model, folders, tmp_path, loss_type, weighting,
                                                              batching):
    steps, first, last = _train(tiny_model, folders["plain"], tmp_path / "ad", loss_type=loss_type,
                                weighting=weighting, **BATCHING[batching])
    assert all(r["loss/triplet"] == 0.0 for r in steps)
    _assert_learns(steps, first, last)
    _assert_lora(first, last)


@pytest.mark.parametrize("batching", list(BATCHING))
@pytest.mark.parametrize("anchor", ["sample", "policy"])
def test_triplet_lowers_the_loss_and_trains_every_adapter(tiny_model, folders, tmp_path, anchor, batching):
    """TI-DPO (hybrid weights + triplet) on pairs that carry an ``anchor``: used as is (``anchor: sample``), or
    ignored and sampled from the policy (``anchor: policy``, the path of pairs without one under ``anchor: sample``,
    which tests/test_train.py shows samples the same anchors)."""
    steps, first, last = _train(tiny_model, folders["anchored"], tmp_path / "ad", anchor=anchor, anchor_max_tokens=8,
                                **TRIPLET, **BATCHING[batching])
    triplet = [r["loss/triplet"] for r in steps]
    # step 1: rho = 0 on every row, so d(a, y_w) = d(a, y_l) = 0 and the triplet is its margin: the anchor rows are in
    assert triplet[0] == pytest.approx(TRIPLET["triplet_margin"], abs=1e-4)
    _assert_learns(steps, first, last)
    _assert_lora(first, last)
    if anchor == "sample":
        # fixed anchors: only the triplet's own gradient closes it (a detached triplet grows past its margin here)
        assert triplet[-1] < TRIPLET["triplet_margin"] / 2, triplet


@pytest.mark.parametrize("batching", list(BATCHING))
def test_full_fine_tune_lowers_the_loss_and_trains_every_tensor(tiny_model, folders, tmp_path, batching):
    """``fine_tune_type: full`` on the last block: every saved tensor moves away from the base and after step 1."""
    steps, first, last = _train(tiny_model, folders["plain"], tmp_path / "full", fine_tune_type="full",
                                num_layers=1, **BATCHING[batching])
    _assert_learns(steps, first, last)
    base = _load(tiny_model / "model.safetensors")
    block = {k for k in base if k.startswith("model.layers.1.")}
    assert set(last) == block
    same = sorted(k for k in last if np.array_equal(last[k], base[k]))
    assert not same, f"equal to the base weights: {same}"
