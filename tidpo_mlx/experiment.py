"""Label-noise robustness (docs/method.md section 11): DPO vs TI-DPO and two ablations under flipped labels.

For every seed, noise level and method: copy the data with that share of the
*training* pairs flipped (chosen and rejected swapped; the pairs to flip are
a seeded permutation's first k, so the flipped set at 10 % is inside the one
at 20 %, and every method sees the same flips), keep the held-out pairs
untouched (the first ``val_pairs`` of them), train with the method's recipe
(warmup capped at a third of the steps, for short runs), and record the
held-out reward accuracy and policy preference accuracy after training
(``TrainResult.after``).

Writes ``results.csv`` (one row per run, rewritten after every run),
``results.md`` (mean ± std over seeds per method x noise) and, with
matplotlib installed (extra ``plot``), ``results.png``. A finished run's row
is kept in ``runs/<name>/result.json``; a rerun with the same settings reuses
it, so an interrupted experiment continues where it stopped.
"""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tidpo_mlx.config import Config, build_config, builtin_recipe_path, load_recipe
from tidpo_mlx.sources import Source, resolve_source
from tidpo_mlx.errors import ConfigError, DataError, TidpoError, first_line
from tidpo_mlx.files import write_jsonl


class ExperimentError(TidpoError, RuntimeError):
    """A run of the experiment failed; the message names the run."""


@dataclass(frozen=True)
class Method:
    """A trained variant: a bundled recipe plus config overrides."""

    name: str
    recipe: str
    overrides: dict[str, Any]
    label: str
    sec_per_step: float  # measured on the built-in SmolLM2, arith data, 2-core CPU (estimate only)


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("dpo", "dpo", {}, "DPO", 3.4),
        Method("tidpo", "quickstart", {"anchor": "sample"}, "TI-DPO (paper)", 7.2),
        Method("tidpo-no-triplet", "quickstart", {"anchor": "none"}, "TI-DPO w/o triplet", 4.4),
        Method("tidpo-uniform", "quickstart", {"anchor": "sample", "weighting": "uniform"}, "TI-DPO uniform weights",
               5.5),
    ]
}
NOISE_LEVELS = (0.0, 0.1, 0.2, 0.4)
QUICK_METHODS = ("dpo", "tidpo")
QUICK_NOISE = (0.0, 0.4)

# Sizes. The seconds per step (Method.sec_per_step), per run and per held-out pair and pass only
# estimate how long a plan takes (printed before it starts): they were measured with the built-in
# SmolLM2-135M on the bundled arith data, batch 4, on an idle CPU machine (benchmarks/RESULTS.md);
# a triplet run is slower because the data's anchors add a third row per pair.
DEFAULT_ITERS, DEFAULT_SEEDS, DEFAULT_VAL_PAIRS = 14, 2, 32
QUICK_ITERS, QUICK_SEEDS, QUICK_VAL_PAIRS = 6, 1, 16
SEC_PER_RUN = 8.0  # model load, data encoding, adapter saving
SEC_PER_VAL_PAIR = 0.34  # one held-out pass (chosen + rejected); a run makes two (reference = before, after)


@dataclass
class Plan:
    """What the experiment runs."""

    out: Path
    methods: tuple[str, ...] = tuple(METHODS)
    noise: tuple[float, ...] = NOISE_LEVELS
    seeds: int = DEFAULT_SEEDS
    iters: int = DEFAULT_ITERS
    val_pairs: int = DEFAULT_VAL_PAIRS
    model: str | None = None
    data: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    keep_adapters: bool = False

    def runs(self) -> list[tuple[int, float, str]]:
        """(seed, noise, method) in run order: whole seeds first, so partial results are balanced."""
        return [(s, p, m) for s in range(self.seeds) for p in self.noise for m in self.methods]


