"""Step time and peak memory of our DPO and TI-DPO steps, measured in one run on the same batches.

    python benchmarks/step_time.py [--model smollm2-135m-instruct] [--steps 20] [--json out.json]

Configuration (issue 6): batch 2 pairs, LoRA rank 8 on all 7 linear layers of
the last 16 blocks, dropout 0, reference computed inside the step for both,
both compiled. Prints medians of steps 6..N and the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import tidpo_mlx  # noqa: F401  (fast BLAS before mlx)

import mlx.core as mx

from tidpo_mlx.anchors import sample_anchors
from tidpo_mlx.config import build_config
from tidpo_mlx.data import PairEncoder, collate, load_dataset
from tidpo_mlx.models import attach_lora, load_base, resolve_model
from tidpo_mlx.objective import to_mx
from tidpo_mlx.trainer import build_optimizer, compile_steps

VARIANTS = {
    "dpo": dict(loss_type="dpo", weighting="none", gamma=0.0),
    "tidpo_no_triplet": dict(preset="paper", gamma=0.0),
    "tidpo_triplet_data_anchor": dict(preset="paper"),
    "tidpo_triplet_sampled": dict(preset="paper"),
}


def measure(variant: str, args: argparse.Namespace) -> dict[str, float]:
    """Median step time (s) and peak memory (GB) of one variant on the bundled data."""
    cfg = build_config(dict(model=args.model, data=args.data, batch_size=args.batch_size, num_layers=16,
                            learning_rate=1e-5, **VARIANTS[variant]))
    mx.random.seed(0)
    model, tok, _ = load_base(resolve_model(cfg.model), cfg.dequantize, cfg.plain_attention)
    data = load_dataset(cfg.data, tok, cfg)
    attach_lora(model, cfg)
    opt = build_optimizer(cfg)
    opt.init(model.trainable_parameters())
    model.train()
    grad_step, apply_step = compile_steps(model, cfg, opt)
    encoder = PairEncoder(tok, cfg)
    batches = [data.train[i: i + cfg.batch_size] for i in range(0, cfg.batch_size * args.steps, cfg.batch_size)]
    mx.reset_peak_memory()
    times = []
    for step, examples in enumerate(batches):
        tic = time.perf_counter()
        anchors = None
        if variant == "tidpo_triplet_data_anchor":
            anchors = [e.anchor or e.rejected for e in examples]
        elif variant == "tidpo_triplet_sampled":
            stripped = [type(e)(**{**e.__dict__, "anchor": None}) for e in examples]
            anchors = sample_anchors(model, tok, encoder, stripped, cfg, seed=step)
        loss, aux, grads = grad_step(to_mx(collate(examples, 0, anchors)))
        apply_step(grads)
        mx.eval(loss, model.parameters())
        times.append(time.perf_counter() - tic)
    return {"step_s": statistics.median(times[5:]), "peak_gb": mx.get_peak_memory() / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="arith")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = {v: measure(v, args) for v in args.variants.split(",")}
    dpo = results["dpo"]["step_s"]
    print(f"{'variant':28s} {'s/step':>8s} {'/ DPO':>7s} {'peak GB':>8s}")
    for name, r in results.items():
        print(f"{name:28s} {r['step_s']:8.3f} {r['step_s'] / dpo:7.2f} {r['peak_gb']:8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
