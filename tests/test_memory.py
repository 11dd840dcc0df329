"""Recomputed blocks (``grad_checkpoint``): same loss and gradients, undone per model, and the ``auto`` rule."""

from __future__ import annotations

import tidpo_mlx  # noqa: F401

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from tidpo_mlx import memory
from tidpo_mlx.batching import collate
from tidpo_mlx.config import build_config
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


def test_auto_follows_the_estimate_and_the_memory_limit(tiny_model):
    model, _, _ = load_base(tiny_model)
    small = memory.activation_bytes(model, 4, 64, plain_attention=True)
    assert memory.activation_bytes(model, 4, 128, plain_attention=True) > 2 * small  # attention scores grow as L^2
    assert memory.activation_bytes(model, 8, 64, plain_attention=True) == 2 * small
    assert memory.decide("true", model, 4, 64, True) == (True, "grad_checkpoint: true")
    on, note = memory.decide("auto", model, 4, 64, True)
    assert not on and "grad_checkpoint auto: off" in note
    limit = mx.get_memory_limit()
    try:
        mx.set_memory_limit(small)  # activations over half the limit
        on, note = memory.decide("auto", model, 4, 64, True)
        assert on and "grad_checkpoint auto: on" in note and "over 50%" in note
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
