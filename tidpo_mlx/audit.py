"""Label audit: score every training pair for how likely its label is flipped, with models that never saw it.

Cross-fitting: the training pairs are split into K folds, grouped so that
pairs sharing a prompt or both responses (a copy of the pair, maybe with its
labels swapped) land in one fold. For each fold a short LoRA run of the
recipe's loss (``trainer.train``, nothing else) trains on the other folds;
the fold's own pairs are then scored by that model from summed log-probs
(``scoring.Scorer``, policy and reference in one compiled pass):

- ``reward_margin``: the implicit reward margin ``beta * (sum rho_w - sum rho_l)``
  (TRL's ``rewards/chosen - rewards/rejected``, docs/method.md section 10);
- ``logp_margin``: the policy's log-prob margin ``log pi(y_w|x) - log pi(y_l|x)``;
- ``ref_margin``: the reference's log-prob margin ``log ref(y_w|x) - log ref(y_l|x)``,
  the free score (``folds=0`` computes only this, with no training; its
  implicit reward margin is 0 by definition).

A low margin means the model that never saw the pair prefers the rejected
response: the pair is suspect. Pairs are ranked by the chosen score, lowest
first. For the most suspect pairs the audit adds evidence: the token weights
the paper preset computes (``inspection.importance_records``) and the
per-token log-ratios ``rho_t`` (policy - reference) of the fold model, with
the tokens where chosen and rejected differ (outside their common prefix and
suffix) marked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import numpy as np

from tidpo_mlx.config import PRESETS, Config, Switch
from tidpo_mlx.data.encoder import PairEncoder
from tidpo_mlx.data.example import Example, prompt_key
from tidpo_mlx.data.formats import parse_row
from tidpo_mlx.data.load import load_split
from tidpo_mlx.errors import ConfigError, DataError, MissingFileError
from tidpo_mlx.files import atomic_write_text, write_jsonl
from tidpo_mlx.sources import Source, SplitRows, read_jsonl, resolve_source

if TYPE_CHECKING:
    from tidpo_mlx.runtime import Runtime
    from tidpo_mlx.scoring import Scorer

SCORES = ("reward_margin", "logp_margin", "ref_margin")
"""Per-pair scores; lower = more likely flipped."""
DEFAULT_SCORE = "reward_margin"
DEFAULT_FOLDS = 2
DEFAULT_ITERS = 40
DEFAULT_RECIPE = "dpo"
DEFAULT_TOP = 20
Action = Literal["drop", "flip"]


@dataclass
class AuditPair:
    """One training pair: where it is, the row as read, its encoding, and what the audit found."""

    index: int
    source: str
    row: dict[str, Any]
    example: Example
    fold: int = -1
    scores: dict[str, float] = field(default_factory=dict)
    rank: int = 0
    evidence: dict[str, Any] | None = None


@dataclass
class AuditResult:
    """Every scored pair (input order) and what the run did."""

    pairs: list[AuditPair]
    score: str
    folds: int
    seconds: dict[str, float]
    source: Source
    notes: list[str]

    def ranked(self) -> list[AuditPair]:
        """Pairs from most to least suspect."""
        return sorted(self.pairs, key=lambda p: p.rank)


def read_pairs(data: str, tokenizer: Any, cfg: Config) -> tuple[Source, list[AuditPair], list[str]]:
    """Every pair of the training split of ``data``, loaded as training loads them
    (:func:`~tidpo_mlx.data.load.load_split`; invalid rows: as in training)."""
    split = load_split(data, tokenizer, cfg, "train")
    pairs = [AuditPair(ex.index, ex.source, row, ex) for ex, row in zip(split.examples, split.rows)]
    return split.source, pairs, split.notes


def group_keys(ex: Example) -> tuple[str, str]:
    """What ties pairs into one fold: the prompt key (the prompt as encoded), and the unordered pair of
    response texts."""
    responses = json.dumps(sorted([ex.texts["chosen"], ex.texts["rejected"]]))
    return "prompt\0" + prompt_key(ex), "responses\0" + responses


def assign_folds(examples: Sequence[Example], folds: int, seed: int) -> list[int]:
    """The fold of every pair: connected groups (shared prompt or shared responses) kept whole.

    Groups go, in a seeded order, each to the fold with the fewest pairs so far.
    """
    if folds < 2:
        raise ConfigError(f"folds must be >= 2 for cross-fitting (0: reference score only), got {folds}")
    parent = list(range(len(examples)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, ex in enumerate(examples):
        for key in group_keys(ex):
            j = owner.setdefault(key, i)
            parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(examples)):
        groups.setdefault(root(i), []).append(i)
    if len(groups) < folds:
        where = examples[0].source if examples else "data"
        raise DataError(f"{where}: only {len(groups)} independent prompt group(s), fewer than --folds {folds}")
    order = sorted(groups.values(), key=lambda g: hashlib.sha256(f"{seed}\0{g[0]}".encode()).hexdigest())
    sizes = [0] * folds
    out = [0] * len(examples)
    for members in order:
        k = min(range(folds), key=lambda f: (sizes[f], f))
        sizes[k] += len(members)
        for i in members:
            out[i] = k
    return out


def fold_config(cfg: Config, data_dir: Path, adapter_dir: Path, iters: int) -> Config:
    """The config of one fold's training run: the recipe on that fold's data, short, saved only at the end."""
    return dataclasses.replace(
        cfg, data=str(data_dir), hf_dataset=None, adapter_path=str(adapter_dir), iters=iters,
        warmup_steps=min(cfg.warmup_steps, iters // 3), steps_per_eval=0, steps_per_save=0, val_batches=1,
        resume_adapter_file=None,
    )


def write_fold_data(pairs: Sequence[AuditPair], fold: int, folder: Path) -> None:
    """``train.jsonl``: the rows of every other fold, as read; ``valid.jsonl``: this fold's rows (training
    evaluates one batch of them before and after, nothing more)."""
    write_jsonl(folder / "train.jsonl", [p.row for p in pairs if p.fold != fold])
    write_jsonl(folder / "valid.jsonl", [p.row for p in pairs if p.fold == fold])


def score_pairs(scorer: Scorer, cfg: Config, pairs: Sequence[AuditPair], batch_size: int, bar: Any = None) -> None:
    """Fill ``scores`` of ``pairs`` from the summed log-probs of the current policy and the reference
    (both in one compiled pass; the triplet term moves no margin); ``bar`` (tqdm) counts the pairs done."""
    batches = scorer.batches([p.example for p in pairs], batch_size)
    sums = scorer.sums(batches, "both", None if bar is None else bar.update)
    by_index = {p.index: p for p in pairs}
    for j, ex in enumerate(ex for b in batches for ex in b):
        (chosen, rejected), (ref_chosen, ref_rejected) = sums[:, :, j]
        logp, ref = chosen - rejected, ref_chosen - ref_rejected
        by_index[ex.index].scores = {"reward_margin": cfg.beta * (logp - ref), "logp_margin": logp, "ref_margin": ref}


def differing(a: Sequence[int], b: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Token spans ``[start, end)`` of ``a`` and ``b`` outside their common prefix and common suffix."""
    n = min(len(a), len(b))
    pre = 0
    while pre < n and a[pre] == b[pre]:
        pre += 1
    suf = 0
    while suf < n - pre and a[len(a) - 1 - suf] == b[len(b) - 1 - suf]:
        suf += 1
    return (pre, len(a) - suf), (pre, len(b) - suf)


