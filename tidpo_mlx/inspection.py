"""Per-token importance of a recipe, as the loss uses it: records for the terminal and HTML views.

``importance_records`` returns, per pair and response, the decoded tokens,
the raw attribution ``I``, the Gaussian prior ``P_hat`` and the weights the
loss multiplies (``objective.token_weights``), all at the response positions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import mlx.core as mx
import numpy as np

from tidpo_mlx.batching import collate
from tidpo_mlx.config import Config
from tidpo_mlx.evaluation import Pairs, batch_seed, pad_id_of
from tidpo_mlx.importance import attribution, gaussian_prior, response_weights
from tidpo_mlx.models import eval_mode
from tidpo_mlx.objective import token_weights
from tidpo_mlx.runtime import Runtime


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


def importance_records(
    rt: Runtime,
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
    eval mode, over whole rows.
    """
    rt = rt.whole_rows()
    wcfg = weights_config(cfg)
    pad = pad_id_of(tokenizer)
    special = _special_ids(tokenizer)
    out = []
    with eval_mode(rt.model):
        for start in range(0, len(pairs.examples), batch_size):
            exs = pairs.examples[start: start + batch_size]
            b = len(exs)
            batch, _ = rt.layout_batch(collate(exs, pad))
            e = rt.embed(batch)
            mx.random.seed(batch_seed(cfg, exs[0].index))
            tw = token_weights(rt, wcfg, batch, e, 2 * b)
            imp = tw["importance"]
            if imp is None:
                imp = attribution(rt, e[: 2 * b], batch, slice(0, 2 * b))
            span = batch["resp_span" if cfg.weight_span == "response" else "seq_mask"]
            pos, mask = batch["resp_pos"], batch["resp_mask"]
            prior = response_weights(gaussian_prior(span, cfg.sigma_div), pos, mask)
            attr = response_weights(imp, pos, mask)
            mx.eval(tw["weights"], prior, attr)
            arrays = {"attribution": np.array(attr), "prior": np.array(prior), "weights": np.array(tw["weights"])}
            for j, ex in enumerate(exs):
                record: dict[str, Any] = {"index": ex.index, "source": ex.source, "prompt": ex.messages[-1]["content"]}
                for side, key in ((0, "chosen"), (1, "rejected")):
                    ids = getattr(ex, key)
                    k = side * b + j
                    n = len(ids)
                    pieces = token_pieces(tokenizer, ex.prompt, ids)
                    text = ex.texts[key]
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
    return out
