"""``eval``, ``importance`` and ``experiment`` on a tiny model: reproducible, equal to the loss's own numbers."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
from html import escape

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from tidpo_mlx.backend import select
from tidpo_mlx.cli import main
from tidpo_mlx.config import build_config, load_config
from tidpo_mlx.batching import collate
from tidpo_mlx.data import PairEncoder
from tidpo_mlx.evaluation import load_pairs
from tidpo_mlx.experiment import flip_labels, make_plan, results_markdown, run_experiment
from tidpo_mlx.inspection import weighting_label
from tidpo_mlx.models import adapter_config, attach_lora, load_adapted, load_base, save_adapters
from tidpo_mlx.objective import batch_objective, token_weights

from conftest import write_jsonl

ROWS = [
    {"prompt": "What is 12 plus 30?", "chosen": "The answer is 42.", "rejected": "The answer is 43.",
     "anchor": "It is 42, I think."},
    {"prompt": "Convert 3 km to metres.", "chosen": "3 km = 3000 m.", "rejected": "3 km = 300 m, so 300.",
     "anchor": "3000"},
    {"prompt": "What day follows Monday?", "chosen": "Tuesday.", "rejected": "Sunday, then Monday.",
     "anchor": "Tuesday, I think."},
    {"prompt": "4 apples cost 8 dollars. One apple?", "chosen": "One apple costs 2 dollars.",
     "rejected": "One apple costs 4 dollars.", "anchor": "2 dollars."},
    {"prompt": "A train leaves at 9:15 and takes 2 hours. Arrival?", "chosen": "It arrives at 11:15.",
     "rejected": "It arrives at 10:15.", "anchor": "At 11:15."},
]


def _run(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    """Random (non-zero) LoRA adapters saved in mlx-lm's format, so rewards are not all 0."""
    folder = tmp_path_factory.mktemp("adapters")
    cfg = build_config({"model": str(tiny_model), "num_layers": 2})
    model, _, _ = load_base(tiny_model)
    attach_lora(model, cfg)
    rng = np.random.default_rng(0)
    model.load_weights([(k, mx.array(rng.normal(scale=0.05, size=v.shape).astype(np.float32)))
                        for k, v in tree_flatten(model.trainable_parameters())], strict=False)
    save_adapters(model, folder, adapter_config(cfg, tiny_model))
    return folder


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", ROWS)


def test_eval_is_reproducible_and_equals_batch_objective(tiny_model, adapters, pairs_file, tmp_path):
    outs = []
    for k in range(2):
        out = tmp_path / f"eval{k}.jsonl"
        text = _run(["eval", "--model", str(tiny_model), "--adapter-path", str(adapters), "--data", str(pairs_file),
                     "--batch-size", "2", "--anchor", "sample", "--output", str(out), "--quiet"])
        outs.append(out.read_text())
    assert outs[0] == outs[1]
    assert "rewards/accuracies" in text and "policy_preference_accuracy" in text and "mean weighted margin" in text
    records = [json.loads(line) for line in outs[0].splitlines()]
    assert [r["index"] for r in records] == list(range(len(ROWS)))
    assert list(records[0]) == ["index", "loss", "loss_pref", "loss_triplet", "reward_chosen", "reward_rejected",
                                "weighted_margin", "logp_chosen", "logp_rejected"]

    cfg = load_config(None, {"model": str(tiny_model), "anchor": "sample"})
    model, tok, path, reference = load_adapted(cfg.model, str(adapters), cfg)
    model.eval()
    rt = select(model, cfg, str(path), reference)
    pairs = load_pairs(str(pairs_file), tok, cfg)
    anchors = [e.anchor for e in pairs.examples]
    _, aux = batch_objective(rt, cfg, *rt.layout_batch(collate(pairs.examples, tok.pad_token_id, anchors)))
    for key in ("loss", "loss_pref", "loss_triplet", "reward_chosen", "weighted_margin", "logp_rejected"):
        np.testing.assert_allclose([r[key] for r in records], np.array(aux[key]), rtol=2e-4, atol=2e-5)
    assert any(r["loss_triplet"] > 0 for r in records)
    assert len({round(r["reward_chosen"], 6) for r in records}) > 1


