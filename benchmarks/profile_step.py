"""Where the time of our DPO and TI-DPO steps goes, measured in one process, interleaved.

    python benchmarks/profile_step.py [--reps 12] [--data arith] [--tokens 53] [--no-fused]

Same configuration as benchmarks/run.py (batch 2 pairs, LoRA r8 on 7 linears
of the last 16 blocks, float32). Every piece is compiled and timed on the same
pairs, round-robin in bursts of 3 calls (so load drift hits all pieces
alike), median of the last 2 calls of each burst over --reps rounds after a
warm-up round; "whole" runs every row as the full sequence,
"shared" each pair's prompt once (the layout the trainer uses on CPU,
``tidpo_mlx/backend/cpu/prefix.py``):

  forward            policy log-probs at the response positions (no grad)
  forward+reference  policy and reference (adapters off) log-probs
  attribution        d max-logit / d embeddings for the chosen+rejected rows
  dpo grad           our DPO value_and_grad (reference inside), as the trainer compiles it
  tidpo grad         TI-DPO (triplet off) value_and_grad, attribution inside
  update             clip + AdamW
  ... and the two grads again, whole rows, with mlx's fused attention/RoPE (plain_attention false)

If the compiler shared nothing, tidpo grad = dpo grad + attribution; the report
shows how much of the attribution the compiled step actually pays.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import tidpo_mlx

tidpo_mlx.setup()  # before mlx: the fast BLAS

import mlx.core as mx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import BATCH, LEARNING_RATE, LORA, NUM_LAYERS, SEED, load_avg  # noqa: E402

from tidpo_mlx.backend import select  # noqa: E402
from tidpo_mlx.batching import Rows, collate  # noqa: E402
from tidpo_mlx.config import Switch, build_config  # noqa: E402
from tidpo_mlx.data import Example, load_dataset  # noqa: E402
from tidpo_mlx.models import attach_lora, load_base, resolve_model  # noqa: E402
from tidpo_mlx.objective import batch_logprobs, token_weights  # noqa: E402
from tidpo_mlx.runtime import RowLayout, Runtime  # noqa: E402
from tidpo_mlx.trainer import build_optimizer, compile_steps  # noqa: E402

LAYOUTS = ("whole", "shared")
BURST = 3
"""Calls of a piece in a row per round; the first of each burst is not timed (a switch between
compiled graphs made the next call up to 20 % slower in single-call round-robin)."""


def config(plain: Switch, **extra):
    return build_config(dict(
        preset="paper", batch_size=BATCH, num_layers=NUM_LAYERS, lora_parameters=dict(LORA),
        learning_rate=LEARNING_RATE, lr_schedule="constant", warmup_steps=0, seed=SEED,
        plain_attention=plain, **extra,
    ))


def median_s(fn: Callable[[], object], reps: int, warm: int = 2) -> float:
    """Median seconds of ``reps`` calls of ``fn`` after ``warm`` untimed ones."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def closest_pairs(data: str, tokenizer, cfg, tokens: float, n: int = BATCH) -> list[Example]:
    """The ``n`` training pairs of ``data`` whose mean templated sequence is closest to ``tokens``, closest first."""
    examples = load_dataset(data, tokenizer, cfg).train
    examples.sort(key=lambda e: (abs((2 * len(e.prompt) + len(e.chosen) + len(e.rejected)) / 2 - tokens), e.index))
    return examples[:n]


def lora_model(cfg) -> tuple[Runtime, object]:
    """The runtime of the built-in model with seeded LoRA attached, in training mode, and its tokenizer."""
    mx.random.seed(SEED)
    model, tokenizer, _ = load_base(resolve_model(cfg.model), cfg.dequantize)
    rt = select(model, cfg, reference=attach_lora(model, cfg))
    model.train()
    return rt, tokenizer


