"""The paper's two claims measured against DPO: answer accuracy and diversity of generations.

Runs the protocol of docs/generation.md ("The paper's two claims, measured
against DPO"): trains the arms (DPO, TI-DPO weights, TI-DPO with the triplet
on policy anchors, LoRA SFT through ``mlx_lm.lora``) for each seed on the
bundled ``arith`` pairs, answers the test prompts greedily and with 4
samples at temperature 0.7 (``tidpo-mlx eval --generate``), and writes
``results.json`` and ``results.md``: per arm the mean ± standard error and
95 % interval of each score (a paired bootstrap over prompts x seeds), and
the TI-DPO - DPO differences with their intervals.

Everything goes into ``--out`` and is reused: a finished run or evaluation
is not redone, an interrupted training run continues from its last
checkpoint, an interrupted evaluation continues its file. Every command it
runs is appended to ``commands.txt`` there.

    python benchmarks/generation_compare.py --pilot                 # DPO alone: the step count
    python benchmarks/generation_compare.py --iters 200             # the comparison (hours)
    python benchmarks/generation_compare.py --iters 2 --limit 4 --seeds 1 --val-batches 1 --out /tmp/gc
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ARMS: dict[str, list[str] | None] = {
    "dpo": ["-c", "dpo"],
    "tidpo": ["-c", "quickstart"],
    "tidpo-triplet": ["-c", "quickstart", "--anchor", "policy", "--gamma", "0.1", "--anchor-every", "5"],
    "sft": None,
}
"""Trained arms: the ``tidpo-mlx train`` flags of each (None: ``mlx_lm.lora`` on the chosen responses)."""
TIDPO_ARMS = ("tidpo", "tidpo-triplet")
LEARNING_RATE, WARMUP, BATCH, NUM_LAYERS, RANK, SCALE = 5e-5, 5, 4, 16, 8, 20.0
SAMPLES, TEMPERATURE, MAX_TOKENS = 4, 0.7, 64
PILOT_ITERS = (100, 200, 400)
PILOT_SE = 3.0
"""The pilot's bar: DPO - base on greedy answer/correct at least this many standard errors above 0."""
BOOTSTRAP, BOOTSTRAP_SEED = 10_000, 0
SCORES = ("answer/correct", "answer/rejected", "answer/none", "length", "distinct-1", "distinct-2", "self-bleu-2")
GREEDY_SCORES = ("answer/correct", "answer/rejected", "answer/none", "length")
SAMPLED_SCORES = ("distinct-1", "distinct-2", "self-bleu-2")
HIGHER_IS_BETTER = {"answer/correct": True, "distinct-1": True, "distinct-2": True, "self-bleu-2": False,
                    "answer/rejected": False, "answer/none": False}


def run(command: list[str], log: Path, out: Path) -> None:
    """Run one command (recorded in ``commands.txt``), its output into ``log``; a failure stops with the log's tail."""
    with open(out / "commands.txt", "a") as f:
        f.write(shlex.join(command) + "\n")
    print(f"$ {shlex.join(command)}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-5:]
        raise SystemExit(f"failed (exit {done.returncode}): {shlex.join(command)}\n  log {log}:\n  "
                         + "\n  ".join(tail))


def float32_base(model: str, out: Path) -> Path:
    """A folder holding the model's base dequantized to float32, as training computes it on a CPU (made once).

    ``mlx_lm.lora`` trains on it and every arm is evaluated on it, so
    ``mlx_lm.generate --model`` this folder reproduces any greedy answer.
    """
    folder = out / "base-float32"
    if (folder / "config.json").exists():
        return folder
    import tidpo_mlx

    tidpo_mlx.setup()
    from mlx_lm.utils import save_model

    from tidpo_mlx.config import Switch
    from tidpo_mlx.models import load_base, resolve_model

    source = resolve_model(model)
    base, _, _ = load_base(source, Switch.TRUE)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(tmp, base)
    config = json.loads((source / "config.json").read_text())
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    config["torch_dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for item in source.iterdir():
        if item.name != "config.json" and not item.name.endswith(".safetensors") and item.is_file():
            shutil.copy(item, tmp / item.name)
    tmp.rename(folder)
    return folder


def sft_data(out: Path) -> Path:
    """The bundled arith train and valid pairs as chat messages (the prompt, then the chosen response), for
    ``mlx_lm.lora``."""
    from tidpo_mlx.sources import bundled_folder

    folder = out / "sft-data"
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        rows = [json.loads(line) for line in (bundled_folder("arith") / f"{split}.jsonl").read_text().splitlines()]
        messages = [{"messages": [{"role": "user", "content": r["prompt"]},
                                  {"role": "assistant", "content": r["chosen"]}]} for r in rows]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(m) + "\n" for m in messages))
    return folder


