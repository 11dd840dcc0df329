"""Two versions of tidpo-mlx, interleaved step by step in one lockstep run: median step time per variant.

Each (version, variant) trains in its own process on the same batches
(``run.prepare``), and ``run.measure_lockstep`` hands out one step at a time,
round-robin, so a change of machine load hits every process alike. The other
version is a source tree with ``tidpo_mlx/`` (``convert/`` and ``recipes/``
copied inside it), e.g. made with::

    mkdir /tmp/old && git archive REV | tar -x -C /tmp/old
    mv /tmp/old/convert /tmp/old/recipes /tmp/old/tidpo_mlx/

    python benchmarks/compare_code.py /tmp/old --steps 24
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402

VARIANTS = ("dpo", "tidpo_no_triplet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", help="source tree of the other version (its tidpo_mlx/ is imported)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--tokens", type=float, default=58.0, help="target tokens per sequence")
    parser.add_argument("--timeout", type=int, default=900, help="seconds a worker may take for one step")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tidpo-compare-"))
    spec = bench.prepare(work, "arith", args.steps, args.tokens)
    spec.update(steps=args.steps, anchor_every=5, has_anchor_every=True)
    names = [f"ours:{v}{suffix}" for v in VARIANTS for suffix in ("@other", "")]
    results, loads = bench.measure_lockstep(names, spec, work, 0, args.timeout,
                                            code={"other": str(Path(args.other).resolve())})
    failed = [n for n, r in results.items() if "error" in r]
    if failed:
        raise SystemExit(f"{', '.join(failed)} failed; logs in {work}")
    median = {n: statistics.median(r["step_times"][2:]) for n, r in results.items()}
    for name in names:
        print(f"{name:26s} median s/step (steps 3..{args.steps}): {median[name]:.3f}")
    for v in VARIANTS:
        print(f"{v}: this / other = {median[f'ours:{v}'] / median[f'ours:{v}@other']:.3f}")
    for suffix, version in (("@other", "other"), ("", "this")):
        ratio = median[f"ours:tidpo_no_triplet{suffix}"] / median[f"ours:dpo{suffix}"]
        print(f"TI-DPO / DPO, {version}: {ratio:.3f}")
    print(f"load average at each round: {[round(l[0], 2) for l in loads]}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
