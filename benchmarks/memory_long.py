"""Peak memory of one TI-DPO training step at long lengths, whole-vocabulary head vs chunked (issue 16).

A random-weight model of Qwen2.5-1.5B's shape (mlx-lm ``qwen2``: hidden 1536,
12 heads, 2 kv heads, intermediate 8960, vocabulary 151936, tied
embeddings) with ``--layers`` blocks in float32 (the CPU computes with the
base dequantized), LoRA r8 on every linear of every block, batch 2 pairs (4
rows) of ``--prompt`` + ``--response`` tokens. One compiled micro-step
(``trainer.compile_steps``: gradient and optimizer update) runs after
``mx.reset_peak_memory``; ``mx.get_peak_memory`` is the peak.

Two peaks: with MLX's default memory limit (on the CPU the scheduler then
runs ahead, allocating the outputs of ops it has queued), and with
``--throttled``, the memory limit set just above the resident weights, so eval waits for running work before allocating more: the
least memory this step's graph needs, which is what a machine near its
limit gets (MLX throttles at its limit on Metal too). ``weights_4bit_gb_28_blocks``
is the size the full 28-block model's weights take quantized to 4 bits
(group 64, as mlx-lm quantizes), for the Mac estimate.

Run one configuration per process (fresh allocator); prints one JSON line:

    python benchmarks/memory_long.py --layers 2 --logits-chunk 0
"""

from __future__ import annotations

import argparse
import json
import os
import time

import tidpo_mlx

tidpo_mlx.setup()  # CPU BLAS and allocator set-up before mlx runs

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models import qwen2  # noqa: E402

from tidpo_mlx.backend import select  # noqa: E402
from tidpo_mlx.batching import collate  # noqa: E402
from tidpo_mlx.config import build_config  # noqa: E402
from tidpo_mlx.data import Example  # noqa: E402
from tidpo_mlx.models import attach_lora  # noqa: E402
from tidpo_mlx.trainer import build_optimizer, compile_steps  # noqa: E402

QWEN25_15B = dict(
    model_type="qwen2",
    hidden_size=1536,
    num_hidden_layers=28,
    intermediate_size=8960,
    num_attention_heads=12,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    vocab_size=151936,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
)
GB = 1e9


def nbytes(tree: object) -> int:
    """Bytes of every array in a parameter tree."""
    return sum(a.nbytes for _, a in tree_flatten(tree))


def weights_4bit_bytes(model: nn.Module) -> int:
    """Bytes of the 28-block model's weights in 4 bits (from ``model``'s shapes, before LoRA): matrices in
    4 bits with a 16-bit scale and bias per 64 values (mlx-lm's quantization), norms and biases in 16 bits."""
    blocks = QWEN25_15B["num_hidden_layers"]
    total = 0
    for k, a in tree_flatten(model.parameters()):
        size = a.size // 2 + 2 * 2 * a.size // 64 if a.ndim == 2 else 2 * a.size
        if k.startswith("model.layers."):
            size = size * blocks // len(model.layers)
        total += size
    return total


def pair(index: int, prompt: int, response: int, rng: np.random.Generator) -> Example:
    """A pair of random token ids of the requested lengths."""
    ids = lambda n: rng.integers(10, QWEN25_15B["vocab_size"] - 10, n).tolist()  # noqa: E731
    return Example(index=index, source="random", messages=[], prompt=ids(prompt), chosen=ids(response),
                   rejected=ids(response))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--logits-chunk", type=int, default=0)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--response", type=int, default=512)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--loss-type", default=None)
    parser.add_argument("--throttled", action="store_true", help="measure with the memory limit just above the weights")
    opts = parser.parse_args()

    mx.random.seed(0)
    model = qwen2.Model(qwen2.ModelArgs(**{**QWEN25_15B, "num_hidden_layers": opts.layers}))
    mx.eval(model.parameters())
    weights_4bit = weights_4bit_bytes(model)
    keys = {"model": "random", "preset": opts.preset, "num_layers": -1, "batch_size": 2, "anchor": "none",
            "lora_parameters": {"rank": 8}, "logits_chunk": opts.logits_chunk, "learning_rate": 1e-5}
    if opts.loss_type:
        keys["loss_type"] = opts.loss_type
    cfg = build_config(keys)
    rt = select(model, cfg, "qwen2.5-1.5b-shape", attach_lora(model, cfg))
    mx.eval(model.parameters())
    opt = build_optimizer(cfg)
    grad_step, apply_step = compile_steps(rt, cfg, opt)
    rng = np.random.default_rng(0)
    examples = [pair(i, opts.prompt, opts.response, rng) for i in range(2)]
    batch, layout = rt.layout_batch(collate(examples, 0))
    mx.eval(batch)

    weights = nbytes(model.parameters())
    resident = mx.get_active_memory()
    default_limit = mx.get_memory_limit()
    if opts.throttled:
        mx.set_memory_limit(resident + 2**20)
    mx.reset_peak_memory()
    start = time.perf_counter()
    loss, aux, grads = grad_step(batch, layout)
    apply_step(grads)
    mx.eval(loss, aux, model.parameters(), opt.state)
    seconds = time.perf_counter() - start
    peak = mx.get_peak_memory()
    mx.set_memory_limit(default_limit)
    print(json.dumps({
        "layers": opts.layers,
        "logits_chunk": opts.logits_chunk,
        "preset": opts.preset,
        "loss_type": cfg.loss_type,
        "tokens_per_sequence": opts.prompt + opts.response,
        "response_tokens": opts.response,
        "rows": layout.rows,
        "layout": layout.kind,
        "throttled": opts.throttled,
        "weights_gb": weights / GB,
        "resident_gb": resident / GB,
        "peak_gb": peak / GB,
        "activations_gb": (peak - resident) / GB,
        "weights_4bit_gb_28_blocks": weights_4bit / GB,
        "lora_params": sum(a.size for _, a in tree_flatten(model.trainable_parameters())),
        "loss": float(loss),
        "seconds_first_step": seconds,
        "load_average": os.getloadavg()[0],
        "notes": rt.notes,
    }), flush=True)


if __name__ == "__main__":
    main()
