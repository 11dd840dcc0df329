"""Plain-op attention (CPU path) equals mlx-lm's fused attention, values and gradients."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.utils import load_model

from tidpo_mlx.backend.cpu.attention import restore_fused_attention, use_plain_attention


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_qwen2"])
def test_plain_attention_matches_fused(request, fixture):
    model, _ = load_model(request.getfixturevalue(fixture))
    tokens = mx.array([[3, 17, 40, 99, 5, 6, 7, 200, 11], [8, 9, 10, 11, 12, 13, 14, 15, 16]])
    fused = np.array(model(tokens))
    assert use_plain_attention(model) == len(model.layers)
    assert use_plain_attention(model) == len(model.layers)  # swapped blocks count again
    assert type(model.layers[0].self_attn).__name__.startswith("Plain")
    plain = np.array(model(tokens))
    np.testing.assert_allclose(plain, fused, atol=1e-4 * np.abs(fused).max())

    def loss(m):
        return m(tokens).max(axis=-1).sum()

    g_plain = nn.value_and_grad(model, loss)(model)[1]
    restore_fused_attention(model)
    assert not type(model.layers[0].self_attn).__name__.startswith("Plain")
    g_fused = nn.value_and_grad(model, loss)(model)[1]
    from mlx.utils import tree_flatten

    for (k, a), (_, b) in zip(tree_flatten(g_plain), tree_flatten(g_fused)):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4 * max(1.0, float(mx.abs(b).max())), err_msg=k)


def test_generation_with_cache_uses_the_fused_path(tiny_model):
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = load_model(tiny_model)
    prompt = mx.array([[3, 17, 40, 99]])
    cache = make_prompt_cache(model)
    want = np.array(model(prompt, cache=cache))
    use_plain_attention(model)
    cache = make_prompt_cache(model)
    np.testing.assert_allclose(np.array(model(prompt, cache=cache)), want, atol=1e-5)
