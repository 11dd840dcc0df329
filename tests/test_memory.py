"""Recomputed blocks (``grad_checkpoint``): same loss and gradients, undone per model, and the ``auto`` rule."""

from __future__ import annotations

import gc

import tidpo_mlx  # noqa: F401

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from tidpo_mlx import memory
from tidpo_mlx.batching import collate
from tidpo_mlx.config import build_config
from tidpo_mlx.data import Example
from tidpo_mlx.forward import make_forward
from tidpo_mlx.models import attach_lora, load_base
from tidpo_mlx.objective import batch_objective
from tidpo_mlx.trainer import train

from conftest import arith_folder, arith_rows


def _grads(model_path, recompute: bool, compiled: bool):
    """Loss and LoRA gradients of one paper-preset micro-step on two messy pairs (whole rows)."""
    from tidpo_mlx.data import PairEncoder
    from mlx_lm.utils import load_tokenizer

    cfg = build_config({"model": "x", "preset": "paper", "anchor": "none", "num_layers": -1, "shared_prefix": "false",
                        "grad_checkpoint": "true" if recompute else "false"})
    model, _, _ = load_base(model_path)
    mx.random.seed(0)
    attach_lora(model, cfg)
    for _, p in tree_flatten(model.trainable_parameters()):  # non-zero lora_b so every path carries gradient
        p += 0.01
    fwd, _ = make_forward(model, cfg)
    if recompute:
        assert memory.recompute_blocks(model) == len(model.layers) and memory.recomputing(model)
    encoder = PairEncoder(load_tokenizer(model_path), cfg)
    rows = arith_rows(2, seed=3)
    rows[1]["prompt"] = "A longer question, with more words in it: " + rows[1]["prompt"]
    examples = [encoder.encode_row(i, f"t:{i}", r) for i, r in enumerate(rows)]
    batch, layout = fwd.prepare(collate(examples, 0))
    step = nn.value_and_grad(model, lambda b: batch_objective(fwd, cfg, b, layout))
    if compiled:
        step = mx.compile(step, inputs=[model.state], outputs=[model.state])
    (loss, _), grads = step(batch)
    mx.eval(loss, grads)
    out = float(loss), {k: np.array(v) for k, v in tree_flatten(grads)}
    memory.restore_blocks(model)
    assert not memory.recomputing(model)
    return out


@pytest.mark.parametrize("compiled", [False, True])
def test_recomputed_blocks_give_the_same_loss_and_gradients(tiny_model, compiled):
    loss, grads = _grads(tiny_model, recompute=False, compiled=compiled)
    loss_r, grads_r = _grads(tiny_model, recompute=True, compiled=compiled)
    assert loss_r == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grads_r.keys() and len(grads) > 4
    for k in grads:
        np.testing.assert_allclose(grads_r[k], grads[k], rtol=1e-4, atol=1e-7, err_msg=k)
    assert any(np.abs(g).max() > 0 for g in grads.values())


def _pairs(prompt: int, response: int, n: int = 2) -> list[Example]:
    return [Example(index=i, source="t", messages=[], prompt=[5] * prompt, chosen=[6] * response,
                    rejected=[7] * (response - 8)) for i in range(n)]


def test_auto_follows_the_estimate_and_the_memory_limit(tiny_model):
    model, _, _ = load_base(tiny_model)
    n = len(model.layers)
    whole = memory.Extent.of(_pairs(40, 24), 2, shared=False)
    assert whole == memory.Extent(4 * 64, 4 * 64 * 64)
    shared = memory.Extent.of(_pairs(40, 24), 2, shared=True)
    assert shared == memory.Extent(2 * 40 + 4 * 24, 2 * 40 * 40 + 4 * 24 * 64)
    assert memory.Extent.of(_pairs(40, 24), 3, shared=True).tokens == 2 * 40 + 6 * 24  # anchor rows
    assert memory.Extent.of(_pairs(37, 21), 2, shared=False) == whole  # padded as training pads (multiples of 8)
    small = memory.activation_bytes(model, n, whole, plain_attention=True)
    assert memory.activation_bytes(model, n, memory.Extent.of(_pairs(80, 48), 2, False), True) > 2 * small  # L^2
    assert memory.activation_bytes(model, 2 * n, whole, True) == 2 * small
    assert memory.activation_bytes(model, n, shared, True) < 0.8 * small  # each prompt once
    assert memory.backward_blocks(model, 1, attribution=False) == 1
    assert memory.backward_blocks(model, -1, attribution=False) == n
    assert memory.backward_blocks(model, 1, attribution=True) == n  # d/dE goes through every block
    assert memory.decide("true", model, n, whole, True) == (True, "grad_checkpoint: true")
    on, note = memory.decide("auto", model, n, whole, True)
    assert not on and "grad_checkpoint auto: off" in note
    limit = mx.get_memory_limit()
    try:
        mx.set_memory_limit(small)  # activations over half the limit
        on, note = memory.decide("auto", model, n, whole, True)
        assert on and "grad_checkpoint auto: on" in note and "over 80%" in note
    finally:
        mx.set_memory_limit(limit)


