"""A fresh process's first training steps, and what a new batch shape costs, in one process.

    python benchmarks/step_shapes.py --data DIR [--tokens 1024] [--variant dpo|tidpo]

Same configuration as ``run.py`` (batch 2 pairs, LoRA r8 on 7 linears of the
last 16 blocks, float32, the layout the trainer picks). The compiled
micro-step plus update (``trainer.compile_steps``) runs on the pairs of
``--data`` closest to ``--tokens`` per sequence: batch 0 again and again,
with batches of other padded shapes in between. A shape the compiled step
has not seen retraces it; if that were costly, the "new shape" calls would
stand out against the repeated batch 0. Make long chat data with
``chat_data.py DIR --tokens 1024``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import tidpo_mlx

tidpo_mlx.setup()  # before mlx: the fast BLAS

import mlx.core as mx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_step import BATCH, config  # noqa: E402

from tidpo_mlx.backend import select  # noqa: E402
from tidpo_mlx.batching import collate  # noqa: E402
from tidpo_mlx.config import Switch  # noqa: E402
from tidpo_mlx.data import load_dataset  # noqa: E402
from tidpo_mlx.models import attach_lora, load_base, resolve_model  # noqa: E402
from tidpo_mlx.trainer import build_optimizer, compile_steps  # noqa: E402

ORDER = (0, 0, 0, 1, 2, 0, 3, 4, 0, 5, 0)
"""Batches in call order: 0 repeated, the others each a shape the step may not have seen."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokens", type=float, default=1024.0)
    parser.add_argument("--variant", choices=("dpo", "tidpo"), default="dpo")
    args = parser.parse_args()

    extra = dict(loss_type="dpo", weighting="none", gamma=0.0) if args.variant == "dpo" else dict(gamma=0.0)
    cfg = config(Switch.AUTO, max_length=4 * int(args.tokens), max_prompt_length=3 * int(args.tokens), **extra)
    model, tok, _ = load_base(resolve_model(cfg.model), cfg.dequantize)
    examples = load_dataset(args.data, tok, cfg).train
    examples.sort(key=lambda e: (abs((2 * len(e.prompt) + len(e.chosen) + len(e.rejected)) / 2 - args.tokens), e.index))
    rt = select(model, cfg, reference=attach_lora(model, cfg))
    model.train()
    opt = build_optimizer(cfg)
    opt.init(model.trainable_parameters())
    grad_step, apply_step = compile_steps(rt, cfg, opt)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = [rt.layout_batch(collate(examples[BATCH * i: BATCH * (i + 1)], pad)) for i in range(max(ORDER) + 1)]
    print(f"{args.variant}, {rt.facts.layout} layout, {BATCH} pairs of about {args.tokens:.0f} tokens per sequence")
    seen: set[tuple] = set()
    for i in ORDER:
        batch, layout = batches[i]
        shape = tuple((k, tuple(v.shape)) for k, v in sorted(batch.items()))
        tic = time.perf_counter()
        loss, _, grads = grad_step(batch, layout)
        apply_step(grads)
        mx.eval(loss, model.parameters(), opt.state)
        seconds = time.perf_counter() - tic
        sizes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(batch.items()) if k in ("tokens", "prompt_tokens"))
        print(f"batch {i}  {'seen     ' if shape in seen else 'new shape'}  {seconds:6.2f} s  {sizes}  "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        seen.add(shape)


if __name__ == "__main__":
    main()
