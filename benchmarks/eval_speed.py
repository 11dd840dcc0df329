"""Held-out and audit-scoring passes against the plain uncompiled loop and a training step, in one run.

    python benchmarks/eval_speed.py [--recipe quickstart] [--repeats 3]

On the recipe's model and held-out split (default: the quickstart, the bundled
150 pairs), per repeat and in turns: the plain loop (each batch of
``2 * batch_size`` pairs through ``objective.batch_logprobs`` uncompiled, as
the held-out pass ran before ``scoring.Scorer``), the scorer's policy pass, the
plain loop for policy and reference (two passes), the scorer's ``both`` pass
(the audit's scores), and compiled training micro-steps of the recipe on
training batches. Prints medians in seconds per pair and their ratios; LoRA
weights are random (policy != reference), so nothing is shared by accident.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import tidpo_mlx

tidpo_mlx.setup()  # before mlx: the fast BLAS

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from tidpo_mlx.batching import collate, eval_batches  # noqa: E402
from tidpo_mlx.config import load_config  # noqa: E402
from tidpo_mlx.models import eval_mode  # noqa: E402
from tidpo_mlx.evaluation import Pairs, evaluate_pairs  # noqa: E402
from tidpo_mlx.objective import batch_logprobs, batch_objective  # noqa: E402
from tidpo_mlx.scoring import Scorer  # noqa: E402
from tidpo_mlx.trainer import compile_steps, load_run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="training micro-steps per repeat")
    opts = parser.parse_args()
    cfg = load_config(opts.recipe, {"adapter_path": os.path.join(tempfile.mkdtemp(), "run")})
    run = load_run(cfg, log=lambda _: None)
    rt, model = run.rt, run.rt.model
    rng = np.random.default_rng(0)
    model.load_weights([(k, mx.array(rng.normal(scale=0.01, size=v.shape).astype(np.float32)))
                        for k, v in tree_flatten(model.trainable_parameters())], strict=False)
    valid = run.data.valid
    plain_batches = [rt.layout_batch(collate(b, run.pad_id)) for b in eval_batches(valid, 2 * cfg.batch_size)]
    scorer = Scorer(rt, cfg, run.pad_id)
    batches = scorer.batches(valid, 2 * cfg.batch_size)
    grad_step, _ = compile_steps(rt, cfg, run.opt)
    train = [rt.layout_batch(collate(b, run.pad_id)) for b, _ in zip(run.batches(0), range(opts.steps))]

    def plain(reference: bool) -> None:
        with eval_mode(model):
            for batch, layout in plain_batches:
                out = [batch_logprobs(rt, batch, rt.embed(batch), layout, chunk=cfg.logits_chunk)[0].sum(-1)]
                if reference:
                    with rt.reference():
                        out.append(batch_logprobs(rt, batch, rt.embed(batch), layout, chunk=cfg.logits_chunk)[0].sum(-1))
                mx.eval(out)

    objective_batches = [rt.layout_batch(collate(b, run.pad_id)) for b in eval_batches(valid, cfg.batch_size)]

    def plain_objective() -> None:
        with eval_mode(model):
            for batch, layout in objective_batches:
                mx.eval(batch_objective(rt, cfg, batch, layout)[1])

    pairs_in = Pairs("held-out split", [], valid, run.encoder, [])

    def training() -> None:
        for batch, layout in train:
            mx.eval(grad_step(batch, layout))

    runs = {
        "plain policy": lambda: plain(False),
        "scorer policy": lambda: scorer.sums(batches, "policy"),
        "plain policy + reference": lambda: plain(True),
        "scorer both": lambda: scorer.sums(batches, "both"),
        "eval objective, plain": plain_objective,
        "eval objective (evaluate_pairs)": lambda: evaluate_pairs(rt, run.tokenizer, cfg, pairs_in, cfg.batch_size),
        "training micro-step": training,
    }
    pairs = {name: len(valid) for name in runs}
    pairs["training micro-step"] = opts.steps * cfg.batch_size
    scorer.sums(batches, "policy"), scorer.sums(batches, "both"), training()
    evaluate_pairs(rt, run.tokenizer, cfg, pairs_in, cfg.batch_size)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(opts.repeats):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) / pairs[name])
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"{opts.recipe}: {len(valid)} held-out pairs in {len(batches)} scorer batches "
          f"({len(plain_batches)} plain), load {os.getloadavg()[0]:.1f}")
    for name, v in med.items():
        print(f"  {name:32s} {v * 1e3:8.1f} ms/pair  (runs: {', '.join(f'{x * 1e3:.1f}' for x in times[name])})")
    print(f"  scorer / plain, policy:             {med['scorer policy'] / med['plain policy']:.2f}")
    print(f"  scorer both / plain two passes:     {med['scorer both'] / med['plain policy + reference']:.2f}")
    print(f"  evaluate_pairs / plain objective:   "
          f"{med['eval objective (evaluate_pairs)'] / med['eval objective, plain']:.2f}")
    print(f"  scorer policy / training micro-step: {med['scorer policy'] / med['training micro-step']:.2f}")


if __name__ == "__main__":
    main()