def pieces(plain: Switch, rows: Rows) -> dict[str, tuple[callable, tuple]]:
    """Compiled pieces of one model (plain-op or fused attention), each with the arguments it runs on."""
    dpo_cfg = config(plain, loss_type="dpo", weighting="none", gamma=0.0)
    tidpo_cfg = config(plain, gamma=0.0)
    rt, _ = lora_model(dpo_cfg)
    model = rt.model
    opt = build_optimizer(dpo_cfg)
    opt.init(model.trainable_parameters())
    if plain is Switch.FALSE:
        forwards = {"whole": rt}
    else:
        assert rt.facts.layout is RowLayout.SHARED_PREFIX
        forwards = {"whole": rt.whole_rows(), "shared": rt}
    out = {}
    grads = {}
    for layout, run in forwards.items():
        batch, lay = run.layout_batch(rows)
        dpo_grad, update = compile_steps(run, dpo_cfg, opt)
        tidpo_grad, _ = compile_steps(run, tidpo_cfg, opt)

        def logprobs(b, run=run, lay=lay):
            return batch_logprobs(run, b, run.embed(b), lay, False)[0]

        def forward_ref(b, logprobs=logprobs):
            with rt.reference():
                ref = logprobs(b)
            return logprobs(b), ref

        def attrib(b, run=run, lay=lay):
            return token_weights(run, tidpo_cfg, b, run.embed(b), lay.rows)["importance"]

        def dpo(b, lay=lay, dpo_grad=dpo_grad):
            grads["g"] = dpo_grad(b, lay)[2]
            return grads["g"]

        def tidpo(b, lay=lay, tidpo_grad=tidpo_grad):
            return tidpo_grad(b, lay)[2]

        if plain is Switch.FALSE:
            out.update({"dpo grad, whole (fused attention)": (dpo, batch),
                        "tidpo grad, whole (fused attention)": (tidpo, batch)})
            continue
        for name, fn in (("forward", rt.compile(logprobs)), ("forward+reference", rt.compile(forward_ref)),
                         ("attribution", rt.compile(attrib)), ("dpo grad", dpo), ("tidpo grad", tidpo)):
            out[f"{name}, {layout}"] = (fn, batch)

        def upd(b, update=update):
            update(grads["g"])
            return model.parameters(), opt.state

        if layout == "shared":
            out["update"] = (upd, batch)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=12)
    parser.add_argument("--data", default="arith")
    parser.add_argument("--tokens", type=float, default=53.0)
    parser.add_argument("--no-fused", action="store_true", help="skip the fused-attention model")
    args = parser.parse_args()

    cfg = config(Switch.TRUE)
    model, tok, _ = load_base(resolve_model(cfg.model), cfg.dequantize)
    del model
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = collate(closest_pairs(args.data, tok, cfg, args.tokens), pad)
    print(f"whole rows {tuple(rows.arrays['tokens'].shape)}, {BATCH} pairs; load {load_avg()}")

    fns = pieces(Switch.TRUE, rows)
    if not args.no_fused:
        fns.update(pieces(Switch.FALSE, rows))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(args.reps + 1):
        for name, (fn, batch) in fns.items():
            for call in range(BURST):
                tic = time.perf_counter()
                mx.eval(fn(batch))
                if rep >= 1 and call > 0:
                    times[name].append(time.perf_counter() - tic)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{'piece':34s} {'ms':>8s}   (median of {(BURST - 1) * args.reps} calls; load now {load_avg()})")
    for k, v in med.items():
        print(f"{k:34s} {1000 * v:8.1f}")
    for layout in LAYOUTS:
        d, t, a = (med[f"{k}, {layout}"] for k in ("dpo grad", "tidpo grad", "attribution"))
        print(f"\n{layout}: tidpo grad / dpo grad {t / d:.2f}; (dpo grad + attribution) / dpo grad {(d + a) / d:.2f}"
              f" (if nothing were shared); attribution paid inside the step: {(t - d) / a:.0%} of its stand-alone time")
    if "dpo grad, whole (fused attention)" in med:
        df, tf = med["dpo grad, whole (fused attention)"], med["tidpo grad, whole (fused attention)"]
        print(f"fused attention, whole rows: dpo {1000 * df:.0f} ms, tidpo {1000 * tf:.0f} ms, ratio {tf / df:.2f}")

if __name__ == "__main__":
    main()