def test_eval_samples_missing_anchors_reproducibly_and_reports_kl(tiny_model, pairs_file, tmp_path):
    rows = [{k: v for k, v in r.items() if k != "anchor"} for r in ROWS[:2]]
    data = write_jsonl(tmp_path / "noanchor.jsonl", rows)
    args = ["eval", "--model", str(tiny_model), "--data", str(data), "--preset", "official", "--anchor", "sample",
            "--anchor-max-tokens", "4", "--output", "-", "--quiet"]
    a, b = _run(args), _run(args)
    assert a == b
    lines = [json.loads(line) for line in a.splitlines() if line.startswith("{")]
    assert len(lines) == 2 and "kl_chosen" in lines[0] and "kl_rejected" in lines[0]
    assert "2 sampled from the policy" in a


def _importance(tiny_model, pairs_file, tmp_path, *extra):
    out = tmp_path / "w.jsonl"
    text = _run(["importance", "--model", str(tiny_model), "--data", str(pairs_file), "--output", str(out), *extra])
    return [json.loads(line) for line in out.read_text().splitlines()], text


def test_importance_lengths_match_response_tokens(tiny_model, adapters, pairs_file, tmp_path):
    records, text = _importance(tiny_model, pairs_file, tmp_path, "--adapter-path", str(adapters))
    cfg = load_config(None, {"model": str(tiny_model)})
    _, tok, _ = load_base(tiny_model)
    enc = PairEncoder(tok, cfg)
    assert [r["index"] for r in records] == list(range(len(ROWS)))
    for rec, row in zip(records, ROWS):
        ex = enc.encode_row(0, "t", row)
        for key in ("chosen", "rejected"):
            resp = rec[key]
            n = len(getattr(ex, key))
            assert resp["token_ids"] == getattr(ex, key)
            for field in ("tokens", "token_ids", "attribution", "prior", "weights", "template"):
                assert len(resp[field]) == n, field
            assert "".join(resp["tokens"]) == row[key] + "<|im_end|>\n"
            assert resp["template"][-2:] == [True, True] and not any(resp["template"][:-2])
    assert "peaks:" in text and "\x1b[48;5;" not in text  # CliRunner is not a terminal: no colour codes