def token_log_ratios(scorer: Scorer, examples: Sequence[Example], batch_size: int) -> dict[int, tuple[list[float], list[float]]]:
    """Per response token ``rho_t = log pi - log ref`` of chosen and rejected, by example index."""
    out = {}
    for exs in scorer.batches(examples, batch_size):
        logp, ref = scorer.tokens(exs, "both")
        rho = np.array(logp - ref)
        b = len(exs)
        for j, ex in enumerate(exs):
            out[ex.index] = ([float(v) for v in rho[j, : len(ex.chosen)]],
                             [float(v) for v in rho[b + j, : len(ex.rejected)]])
    return out


def paper_weights_config(cfg: Config) -> Config:
    """``cfg`` with the paper preset's token weights (hybrid, lam, sigma_div, response span, sum1)."""
    paper = PRESETS["paper"]
    keys = ("lam", "sigma_div", "weight_span", "weight_norm")
    return dataclasses.replace(cfg, preset="paper", loss_type="dpo", weighting="hybrid", anchor="none",
                               **{k: paper[k] for k in keys})


def add_evidence(scorer: Scorer, tokenizer: Any, cfg: Config, pairs: Sequence[AuditPair], batch_size: int) -> None:
    """Evidence of ``pairs`` (current policy): paper-preset token weights, per-token rho, the differing spans."""
    from tidpo_mlx.evaluation import Pairs
    from tidpo_mlx.inspection import importance_records

    if not pairs:
        return
    wcfg = paper_weights_config(cfg)
    held = Pairs("audit", [p.row for p in pairs], [p.example for p in pairs], PairEncoder(tokenizer, wcfg), [])
    records = {r["index"]: r for r in importance_records(scorer.rt, tokenizer, wcfg, held, batch_size)}
    rhos = token_log_ratios(scorer, [p.example for p in pairs], batch_size)
    for p in pairs:
        rec = records[p.index]
        spans = differing(p.example.chosen, p.example.rejected)
        evidence: dict[str, Any] = {"prompt": rec["prompt"]}
        for key, rho, span in zip(("chosen", "rejected"), rhos[p.index], spans):
            evidence[key] = {**rec[key], "log_ratio": rho, "differ": list(span)}
        p.evidence = evidence


