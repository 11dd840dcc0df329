"""Two versions of tidpo-mlx, interleaved step by step in one lockstep run: median step time per variant.

Each (version, variant) trains in its own process on the same batches
(``run.prepare``); the driver hands out one step at a time, round-robin, so
a change of machine load hits every process alike. The other version is a
source tree with ``tidpo_mlx/`` (``convert/`` and ``recipes/`` copied inside
it), e.g. made with::

    mkdir /tmp/old && git archive REV | tar -x -C /tmp/old
    mv /tmp/old/convert /tmp/old/recipes /tmp/old/tidpo_mlx/

    python benchmarks/compare_code.py /tmp/old --steps 24
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as bench  # noqa: E402

VARIANTS = ("dpo", "tidpo_no_triplet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", help="source tree of the other version (its tidpo_mlx/ is imported)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--tokens", type=float, default=58.0, help="target tokens per sequence")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tidpo-compare-"))
    spec = bench.prepare(work, "arith", args.steps, args.tokens)
    spec.update(steps=args.steps, anchor_every=5, has_anchor_every=True)
    procs = {}
    for variant in VARIANTS:
        for version in ("other", "this"):
            tag = f"{version}-{variant}"
            wspec = dict(spec, adapter_path=str(work / f"out-{tag}"), log=str(work / f"{tag}.log"))
            spec_path, out_path = work / f"{tag}.spec.json", work / f"{tag}.result.json"
            spec_path.write_text(json.dumps(wspec))
            go_r, go_w = os.pipe()
            done_r, done_w = os.pipe()
            env = dict(os.environ, TIDPO_BENCH_GATE=f"{go_r},{done_w}")
            if version == "other":
                env["PYTHONPATH"] = str(Path(args.other).resolve())
            with open(wspec["log"], "a") as log:
                proc = subprocess.Popen(
                    [sys.executable, str(HERE / "run.py"), "--worker", f"ours:{variant}", "--spec", str(spec_path),
                     "--out", str(out_path)], stdout=log, stderr=log, pass_fds=(go_r, done_w), env=env)
            os.close(go_r)
            os.close(done_w)
            procs[(version, variant)] = dict(proc=proc, go=go_w, done=done_r, out=out_path)
    loads = []
    for step in range(args.steps):
        for key, p in procs.items():
            if step > 0:
                os.write(p["go"], b"g")
            ready, _, _ = select.select([p["done"]], [], [], 900)
            if not ready or os.read(p["done"], 1) != b"d":
                raise SystemExit(f"{key} stopped at step {step + 1}; logs in {work}")
        loads.append(round(os.getloadavg()[0], 2))
    for p in procs.values():
        os.write(p["go"], b"g")
        p["proc"].wait()
    median = {}
    for key, p in procs.items():
        times = json.loads(p["out"].read_text())["step_times"]
        median[key] = statistics.median(times[2:])
        print(f"{key[0]:5s} {key[1]:18s} median s/step (steps 3..{args.steps}): {median[key]:.3f}")
    for variant in VARIANTS:
        print(f"{variant}: this / other = {median[('this', variant)] / median[('other', variant)]:.3f}")
    for version in ("other", "this"):
        print(f"TI-DPO / DPO, {version}: {median[(version, 'tidpo_no_triplet')] / median[(version, 'dpo')]:.3f}")
    print(f"load average after each round: {loads}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
