"""``tidpo-mlx eval --generate``: the pairs' prompts answered by the base model and by the adapters.

One loaded model: ``base`` is it with the adapters switched off, ``tuned``
with them on. The weights are the ones ``mlx_lm.generate`` loads (a quantized
model stays quantized) unless ``--dequantize true``. ``--output`` gets one
row per pair as each batch finishes; a rerun with the same settings skips the
pairs already there and refuses other settings. Scores: docs/generation.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tidpo_mlx.answers import AnswerKey, AnswerRule, answer_key, answer_rule, answer_scores
from tidpo_mlx.config import Config, Switch
from tidpo_mlx.data import Example, PairEncoder, load_split
from tidpo_mlx.errors import DataError, ModelError
from tidpo_mlx.files import WriteError, atomic_write_text, jsonl_text
from tidpo_mlx.gen_scores import row_scores, summarize
from tidpo_mlx.generation import Decoding, generate_arms, generation_prompt, reproduce_command

BATCH_PAIRS = 64
"""Pairs per generation batch when ``--batch-size`` is not given (each decodes ``num_samples`` sequences per arm)."""


@dataclass(frozen=True)
class Request:
    """What ``eval --generate`` was asked for."""

    data: str
    split: str | None
    limit: int | None
    decoding: Decoding
    answer_pattern: str | None
    output: str | None
    html: str | None
    adapter_path: str | None
    no_base: bool
    batch_size: int | None
    quiet: bool


def _adapters_digest(adapter_path: str | None) -> str | None:
    if adapter_path is None:
        return None
    file = Path(adapter_path) / "adapters.safetensors"
    if not file.is_file():
        raise ModelError(f"{adapter_path}: no adapters.safetensors")
    return hashlib.sha256(file.read_bytes()).hexdigest()[:16]


def read_rows(path: Path, settings: dict[str, Any], log: Callable[[str], None]) -> dict[int, dict[str, Any]]:
    """The finished rows of an earlier run into ``path`` by pair index; other settings there stop the run.

    A torn last line (a run killed during a write) is dropped with a note and
    the file rewritten without it.
    """
    from tidpo_mlx.metrics import read_metrics

    rows = read_metrics(path, log)
    for number, row in enumerate(rows, 1):
        theirs = row.get("settings")
        if theirs != settings:
            keys = sorted(k for k in set(settings) | set(theirs or {}) if (theirs or {}).get(k) != settings.get(k))
            shown = ", ".join(f"{k} {(theirs or {}).get(k)!r} there, {settings.get(k)!r} now" for k in keys[:3])
            raise DataError(f"{path}:{number}: generations made with other settings ({shown}); name another "
                            "--output or move this file away")
    atomic_write_text(path, jsonl_text(rows))
    return {row["index"]: row for row in rows}


def _check_same_pair(path: Path, row: dict[str, Any], ex: Example) -> None:
    if row.get("source") != ex.source or row.get("prompt") != ex.messages:
        raise DataError(f"{path}: pair #{ex.index} there is not this data's pair #{ex.index} ({ex.source}); "
                        "name another --output or move this file away")


def append_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append rows to ``path`` and make them durable (an interrupted run keeps every finished batch)."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(jsonl_text(rows))
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise WriteError(f"{path}: could not append generations ({err.strerror or err})") from None


def make_row(ex: Example, settings: dict[str, Any], tokens: dict[str, list[list[int]]], tokenizer: Any,
             rule: AnswerRule | None, key: AnswerKey | None) -> dict[str, Any]:
    """One pair's output row: the pair, its generations, answers and scores, and the settings."""
    texts = {arm: [tokenizer.decode(t) for t in samples] for arm, samples in tokens.items()}
    answers, scores = row_scores(tokens, texts, rule, key)
    row: dict[str, Any] = {"index": ex.index, "source": ex.source, "prompt": ex.messages,
                           "chosen": ex.texts.get("chosen", ""), "rejected": ex.texts.get("rejected", ""),
                           "generations": texts, "lengths": {arm: [len(t) for t in s] for arm, s in tokens.items()}}
    if answers is not None and key is not None:
        row["answers"] = {"chosen": key.chosen, "rejected": key.rejected, **answers}
        if key.skip_reason is not None:
            row["answer_skipped"] = key.skip_reason
    row["scores"] = scores
    row["settings"] = settings
    return row


def _arms(req: Request) -> list[str]:
    if req.adapter_path is None:
        if req.no_base:
            raise DataError("--no-base goes with --adapter-path (without adapters only the base is generated)")
        return ["base"]
    return ["tuned"] if req.no_base else ["base", "tuned"]


