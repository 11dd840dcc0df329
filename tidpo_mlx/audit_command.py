"""``tidpo-mlx audit``: rank the training pairs by how likely their label is flipped (``audit.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from tidpo_mlx import audit as au
from tidpo_mlx.options import METHOD_KEYS, config_options, run_guarded

AUDIT_KEYS = METHOD_KEYS + (
    "learning_rate", "lr_schedule", "warmup_steps", "batch_size", "num_layers", "skip_invalid", "valid_fraction",
    "dataset_num_proc",
)
"""Config keys of the audit: the method keys plus what shapes the short fold runs."""


@click.command()
@click.option("--data", required=True, help="Data to audit (folder, file, bundled name, Hub id): its training split.")
@click.option("--model", default=None, help="Model (built-in name, HF id, folder, .gguf). [default: the recipe's]")
@click.option("-c", "--config", "recipe", default=au.DEFAULT_RECIPE, show_default=True,
              help="Recipe (path or bundled name) whose loss trains the fold models.")
@click.option("--folds", type=int, default=au.DEFAULT_FOLDS, show_default=True,
              help="Cross-fitting folds (grouped by prompt and duplicate pair); 0: reference margin only, no training.")
@click.option("--iters", type=int, default=au.DEFAULT_ITERS, show_default=True, help="Training steps per fold.")
@click.option("--score", type=click.Choice(au.SCORES), default=None,
              help=f"Score that ranks the pairs (lowest = most suspect). [default: {au.DEFAULT_SCORE}; with --folds 0: ref_margin]")
@click.option("--top", type=int, default=au.DEFAULT_TOP, show_default=True,
              help="Most suspect pairs to print and to show (with evidence) in audit.html.")
@click.option("--out", required=True, help="Output folder (new or empty): audit.jsonl, audit.html, summary.json, folds/.")
@click.option("--write", "write_dir", default=None, help="Also write a cleaned data folder here (must not exist).")
@click.option("--action", type=click.Choice(["drop", "flip"]), default="drop", show_default=True,
              help="With --write: drop the flagged pairs or flip their labels.")
@click.option("--share", type=float, default=None, help="With --write: flag this share of most suspect pairs. [default: 0.2]")
@click.option("--threshold", type=float, default=None, help="With --write: flag every pair whose score is below this.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@config_options(AUDIT_KEYS)
def audit_command(data: str, model: str | None, recipe: str, folds: int, iters: int, score: str | None, top: int,
                  out: str, write_dir: str | None, action: str, share: float | None, threshold: float | None,
                  debug: bool, quiet: bool, **overrides: Any) -> None:
    """Score every training pair for how likely its label is flipped, with models that never saw it.

    Splits the pairs into --folds folds (pairs sharing a prompt or both
    responses stay together), trains a short LoRA run of the recipe's loss on
    the other folds, and scores each fold's pairs by that model's implicit
    reward margin (reward_margin), its log-prob margin (logp_margin) and the
    reference's log-prob margin (ref_margin). Writes audit.jsonl (one line per
    pair: source file:line, scores, rank, fold), audit.html (the --top pairs
    with token heat maps and the log-ratios of the tokens where chosen and
    rejected differ) and prints the --top pairs.
    """
    def job() -> None:
        from tidpo_mlx.config import load_config
        from tidpo_mlx.data import hf_dataset_keys
        from tidpo_mlx.inspection import weighting_label

        cfg = load_config(recipe, {**overrides, "model": model, "data": data})
        chosen = score or ("ref_margin" if folds == 0 else au.DEFAULT_SCORE)
        if write_dir is None and (share is not None or threshold is not None):
            raise click.UsageError("--share and --threshold go with --write")
        if write_dir is not None:
            au.check_write_target(Path(write_dir))
            au.flag_rule(share, threshold)
        folder = Path(out)
        au.refuse_existing(folder, "--out")
        result = au.run_audit(cfg, folder, folds, iters, chosen, top, log=click.echo, progress=not quiet)
        label = (f"recipe {recipe}: {weighting_label(cfg)}; model {cfg.model}; {result.folds} folds x {iters} steps; "
                 "evidence weights: paper preset")
        au.write_reports(result, folder, label)
        for line in au.terminal_summary(result, top):
            click.echo(line)
        secs = result.seconds
        click.echo(f"audit of {len(result.pairs)} pairs in {secs['total']:.0f} s (scoring {secs['score']:.0f} s, "
                   f"evidence {secs['evidence']:.0f} s); report: {folder / 'audit.jsonl'}, {folder / 'audit.html'}")
        if write_dir is not None:
            rule_share, rule_threshold = au.flag_rule(share, threshold)
            counts = au.write_cleaned(folder, Path(write_dir), action, rule_share, rule_threshold,  # type: ignore[arg-type]
                                      plain=cfg.chat_template == "none", hf_dataset=hf_dataset_keys(cfg))
            click.echo(f"wrote {write_dir}: {counts['train_pairs']} training pairs, {counts['changed']} {action}ped "
                       f"(changes.jsonl lists them)")

    run_guarded(debug, job)