def _settings_guard(folder: Path, settings: dict[str, Any]) -> None:
    """Refuse to reuse ``folder`` when it was made with other settings (``bench.json``)."""
    marker = folder / "bench.json"
    if marker.exists() and json.loads(marker.read_text()) != settings:
        raise SystemExit(f"{folder} was made with other settings ({marker}); give another --out")


def train_tidpo(arm: str, seed: int, iters: int, args: argparse.Namespace, out: Path) -> Path:
    """Train one tidpo-mlx arm (continuing from its last checkpoint after an interruption)."""
    folder = out / "runs" / f"{arm}-seed{seed}-iters{iters}"
    settings = {"arm": arm, "seed": seed, "iters": iters, "model": args.model, "val_batches": args.val_batches}
    _settings_guard(folder, settings)
    if (folder / "adapters.safetensors").exists() and (folder / "bench.json").exists():
        return folder
    command = [sys.executable, "-m", "tidpo_mlx.cli", "train", *ARMS[arm], "--model", args.model, "--data", "arith",
               "--iters", str(iters), "--learning-rate", str(LEARNING_RATE), "--warmup-steps",
               str(min(WARMUP, max(iters - 1, 0))), "--lr-schedule", "cosine", "--optimizer", "adamw",
               "--weight-decay", "0", "--batch-size", str(BATCH), "--num-layers", str(NUM_LAYERS), "--lora-rank",
               str(RANK), "--lora-scale", str(SCALE), "--lora-dropout", "0", "--seed", str(seed), "--steps-per-save",
               "50", "--val-batches", str(args.val_batches), "--quiet", "--adapter-path", str(folder)]
    if (folder / "checkpoints").is_dir() and any((folder / "checkpoints").iterdir()):
        command.append("--resume")
    elif folder.exists():
        command.append("--overwrite")
    run(command, out / "logs" / f"{folder.name}.log", out)
    (folder / "bench.json").write_text(json.dumps(settings))
    return folder


def train_sft(seed: int, iters: int, args: argparse.Namespace, out: Path, base: Path) -> Path:
    """LoRA SFT on the chosen responses with ``mlx_lm.lora`` (same LoRA, rate, schedule, steps and batch)."""
    import yaml

    folder = out / "runs" / f"sft-seed{seed}-iters{iters}"
    settings = {"arm": "sft", "seed": seed, "iters": iters, "model": args.model}
    _settings_guard(folder, settings)
    if (folder / "adapters.safetensors").exists() and (folder / "bench.json").exists():
        return folder
    warmup = min(WARMUP, max(iters - 1, 0))
    config = {
        "model": str(base), "train": True, "data": str(sft_data(out)), "fine_tune_type": "lora", "seed": seed,
        "num_layers": NUM_LAYERS, "batch_size": BATCH, "iters": iters, "learning_rate": LEARNING_RATE,
        "lr_schedule": {"name": "cosine_decay", "arguments": [LEARNING_RATE, max(iters - warmup, 1)],
                        "warmup": warmup},
        "optimizer": "adamw", "optimizer_config": {"adamw": {"weight_decay": 0.0}},
        "lora_parameters": {"rank": RANK, "scale": SCALE, "dropout": 0.0}, "mask_prompt": True,
        "adapter_path": str(folder), "save_every": max(iters, 1), "steps_per_eval": max(iters, 1),
        "val_batches": 1, "steps_per_report": max(min(10, iters), 1), "max_seq_length": 256,
    }
    folder.mkdir(parents=True, exist_ok=True)
    cfg_file = folder / "lora.yaml"
    cfg_file.write_text(yaml.safe_dump(config, sort_keys=False))
    run([sys.executable, "-m", "mlx_lm", "lora", "-c", str(cfg_file)], out / "logs" / f"{folder.name}.log", out)
    (folder / "bench.json").write_text(json.dumps(settings))
    return folder


def evaluate(name: str, adapters: Path | None, split: str, seed: int, sampled: bool, args: argparse.Namespace,
             out: Path, base: Path) -> Path:
    """One ``eval --generate`` file (the adapters' arm only; the base without adapters); skipped when complete."""
    file = out / "evals" / f"{name}-{split}-{'t0.7' if sampled else 'greedy'}.jsonl"
    if file.exists() and len(file.read_text().splitlines()) == args.limit:
        return file
    command = [sys.executable, "-m", "tidpo_mlx.cli", "eval", "--generate", "--model", str(base), "--data", "arith",
               "--split", split, "--limit", str(args.limit), "--max-tokens", str(MAX_TOKENS), "--dequantize", "false",
               "--seed", str(seed), "--quiet", "--output", str(file)]
    if adapters is not None:
        command += ["--adapter-path", str(adapters), "--no-base"]
    if sampled:
        command += ["--num-samples", str(SAMPLES), "--temperature", str(TEMPERATURE)]
    run(command, out / "logs" / f"eval-{file.stem}.log", out)
    return file