def _answer_notes(rule: AnswerRule | None, keys: Sequence[AnswerKey | None]) -> str:
    if rule is None:
        return "answer scores: off (--answer-pattern none)"
    absent = sum(k.skip_reason == "absent" for k in keys)
    equal = sum(k.skip_reason == "equal" for k in keys)
    scored = len(keys) - absent - equal
    reasons = f"{absent} without an answer in chosen or rejected, {equal} with equal answers"
    if scored == 0:
        return (f"answer scores: none: no pair's chosen and rejected answers differ under the rule "
                f"({rule.label}): {reasons}; samples, lengths and diversity only")
    return f"answer scores over {scored} of {len(keys)} pairs ({rule.label}); left out: {reasons}"


def empty_notes(rows: Sequence[dict[str, Any]], arms: Sequence[str]) -> list[str]:
    """One line per arm with empty generations (the model ended its turn at once)."""
    notes = []
    for arm in arms:
        lengths = [n for r in rows for n in r["lengths"][arm]]
        empty = lengths.count(0)
        if empty:
            notes.append(f"note: {arm}: {empty} of {len(lengths)} generations are empty (the model ended its turn "
                         "at once): length 0, no answer, no n-grams for the diversity scores")
    return notes


def run_generate(cfg: Config, req: Request, echo: Callable[[str], None]) -> dict[str, Any]:
    """Generate, score, write and show (see the module docstring); returns the summary by score and arm."""
    from tidpo_mlx.models import load_adapted, load_tokenizer, resolve_model

    req.decoding.check()
    rule = answer_rule(req.answer_pattern)
    arms = _arms(req)
    dequantize = cfg.dequantize is Switch.TRUE
    gen_cfg = dataclasses.replace(cfg, dequantize=Switch.TRUE if dequantize else Switch.FALSE)
    digest = _adapters_digest(req.adapter_path)
    path = resolve_model(cfg.model)
    pairs = load_split(req.data, load_tokenizer(path), gen_cfg, req.split, req.limit)
    if not pairs.examples:
        raise DataError(f"{pairs.name}: no pairs to evaluate")
    model, tokenizer, path, reference = load_adapted(cfg.model, req.adapter_path, gen_cfg)
    template = PairEncoder(tokenizer, gen_cfg).template
    prompts = [generation_prompt(tokenizer, ex, gen_cfg, template) for ex in pairs.examples]
    keys = [answer_key(rule, ex.texts.get("chosen", ""), ex.texts.get("rejected", "")) if rule else None
            for ex in pairs.examples]
    adapters = str(Path(req.adapter_path).resolve()) if req.adapter_path else None
    settings = {"model": str(path.resolve()), "adapter_path": adapters, "adapters_sha256": digest,
                "dequantize": dequantize, "data": pairs.name, "arms": arms,
                "answer_rule": rule.label if rule else None, **req.decoding.to_dict()}
    weights = ("dequantized to float32 (--dequantize true): faster on a CPU, not the weights mlx_lm.generate "
               "loads, so its output can differ" if dequantize else "as mlx_lm.generate loads them")
    echo(f"generate: {len(pairs.examples)} pairs of {pairs.name}; model {cfg.model} ({path})"
         + (f" + adapters {req.adapter_path}" if req.adapter_path else " (no adapters: base only)"))
    d = req.decoding
    echo(f"decoding: {'greedy' if d.greedy else f'temperature {d.temperature:g}, top-p {d.top_p:g}, seed {d.seed}'}, "
         f"{d.num_samples} sample(s) per prompt, at most {d.max_tokens} new tokens; arms: {', '.join(arms)}; "
         f"weights {weights}")
    for note in pairs.notes:
        echo(f"  {note}")
    echo(_answer_notes(rule, keys))

    out = Path(req.output) if req.output and req.output != "-" else None
    done: dict[int, dict[str, Any]] = {}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            done = read_rows(out, settings, echo)
            for ex in pairs.examples:
                if ex.index in done:
                    _check_same_pair(out, done[ex.index], ex)
        else:
            atomic_write_text(out, "")
    todo = [i for i, ex in enumerate(pairs.examples) if ex.index not in done]
    if done:
        echo(f"{out}: {len(pairs.examples) - len(todo)} pairs already generated there, {len(todo)} to go")
    batch = req.batch_size or BATCH_PAIRS
    bar = None
    if not req.quiet and len(todo) > 1:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="pair", dynamic_ncols=True, leave=False)
    t, generated = time.perf_counter(), 0
    for start in range(0, len(todo), batch):
        chunk = todo[start:start + batch]
        examples = [pairs.examples[i] for i in chunk]
        tokens = generate_arms(model, tokenizer, examples, [prompts[i] for i in chunk], d, arms, reference.active)
        rows = [make_row(ex, settings, {arm: tokens[arm][j] for arm in arms}, tokenizer, rule, keys[i])
                for j, (i, ex) in enumerate(zip(chunk, examples))]
        generated += sum(len(s) for arm in arms for pair in tokens[arm] for s in pair)
        if out is not None:
            append_rows(out, rows)
        elif req.output == "-":
            import sys

            sys.stdout.write(jsonl_text(rows))
        done.update((r["index"], r) for r in rows)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t
    if todo:
        sequences = len(todo) * d.num_samples * len(arms)
        echo(f"generated {generated} tokens in {sequences} sequences in {seconds:.1f} s "
             f"({generated / max(seconds, 1e-9):.0f} tokens/s; batches of {batch} pairs = "
             f"{batch * d.num_samples} sequences per arm)")
    rows = [done[ex.index] for ex in pairs.examples]
    for note in empty_notes(rows, arms):
        echo(note)
    first = next(((ex.index, p) for ex, p in zip(pairs.examples, prompts) if p.cli is not None), None)
    command = None
    if first is not None and not dequantize:
        command = (first[0], reproduce_command(str(path), req.adapter_path if "tuned" in arms else None, first[1], d))
    return show(rows, arms, rule, keys, pairs.name, req, echo, command, weights)


