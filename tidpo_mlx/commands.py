"""``tidpo-mlx eval``, ``importance`` and ``experiment``.

``eval`` and ``importance`` take a recipe (``-c``, default quickstart) plus
flags for the method keys (``--preset``, ``--loss-type``, ``--weighting``,
``--lam``, ...), load the model with optional adapters and never train.
Errors print one line and exit 1 (``--debug``: the traceback).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from tidpo_mlx import experiment as ex
from tidpo_mlx.errors import ConfigError
from tidpo_mlx.files import write_jsonl
from tidpo_mlx.options import METHOD_KEYS, config_options, run_guarded


def _common(func: Callable) -> Callable:
    opts = [
        click.option("--model", default=None, help="Model (built-in name, HF id, folder, .gguf). [default: the recipe's]"),
        click.option("--adapter-path", default=None, help="Adapter folder to load (adapters.safetensors + adapter_config.json); without it the base model."),
        click.option("--data", required=True, help="JSONL file of pairs (a data folder or bundled dataset name: its valid.jsonl)."),
        click.option("-c", "--config", "recipe", default=None, help="Recipe YAML (path or bundled name). [default: quickstart]"),
        click.option("--batch-size", type=int, default=None, help="Pairs per forward batch. [default: the recipe's batch_size]"),
        click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def _load(recipe: str | None, model: str | None, adapter_path: str | None, overrides: dict[str, Any]):
    """The config, the runtime of the model with the adapters of ``adapter_path``, its tokenizer and folder."""
    from tidpo_mlx.backend import select
    from tidpo_mlx.config import load_config
    from tidpo_mlx.models import load_adapted

    cfg = load_config(recipe, {**overrides, "model": model})
    model_obj, tokenizer, path, reference = load_adapted(cfg.model, adapter_path, cfg)
    return cfg, select(model_obj, cfg, str(path), reference), tokenizer, path


def _bar(total: int, enabled: bool):
    if not enabled or total < 2:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="pair", dynamic_ncols=True, leave=False)


GENERATION_FLAGS = ("num_samples", "temperature", "top_p", "max_tokens", "html_path", "answer_pattern", "no_base")
"""``eval`` flags that only ``--generate`` reads."""


@click.command()
@_common
@click.option("-o", "--output", default=None,
              help="Write one JSON object per pair here ('-': stdout, the summary then goes to stderr). With "
                   "--generate: rows are appended as batches finish, and a rerun continues the file.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--split", type=click.Choice(["train", "valid", "test"]), default=None,
              help="Split of a data folder or bundled dataset. [default: a file's every pair, else valid]")
@click.option("--limit", type=int, default=None, help="First N pairs (-1: all). [default: all]")
@click.option("--generate", is_flag=True, help="Generate answers to the pairs' prompts with the base model and with "
              "the adapters, and score them (docs/generation.md) instead of the loss. --batch-size: pairs per "
              "generation batch [default: 64].")
@click.option("--num-samples", type=int, default=None, help="--generate: samples per prompt and arm. [default: 1]")
@click.option("--temperature", type=float, default=None,
              help="--generate: sampling temperature (0: greedy). [default: 0]")
@click.option("--top-p", type=float, default=None, help="--generate: top-p of sampling. [default: 1.0]")
@click.option("--max-tokens", type=int, default=None, help="--generate: new tokens per generation at most. [default: 64]")
@click.option("--html", "html_path", default=None, help="--generate: write a side-by-side HTML page here.")
@click.option("--answer-pattern", default=None, metavar="REGEX",
              help="--generate: the answer is the first group of the pattern's last match (e.g. '#### (-?[\\d,.]+)'); "
                   "'none': no answer scores. [default: the last time, date, weekday or number]")
@click.option("--no-base", is_flag=True, help="--generate with --adapter-path: generate only with the adapters.")
@config_options(METHOD_KEYS)
def eval_command(model, adapter_path, data, recipe, batch_size, debug, output, quiet, split, limit, generate,
                 num_samples, temperature, top_p, max_tokens, html_path, answer_pattern, no_base, **overrides) -> None:
    """Per-pair loss of a recipe on a data file, without training; or, with --generate, the answers.

    Runs the recipe's objective (the function training differentiates) on
    every pair with the model in eval mode. Per pair: index, loss, loss_pref,
    loss_triplet, reward_chosen, reward_rejected (beta * sum rho, unweighted),
    weighted_margin (m_w - m_l), logp_chosen, logp_rejected, and kl_chosen,
    kl_rejected for tdpo losses. Triplet anchors: the pair's 'anchor' field
    (ignored with anchor: policy), else sampled from the policy, seeded from the pair index.

    --generate: the pairs' prompts answered by the base model and by the
    adapters (one model, adapters switched off for the base), batched and
    seeded (--seed); answer accuracy, length and diversity per arm with
    standard errors and the paired difference tuned - base. The weights are
    the ones the printed mlx_lm.generate command loads (--dequantize true:
    dequantized, faster on a CPU).
    """
    flags = {"num_samples": num_samples, "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens,
             "html_path": html_path, "answer_pattern": answer_pattern, "no_base": no_base or None}
    if generate:
        run_guarded(debug, lambda: _generate(recipe, model, adapter_path, data, split, limit, batch_size, output,
                                              quiet, flags, overrides))
        return

    def job() -> None:
        from tidpo_mlx.anchors import anchor_origins
        from tidpo_mlx.evaluation import Pairs, evaluate_pairs, load_pairs, summarize

        misplaced = [name for name in GENERATION_FLAGS if flags[name] is not None]
        if misplaced:
            raise ConfigError(f"--{'html' if misplaced[0] == 'html_path' else misplaced[0].replace('_', '-')} "
                              "goes with --generate")
        cfg, fwd, tok, _ = _load(recipe, model, adapter_path, overrides)
        if split is None:
            pairs = load_pairs(data, tok, cfg, limit=limit)
        else:
            from tidpo_mlx.data import PairEncoder, load_split

            chosen = load_split(data, tok, cfg, split, limit)
            pairs = Pairs(chosen.name, chosen.rows, chosen.examples, PairEncoder(tok, cfg), chosen.notes)
        echo = (lambda s: click.echo(s, err=True)) if output == "-" else click.echo
        if cfg.triplet_on:
            given, sampled = anchor_origins(pairs.examples, cfg)
            anchors = f"{given} from the data, {sampled} sampled from the policy"
        else:
            anchors = "none (triplet term off)"
        echo(f"eval: {len(pairs.examples)} pairs of {pairs.path}; model {cfg.model}"
             + (f" + adapters {adapter_path}" if adapter_path else " (no adapters: policy = reference, rewards 0)"))
        echo(f"recipe {recipe or 'quickstart'}: preset {cfg.preset}, loss_type {cfg.loss_type}, weighting "
             f"{cfg.weighting}, beta {cfg.beta:g}, gamma {cfg.gamma:g}; anchors: {anchors}")
        bar = _bar(len(pairs.examples), not quiet)
        records = evaluate_pairs(fwd, tok, cfg, pairs, batch_size or cfg.batch_size,
                                 progress=bar.update if bar is not None else None)
        if bar is not None:
            bar.close()
        if output:
            write_jsonl(output, records)
        s = summarize(records)
        echo(f"pairs {s['pairs']}")
        echo(f"mean loss {s['loss']:.4f} (pref {s['loss/pref']:.4f}, triplet {s['loss/triplet']:.4f})")
        echo(f"rewards/accuracies {s['rewards/accuracies']:.3f}, policy_preference_accuracy "
             f"{s['policy_preference_accuracy']:.3f}")
        echo(f"rewards/margins {s['rewards/margins']:.4f}, mean weighted margin {s['margins/weighted']:.4f}")
        if "kl/chosen" in s:
            echo(f"kl/chosen {s['kl/chosen']:.4f}, kl/rejected {s['kl/rejected']:.4f}")
        if output and output != "-":
            echo(f"per-pair results: {output}")

    run_guarded(debug, job)


def _generate(recipe: str | None, model: str | None, adapter_path: str | None, data: str, split: str | None,
              limit: int | None, batch_size: int | None, output: str | None, quiet: bool, given: dict[str, Any],
              overrides: dict[str, Any]) -> None:
    """``eval --generate`` (``gen_eval.run_generate``)."""
    from tidpo_mlx.config import load_config
    from tidpo_mlx.gen_eval import Request, run_generate
    from tidpo_mlx.generation import Decoding

    cfg = load_config(recipe, {**overrides, "model": model})
    defaults = Decoding()
    decoding = Decoding(
        num_samples=given["num_samples"] if given["num_samples"] is not None else defaults.num_samples,
        temperature=given["temperature"] if given["temperature"] is not None else defaults.temperature,
        top_p=given["top_p"] if given["top_p"] is not None else defaults.top_p,
        max_tokens=given["max_tokens"] if given["max_tokens"] is not None else defaults.max_tokens,
        seed=cfg.seed,
    )
    request = Request(data=data, split=split, limit=limit, decoding=decoding, answer_pattern=given["answer_pattern"],
                      output=output, html=given["html_path"], adapter_path=adapter_path, no_base=bool(given["no_base"]),
                      batch_size=batch_size, quiet=quiet)
    echo = (lambda s: click.echo(s, err=True)) if output == "-" else click.echo
    run_generate(cfg, request, echo)


@click.command()
@_common
@click.option("-o", "--output", default=None, help="Write per-pair tokens, attribution, prior and weights as JSONL here.")
@click.option("--html", "html_path", default=None, help="Write a self-contained HTML view here.")
@click.option("--limit", type=int, default=10, show_default=True, help="First N pairs of the file (-1: all).")
@click.option("--hide-template", is_flag=True, help="Hide chat-template tokens (<|im_end|>, newline) in the views; colour scale over the response text.")
@click.option("--no-view", is_flag=True, help="Do not print the terminal heat map.")
@config_options(METHOD_KEYS)
def importance_command(model, adapter_path, data, recipe, batch_size, debug, output, html_path, limit,
                       hide_template, no_view, **overrides) -> None:
    """Per-token attribution, prior and weights of pairs, as the loss uses them.

    For the chosen and the rejected response of each pair: tokens, token_ids,
    attribution (raw L1 norms I), prior (normalised Gaussian prior over the
    weight span), weights (exactly what the loss multiplies rho by), all at the
    response positions. Prints a colour heat map; --html writes a page.
    """
    def job() -> None:
        from tidpo_mlx.evaluation import load_pairs
        from tidpo_mlx.inspection import importance_records, weighting_label
        from tidpo_mlx.view import html_page, terminal_view

        cfg, fwd, tok, _ = _load(recipe, model, adapter_path, overrides)
        pairs = load_pairs(data, tok, cfg, limit=None if limit < 0 else limit)
        records = importance_records(fwd, tok, cfg, pairs, batch_size or cfg.batch_size)
        label = weighting_label(cfg)
        source = f"model {cfg.model}" + (f" + adapters {adapter_path}" if adapter_path else "")
        if output:
            write_jsonl(output, records)
        if not no_view:
            for line in terminal_view(records, f"{label}; {source}", hide_template):
                click.echo(line)
        if html_path:
            page = html_page(records, f"{label}; {source}; data {pairs.path}", "tidpo-mlx token weights", hide_template)
            Path(html_path).parent.mkdir(parents=True, exist_ok=True)
            Path(html_path).write_text(page, encoding="utf-8")
        for what, where in (("weights", output), ("HTML view", html_path)):
            if where:
                click.echo(f"{what}: {where}")

    run_guarded(debug, job)


def _floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated fractions, e.g. 0,0.1,0.2,0.4") from None
    return tuple(v / 100 if v >= 1 else v for v in values)


def _settings(items: tuple[str, ...]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--set")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def _listed(shares: tuple[float, ...]) -> str:
    """Noise shares for help texts: ``0,10,20,40 %``."""
    return ",".join(f"{100 * p:g}" for p in shares) + " %"


@click.command()
@click.option("--quick", is_flag=True, help=f"{' and '.join(ex.QUICK_METHODS)} at {_listed(ex.QUICK_NOISE)} noise, {ex.QUICK_SEEDS} seed, "
              f"{ex.QUICK_ITERS} steps (about 3.5 min).")
@click.option("--seeds", type=int, default=None, help=f"Seeds per method and noise level. [default: {ex.DEFAULT_SEEDS}; quick: {ex.QUICK_SEEDS}]")
@click.option("--iters", type=int, default=None, help=f"Training steps per run. [default: {ex.DEFAULT_ITERS}; quick: {ex.QUICK_ITERS}]")
@click.option("--out", default="experiments/label-noise", show_default=True, help="Output folder.")
@click.option("--val-pairs", type=int, default=None, help=f"Held-out pairs evaluated (first N of valid.jsonl, -1: all). [default: {ex.DEFAULT_VAL_PAIRS}; "
              f"quick: {ex.QUICK_VAL_PAIRS}]")
@click.option("--methods", default=None, help=f"Comma-separated subset of: {', '.join(ex.METHODS)}.")
@click.option("--noise", default=None, help="Comma-separated flipped-label shares (fractions or percents). "
              f"[default: {_listed(ex.NOISE_LEVELS)}; quick: {_listed(ex.QUICK_NOISE)}]")
@click.option("--model", default=None, help="Model for every run. [default: the recipes' (built-in SmolLM2)]")
@click.option("--data", default=None, help="Data folder with train.jsonl and valid.jsonl. [default: arith]")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Config override for every run (repeatable), e.g. --set num_layers=2.")
@click.option("--keep-adapters", is_flag=True, help="Keep every run's adapters and checkpoints.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def experiment_command(quick, seeds, iters, out, val_pairs, methods, noise, model, data, settings, keep_adapters,
                       debug) -> None:
    """Label-noise robustness: DPO, TI-DPO and ablations under 0/10/20/40 % flipped training labels.

    Trains every method (recipes dpo and quickstart; TI-DPO without the
    triplet term; TI-DPO with uniform weights) on the data with a seeded share
    of training pairs' chosen/rejected swapped, and records the held-out
    reward accuracy and policy preference accuracy after training. Writes
    results.csv, results.md and (with matplotlib) results.png to --out.
    Rerunning with the same settings reuses finished runs.
    """
    def job() -> None:
        plan = ex.make_plan(
            out, quick=quick, seeds=seeds, iters=iters, val_pairs=val_pairs,
            methods=tuple(m.strip() for m in methods.split(",") if m.strip()) if methods else None,
            noise=_floats(noise), model=model, data=data, overrides=_settings(settings),
            keep_adapters=keep_adapters,
        )
        source = ex.source_data(plan)
        train_rows = [r for _, r in source.splits["train"].rows]
        n_valid = len(source.splits["valid"].rows)
        n_val = n_valid if plan.val_pairs < 0 else min(plan.val_pairs, n_valid)
        runs = len(plan.runs())
        click.echo(f"plan: {len(plan.methods)} methods ({', '.join(plan.methods)}) x {len(plan.noise)} noise levels "
                   f"({', '.join(f'{p:.0%}' for p in plan.noise)}) x {plan.seeds} seed(s) = {runs} runs of "
                   f"{plan.iters} steps")
        click.echo(f"data: {source.name} ({len(train_rows)} train pairs, {n_val} of {n_valid} held-out pairs); "
                   f"model: {plan.model or 'recipe default'}; output: {plan.out}")
        no_anchor = sum(r.get("anchor") is None for r in train_rows)
        if no_anchor and any(ex.METHODS[m].overrides.get("anchor") == "sample" for m in plan.methods):
            click.echo(f"note: {no_anchor} training pairs have no 'anchor': TI-DPO runs sample anchors "
                       "every step (several seconds per step on a CPU)")
        est = ex.estimate_seconds(plan, n_val)
        click.echo(f"estimated time: ~{est / 60:.0f} min (rates measured with the built-in SmolLM2 on an idle "
                   "2-core CPU; a busy machine is slower)")
        ex.run_experiment(plan, log=click.echo, source=source)
        click.echo(f"results: {plan.out / 'results.md'}, {plan.out / 'results.csv'}"
                   + (f", {plan.out / 'results.png'}" if (plan.out / "results.png").exists() else
                      " (pip install 'tidpo-mlx[plot]' for a plot)"))
        click.echo((plan.out / "results.md").read_text())

    run_guarded(debug, job)
