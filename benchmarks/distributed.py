"""Step time per global batch: one process vs `mlx.launch -n N --backend ring` local ranks.

    python benchmarks/distributed.py [--ranks 2] [--steps 10] [--batch-size 4] [--threads 1]

Both runs train the built-in model on the bundled data with the quickstart
recipe (triplet off, so no sampling) and the same global batch; step times
come from each run's ``metrics.jsonl`` (rank 0's clock, gradients averaged and
metrics gathered inside the step). Prints the median of steps 3..N for each and
their ratio. Local ranks on one machine share its cores: on a 2-core box this
measures the cost of the collectives and of splitting the batch, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(cmd: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def step_times(folder: Path) -> list[float]:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time"] for r in records if "split" not in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="OPENBLAS_NUM_THREADS for every process (0: default)")
    args = ap.parse_args()
    launch = shutil.which("mlx.launch")
    if launch is None:
        sys.exit("mlx.launch is not on PATH")
    env = dict(os.environ)
    if args.threads:
        env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = str(args.threads)
    common = ["train", "--quiet", "--anchor", "none", "--iters", str(args.steps), "--batch-size",
              str(args.batch_size), "--val-batches", "1", "--steps-per-save", "0"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, prefix in (("1 process", []), (f"{args.ranks} ranks", [launch, "-n", str(args.ranks), "--backend", "ring", "--"])):
            out = Path(tmp) / name.replace(" ", "_")
            run([*prefix, sys.executable, "-m", "tidpo_mlx.cli", *common, "--adapter-path", str(out)], env)
            times = step_times(out)
            results[name] = statistics.median(times[2:])
            print(f"{name}: median step {results[name]:.2f} s (steps 3..{args.steps}: "
                  f"{min(times[2:]):.2f}-{max(times[2:]):.2f} s)", flush=True)
    one, many = results.values()
    print(f"{args.ranks} ranks / 1 process, s per global batch of {args.batch_size} pairs: {many / one:.2f} "
          f"(threads: {args.threads or 'default'}, load {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