@pytest.mark.parametrize("preset,norm", [("paper", "sum1"), ("paper", "mean1"), ("official", "mean1")])
def test_weights_are_the_losses_weights(tiny_model, adapters, tmp_path, preset, norm):
    pair = {"prompt": "What is 12 plus 30?", "chosen": "The answer is 42.", "rejected": "The answer is 43."}
    data = write_jsonl(tmp_path / "one.jsonl", [pair])
    records, _ = _importance(tiny_model, data, tmp_path, "--adapter-path", str(adapters), "--preset", preset,
                             "--weight-norm", norm)
    rec = records[0]
    c, r = rec["chosen"], rec["rejected"]
    assert len(c["token_ids"]) == len(r["token_ids"])
    assert sum(a != b for a, b in zip(c["token_ids"], r["token_ids"])) == 1
    for resp in (c, r):
        w = np.array(resp["weights"])
        assert w.shape == (len(resp["token_ids"]),) and np.all(w > 0)
        if preset == "paper":
            assert np.array(resp["prior"]).sum() == pytest.approx(1.0, abs=1e-5)
            assert (w.sum() if norm == "sum1" else w.mean()) == pytest.approx(1.0, abs=1e-5)

    cfg = load_config(None, {"model": str(tiny_model), "preset": preset, "weight_norm": norm})
    model, tok, path, reference = load_adapted(cfg.model, str(adapters), cfg)
    model.eval()
    rt = select(model, cfg, str(path), reference).whole_rows()
    ex = PairEncoder(tok, cfg).encode_row(0, "t", pair)
    batch, _ = rt.layout_batch(collate([ex], tok.pad_token_id))
    tw = token_weights(rt, cfg, batch, rt.embed(batch), 2)
    span_w, imp = np.array(tw["span_weights"]), np.array(tw["importance"])
    for row, resp, ids in ((0, c, ex.chosen), (1, r, ex.rejected)):
        pos = len(ex.prompt) + np.arange(len(ids))
        np.testing.assert_allclose(resp["weights"], np.array(tw["weights"])[row, : len(ids)], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(resp["weights"], span_w[row, pos], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(resp["attribution"], imp[row, pos], rtol=1e-5)
    if preset == "official":  # sequence span: the response slice of w neither sums nor averages to 1
        assert np.array(c["weights"]).mean() != pytest.approx(1.0, abs=1e-3)
        assert span_w[0].sum() / (span_w[0] > 0).sum() == pytest.approx(1.0, abs=1e-5)


def test_html_view_shows_both_responses(tiny_model, pairs_file, tmp_path):
    page = tmp_path / "view.html"
    records, _ = _importance(tiny_model, pairs_file, tmp_path, "--html", str(page), "--limit", "2")
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and "http" not in html.split("<body>")[0]
    label = weighting_label(load_config(None, {"model": str(tiny_model)}))
    assert html.count("<section>") == 2 and label in html and "weighting hybrid" in html
    assert len(records) == 2
    for rec in records:
        for key in ("chosen", "rejected"):
            for piece in rec[key]["tokens"]:
                assert f">{escape(piece.replace(chr(10), '↵'))}</span>" in html
    assert 'title="token' in html and "attribution" in html and "prior" in html and "&lt;|im_end|&gt;" in html
    hidden = tmp_path / "hidden.html"
    _importance(tiny_model, pairs_file, tmp_path, "--html", str(hidden), "--limit", "2", "--hide-template")
    assert "&lt;|im_end|&gt;</span>" not in hidden.read_text()


def test_errors_are_one_line(tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "a", "rejected": "b"}\n{"prompt": "x"\n')
    for command in ("eval", "importance"):
        result = CliRunner().invoke(main, [command, "--model", str(tiny_model), "--data", str(bad)])
        assert result.exit_code != 0 and f"{bad}:2: malformed JSON" in result.output
        assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["experiment", "--methods", "nope"])
    assert result.exit_code != 0 and "unknown method 'nope'" in result.output


def test_flip_labels_is_seeded_and_nested():
    rows = [{"prompt": str(i), "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(20)]
    low, k_low = flip_labels(rows, 0.1, seed=3)
    high, k_high = flip_labels(rows, 0.4, seed=3)
    assert (k_low, k_high) == (2, 8)
    flipped = lambda out: {i for i, r in enumerate(out) if r["chosen"].startswith("r")}
    assert flipped(low) < flipped(high) and flipped(flip_labels(rows, 0.4, seed=3)[0]) == flipped(high)
    assert flipped(flip_labels(rows, 0.0, seed=3)[0]) == set()
    assert rows[0]["chosen"] == "c0"


def test_experiment_quick_smoke(tiny_model, tmp_path):
    data = tmp_path / "data"
    rows = [dict(r, prompt=f"{r['prompt']} ({i})") for i, r in enumerate(ROWS * 2)]
    write_jsonl(data / "train.jsonl", rows[:8])
    write_jsonl(data / "valid.jsonl", rows[8:] + rows[:2])
    out = tmp_path / "exp"
    result = CliRunner().invoke(main, [
        "experiment", "--quick", "--iters", "2", "--model", str(tiny_model), "--data", str(data), "--out", str(out),
        "--set", "num_layers=2", "--set", "batch_size=2", "--set", "warmup_steps=1", "--set", "learning_rate=1e-3",
    ])
    assert result.exit_code == 0, result.output
    assert "estimated time" in result.output and "4 runs of 2 steps" in result.output
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["method"], float(r["noise"]), int(r["seed"])) for r in table] == [
        ("dpo", 0.0, 0), ("tidpo", 0.0, 0), ("dpo", 0.4, 0), ("tidpo", 0.4, 0)]
    assert [int(r["flipped"]) for r in table] == [0, 0, 3, 3] and all(r["val_pairs"] == "4" for r in table)
    for r in table:
        assert 0.0 <= float(r["reward_accuracy"]) <= 1.0 and 0.0 <= float(r["policy_preference_accuracy"]) <= 1.0
    md = (out / "results.md").read_text()
    assert "| method | 0% noise | 40% noise |" in md and "| dpo | " in md and "| tidpo | " in md
    assert not (out / "runs" / "dpo-noise00-seed0" / "adapters.safetensors").exists()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "results.png").stat().st_size > 0

    # a rerun with the same settings reuses every finished run
    plan = make_plan(out, quick=True, iters=2, model=str(tiny_model), data=str(data),
                     overrides={"num_layers": 2, "batch_size": 2, "warmup_steps": 1, "learning_rate": 1e-3})
    logs = []
    again = run_experiment(plan, log=logs.append)
    assert len(again) == 4 and all("(reused)" in line for line in logs)
    rows = [dict(r, seed=1, reward_accuracy=r["reward_accuracy"] + 0.1) for r in again]
    md = results_markdown(dataclasses.replace(plan, seeds=2), again + rows)
    assert md.count(" ± 0.071 |") >= 2  # two seeds: mean ± sample std
