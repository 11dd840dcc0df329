"""GGUF export of the built-in SmolLM2 with a trained adapter, run by llama.cpp (``slow``; needs the ``llama`` extra).

The real-model case of ``tests/test_gguf_export.py``: f16 logits within 1 % of
the logits' range and identical greedy 20-token continuations, the q8_0 and
q4_0 figures printed, ``--lora-only`` applied by llama.cpp matching the merged
file, ``gguf-to-mlx`` reading the export back, and the ChatML template
formatted by llama.cpp into the tokenizer's own tokens.
"""

from __future__ import annotations

import tidpo_mlx  # noqa: F401  (loads the fast BLAS before mlx)

import mlx.core as mx
import numpy as np
import pytest

from conftest import arith_folder
from test_gguf_export import (
    F16_BOUND,
    chat_ids,
    llama_cpp_chat_ids,
    llama_cpp_file_logits,
    llama_cpp_greedy,
    llama_cpp_logits,
    llama_cpp_model,
    mlx_greedy,
    mlx_logits,
    mlx_model,
    prompt_tokens,
    relative,
)
from tidpo_mlx.convert.gguf_export import lora_to_gguf, to_gguf

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An adapter trained a few steps on every linear layer of every block of SmolLM2."""
    from tidpo_mlx.config import build_config
    from tidpo_mlx.trainer import train

    root = tmp_path_factory.mktemp("smollm2")
    cfg = build_config(dict(model=MODEL, data=str(arith_folder(root / "data", 8, 2)), adapter_path=str(root / "ad"),
                            iters=2, batch_size=2, num_layers=-1, learning_rate=1e-3, warmup_steps=0,
                            anchor="none", val_batches=0))
    return train(cfg, log=lambda s: None, progress=False).adapter_path


@pytest.mark.slow
def test_smollm2_with_trained_adapter_in_llama_cpp(trained, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install '.[llama]')")
    from mlx_lm import load

    from tidpo_mlx.convert.gguf import gguf_to_mlx

    model, tokenizer = mlx_model(MODEL, trained)
    tokens = prompt_tokens(tokenizer._tokenizer)
    ours = mlx_logits(model, tokens)

    figures = {}
    for outtype in ("f16", "q8_0", "q4_0"):
        out = tmp_path / f"smollm2-{outtype}.gguf"
        to_gguf(MODEL, out, adapter_path=trained, outtype=outtype)
        llm = llama_cpp_model(out)
        theirs = llama_cpp_logits(llm, tokens)
        figures[outtype] = relative(theirs, ours)
        if outtype == "f16":
            greedy, _ = mlx_greedy(model, tokens)
            assert llama_cpp_greedy(llm, tokens) == greedy
        llm.close()
    print("\nSmolLM2 + adapter: max|llama.cpp - MLX| / range: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()))
    assert figures["f16"] <= F16_BOUND

    base, lora = tmp_path / "base-f16.gguf", tmp_path / "adapter.gguf"
    to_gguf(MODEL, base)
    lora_to_gguf(MODEL, trained, lora)
    merged = tmp_path / "smollm2-f16.gguf"
    with_lora = llama_cpp_file_logits(base, tokens, lora=lora)
    fused = llama_cpp_file_logits(merged, tokens)
    print(f"SmolLM2 --lora-only vs merged (both llama.cpp f16): {relative(with_lora, fused):.4f}; "
          f"adapter effect {relative(llama_cpp_file_logits(base, tokens), fused):.4f}")
    assert relative(with_lora, fused) <= F16_BOUND

    back, back_tok = load(str(gguf_to_mlx(merged, tmp_path / "back")))
    assert chat_ids(back_tok._tokenizer)[:32] == tokens
    assert relative(np.array(back(mx.array([tokens]))[0]), ours) <= F16_BOUND


@pytest.mark.slow
def test_smollm2_chat_template_formats_in_llama_cpp_as_the_tokenizer_does(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install '.[llama]')")
    _, tokenizer = mlx_model(MODEL, None)
    out = tmp_path / "smollm2.gguf"
    to_gguf(MODEL, out)
    assert llama_cpp_chat_ids(out, tokenizer._tokenizer) == chat_ids(tokenizer._tokenizer)
