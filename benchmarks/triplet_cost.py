"""What the triplet term costs on CPU: the anchor rows in the compiled step, and sampling the anchors.

    python benchmarks/chat_data.py /tmp/chat180 --tokens 180
    python benchmarks/triplet_cost.py --data /tmp/chat180 --tokens 180 [--reps 5] [--every 5]

Same configuration as benchmarks/run.py (batch 2 pairs, LoRA r8 on 7 linears
of the last 16 blocks, float32). Part 1 times the compiled micro-step (value
and gradient) on the 2 pairs closest to ``--tokens``: plain DPO, TI-DPO with
the triplet off, and TI-DPO with anchor rows (each pair's rejected response
cut to ``anchor_max_tokens`` as a stand-in anchor, then to the pair's overlap
as training does), in the shared-prefix and whole-row layouts. Part 2 times
``anchors.sample_anchors`` (the released sampler through mlx-lm's batched
generation, as training calls it) for one step's pairs and for ``--every``
steps' pairs (the amortised call), and mlx-lm's prefill and decode steps for
those prompts, so the sampling time splits into its two phases.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import tidpo_mlx

tidpo_mlx.setup()  # before mlx: the fast BLAS

import mlx.core as mx  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_step import closest_pairs, config, lora_model, median_s  # noqa: E402
from run import BATCH, load_avg  # noqa: E402

from tidpo_mlx.anchors import sample_anchors  # noqa: E402
from tidpo_mlx.batching import collate  # noqa: E402
from tidpo_mlx.config import Switch  # noqa: E402
from tidpo_mlx.data import PairEncoder  # noqa: E402
from tidpo_mlx.models import eval_mode  # noqa: E402
from tidpo_mlx.trainer import build_optimizer, compile_steps  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="data folder (e.g. from benchmarks/chat_data.py)")
    parser.add_argument("--tokens", type=float, default=180.0, help="target tokens per templated sequence")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--every", type=int, default=5, help="K of the amortised sampling call")
    args = parser.parse_args()

    cfgs = {"dpo": config(Switch.TRUE, loss_type="dpo", weighting="none", gamma=0.0),
            "tidpo, triplet off": config(Switch.TRUE, gamma=0.0), "tidpo + triplet": config(Switch.TRUE)}
    cfg = cfgs["tidpo + triplet"]
    rt, tok = lora_model(cfg)
    model = rt.model
    block = closest_pairs(args.data, tok, cfg, args.tokens, BATCH * args.every)
    pairs = block[:BATCH]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    anchors = [list(e.rejected[: cfg.anchor_max_tokens]) for e in pairs]
    print(f"pairs: prompt {[len(e.prompt) for e in pairs]}, chosen {[len(e.chosen) for e in pairs]}, "
          f"rejected {[len(e.rejected) for e in pairs]}, overlap {[e.overlap for e in pairs]}; load {load_avg()}")

    opt = build_optimizer(cfg)
    opt.init(model.trainable_parameters())
    print(f"\n{'compiled micro-step':28s} " + " ".join(f"{k:>20s}" for k in cfgs) + "   (s; / dpo)")
    for shared, run in ((True, rt), (False, rt.whole_rows())):
        times = {}
        for name, c in cfgs.items():
            batch, layout = run.layout_batch(collate(pairs, pad, anchors=anchors if c.triplet_on else None))
            grad_step, _ = compile_steps(run, c, opt)
            times[name] = median_s(lambda: mx.eval(grad_step(batch, layout)[2]), args.reps)
        cells = " ".join(f"{t:9.3f} s ({t / times['dpo']:4.2f}) " for t in times.values())
        print(f"{'shared prefix' if shared else 'whole rows':28s} {cells}")

    encoder = PairEncoder(tok, cfg)
    print(f"\nsampling (released sampler, <= min({cfg.anchor_max_tokens}, overlap + 8) new tokens), load {load_avg()}")
    for group in (pairs, block):
        t = median_s(lambda g=group: sample_anchors(model, tok, encoder, g, cfg, 1), max(1, args.reps // 2), warm=1)
        print(f"  sample_anchors, {len(group):2d} pairs: {t:6.2f} s")
    with eval_mode(model):
        for group in (pairs, block):
            width = max(len(e.prompt) for e in group)
            prompts = mx.array([[pad] * (width - len(e.prompt)) + list(e.prompt) for e in group])
            cache = make_prompt_cache(model)
            prefill = median_s(lambda: mx.eval(model(prompts, cache=make_prompt_cache(model))), 1, warm=1)
            mx.eval(model(prompts, cache=cache))
            step = mx.zeros((len(group), 1), dtype=mx.int32)
            decode = median_s(lambda: mx.eval(model(step, cache=cache)), 10, warm=3)
            print(f"  mlx-lm prefill of {len(group):2d} prompts x {width} tokens {prefill:5.2f} s; "
                  f"one decode step {1000 * decode:6.1f} ms")
    print(f"load at end {load_avg()}")


if __name__ == "__main__":
    main()