def test_auto_counts_the_blocks_and_tokens_the_step_runs(tiny_model):
    """A DPO step on the last block with the shared prefix keeps far less than TI-DPO over whole rows: under a
    limit between the two estimates, auto recomputes only the latter (and says when it leaves the shared prefix).
    The largest micro-step counts, not the longest prompt and the longest response of different pairs."""
    from mlx_lm.utils import load_tokenizer

    from tidpo_mlx.data import PairEncoder
    from tidpo_mlx.trainer import grad_checkpoint

    model, _, _ = load_base(tiny_model)
    dpo = build_config({"model": "x", "loss_type": "dpo", "weighting": "none", "gamma": 0.0, "anchor": "none",
                        "num_layers": 1, "batch_size": 2})
    tidpo = build_config({**dpo.to_dict(), "preset": "paper", "loss_type": "dpo", "weighting": "hybrid",
                          "shared_prefix": "false"})
    encoder = PairEncoder(load_tokenizer(tiny_model), dpo)
    rows = arith_rows(6, seed=5)
    rows[0]["prompt"] = "A much longer question, with many more words in it than the others have: " + rows[0]["prompt"]
    rows[1]["chosen"] = "A much longer answer, with many more words in it than the others have: " + rows[1]["chosen"]
    train_set = [encoder.encode_row(i, f"t:{i}", r) for i, r in enumerate(rows)]
    fwd_dpo, _ = make_forward(model, dpo)
    assert fwd_dpo.kind == "shared-prefix"
    prompt = max(len(ex.prompt) for ex in train_set)
    response = max(ex.overlap for ex in train_set)
    worst_pair = max(train_set, key=lambda ex: ex.length)
    loose = memory.Extent.of([Example(0, "t", [], [1] * prompt, [1] * response, [1])] * 2, 2, shared=True)
    low = memory.activation_bytes(model, 1, memory.Extent.of([worst_pair] * 2, 2, True), True)
    high = memory.activation_bytes(model, len(model.layers), memory.Extent.of([worst_pair] * 2, 2, False), True)
    assert high > 2 * low and memory.activation_bytes(model, 1, loose, True) > low
    attach_lora(model, dpo)
    trainable = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    gc.collect()
    resident = mx.get_active_memory() + memory.OPTIMIZER_COPIES * trainable
    limit = mx.get_memory_limit()
    try:
        mx.set_memory_limit(int((resident + (low + high) / 2) / memory.SHARE))  # between the two estimates
        on, note = grad_checkpoint(dpo, fwd_dpo, train_set, ranks=1)
        assert not on and "auto: off" in note and "for 1 blocks" in note
        fwd_whole, _ = make_forward(model, tidpo)
        on, note = grad_checkpoint(tidpo, fwd_whole, train_set, ranks=1)
        assert on and "auto: on" in note and f"for {len(model.layers)} blocks" in note
        mx.set_memory_limit(resident)  # even the DPO step is over: recompute, over whole rows
        on, note = grad_checkpoint(dpo, fwd_dpo, train_set, ranks=1)
        assert on and note.endswith("whole rows instead of the shared prefix")
        insist = build_config({**dpo.to_dict(), "shared_prefix": "true"})
        on, note = grad_checkpoint(insist, fwd_dpo, train_set, ranks=1)
        assert not on and note.endswith("kept off for shared_prefix: true")
    finally:
        mx.set_memory_limit(limit)


def test_training_with_grad_checkpoint_logs_it_and_turns_the_shared_prefix_off(tiny_model, tmp_path):
    data = arith_folder(tmp_path / "data", 8, 4)
    lines: list[str] = []
    cfg = build_config({"model": str(tiny_model), "data": str(data), "adapter_path": str(tmp_path / "ad"), "iters": 2,
                        "batch_size": 2, "num_layers": 2, "anchor": "none", "grad_checkpoint": "true"})
    train(cfg, log=lines.append, progress=False)
    assert any("grad_checkpoint: true" in line for line in lines)
    assert not any("shared prefix:" in line for line in lines)
    lines.clear()
    train(build_config({**cfg.to_dict(), "adapter_path": str(tmp_path / "ad2"), "grad_checkpoint": "auto"}),
          log=lines.append, progress=False)
    assert any("grad_checkpoint auto: off" in line for line in lines)
    assert any("shared prefix:" in line for line in lines)