def make_plan(
    out: str | Path,
    quick: bool = False,
    seeds: int | None = None,
    iters: int | None = None,
    val_pairs: int | None = None,
    methods: tuple[str, ...] | None = None,
    noise: tuple[float, ...] | None = None,
    model: str | None = None,
    data: str | None = None,
    overrides: dict[str, Any] | None = None,
    keep_adapters: bool = False,
) -> Plan:
    """The default (or ``quick``) plan with any of its sizes replaced; checks every value."""
    methods = tuple(methods or (QUICK_METHODS if quick else tuple(METHODS)))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method {unknown[0]!r} (known: {', '.join(METHODS)})")
    noise = tuple(noise if noise is not None else (QUICK_NOISE if quick else NOISE_LEVELS))
    if not noise or any(not 0.0 <= p < 1.0 for p in noise):
        raise ConfigError("noise levels must be fractions in [0, 1), e.g. 0,0.1,0.2,0.4")
    plan = Plan(
        out=Path(out),
        methods=methods,
        noise=noise,
        seeds=seeds if seeds is not None else (QUICK_SEEDS if quick else DEFAULT_SEEDS),
        iters=iters if iters is not None else (QUICK_ITERS if quick else DEFAULT_ITERS),
        val_pairs=val_pairs if val_pairs is not None else (QUICK_VAL_PAIRS if quick else DEFAULT_VAL_PAIRS),
        model=model,
        data=data,
        overrides=dict(overrides or {}),
        keep_adapters=keep_adapters,
    )
    if plan.seeds < 1 or plan.iters < 1:
        raise ConfigError("--seeds and --iters must be >= 1")
    build_config(None, plan.overrides)  # unknown or ill-typed keys fail here, before any run
    return plan


def run_estimate(plan: Plan, method: str, val_pairs: int) -> float:
    """Estimated seconds of one run with the built-in SmolLM2 on a 2-core CPU."""
    return SEC_PER_RUN + 2 * val_pairs * SEC_PER_VAL_PAIR + plan.iters * METHODS[method].sec_per_step


def estimate_seconds(plan: Plan, val_pairs: int) -> float:
    """Estimated wall time of the whole plan (``val_pairs``: the held-out pairs actually used)."""
    return sum(run_estimate(plan, m, val_pairs) for _, _, m in plan.runs())


def flip_labels(rows: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list[dict[str, Any]], int]:
    """Rows with ``round(fraction * n)`` pairs' chosen and rejected swapped.

    The flipped pairs are the first k of a permutation seeded by ``seed`` only,
    so for one seed a lower noise level flips a subset of a higher one's pairs.
    """
    k = round(fraction * len(rows))
    order = np.random.default_rng([seed, 20_250_519]).permutation(len(rows))
    flip = {int(i) for i in order[:k]}
    out = []
    for i, row in enumerate(rows):
        row = dict(row)
        if i in flip:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
        out.append(row)
    return out, k


def noisy_folder(source: Source, target: Path, fraction: float, seed: int, val_pairs: int) -> dict[str, int]:
    """Write ``train.jsonl`` with flipped labels and ``valid.jsonl`` (untouched rows, the first
    ``val_pairs`` of them, -1: all) into ``target``; return the counts.

    The rows keep their form (any that ``--data`` reads: standard,
    conversational, implicit prompt); flipping swaps ``chosen`` and ``rejected``.
    """
    train = [row for _, row in source.splits["train"].rows]
    valid = [row for _, row in source.splits["valid"].rows]
    if val_pairs >= 0:
        valid = valid[:val_pairs]
    flipped_rows, k = flip_labels(train, fraction, seed)
    target.mkdir(parents=True, exist_ok=True)
    write_jsonl(target / "train.jsonl", flipped_rows)
    write_jsonl(target / "valid.jsonl", valid)
    return {"train_pairs": len(train), "flipped": k, "val_pairs": len(valid)}


def run_name(method: str, noise: float, seed: int) -> str:
    """Folder name of one run."""
    return f"{method}-noise{round(noise * 100):02d}-seed{seed}"


FIELDS = [
    "method", "noise", "seed", "iters", "train_pairs", "flipped", "val_pairs",
    "reward_accuracy", "policy_preference_accuracy", "reward_margin",
    "before_reward_accuracy", "before_policy_preference_accuracy", "train_seconds", "run_seconds",
]


