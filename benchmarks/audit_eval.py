"""How well ``tidpo-mlx audit`` finds flipped labels, and what cleaning buys (docs/audit.md).

``detect``: for each flip seed and noise level, flip that share of the bundled
``arith`` training pairs (``experiment.flip_labels``: seeded, nested across
levels), audit them, and report per score the AUROC against the true flips
and the precision among the top flipped-share of pairs, with the audit's wall
time and the machine's load average.

``downstream``: train a method (``experiment.METHODS``) on the clean data, on
the noisy data and on the data ``audit --write`` cleaned (drop and flip the
top flipped-share), and report the held-out policy preference accuracy (all
150 held-out pairs).

Results go to ``--out`` as JSON lines (one per run, reused when rerun with the
same settings) and a Markdown table on stdout.

    python benchmarks/audit_eval.py detect --seeds 0 --noise 0.2
    python benchmarks/audit_eval.py downstream --seeds 0,1 --noise 0.4 --methods dpo,tidpo
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import tidpo_mlx

tidpo_mlx.setup()  # before mlx: the fast BLAS

import numpy as np  # noqa: E402

from tidpo_mlx import audit as au  # noqa: E402
from tidpo_mlx import experiment as ex  # noqa: E402
from tidpo_mlx.config import build_config, builtin_recipe_path, load_recipe  # noqa: E402
from tidpo_mlx.sources import bundled_folder, read_jsonl, resolve_source  # noqa: E402


def auroc(suspicion: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random flipped pair is more suspect than a random clean one (ties count half)."""
    order = np.argsort(suspicion, kind="mergesort")
    ranks = np.empty(len(suspicion))
    sorted_s = suspicion[order]
    i = 0
    while i < len(sorted_s):
        j = i
        while j + 1 < len(sorted_s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i: j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_at_k(suspicion: np.ndarray, positive: np.ndarray, k: int) -> float:
    """Share of true flips among the ``k`` most suspect pairs."""
    top = np.argsort(-suspicion, kind="mergesort")[:k]
    return float(positive[top].mean())


def flipped_set(n: int, fraction: float, seed: int) -> np.ndarray:
    """Which of ``n`` pairs ``experiment.flip_labels`` flips (the same permutation)."""
    rows = [{"chosen": i, "rejected": -1 - i} for i in range(n)]
    out, _ = ex.flip_labels(rows, fraction, seed)
    return np.array([r["chosen"] != i for i, r in enumerate(out)])


def read_scores(audit_dir: Path) -> dict[str, np.ndarray]:
    """Every score of an audit folder's ``audit.jsonl``, in input order."""
    records = [r for _, r in read_jsonl(audit_dir / "audit.jsonl")]
    return {s: np.array([r["scores"][s] for r in records]) for s in au.SCORES}


def detection(scores: dict[str, np.ndarray], truth: np.ndarray) -> dict[str, float]:
    """Per score (suspicion = -margin): AUROC against the true flips, precision among the top flipped-share."""
    out = {}
    for score, margin in scores.items():
        if np.all(margin == margin[0]):
            continue  # reward_margin of a reference-only audit: 0 everywhere
        out[f"auroc/{score}"] = round(auroc(-margin, truth), 4)
        out[f"precision/{score}"] = round(precision_at_k(-margin, truth, int(truth.sum())), 4)
    return out


FAMILIES = {"change": "What is the change", "carry": "What is ", "units": "Convert ", "weekday": "Today is ",
            "month": "What date is", "clock": "What time is it"}
"""The arith families (tidpo_mlx/datasets/arith/README.md): change prompts contain their marker, the others
start with theirs."""


def family(prompt: str) -> str:
    """The arith family of a prompt."""
    if FAMILIES["change"] in prompt:
        return "change"
    return next((name for name, marker in FAMILIES.items() if prompt.startswith(marker)), "other")


def breakdown(audit_dir: Path, truth: np.ndarray, score: str = au.DEFAULT_SCORE) -> dict[str, dict[str, Any]]:
    """AUROC of ``score`` within each fold and within each arith family: where the detection is weak."""
    records = [r for _, r in read_jsonl(audit_dir / "audit.jsonl")]
    margin = np.array([r["scores"][score] for r in records])
    groups: dict[str, dict[str, np.ndarray]] = {
        "fold": {str(k): np.array([r["fold"] == k for r in records]) for k in sorted({r["fold"] for r in records})},
        "family": {f: np.array([family(str(r["prompt"])) == f for r in records]) for f in FAMILIES},
    }
    out: dict[str, dict[str, Any]] = {}
    for kind, masks in groups.items():
        out[kind] = {}
        for name, m in masks.items():
            t = truth[m]
            out[kind][name] = {"pairs": int(m.sum()), "flipped": int(t.sum()),
                               "auroc": round(auroc(-margin[m], t), 3) if 0 < t.sum() < len(t) else None}
    return out


def _cached(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return saved["row"] if saved["settings"] == settings else None


def audit_config(args: argparse.Namespace, data_dir: Path, seed: int) -> Any:
    """The recipe with the audit's sizes (the same path as the CLI: recipe < overrides); the audit's seed (fold
    split, LoRA init, batch order) is ``--train-seed`` or else the flip seed."""
    recipe = builtin_recipe_path(args.recipe)
    run_seed = seed if args.train_seed is None else args.train_seed
    overrides = {"data": str(data_dir), "seed": run_seed, **({"learning_rate": args.lr} if args.lr else {})}
    return build_config(load_recipe(recipe), overrides, where=str(recipe))


def audit_name(args: argparse.Namespace, seed: int, noise: float) -> str:
    """The folder name of an audit's settings under ``OUT/detect``."""
    train = "" if args.train_seed is None else f"-train{args.train_seed}"
    return f"{args.recipe}-f{args.folds}-i{args.iters}-lr{args.lr or 'recipe'}-noise{round(noise * 100):02d}-seed{seed}{train}"


def detect_one(args: argparse.Namespace, seed: int, noise: float) -> dict[str, Any]:
    """Audit the arith training pairs with ``noise`` flipped (flip seed ``seed``); the detection row."""
    source = resolve_source("arith")
    name = audit_name(args, seed, noise)
    run = args.out / "detect" / name
    settings = {"recipe": args.recipe, "folds": args.folds, "iters": args.iters, "lr": args.lr, "noise": noise,
                "seed": seed, **({"train_seed": args.train_seed} if args.train_seed is not None else {})}
    row = _cached(run / "result.json", settings)
    if row is not None:
        return row
    if run.exists():
        shutil.rmtree(run)
    data_dir = run / "data"
    counts = ex.noisy_folder(source, data_dir, noise, seed, -1)
    load = os.getloadavg()[0]
    tic = time.perf_counter()
    cfg = audit_config(args, data_dir, seed)
    result = au.run_audit(cfg, run / "audit", args.folds, args.iters, au.DEFAULT_SCORE if args.folds else "ref_margin",
                          args.top, log=print)
    au.write_reports(result, run / "audit", f"benchmark {name}")
    wall = time.perf_counter() - tic
    truth = flipped_set(counts["train_pairs"], noise, seed)
    row = {"name": name, **settings, "pairs": len(result.pairs), "flipped": int(truth.sum()),
           "wall_s": round(wall, 1), "load_start": round(load, 2), "load_end": round(os.getloadavg()[0], 2),
           "seconds": {k: round(v, 1) for k, v in result.seconds.items()},
           **detection(read_scores(run / "audit"), truth)}
    (run / "result.json").write_text(json.dumps({"settings": settings, "row": row}, indent=2))
    return row


def clean_reference_margins(args: argparse.Namespace) -> tuple[np.ndarray, float]:
    """The reference margin of every clean arith pair, and the seconds the audit that gave it took.

    From ``--audit`` (any audit of arith with ``--audit-noise`` flipped by ``--audit-seed``: flipping a pair
    negates its reference margin), else from a reference-only audit of the clean data.
    """
    run = args.audit
    if run is None:
        run = args.out / "reference"
        if not (run / "audit.jsonl").exists():
            cfg = audit_config(args, bundled_folder("arith"), 0)
            result = au.run_audit(cfg, run, 0, 0, "ref_margin", args.top, log=print)
            au.write_reports(result, run, "benchmark reference")
    margins = read_scores(run)["ref_margin"]
    flips = flipped_set(len(margins), args.audit_noise, args.audit_seed) if args.audit else np.zeros(len(margins), bool)
    return np.where(flips, -margins, margins), json.loads((run / "summary.json").read_text())["seconds"]["total"]


def reference_rows(args: argparse.Namespace, seeds: list[int], noise: list[float]) -> list[dict[str, Any]]:
    """``ref_margin`` detection for every seed and noise level from one set of clean reference margins."""
    clean, wall = clean_reference_margins(args)
    rows = []
    for seed in seeds:
        for p in noise:
            truth = flipped_set(len(clean), p, seed)
            rows.append({"noise": p, "seed": seed, "wall_s": wall, "load_start": float("nan"),
                         "load_end": float("nan"), **detection({"ref_margin": np.where(truth, -clean, clean)}, truth)})
    return rows


def downstream_one(args: argparse.Namespace, seed: int, noise: float, method: str, variant: str) -> dict[str, Any]:
    """Train ``method`` on the clean, noisy or audit-cleaned (drop / flip) data; the held-out row."""
    source = resolve_source("arith")
    base = args.out / "downstream" / f"noise{round(noise * 100):02d}-seed{seed}"
    noisy = base / "noisy"
    if not noisy.exists():
        ex.noisy_folder(source, noisy, noise, seed, -1)
    data = {"clean": Path(source.name), "noisy": noisy}.get(variant)
    if data is None:
        audit_dir = args.out / "detect" / audit_name(args, seed, noise) / "audit"
        if not audit_dir.exists():
            detect_one(args, seed, noise)
        data = base / variant
        if not data.exists():
            au.write_cleaned(audit_dir, data, variant, noise, None, plain=False)
    plan = ex.make_plan(base / f"runs-{variant}", iters=args.train_iters, val_pairs=-1, methods=(method,))
    cfg = ex.run_config(plan, method, noise, seed, data)
    settings = json.loads(json.dumps({**cfg.to_dict(), "variant": variant}))  # tuples -> lists, as saved
    folder = Path(cfg.adapter_path)
    row = _cached(folder / "downstream.json", settings)
    if row is not None:
        return row
    counts = {"train_pairs": len(read_jsonl(data / "train.jsonl")), "flipped": -1, "val_pairs": 150}
    row = {**ex.run_one(cfg, method, noise, counts, settings), "variant": variant}
    (folder / "downstream.json").write_text(json.dumps({"settings": settings, "row": row}, indent=2))
    return row


def detect_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| noise | seed | " + " | ".join(f"AUROC {s} | P@k {s}" for s in au.SCORES) + " | wall s | load |",
             "|---" * (3 + 2 * len(au.SCORES)) + "|---|"]
    for r in rows:
        cells = [f"{r['noise']:.0%}", str(r["seed"])]
        for s in au.SCORES:
            cells += [f"{r.get(f'auroc/{s}', float('nan')):.3f}", f"{r.get(f'precision/{s}', float('nan')):.3f}"]
        lines.append("| " + " | ".join(cells + [f"{r['wall_s']:.0f}", f"{r['load_start']:.1f}-{r['load_end']:.1f}"]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["detect", "reference", "score", "downstream"])
    parser.add_argument("--audit", type=Path, default=None,
                        help="score, reference: an audit folder of arith with --audit-noise flipped by --audit-seed.")
    parser.add_argument("--audit-noise", type=float, default=0.2)
    parser.add_argument("--audit-seed", type=int, default=0)
    parser.add_argument("--seeds", default="0", help="Flip seeds, comma-separated.")
    parser.add_argument("--noise", default="0.2", help="Flipped shares, comma-separated.")
    parser.add_argument("--recipe", default=au.DEFAULT_RECIPE)
    parser.add_argument("--folds", type=int, default=au.DEFAULT_FOLDS)
    parser.add_argument("--iters", type=int, default=au.DEFAULT_ITERS, help="Audit steps per fold.")
    parser.add_argument("--lr", type=float, default=None, help="Audit learning rate. [default: the recipe's]")
    parser.add_argument("--train-seed", type=int, default=None,
                        help="Seed of the audit: fold split, LoRA init, batch order. [default: the flip seed]")
    parser.add_argument("--top", type=int, default=au.DEFAULT_TOP)
    parser.add_argument("--methods", default="dpo", help="downstream: methods of experiment.METHODS.")
    parser.add_argument("--variants", default="clean,noisy,drop,flip", help="downstream: data variants.")
    parser.add_argument("--train-iters", type=int, default=100, help="downstream: training steps.")
    parser.add_argument("--out", type=Path, default=Path("experiments/audit"))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    noise = [float(p) for p in args.noise.split(",")]
    if args.what == "reference":
        print(detect_table(reference_rows(args, seeds, noise)))
        return
    if args.what == "score":
        truth = flipped_set(600, args.audit_noise, args.audit_seed)
        print(json.dumps({"noise": args.audit_noise, "seed": args.audit_seed, **detection(read_scores(args.audit), truth),
                          "breakdown": breakdown(args.audit, truth)}))
        return
    if args.what == "detect":
        rows = []
        for seed in seeds:
            for p in noise:
                rows.append(detect_one(args, seed, p))
                print(json.dumps(rows[-1]), flush=True)
        print(detect_table(rows))
        return
    for seed in seeds:
        for p in noise:
            for method in args.methods.split(","):
                for variant in args.variants.split(","):
                    row = downstream_one(args, seed, p, method, variant)
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
