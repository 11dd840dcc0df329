"""Per-pair evaluation and per-token importance of a recipe, without training.

``evaluate_pairs`` runs the recipe's objective (``objective.batch_objective``,
the very function training differentiates) on every pair of a file with the
model in eval mode (no dropout) and returns one record per pair, in file order.
``importance_records`` returns, per pair and response, the decoded tokens, the
raw attribution ``I``, the Gaussian prior ``P_hat`` and the weights the loss
multiplies (``objective.token_weights``), all at the response positions.

Anchors (triplet term): a pair's ``anchor`` field wins; the others are sampled
from the policy with the recipe's sampler, seeded from the pair's index
(``anchors.anchor_seed(seed, 0, index)``) with one keyed sampler per pair, so a
pair's anchor does not depend on the batch it lands in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from tidpo_mlx.anchors import sample_anchors
from tidpo_mlx.config import Config
from tidpo_mlx.data import DataError, Example, PairEncoder, collate, eval_batches, read_jsonl, resolve_data_dir
from tidpo_mlx.importance import attribution, gaussian_prior, response_weights
from tidpo_mlx.models import embed
from tidpo_mlx.objective import batch_objective, to_mx, token_weights
from tidpo_mlx.prefix import active as shared_prefix_active

PER_PAIR_KEYS = (
    "loss",
    "loss_pref",
    "loss_triplet",
    "reward_chosen",
    "reward_rejected",
    "weighted_margin",
    "logp_chosen",
    "logp_rejected",
    "kl_chosen",
    "kl_rejected",
)


@dataclass
class Pairs:
    """The rows of a JSONL file and their encoded examples (same order)."""

    path: Path
    rows: list[dict[str, Any]]
    examples: list[Example]
    encoder: PairEncoder


def resolve_data_file(data: str) -> Path:
    """A JSONL file, or a data folder / bundled dataset name (its ``valid.jsonl``)."""
    path = Path(data).expanduser()
    if path.is_file():
        return path
    if path.suffix == ".jsonl":
        raise DataError(f"{data}: no such file")
    folder = resolve_data_dir(data)
    valid = folder / "valid.jsonl"
    if not valid.exists():
        raise DataError(f"{folder}: no valid.jsonl (pass a .jsonl file with --data)")
    return valid


def load_pairs(data: str, tokenizer: Any, cfg: Config, limit: int | None = None) -> Pairs:
    """Read and encode the pairs of ``data`` (first ``limit`` pairs if given)."""
    path = resolve_data_file(data)
    read = read_jsonl(path)
    if limit is not None and limit >= 0:
        read = read[:limit]
    encoder = PairEncoder(tokenizer, cfg)
    examples = [encoder.encode_row(i, where, row) for i, (where, row) in enumerate(read)]
    return Pairs(path, [row for _, row in read], examples, encoder)


def pad_id_of(tokenizer: Any) -> int:
    """The padding id batches use (pad token, else 0)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def anchors_needed(cfg: Config) -> bool:
    """Whether the triplet term is on, i.e. every pair needs an anchor."""
    return cfg.uses_triplet and cfg.anchor == "sample"


def pair_anchors(
    model: nn.Module, tokenizer: Any, encoder: PairEncoder, examples: Sequence[Example], cfg: Config
) -> list[list[int]]:
    """Anchors of ``examples``: the data's, else a policy sample seeded from the pair index
    (one keyed sampler per pair, so a pair's anchor does not depend on its batch)."""
    return sample_anchors(model, tokenizer, encoder, examples, cfg, step=0)


def _batch_seed(cfg: Config, first_index: int) -> int:
    """Seed of the global RNG for one eval batch (only ``weighting: random`` draws from it)."""
    return (cfg.seed * 7_919 + first_index * 104_729 + 31) % (2**31)