def run_config(plan: Plan, method: str, noise: float, seed: int, data_dir: Path) -> Config:
    """The config of one run: the method's recipe and overrides, the plan's sizes and overrides."""
    m = METHODS[method]
    recipe = builtin_recipe_path(m.recipe)
    recipe_values = load_recipe(recipe)
    overrides: dict[str, Any] = {
        **m.overrides,
        # short runs: warmup at most a third of the steps
        "warmup_steps": min(build_config(recipe_values, where=str(recipe)).warmup_steps, plan.iters // 3),
        "data": str(data_dir),
        "iters": plan.iters,
        "seed": seed,
        "adapter_path": str(plan.out / "runs" / run_name(method, noise, seed)),
        "steps_per_eval": 0,
        "steps_per_save": 0,
        "val_batches": -1,
        **plan.overrides,
    }
    if plan.model:
        overrides["model"] = plan.model
    return build_config(recipe_values, overrides, where=str(recipe))


def _settings(cfg: Config, source: Source, plan: Plan) -> dict[str, Any]:
    """What a finished run must match to be reused (its config, the source data, the held-out size)."""
    name = Path(source.name).resolve() if Path(source.name).exists() else source.name
    return json.loads(json.dumps({**cfg.to_dict(), "data": str(name), "val_pairs": plan.val_pairs}))


def run_one(cfg: Config, method: str, noise: float, counts: dict[str, int], settings: dict[str, Any],
            keep_adapters: bool = False) -> dict[str, Any]:
    """Train one (method, noise, seed) run and return its results row."""
    from tidpo_mlx.trainer import train

    folder = Path(cfg.adapter_path)
    tic = time.perf_counter()
    # a run folder without a matching result.json holds a stale or cut-short run of this experiment
    result = train(cfg, log=lambda _: None, progress=False, existing="remove")
    row = {
        "method": method,
        "noise": noise,
        "seed": cfg.seed,
        "iters": cfg.iters,
        **counts,
        "reward_accuracy": result.after["rewards/accuracies"],
        "policy_preference_accuracy": result.after["policy_preference_accuracy"],
        "reward_margin": result.after["rewards/margins"],
        "before_reward_accuracy": (result.before or {}).get("rewards/accuracies", float("nan")),
        "before_policy_preference_accuracy": (result.before or {}).get("policy_preference_accuracy", float("nan")),
        "train_seconds": round(result.seconds, 2),
        "run_seconds": round(time.perf_counter() - tic, 2),
    }
    if not keep_adapters:
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        (folder / "adapters.safetensors").unlink(missing_ok=True)
    (folder / "result.json").write_text(json.dumps({"settings": settings, "row": row}, indent=2))
    return row


def _cached(cfg: Config, settings: dict[str, Any]) -> dict[str, Any] | None:
    path = Path(cfg.adapter_path) / "result.json"
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    return saved.get("row") if saved.get("settings") == settings else None


def source_data(plan: Plan) -> Source:
    """The plan's data (default: the bundled ``arith``), read as ``--data`` is (any format and source).

    It needs its own held-out split: flipped labels must never reach the pairs
    that score the runs. Unreadable lines stop it here (the runs' encoding
    reports invalid pairs as training does).
    """
    source = resolve_source(plan.data or "arith")
    if not source.splits.get("valid") or not source.splits["valid"].rows:
        raise DataError(f"{source.name}: the experiment needs a held-out split (a valid/validation file or Hub "
                        "split): the flipped labels must not reach the pairs that score the runs")
    problems = [p for rows in source.splits.values() for p in rows.problems]
    if problems:
        raise DataError(f"{problems[0].where}: {problems[0].reason}"
                        + (f" (and {len(problems) - 1} more unreadable rows)" if len(problems) > 1 else ""))
    return source


def run_experiment(
    plan: Plan, log: Callable[[str], None] = print, source: Source | None = None
) -> list[dict[str, Any]]:
    """Run every (seed, noise, method) of ``plan``; write results after each run; return the rows.

    ``source``: the plan's data as :func:`source_data` read it (read here when not given).
    """
    source = source if source is not None else source_data(plan)
    plan.out.mkdir(parents=True, exist_ok=True)
    runs = plan.runs()
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    spent: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="tidpo-noise-") as tmp:
        for n, (seed, noise, method) in enumerate(runs, 1):
            data_dir = Path(tmp) / f"noise{round(noise * 100):02d}-seed{seed}"
            counts = noisy_folder(source, data_dir, noise, seed, plan.val_pairs)
            cfg = run_config(plan, method, noise, seed, data_dir)
            settings = _settings(cfg, source, plan)
            row = _cached(cfg, settings)
            reused = row is not None
            if row is None:
                try:
                    row = run_one(cfg, method, noise, counts, settings, plan.keep_adapters)
                except TidpoError as err:
                    raise ExperimentError(f"run {run_name(method, noise, seed)}: {first_line(err)}") from err
                spent.setdefault(method, []).append(row["run_seconds"])
            rows.append(row)
            write_results(plan, rows)
            left = [m for _, _, m in runs[n:]]
            eta = sum(_guess(spent, m, plan, counts["val_pairs"]) for m in left)
            log(
                f"[{n}/{len(runs)}] {run_name(method, noise, seed)}: reward acc {row['reward_accuracy']:.3f}, "
                f"policy pref acc {row['policy_preference_accuracy']:.3f}"
                + (" (reused)" if reused else f" in {row['run_seconds']:.0f} s")
                + f"; elapsed {_clock(time.perf_counter() - t0)}, left ~{_clock(eta)}"
            )
    return rows