def rank_pairs(pairs: Sequence[AuditPair], score: str) -> None:
    """Rank 1 = lowest ``score`` (most suspect); ties in input order."""
    for rank, p in enumerate(sorted(pairs, key=lambda p: (p.scores[score], p.index)), 1):
        p.rank = rank


def load_scoring_model(cfg: Config, attach: bool) -> tuple[Runtime, Any]:
    """The base model's runtime (with empty LoRA layers when ``attach``, its reference the base) and its tokenizer,
    for scoring."""
    from tidpo_mlx.backend import select
    from tidpo_mlx.models import Reference, attach_trainable, load_base, resolve_model

    path = resolve_model(cfg.model)
    model, tokenizer, _ = load_base(path, Switch.TRUE if cfg.fine_tune_type == "full" else cfg.dequantize)
    reference = attach_trainable(model, cfg) if attach else Reference(model)
    return select(model, cfg, str(path), reference), tokenizer


def run_audit(
    cfg: Config,
    out: Path,
    folds: int = DEFAULT_FOLDS,
    iters: int = DEFAULT_ITERS,
    score: str = DEFAULT_SCORE,
    top: int = DEFAULT_TOP,
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> AuditResult:
    """Cross-fit, score and rank every training pair of ``cfg.data``; evidence for the ``top`` pairs.

    ``out`` receives ``folds/fold-K/{data,adapters}`` (each fold's training
    rows and run); ``folds=0`` trains nothing and scores with the reference
    (only ``ref_margin``). ``progress``: the trainer's bar per fold and one
    over the pairs scored. The caller writes the reports (:func:`write_reports`).
    """
    from tqdm import tqdm

    from tidpo_mlx.evaluation import pad_id_of
    from tidpo_mlx.models import load_adapter_weights, load_tokenizer, resolve_model
    from tidpo_mlx.scoring import Scorer
    from tidpo_mlx.trainer import train

    if not cfg.uses_reference:
        raise ConfigError(f"loss_type {cfg.loss_type} has no reference model: the audit needs a reference-based loss")
    if folds == 1 or folds < 0:
        raise ConfigError(f"--folds must be 0 (reference only) or >= 2, got {folds}")
    if folds == 0 and score != "ref_margin":
        raise ConfigError("--folds 0 trains nothing: only --score ref_margin is defined")
    if score not in SCORES:
        raise ConfigError(f"unknown score {score!r} (known: {', '.join(SCORES)})")
    seconds: dict[str, float] = {}
    tic = time.perf_counter()
    source, pairs, notes = read_pairs(cfg.data, load_tokenizer(resolve_model(cfg.model)), cfg)
    if folds:
        for p, k in zip(pairs, assign_folds([p.example for p in pairs], folds, cfg.seed)):
            p.fold = k
    seconds["read"] = time.perf_counter() - tic
    log(f"audit: {len(pairs)} training pairs of {source.name}; "
        + (f"{folds} folds of {', '.join(str(sum(p.fold == k for p in pairs)) for k in range(folds))} pairs, "
           f"{iters} steps each" if folds else "reference only (no training)"))
    batch = 2 * cfg.batch_size
    trained = []
    for k in range(folds):
        t = time.perf_counter()
        folder = out / "folds" / f"fold-{k}"
        write_fold_data(pairs, k, folder / "data")
        train(fold_config(cfg, folder / "data", folder / "adapters", iters), log=lambda _: None, progress=progress)
        trained.append(folder / "adapters")
        seconds[f"train_fold_{k}"] = time.perf_counter() - t
        log(f"  fold {k}: trained on {sum(p.fold != k for p in pairs)} pairs in {seconds[f'train_fold_{k}']:.0f} s")
    t = time.perf_counter()
    rt, tokenizer = load_scoring_model(cfg, attach=bool(folds))
    scorer = Scorer(rt, cfg, pad_id_of(tokenizer))
    bar = tqdm(total=len(pairs), desc="score", unit="pair", dynamic_ncols=True) if progress else None
    for k in range(max(folds, 1)):
        if folds:
            load_adapter_weights(rt.model, trained[k])
        score_pairs(scorer, cfg, [p for p in pairs if p.fold == (k if folds else -1)], batch, bar)
    if bar is not None:
        bar.close()
    seconds["score"] = time.perf_counter() - t
    log(f"  scored {len(pairs)} pairs in {seconds['score']:.0f} s")
    rank_pairs(pairs, score)
    t = time.perf_counter()
    suspects = [p for p in pairs if p.rank <= top]
    for k in range(max(folds, 1)):
        mine = [p for p in suspects if p.fold == (k if folds else -1)]
        if folds and mine:
            load_adapter_weights(rt.model, trained[k])
        add_evidence(scorer, tokenizer, cfg, mine, cfg.batch_size)
    seconds["evidence"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - tic
    return AuditResult(pairs, score, folds, seconds, source, notes)


def pair_record(p: AuditPair, score: str) -> dict[str, Any]:
    """The ``audit.jsonl`` line of a pair."""
    rec: dict[str, Any] = {
        "source": p.source, "index": p.index, "rank": p.rank, "fold": p.fold, "score": p.scores[score],
        "scores": p.scores, "prompt": single(p.example.messages, "user"),
        "chosen": p.example.texts["chosen"], "rejected": p.example.texts["rejected"],
    }
    if p.evidence is not None:
        rec["evidence"] = p.evidence
    return rec


def differing_summary(resp: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(token, weight, rho) of a response's differing tokens."""
    a, b = resp["differ"]
    return [(resp["tokens"][i], resp["weights"][i], resp["log_ratio"][i]) for i in range(a, b)]


def terminal_summary(result: AuditResult, top: int) -> list[str]:
    """Lines naming the ``top`` most suspect pairs, their scores and differing tokens with rho."""
    from tidpo_mlx.view import visible

    lines = [f"most suspect pairs (score {result.score}, lowest first; rho = log pi - log ref):"]
    for p in result.ranked()[:top]:
        scores = ", ".join(f"{k} {v:+.3f}" for k, v in p.scores.items())
        lines.append(f"{p.rank:>4}. {p.source} (fold {p.fold}): {scores}")
        if p.evidence is None:
            continue
        for key in ("chosen", "rejected"):
            toks = " ".join(f"{visible(t)!r} rho {r:+.2f} w {w:.3f}" for t, w, r in differing_summary(p.evidence[key]))
            lines.append(f"        {key:<8} {toks or '(no differing tokens)'}")
    return lines


def _diff_chips(resp: dict[str, Any]) -> str:
    import html

    chips = []
    for tok, w, rho in differing_summary(resp):
        colour = "#c9f2c9" if rho > 0 else "#f6c6c6"
        chips.append(f'<span class="chip" style="background:{colour}">{html.escape(tok.replace(chr(10), "↵"))} '
                     f"<small>rho {rho:+.3f}, w {w:.3f}</small></span>")
    return " ".join(chips) or "<i>none</i>"


def html_report(result: AuditResult, title: str, label: str) -> str:
    """A self-contained page (``view.page``): the most suspect pairs, chosen and rejected token heat maps
    side by side (``view``'s colours: the paper preset's token weights), the differing tokens with their
    log-ratios."""
    import html

    from tidpo_mlx.view import SCALE_BAR, page, pair_section, response_column

    sections = []
    for p in result.ranked():
        if p.evidence is None:
            continue
        scores = ", ".join(f"{k} {v:+.4f}" for k, v in p.scores.items())
        columns = [response_column(key, f"{len(p.evidence[key]['tokens'])} tokens", p.evidence[key],
                                   extra=f"<p>differing tokens: {_diff_chips(p.evidence[key])}</p>")
                   for key in ("chosen", "rejected")]
        sections.append(pair_section(f"rank {p.rank}", f"{p.source}, fold {p.fold}; {scores}",
                                     p.evidence["prompt"], columns))
    legend = (f"<p>{html.escape(label)}</p>\n"
              f"<p>Ranked by <b>{html.escape(result.score)}</b>, lowest first: each pair scored by a model that never "
              "trained on it\n(fold = the part of the data it was held out in). Token colour: the paper preset's "
              "token weight, per response from\nlowest to highest (square-root scale): "
              f"low {SCALE_BAR} high; hover for the numbers. Differing tokens\n(outside the common prefix and suffix "
              "of chosen and rejected) with rho = log pi - log ref: green &gt; 0, red &lt; 0.</p>")
    return page(title, legend, sections)


def write_reports(result: AuditResult, out: Path, label: str) -> None:
    """``audit.jsonl`` (input order), ``audit.html`` and ``summary.json`` in ``out``."""
    write_jsonl(out / "audit.jsonl", [pair_record(p, result.score) for p in result.pairs])
    atomic_write_text(out / "audit.html", html_report(result, "tidpo-mlx label audit", label))
    summary = {"source": result.source.name, "pairs": len(result.pairs), "folds": result.folds,
               "score": result.score, "seconds": result.seconds, "notes": result.notes}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))


def refuse_existing(folder: Path, what: str) -> None:
    """Stop unless ``folder`` is absent or an empty folder."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(f"{folder}: {what} exists and is not empty; name a new folder")


DEFAULT_SHARE = 0.2


def flag_rule(share: float | None, threshold: float | None) -> tuple[float | None, float | None]:
    """Checked ``(share, threshold)``: one of them (neither given: the default share)."""
    if share is not None and threshold is not None:
        raise ConfigError("give one of --share and --threshold")
    if share is None and threshold is None:
        return DEFAULT_SHARE, None
    if share is not None and not 0.0 < share < 1.0:
        raise ConfigError(f"--share must be in (0, 1), got {share}")
    return share, threshold


def flagged(records: Sequence[dict[str, Any]], share: float | None, threshold: float | None) -> list[dict[str, Any]]:
    """The audit records to act on: the ``share`` most suspect (by rank), or every score below ``threshold``."""
    share, threshold = flag_rule(share, threshold)
    if share is not None:
        k = round(share * len(records))
        return [r for r in records if r["rank"] <= k]
    return [r for r in records if r["score"] < threshold]


def check_write_target(target: Path) -> None:
    """Stop if the ``--write`` folder exists (checked before the audit runs, and again before writing)."""
    if target.exists():
        raise ConfigError(f"{target}: exists; --write makes a new folder")


FORMAT_FIELDS = ("prompt", "chosen", "rejected", "anchor", "system")
"""Fields :func:`~tidpo_mlx.data.parse_row` reads; a cleaned row writes them anew (``system`` joins the prompt)."""


def single(messages: Sequence[dict[str, Any]], role: str) -> Any:
    """The content string of a lone plain ``role`` message, else the message list (explicit-prompt form)."""
    one = len(messages) == 1 and set(messages[0]) == {"role", "content"} and messages[0]["role"] == role
    return messages[0]["content"] if one else list(messages)


def paired_fields(row: dict[str, Any]) -> list[tuple[str, str]]:
    """The other fields of a row that belong to one response each (``score_chosen`` / ``score_rejected``,
    ``chosen-model`` / ``rejected-model``): the pairs a label flip swaps too."""
    return [(k, k.replace("chosen", "rejected")) for k in row
            if k not in FORMAT_FIELDS and "chosen" in k and k.replace("chosen", "rejected") in row]


def explicit_row(where: str, row: dict[str, Any], plain: bool, flip: bool = False) -> dict[str, Any]:
    """A row in explicit-prompt form (strings where the prompt is one user turn and each response one
    assistant turn, message lists otherwise), its other fields kept; ``flip`` swaps chosen and rejected
    and the fields of :func:`paired_fields`."""
    pair = parse_row(where, row, plain)
    c = pair.completions
    out: dict[str, Any] = {"prompt": single(pair.prompt, "user")}
    chosen, rejected = ("rejected", "chosen") if flip else ("chosen", "rejected")
    out["chosen"], out["rejected"] = single(c[chosen], "assistant"), single(c[rejected], "assistant")
    if "anchor" in c:
        out["anchor"] = single(c["anchor"], "assistant")
    out.update({k: v for k, v in row.items() if k not in FORMAT_FIELDS})
    if flip:
        for a, b in paired_fields(row):
            out[a], out[b] = row[b], row[a]
    return out


def write_cleaned(audit_dir: Path, target: Path, action: Action, share: float | None, threshold: float | None,
                  plain: bool, hf_dataset: dict[str, Any] | None = None) -> dict[str, int]:
    """A data folder with the flagged pairs of an audit dropped or flipped.

    ``train.jsonl`` (explicit-prompt JSONL, the audited pairs in input order,
    other fields kept), ``valid.jsonl`` (the source's valid split, unchanged
    in content) when it has one, and ``changes.jsonl`` (one line per dropped
    or flipped pair, with the per-response fields a flip swapped).
    Refuses an existing ``target``.
    """
    if action not in ("drop", "flip"):
        raise ConfigError(f"--action must be drop or flip, got {action!r}")
    check_write_target(target)
    path = audit_dir / "audit.jsonl"
    if not path.exists():
        raise MissingFileError(f"{path}: no audit here")
    summary = json.loads((audit_dir / "summary.json").read_text())
    records = [r for _, r in read_jsonl(path)]
    chosen = {r["source"]: r for r in flagged(records, share, threshold)}
    source = resolve_source(summary["source"], hf_dataset)
    rows = dict(source.splits["train"].rows)
    missing = [r["source"] for r in records if r["source"] not in rows]
    if missing:
        raise DataError(f"{missing[0]}: in {path} but not in {summary['source']} (the data changed since the audit)")
    train, changes = [], []
    for r in records:
        where = r["source"]
        hit = chosen.get(where)
        if hit is not None:
            change = {"source": where, "action": action, "rank": hit["rank"], "score": hit["score"],
                      "prompt": hit["prompt"], "chosen": hit["chosen"], "rejected": hit["rejected"]}
            swapped = paired_fields(rows[where]) if action == "flip" else []
            changes.append({**change, **({"swapped_fields": [k for ab in swapped for k in ab]} if swapped else {})})
        if hit is None or action == "flip":
            train.append(explicit_row(where, rows[where], plain, flip=hit is not None))
    target.mkdir(parents=True)
    write_jsonl(target / "train.jsonl", train)
    if "valid" in source.splits:
        write_jsonl(target / "valid.jsonl", [explicit_row(w, row, plain) for w, row in _rows(source.splits["valid"])])
    write_jsonl(target / "changes.jsonl", changes)
    return {"train_pairs": len(train), "changed": len(changes)}


def _rows(rows: SplitRows) -> list[tuple[str, dict[str, Any]]]:
    if rows.problems:
        raise DataError(f"{rows.problems[0].where}: {rows.problems[0].reason}")
    return list(rows.rows)