def evaluate_pairs(
    model: nn.Module,
    tokenizer: Any,
    cfg: Config,
    pairs: Pairs,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """The recipe's per-pair loss and metrics on every pair, in input order.

    Records carry ``index`` (0-based position in the file) and the per-pair
    arrays of ``batch_objective`` (``kl_*`` for tdpo losses only). Rewards are
    SPEC section 10's ``beta * sum rho`` (simpo: ``simpo_beta * avg logp``).
    """
    training = model.training
    model.eval()
    pad = pad_id_of(tokenizer)
    sample = anchors_needed(cfg)
    shared_prefix = shared_prefix_active(model, cfg)
    records: dict[int, dict[str, Any]] = {}
    try:
        for batch_examples in eval_batches(pairs.examples, batch_size):
            anchors = pair_anchors(model, tokenizer, pairs.encoder, batch_examples, cfg) if sample else None
            batch = to_mx(collate(batch_examples, pad, anchors, shared_prefix=shared_prefix))
            mx.random.seed(_batch_seed(cfg, batch_examples[0].index))
            _, aux = batch_objective(model, cfg, batch)
            mx.eval(aux)
            values = {k: np.array(v, dtype=np.float64) for k, v in aux.items() if k in PER_PAIR_KEYS}
            for j, ex in enumerate(batch_examples):
                records[ex.index] = {"index": ex.index, **{k: float(values[k][j]) for k in PER_PAIR_KEYS if k in values}}
            if progress is not None:
                progress(len(batch_examples))
    finally:
        model.train(training)
    return [records[i] for i in sorted(records)]


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Pairs, mean loss, reward / policy preference accuracy, mean reward and weighted margins."""
    a = {k: np.array([r[k] for r in records], dtype=np.float64) for k in records[0] if k != "index"}
    out = {
        "pairs": len(records),
        "loss": float(a["loss"].mean()),
        "loss_pref": float(a["loss_pref"].mean()),
        "loss_triplet": float(a["loss_triplet"].mean()),
        "reward_accuracy": float((a["reward_chosen"] > a["reward_rejected"]).mean()),
        "policy_preference_accuracy": float((a["logp_chosen"] > a["logp_rejected"]).mean()),
        "reward_margin": float((a["reward_chosen"] - a["reward_rejected"]).mean()),
        "weighted_margin": float(a["weighted_margin"].mean()),
    }
    if "kl_chosen" in a:
        out["kl_chosen"] = float(a["kl_chosen"].mean())
        out["kl_rejected"] = float(a["kl_rejected"].mean())
    return out


# --- importance ---------------------------------------------------------------------------


def weights_config(cfg: Config) -> Config:
    """The config whose weights the loss multiplies: simpo uses none (all 1)."""
    return cfg if cfg.uses_reference else dataclasses.replace(cfg, weighting="none")


def weighting_label(cfg: Config) -> str:
    """One line naming what produced the weights (for legends)."""
    if not cfg.uses_reference:
        return f"preset {cfg.preset}, loss_type simpo: no token weights (every weight 1)"
    text = f"preset {cfg.preset}, loss_type {cfg.loss_type}, weighting {cfg.weighting}"
    if cfg.weighting == "none":
        return text + " (every weight 1)"
    if cfg.weighting in ("hybrid", "softmax", "random"):
        text += f", lam {cfg.lam:g}"
    elif cfg.weighting == "attribution":
        text += ", lam 1"
    elif cfg.weighting == "prior":
        text += ", lam 0"
    if cfg.weighting != "uniform":
        text += f", sigma_div {cfg.sigma_div:g}"
    return text + f", span {cfg.weight_span}, norm {cfg.weight_norm}"


def token_pieces(tokenizer: Any, prompt: Sequence[int], response: Sequence[int]) -> list[str]:
    """Text of each response token, decoded in context (after the prompt) so spaces and
    multi-byte characters come out as in the full text."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)

    def dec(ids: Sequence[int]) -> str:
        return hf.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    seq = list(prompt) + list(response)
    prev = dec(prompt)
    pieces = []
    for k in range(len(prompt) + 1, len(seq) + 1):
        cur = dec(seq[:k])
        common = 0
        for a, b in zip(prev, cur):
            if a != b:
                break
            common += 1
        pieces.append(cur[common:])
        prev = cur
    return pieces


def template_mask(pieces: Sequence[str], content: str, token_ids: Sequence[int], special: set[int]) -> list[bool]:
    """True for tokens the chat template added around the response text (e.g. ``<|im_end|>``,
    the trailing newline): those lying wholly outside the response text."""
    text = "".join(pieces)
    span = None
    for n in range(len(content), 0, -1):  # a truncated response keeps a prefix of its text
        pos = text.find(content[:n])
        if pos >= 0:
            span = (pos, pos + n)
            break
    out, cursor = [], 0
    for piece, tid in zip(pieces, token_ids):
        a, b = cursor, cursor + len(piece)
        cursor = b
        if span is None:
            out.append(tid in special)
        else:
            out.append(tid in special or not (a < span[1] and span[0] < b))
    return out


def _special_ids(tokenizer: Any) -> set[int]:
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    ids = set(getattr(hf, "all_special_ids", []) or [])
    added = getattr(hf, "added_tokens_decoder", None) or {}
    ids.update(i for i, t in added.items() if getattr(t, "special", False))
    return ids


def _response_text(row: dict[str, Any], key: str) -> str:
    value = row[key]
    if isinstance(value, list):
        value = value[0]["content"]
    return value


def importance_records(
    model: nn.Module,
    tokenizer: Any,
    cfg: Config,
    pairs: Pairs,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Per pair and response: tokens, token_ids, attribution, prior, weights, template flags.

    ``attribution`` is the raw ``I`` (L1 norm of the gradient of the max logit at
    the last position w.r.t. each input embedding) at the response positions,
    ``prior`` the normalised Gaussian prior over ``weight_span`` at the response
    positions and ``weights`` exactly ``token_weights(...)["weights"]``, i.e. what
    the loss multiplies ``rho`` by. The model runs as the policy (adapters on) in
    eval mode.
    """
    training = model.training
    model.eval()
    wcfg = weights_config(cfg)
    pad = pad_id_of(tokenizer)
    special = _special_ids(tokenizer)
    out = []
    try:
        for start in range(0, len(pairs.examples), batch_size):
            exs = pairs.examples[start: start + batch_size]
            b = len(exs)
            batch = to_mx(collate(exs, pad))
            e = embed(model, batch["tokens"])
            mx.random.seed(_batch_seed(cfg, exs[0].index))
            tw = token_weights(model, wcfg, batch, e, 2 * b)
            imp = tw["importance"]
            if imp is None:
                imp = attribution(model, e, batch["last"])
            span = batch["resp_span" if cfg.weight_span == "response" else "seq_mask"]
            pos, mask = batch["resp_pos"], batch["resp_mask"]
            prior = response_weights(gaussian_prior(span, cfg.sigma_div), pos, mask)
            attr = response_weights(imp, pos, mask)
            mx.eval(tw["weights"], prior, attr)
            arrays = {"attribution": np.array(attr), "prior": np.array(prior), "weights": np.array(tw["weights"])}
            for j, ex in enumerate(exs):
                row = pairs.rows[ex.index]
                record: dict[str, Any] = {"index": ex.index, "source": ex.source, "prompt": ex.messages[-1]["content"]}
                for side, key in ((0, "chosen"), (1, "rejected")):
                    ids = getattr(ex, key)
                    k = side * b + j
                    n = len(ids)
                    pieces = token_pieces(tokenizer, ex.prompt, ids)
                    text = _response_text(row, key)
                    record[key] = {
                        "text": text,
                        "tokens": pieces,
                        "token_ids": list(ids),
                        "attribution": [float(v) for v in arrays["attribution"][k, :n]],
                        "prior": [float(v) for v in arrays["prior"][k, :n]],
                        "weights": [float(v) for v in arrays["weights"][k, :n]],
                        "template": template_mask(pieces, text, ids, special),
                    }
                out.append(record)
            if progress is not None:
                progress(b)
    finally:
        model.train(training)
    return out
