"""``tidpo-mlx data check``: read and encode ``--data`` with only the tokenizer, and say what training would see."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Callable

import click
import numpy as np

from tidpo_mlx.config import Config
from tidpo_mlx.data.example import Dataset, Example
from tidpo_mlx.options import run_guarded


def report(data: Dataset, tokenizer: Any, echo: Callable[[str], None] = click.echo) -> None:
    """Counts, token-length percentiles, truncation, invalid rows, duplicates and one templated pair."""
    every = data.train + data.valid + data.test
    echo(f"data: {data.source}: {len(data.train)} train, {len(data.valid)} valid, {len(data.test)} test pairs")
    for note in data.notes:
        echo(f"  {note}")
    for name, values in (("prompt", [len(e.prompt) for e in every]),
                         ("prompt + longer response", [e.length for e in every])):
        p = np.percentile(values, [50, 90, 99, 100]).astype(int)
        echo(f"tokens of {name}: median {p[0]}, p90 {p[1]}, p99 {p[2]}, max {p[3]}")
    echo(f"truncated: {data.truncated_prompts} prompts, {data.truncated_responses} responses; dropped turns: "
         f"{data.dropped_turns} messages in {data.pairs_with_dropped_turns} pairs")
    echo(f"invalid rows: {data.skipped} (training stops on them unless --skip-invalid drops them)"
         + "".join(f"\n  {n} x {r}" for r, n in data.invalid.items()))
    keys = Counter((tuple(e.prompt), tuple(e.chosen), tuple(e.rejected)) for e in every)
    echo(f"exact duplicate pairs: {sum(n - 1 for n in keys.values() if n > 1)}")
    echo("first training pair as templated, response tokens in [[ ]]:")
    echo(marked(data.train[0], tokenizer))


def marked(ex: Example, tokenizer: Any) -> str:
    """The prompt and chosen response decoded, the response (what the loss sees) in ``[[ ]]``."""
    return f"{ex.source}:\n{tokenizer.decode(ex.prompt)}[[{tokenizer.decode(ex.chosen)}]]"


def check_data(cfg: Config, echo: Callable[[str], None] = click.echo) -> None:
    """Load the tokenizer of ``cfg.model`` and report on ``cfg.data`` (invalid rows counted, not stopping)."""
    from tidpo_mlx.data.load import load_dataset
    from tidpo_mlx.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(cfg.model))
    report(load_dataset(cfg.data, tokenizer, dataclasses.replace(cfg, skip_invalid=True)), tokenizer, echo)


@click.group()
def data() -> None:
    """Inspect preference data without loading model weights."""


@data.command()
@click.option("--data", "data_spec", default=None, help="Folder, file, bundled name or Hub dataset id. [default: the recipe's]")
@click.option("-c", "--config", "recipe", default=None, help="Recipe YAML (a path, or bundled: quickstart, paper, official, dpo) laid over the defaults; without it the defaults.")
@click.option("--model", default=None, help="Model whose tokenizer and chat template apply. [default: the recipe's]")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def check(data_spec: str | None, recipe: str | None, model: str | None, debug: bool) -> None:
    """Counts, token lengths, truncation, invalid rows and duplicates of --data, loading only the tokenizer.

    Invalid rows are counted by reason (with their first places) instead of stopping, as
    ``--skip-invalid`` would drop them.
    """

    def job() -> None:
        from tidpo_mlx.config import load_config

        check_data(load_config(recipe, {"data": data_spec, "model": model}))

    run_guarded(debug, job)