def scores_of(file: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Per-prompt scores of the one arm in an eval file (nan where a prompt has none), by score."""
    rows = sorted((json.loads(line) for line in file.read_text().splitlines()), key=lambda r: r["index"])
    out = {}
    for name in names:
        values = []
        for r in rows:
            arm_scores = next(iter(r["scores"].values()))
            v = arm_scores.get(name)
            values.append(np.nan if v is None else float(v))
        out[name] = np.array(values)
    return out


def bootstrap(cells: np.ndarray, draws: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Bootstrap means of a (seeds x prompts) array of cells (nan: missing) for count draws (B x seeds, B x prompts)."""
    seeds, prompts = draws
    mask = np.isfinite(cells).astype(float)
    values = np.where(np.isfinite(cells), cells, 0.0)
    num = np.einsum("bs,sp,bp->b", seeds, values, prompts)
    den = np.einsum("bs,sp,bp->b", seeds, mask, prompts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def interval(cells: np.ndarray, draws: tuple[np.ndarray, np.ndarray]) -> dict[str, float | int]:
    """Mean over the cells, bootstrap standard error and 95 % percentile interval."""
    boot = bootstrap(cells, draws)
    boot = boot[np.isfinite(boot)]
    n = int(np.isfinite(cells).sum())
    if n == 0 or boot.size == 0:
        return {"mean": float("nan"), "se": float("nan"), "lo": float("nan"), "hi": float("nan"), "cells": n}
    return {"mean": float(np.nanmean(cells)), "se": float(boot.std(ddof=1)) if boot.size > 1 else float("nan"),
            "lo": float(np.percentile(boot, 2.5)), "hi": float(np.percentile(boot, 97.5)), "cells": n}


def verdict(diff: dict[str, float | int]) -> str:
    if not np.isfinite(diff["lo"]):
        return "n/a"
    if diff["lo"] > 0:
        return "above 0"
    if diff["hi"] < 0:
        return "below 0"
    return "no difference detected"


def results(cells: dict[str, dict[str, np.ndarray]], seeds: int, prompts: int) -> dict[str, Any]:
    """Per arm and score the interval; per TI-DPO arm and score the paired difference to DPO."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    draws = (rng.multinomial(seeds, [1 / seeds] * seeds, size=BOOTSTRAP).astype(float),
             rng.multinomial(prompts, [1 / prompts] * prompts, size=BOOTSTRAP).astype(float))
    out: dict[str, Any] = {"arms": {}, "differences": {}}
    for arm, by_score in cells.items():
        out["arms"][arm] = {name: interval(values, draws) for name, values in by_score.items()}
    for arm in TIDPO_ARMS:
        if arm in cells and "dpo" in cells:
            out["differences"][f"{arm} - dpo"] = {}
            for name in cells[arm]:
                diff = interval(cells[arm][name] - cells["dpo"][name], draws)
                diff["verdict"] = verdict(diff)
                out["differences"][f"{arm} - dpo"][name] = diff
    return out


def markdown(res: dict[str, Any], meta: dict[str, Any]) -> str:
    def cell(s: dict[str, Any], signed: bool = False) -> str:
        if not np.isfinite(s["mean"]):
            return "n/a"
        sign = "+" if signed else ""
        return f"{s['mean']:{sign}.3f} ± {s['se']:.3f} [{s['lo']:{sign}.3f}, {s['hi']:{sign}.3f}]"

    lines = [f"# Generation comparison ({meta['iters']} steps, seeds {', '.join(map(str, meta['seeds']))}, "
             f"{meta['prompts']} test prompts)", "",
             "Mean ± bootstrap standard error [95 % interval], paired bootstrap over prompts x seeds "
             "(docs/generation.md). Accuracy scores: greedy; diversity: 4 samples at temperature 0.7.", "",
             "| arm | " + " | ".join(SCORES) + " |", "|---" * (len(SCORES) + 1) + "|"]
    for arm, by_score in res["arms"].items():
        lines.append(f"| {arm} | " + " | ".join(cell(by_score[s]) if s in by_score else "" for s in SCORES) + " |")
    if res["differences"]:
        lines += ["", "| difference | score | mean ± SE [95 % interval] | verdict |", "|---|---|---|---|"]
        for name, by_score in res["differences"].items():
            for score, d in by_score.items():
                better = HIGHER_IS_BETTER.get(score)
                direction = "" if better is None else (" (higher is better)" if better else " (lower is better)")
                lines.append(f"| {name} | {score}{direction} | {cell(d, signed=True)} | {d['verdict']} |")
    return "\n".join(lines) + "\n"


def pilot(args: argparse.Namespace, out: Path, base: Path) -> None:
    """DPO alone at each pilot step count, greedy on the valid prompts: the smallest count past the bar."""
    base_file = evaluate("base", None, "valid", 0, False, args, out, base)
    base_scores = scores_of(base_file, ("answer/correct",))["answer/correct"]
    chosen = None
    for iters in args.pilot_iters:
        run_dir = train_tidpo("dpo", 0, iters, args, out)
        file = evaluate(f"dpo-seed0-iters{iters}", run_dir, "valid", 0, False, args, out, base)
        diff = scores_of(file, ("answer/correct",))["answer/correct"] - base_scores
        diff = diff[np.isfinite(diff)]
        se = diff.std(ddof=1) / np.sqrt(diff.size) if diff.size > 1 else float("nan")
        z = diff.mean() / se if se > 0 else float("nan")
        print(f"pilot: DPO {iters} steps: answer/correct - base {diff.mean():+.3f} ± {se:.3f} ({z:.1f} SE)")
        if chosen is None and np.isfinite(z) and z >= PILOT_SE:
            chosen = iters
    pick = chosen if chosen is not None else max(args.pilot_iters)
    reason = f"the first at least {PILOT_SE:g} SE above 0" if chosen is not None else "none passed the bar: the largest"
    print(f"pilot: steps {pick} ({reason}); run: python benchmarks/generation_compare.py --iters {pick}")
    (out / "pilot.json").write_text(json.dumps({"iters": pick, "passed": chosen is not None}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="experiments/generation", help="Output folder (reused across runs).")
    parser.add_argument("--iters", type=int, default=None, help="Training steps of every arm (the pilot's choice).")
    parser.add_argument("--seeds", type=int, default=3, help="Training seeds 0..N-1.")
    parser.add_argument("--limit", type=int, default=150, help="Test prompts (the first N).")
    parser.add_argument("--arms", default="base,dpo,tidpo,tidpo-triplet,sft", help="Comma-separated arms.")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Model (built-in name, folder, ...).")
    parser.add_argument("--val-batches", type=int, default=-1, help="Training's held-out batches (-1: all).")
    parser.add_argument("--pilot", action="store_true", help="Run the step pilot (DPO only) and stop.")
    parser.add_argument("--pilot-iters", default=",".join(map(str, PILOT_ITERS)), help="Pilot step counts.")
    args = parser.parse_args()
    args.pilot_iters = [int(v) for v in args.pilot_iters.split(",") if v.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = float32_base(args.model, out)
    if args.pilot:
        pilot(args, out, base)
        return
    if args.iters is None:
        picked = out / "pilot.json"
        if not picked.exists():
            raise SystemExit("give --iters, or run --pilot first")
        args.iters = json.loads(picked.read_text())["iters"]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a != "base" and a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {', '.join(unknown)}; known: base, {', '.join(ARMS)}")
    seeds = list(range(args.seeds))
    cells: dict[str, dict[str, list[np.ndarray]]] = {arm: {s: [] for s in SCORES} for arm in arms}
    for seed in seeds:
        for arm in arms:
            if arm == "base":
                greedy = evaluate("base", None, "test", 0, False, args, out, base)
                sampled = evaluate(f"base-seed{seed}", None, "test", seed, True, args, out, base)
            else:
                folder = (train_sft(seed, args.iters, args, out, base) if ARMS[arm] is None
                          else train_tidpo(arm, seed, args.iters, args, out))
                name = f"{arm}-seed{seed}-iters{args.iters}"
                greedy = evaluate(name, folder, "test", seed, False, args, out, base)
                sampled = evaluate(name, folder, "test", seed, True, args, out, base)
            for file, names in ((greedy, GREEDY_SCORES), (sampled, SAMPLED_SCORES)):
                for score, values in scores_of(file, names).items():
                    cells[arm][score].append(values)
    stacked = {arm: {s: np.stack(v) for s, v in by.items() if v} for arm, by in cells.items()}
    res = results(stacked, len(seeds), args.limit)
    meta = {"iters": args.iters, "seeds": seeds, "prompts": args.limit, "arms": arms, "model": args.model}
    (out / "results.json").write_text(json.dumps({"meta": meta, **res}, indent=2))
    (out / "results.md").write_text(markdown(res, meta))
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