def show(rows: Sequence[dict[str, Any]], arms: Sequence[str], rule: AnswerRule | None, keys: Sequence[Any],
         source: str, req: Request, echo: Callable[[str], None], command: tuple[int, str] | None,
         weights: str) -> dict[str, Any]:
    """The score table and first pairs on the terminal, the HTML page; returns the summary."""
    from tidpo_mlx.gen_view import first_pairs, html_page, score_table

    summary = summarize(rows, arms)
    columns = list(arms) + (["tuned - base"] if len(arms) == 2 else [])
    table = score_table(summary, columns)
    echo("mean ± standard error over prompts" + (" (tuned - base: paired)" if len(arms) == 2 else "") + ":")
    for line in table:
        echo(f"  {line}")
    for line in first_pairs(rows, arms):
        echo(line)
    if command is not None:
        arm = "tuned" if "tuned" in arms else "base"
        echo(f"pair #{command[0]}'s {arm} generation with mlx-lm"
             + (" (the base: without --adapter-path):" if len(arms) == 2 else ":"))
        echo(f"  {command[1]}")
        if not req.decoding.greedy:
            echo("  (mlx_lm.generate draws from the same distribution with its own random stream, so its samples "
                 "differ)")
    if req.html:
        notes = [f"data {source}; arms: {', '.join(arms)}; weights {weights}", _answer_notes(rule, keys)]
        page = html_page(rows, arms, "tidpo-mlx generations", notes, table)
        Path(req.html).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(req.html), page)
        echo(f"HTML view: {req.html}")
    if req.output and req.output != "-":
        echo(f"per-pair generations: {req.output}")
    return {name: {arm: s.to_dict() for arm, s in stats.items()} for name, stats in summary.items()}


def answer_accuracy(cfg: Config, adapter_path: str | None, data: str, split: str | None = None,
                    limit: int | None = None, max_tokens: int = 64) -> dict[str, float]:
    """Greedy answer scores of the model with ``adapter_path`` on a split's prompts (the default answer rule,
    the weights as ``cfg.dequantize`` says): the means over the scored pairs, their standard errors
    (``<score>_se``) and ``answer_pairs``, the pairs scored (the others have equal or absent answers)."""
    from tidpo_mlx.gen_scores import ANSWER_SCORES, mean_se
    from tidpo_mlx.models import load_adapted

    model, tokenizer, _, reference = load_adapted(cfg.model, adapter_path, cfg)
    examples = load_split(data, tokenizer, cfg, split, limit).examples
    rule = AnswerRule()
    keys = [answer_key(rule, ex.texts.get("chosen", ""), ex.texts.get("rejected", "")) for ex in examples]
    scored = [(ex, key) for ex, key in zip(examples, keys) if key.skip_reason is None]
    prompts = [generation_prompt(tokenizer, ex, cfg) for ex, _ in scored]
    arm = "tuned" if adapter_path is not None else "base"
    tokens = generate_arms(model, tokenizer, [ex for ex, _ in scored], prompts, Decoding(max_tokens=max_tokens),
                           [arm], reference.active)[arm] if scored else []
    rows = [answer_scores([rule.extract(tokenizer.decode(t[0]))], key) for t, (_, key) in zip(tokens, scored)]
    out: dict[str, float] = {"answer_pairs": float(len(rows))}
    for name in ANSWER_SCORES:
        stat = mean_se([r[name] for r in rows])
        out[name], out[f"{name}_se"] = stat.mean, stat.se
    return out
