"""Gradient checkpointing (``grad_checkpoint``) at long lengths: memory against time, and the ``auto`` estimate.

    python benchmarks/grad_checkpoint.py [--shape smollm2-135m|qwen2.5-1.5b] [--layers N] [--lengths 512,1024]

A random-weight model of the named shape (mlx-lm ``llama`` / ``qwen2``, float32,
LoRA r8 on the 7 linears of every block), the paper preset (TI-DPO weights, so
the attribution pass runs; triplet off), batch 2 pairs of ``L/2`` prompt and
``L/2`` response tokens per sequence. For each length, three variants of the
compiled micro-step (``trainer.compile_steps``): the default (shared prompt
prefix, no recomputation), whole rows, and whole rows with every block
recomputed (``memory.recompute_blocks``). Per variant: the peak memory above
the resident weights of one step run under a memory limit just above them (the
least the graph needs; see ``memory_long.py``), and the median seconds of
``--steps`` unthrottled steps, the variants taking turns, so their ratio is
measured under the same load. The estimates of ``memory.activation_bytes`` (whole rows, shared prefix)
are printed next to the measured activations.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import tidpo_mlx

tidpo_mlx.setup()  # CPU BLAS and allocator set-up before mlx runs

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.models import llama, qwen2  # noqa: E402

from tidpo_mlx import memory  # noqa: E402
from tidpo_mlx.backend import select  # noqa: E402
from tidpo_mlx.batching import collate  # noqa: E402
from tidpo_mlx.config import build_config  # noqa: E402
from tidpo_mlx.data import Example  # noqa: E402
from tidpo_mlx.models import attach_lora  # noqa: E402
from tidpo_mlx.trainer import build_optimizer, compile_steps  # noqa: E402

SHAPES = {
    "smollm2-135m": (llama, dict(model_type="llama", hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
                                 num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, vocab_size=49152,
                                 rope_theta=100000.0, tie_word_embeddings=True)),
    "qwen2.5-1.5b": (qwen2, dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28, intermediate_size=8960,
                                 num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=151936,
                                 rope_theta=1000000.0, tie_word_embeddings=True)),
}
VARIANTS = ("shared prefix", "whole rows", "whole rows, recomputed")
GB = 1e9


def pair(index: int, prompt: int, response: int, vocab: int, rng: np.random.Generator) -> Example:
    ids = lambda n: rng.integers(10, vocab - 10, n).tolist()  # noqa: E731
    return Example(index=index, source="random", messages=[], prompt=ids(prompt), chosen=ids(response),
                   rejected=ids(response))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=0, help="blocks (0: the shape's own)")
    parser.add_argument("--lengths", default="512,1024", help="tokens per sequence, comma-separated")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    opts = parser.parse_args()

    module, shape = SHAPES[opts.shape]
    if opts.layers:
        shape = {**shape, "num_hidden_layers": opts.layers}
    for length in (int(v) for v in opts.lengths.split(",")):
        keys = {"model": "random", "preset": "paper", "num_layers": -1, "batch_size": 2, "anchor": "none",
                "lora_parameters": {"rank": 8}, "learning_rate": 1e-6, "max_length": length, "max_prompt_length": length // 2}
        rng = np.random.default_rng(0)
        examples = [pair(i, length // 2, length - length // 2, shape["vocab_size"], rng) for i in range(2)]
        steps = {}
        for variant in VARIANTS:
            vcfg = build_config({**keys, "shared_prefix": "auto" if variant == "shared prefix" else "false"})
            mx.random.seed(0)
            model = module.Model(module.ModelArgs(**shape))
            reference = attach_lora(model, vcfg)
            mx.eval(model.parameters())
            rt = select(model, vcfg, opts.shape, reference)
            if variant.endswith("recomputed"):
                memory.recompute_blocks(model)
            opt = build_optimizer(vcfg)
            opt.init(model.trainable_parameters())
            grad_step, apply_step = compile_steps(rt, vcfg, opt)
            batch, layout = rt.layout_batch(collate(examples, 0))
            mx.eval(batch, opt.state)
            resident = mx.get_active_memory()
            limit = mx.get_memory_limit()
            mx.set_memory_limit(resident + 2**20)
            mx.reset_peak_memory()
            loss, aux, grads = grad_step(batch, layout)
            apply_step(grads)
            mx.eval(loss, model.parameters(), opt.state)
            peak = mx.get_peak_memory()
            mx.set_memory_limit(limit)
            steps[variant] = {"step": (model, grad_step, apply_step, batch, layout, opt), "layout": layout.kind,
                              "rows": layout.rows, "activations_gb": (peak - resident) / GB, "loss": float(loss),
                              "blocks_recomputed": memory.recomputing(model), "seconds": []}
            mx.clear_cache()
        for _ in range(opts.steps):
            for variant in VARIANTS:
                model, grad_step, apply_step, batch, layout, opt = steps[variant]["step"]
                tic = time.perf_counter()
                loss, aux, grads = grad_step(batch, layout)
                apply_step(grads)
                mx.eval(loss, model.parameters(), opt.state)
                steps[variant]["seconds"].append(time.perf_counter() - tic)
        estimates = {f"estimate_{name}_gb": memory.activation_bytes(
            model, len(model.layers), memory.Extent.of(examples, 2, shared), True) / GB
            for name, shared in (("whole_rows", False), ("shared_prefix", True))}
        base = statistics.median(steps["whole rows"]["seconds"])
        for variant in VARIANTS:
            s = steps.pop(variant)
            s.pop("step")
            median = statistics.median(s["seconds"])
            print(json.dumps({"shape": opts.shape, "blocks": shape["num_hidden_layers"], "length": length,
                              "variant": variant, **s, "median_s": median, "time_vs_whole_rows": median / base,
                              **estimates, "load_average": os.getloadavg()[0]}), flush=True)
            steps[variant] = s


if __name__ == "__main__":
    main()
