"""Recomputed blocks (``grad_checkpoint``): same loss and gradients, undone per model, and the ``auto`` rule."""

from __future__ import annotations

import gc

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from tidpo_mlx import memory
from tidpo_mlx.backend import select
from tidpo_mlx.batching import collate
from tidpo_mlx.config import Switch, build_config
from tidpo_mlx.data import Example
from tidpo_mlx.models import attach_lora, load_base
from tidpo_mlx.objective import batch_objective
from tidpo_mlx.runtime import Facts, RowLayout, backward_blocks
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
    reference = attach_lora(model, cfg)
    for _, p in tree_flatten(model.trainable_parameters()):  # non-zero lora_b so every path carries gradient
        p += 0.01
    rt = select(model, cfg, reference=reference)
    if recompute:
        assert memory.recompute_blocks(model) == len(model.layers) and memory.recomputing(model)
    encoder = PairEncoder(load_tokenizer(model_path), cfg)
    rows = arith_rows(2, seed=3)
    rows[1]["prompt"] = "A longer question, with more words in it: " + rows[1]["prompt"]
    examples = [encoder.encode_row(i, f"t:{i}", r) for i, r in enumerate(rows)]
    batch, layout = rt.layout_batch(collate(examples, 0))
    step = nn.value_and_grad(model, lambda b: batch_objective(rt, cfg, b, layout))
    if compiled:
        step = rt.compile(step)
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
    small = memory.activation_bytes(model, n, whole, score_matrix=True)
    assert memory.activation_bytes(model, n, memory.Extent.of(_pairs(80, 48), 2, False), True) > 2 * small  # L^2
    assert memory.activation_bytes(model, 2 * n, whole, True) == 2 * small
    assert memory.activation_bytes(model, n, shared, True) < 0.8 * small  # each prompt once
    assert backward_blocks(model, 1, attribution=False) == 1
    assert backward_blocks(model, -1, attribution=False) == n
    assert backward_blocks(model, 1, attribution=True) == n  # d/dE goes through every block
    plain = Facts("cpu", RowLayout.ROWS, score_matrix=True, quantized=False, backward_blocks=n)
    insisted = memory.decide(Switch.TRUE, model, plain, whole)
    assert insisted.on and insisted.estimate is None and insisted.note == "grad_checkpoint: true"
    assert not memory.decide(Switch.FALSE, model, plain, whole).on
    decision = memory.decide(Switch.AUTO, model, plain, whole)
    assert not decision.on and decision.estimate.activations == small and "grad_checkpoint auto: off" in decision.note
    limit = mx.get_memory_limit()
    try:
        mx.set_memory_limit(small)  # activations over half the limit
        decision = memory.decide(Switch.AUTO, model, plain, whole)
        assert decision.on and "grad_checkpoint auto: on" in decision.note and "over 80%" in decision.note
        shared = Facts("cpu", RowLayout.SHARED_PREFIX, score_matrix=True, quantized=False, backward_blocks=n)
        held = memory.decide(Switch.AUTO, model, shared, whole, keep_shared_prefix=True)
        assert not held.on and held.held_off and held.estimate.over
        assert held.note.startswith("grad_checkpoint auto: off") and held.note.endswith("kept off for shared_prefix: true")
        leaves = memory.decide(Switch.AUTO, model, shared, whole)
        assert leaves.on and leaves.leaves_shared_prefix and not leaves.held_off
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
    rt_dpo = select(model, dpo)
    assert rt_dpo.facts.layout is RowLayout.SHARED_PREFIX
    prompt = max(len(ex.prompt) for ex in train_set)
    response = max(ex.overlap for ex in train_set)
    worst_pair = max(train_set, key=lambda ex: ex.length)
    loose = memory.Extent.of([Example(0, "t", [], [1] * prompt, [1] * response, [1])] * 2, 2, shared=True)
    low = memory.activation_bytes(model, 1, memory.Extent.of([worst_pair] * 2, 2, True), True)
    high = memory.activation_bytes(model, len(model.layers), memory.Extent.of([worst_pair] * 2, 2, False), True)
    assert high > 2 * low and memory.activation_bytes(model, 1, loose, True) > low
    reference = attach_lora(model, dpo)
    rt_dpo = select(model, dpo, reference=reference)
    trainable = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    gc.collect()
    resident = mx.get_active_memory() + memory.OPTIMIZER_COPIES * trainable
    limit = mx.get_memory_limit()
    try:
        mx.set_memory_limit(int((resident + (low + high) / 2) / memory.SHARE))  # between the two estimates
        decision = grad_checkpoint(rt_dpo, dpo, train_set, ranks=1)
        assert not decision.on and "auto: off" in decision.note and "for 1 blocks" in decision.note
        rt_whole = select(model, tidpo, reference=reference)
        decision = grad_checkpoint(rt_whole, tidpo, train_set, ranks=1)
        assert decision.on and "auto: on" in decision.note and f"for {len(model.layers)} blocks" in decision.note
        mx.set_memory_limit(resident)  # even the DPO step is over: recompute, over whole rows
        decision = grad_checkpoint(rt_dpo, dpo, train_set, ranks=1)
        assert decision.on and decision.leaves_shared_prefix
        assert decision.note.endswith("whole rows instead of the shared prefix")
        insist = build_config({**dpo.to_dict(), "shared_prefix": "true"})
        decision = grad_checkpoint(rt_dpo, insist, train_set, ranks=1)
        assert not decision.on and decision.held_off and decision.note.endswith("kept off for shared_prefix: true")
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