def _guess(spent: dict[str, list[float]], method: str, plan: Plan, val_pairs: int) -> float:
    """Seconds a run of ``method`` will take: measured so far, else the estimate scaled by the
    ratio of measured to estimated times of the other methods."""
    if spent.get(method):
        return float(np.mean(spent[method]))
    seen = [float(np.mean(v)) / run_estimate(plan, k, val_pairs) for k, v in spent.items() if v]
    scale = float(np.mean(seen)) if seen else 1.0
    return run_estimate(plan, method, val_pairs) * scale


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


def write_results(plan: Plan, rows: list[dict[str, Any]]) -> None:
    """``results.csv``, ``results.md`` and (with matplotlib) ``results.png`` in ``plan.out``."""
    with open(plan.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in FIELDS})
    (plan.out / "results.md").write_text(results_markdown(plan, rows))
    plot_results(plan, rows)


def aggregate(rows: list[dict[str, Any]], key: str) -> dict[tuple[str, float], tuple[float, float, int]]:
    """(method, noise) -> (mean, std over seeds (0 for one seed), number of seeds)."""
    groups: dict[tuple[str, float], list[float]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["noise"]), []).append(float(row[key]))
    return {
        k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v))
        for k, v in groups.items()
    }


def results_markdown(plan: Plan, rows: list[dict[str, Any]]) -> str:
    """The mean ± std tables (one per metric) as Markdown."""
    noise = [p for p in plan.noise]
    methods = [m for m in plan.methods if any(r["method"] == m for r in rows)]
    val = rows[0]["val_pairs"] if rows else plan.val_pairs
    train_pairs = rows[0]["train_pairs"] if rows else "?"
    lines = [
        "# Label-noise robustness",
        "",
        f"Model `{plan.model or 'default (smollm2-135m-instruct)'}`, data `{plan.data or 'arith'}` "
        f"({train_pairs} training pairs, {val} held-out pairs), {plan.iters} steps per run, "
        f"{plan.seeds} seed(s) (warmup at most a third of the steps); a share of the *training* labels "
        "flipped, held-out pairs untouched. "
        "Values: mean ± std over seeds (sample std; the mean alone with one seed) of held-out metrics "
        "after training.",
        "",
        "Methods: " + "; ".join(f"`{m}` = {METHODS[m].label} (recipe {METHODS[m].recipe}"
                                + (f", {', '.join(f'{k} {v}' for k, v in METHODS[m].overrides.items())}" if METHODS[m].overrides else "")
                                + ")" for m in methods) + ".",
    ]
    for key, title in (
        ("reward_accuracy", "Held-out reward accuracy (rewards/accuracies)"),
        ("policy_preference_accuracy", "Held-out policy preference accuracy"),
    ):
        stats = aggregate(rows, key)
        lines += ["", f"## {title}", "", "| method | " + " | ".join(f"{p:.0%} noise" for p in noise) + " |",
                  "|---|" + "---|" * len(noise)]
        for m in methods:
            cells = []
            for p in noise:
                if (m, p) in stats:
                    mean, std, n = stats[(m, p)]
                    cells.append(f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}")
                else:
                    cells.append("-")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    before = aggregate(rows, "before_policy_preference_accuracy")
    if before:
        base = np.mean([v[0] for v in before.values()])
        lines += ["", f"Before training, held-out policy preference accuracy: {base:.3f} (same base model for every run)."]
    secs = aggregate(rows, "train_seconds")
    if secs:
        lines += ["", "Mean training time per run: " + ", ".join(
            f"{m} {np.mean([v[0] for k, v in secs.items() if k[0] == m]):.0f} s" for m in methods) + "."]
    lines += [
        "",
        "Paper (docs/method.md section 11, GSM8K accuracy, full fine-tunes of much larger models; for the shape only):",
        "DPO 69.3 / 67.5 / 64.8 / 60.1, TI-DPO 73.0 / 72.2 / 70.8 / 68.3 at 0 / 10 / 20 / 40 % flipped labels.",
        "",
    ]
    return "\n".join(lines)


def plot_results(plan: Plan, rows: list[dict[str, Any]]) -> Path | None:
    """``results.png`` (both metrics vs noise, error bars = std over seeds), if matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, title) in zip(axes, (("reward_accuracy", "held-out reward accuracy"),
                                       ("policy_preference_accuracy", "held-out policy preference accuracy"))):
        stats = aggregate(rows, key)
        for m in plan.methods:
            pts = [(p, *stats[(m, p)][:2]) for p in plan.noise if (m, p) in stats]
            if pts:
                xs, ys, es = zip(*pts)
                ax.errorbar([100 * x for x in xs], ys, yerr=es, marker="o", capsize=3, label=METHODS[m].label)
        ax.set_xlabel("flipped training labels (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path = plan.out / "results.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
