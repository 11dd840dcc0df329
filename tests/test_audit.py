"""``tidpo-mlx audit``: cross-fitted label scores, evidence, reports and the cleaned data folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import write_jsonl
from tidpo_mlx import audit as au
from tidpo_mlx.cli import main
from tidpo_mlx.config import build_config
from tidpo_mlx.data import Example, load_dataset
from tidpo_mlx.models import load_tokenizer

FLIPPED = {3, 10, 17}
FLIPPED_LINES = {i + 1 for i in FLIPPED} | {26}
"""train.jsonl lines whose labels are swapped: the three FLIPPED pairs and the flipped copy of pair 6."""
TINY = ["--num-layers", "2", "--batch-size", "2", "--learning-rate", "1e-3", "--warmup-steps", "0"]
REJECTED = "The answer is 2 dollars."
"""Every clean pair's rejected response: a pattern a fold model learns in a few steps, which the tiny random
reference itself prefers to most right answers (so ranking by the reference's margin misses the flips)."""


def _rows() -> list[dict]:
    """24 addition pairs (3 flipped), plus an exact copy, a flipped copy and a second pair on one prompt."""
    rows = []
    for i in range(24):
        a, b = 3 + i, 11 + 2 * i
        row = {"prompt": f"What is {a} plus {b}?", "chosen": f"The answer is {a + b}.", "rejected": REJECTED}
        if i in FLIPPED:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
        rows.append(row)
    rows.append(dict(rows[5]))  # exact duplicate
    rows.append({**rows[6], "chosen": rows[6]["rejected"], "rejected": rows[6]["chosen"]})  # flipped copy
    rows.append({**rows[7], "rejected": "The answer is 2."})  # same prompt, other rejected
    return rows


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("audit-data")
    write_jsonl(folder / "train.jsonl", _rows())
    write_jsonl(folder / "valid.jsonl", [{"prompt": f"What is {i} plus 1?", "chosen": f"It is {i + 1}.",
                                          "rejected": f"It is {i + 2}."} for i in range(8)])
    return folder


def _invoke(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def audited(tiny_model, data_dir, tmp_path_factory) -> tuple[Path, Path, str]:
    """One DPO audit (2 folds x 4 steps) with --write (drop the top quarter)."""
    root = tmp_path_factory.mktemp("audit-run")
    out, cleaned = root / "audit", root / "cleaned"
    text = _invoke(["audit", "--data", str(data_dir), "--model", str(tiny_model), "-c", "dpo", "--iters", "4",
                    "--top", "5", "--out", str(out), "--write", str(cleaned), "--share", "0.25", *TINY])
    return out, cleaned, text


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]


def test_audit_writes_every_output(audited, data_dir):
    out, cleaned, text = audited
    records = _records(out)
    assert len(records) == 27
    assert sorted(r["rank"] for r in records) == list(range(1, 28))
    assert [r["source"] for r in records] == [f"{data_dir / 'train.jsonl'}:{i}" for i in range(1, 28)]
    assert {r["fold"] for r in records} == {0, 1}
    for r in records:
        assert set(r["scores"]) == set(au.SCORES) and r["score"] == r["scores"]["reward_margin"]
    by_rank = sorted(records, key=lambda r: r["rank"])
    assert [r["score"] for r in by_rank] == sorted(r["score"] for r in records)
    shown = [r for r in by_rank if "evidence" in r]
    assert [r["rank"] for r in shown] == [1, 2, 3, 4, 5]
    for r in shown:
        for key in ("chosen", "rejected"):
            ev = r["evidence"][key]
            n = len(ev["tokens"])
            assert len(ev["weights"]) == len(ev["log_ratio"]) == n
            assert abs(sum(ev["weights"]) - 1.0) < 1e-3  # paper preset: sum1 over the response
            a, b = ev["differ"]
            assert 0 < a < b <= n  # "The answer is" is shared; the number differs
    page = (out / "audit.html").read_text()
    assert page.count("<section>") == 5 and "rank 1 " in page and 'class="t' in page and "rho" in page
    assert "most suspect pairs" in text and by_rank[0]["source"] in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["folds"] == 2 and summary["seconds"]["total"] > 0


def _auroc(records: list[dict], score: str) -> float:
    """P(a flipped pair scores below a clean one), ties half: 1.0 when every flip ranks above every clean pair."""
    flipped = [r["scores"][score] for r in records if int(r["source"].rsplit(":", 1)[1]) in FLIPPED_LINES]
    clean = [r["scores"][score] for r in records if int(r["source"].rsplit(":", 1)[1]) not in FLIPPED_LINES]
    assert len(flipped) == 4 and len(clean) == 23
    return float(np.mean([(f < c) + 0.5 * (f == c) for f in flipped for c in clean]))


def test_audit_ranks_the_flipped_pairs_first(audited):
    """The fold models find the flips the reference misses: seeds 0-9 of this setup all rank the 4 flipped
    pairs 1-4 (AUROC 1.0), while the reference's own margin ranks them below most clean pairs."""
    out, _, _ = audited
    records = _records(out)
    assert _auroc(records, "reward_margin") >= 0.9
    assert _auroc(records, "ref_margin") < 0.5
    top = {int(r["source"].rsplit(":", 1)[1]) for r in records if r["rank"] <= len(FLIPPED_LINES) + 1}
    assert FLIPPED_LINES <= top


def test_no_pair_is_scored_by_a_model_trained_on_it(audited):
    out, _, _ = audited
    records = _records(out)
    for fold in (0, 1):
        trained = [json.loads(line) for line in (out / "folds" / f"fold-{fold}" / "data" / "train.jsonl").read_text().splitlines()]
        held = [r for r in records if r["fold"] == fold]
        assert len(trained) + len(held) == len(records)
        prompts = {t["prompt"] for t in trained}
        responses = {frozenset((t["chosen"], t["rejected"])) for t in trained}
        for r in held:
            assert r["prompt"] not in prompts
            assert frozenset((r["chosen"], r["rejected"])) not in responses
    folds = {r["source"].rsplit(":", 1)[1]: r["fold"] for r in records}
    assert folds["6"] == folds["25"]  # pair 5 and its exact copy
    assert folds["7"] == folds["26"]  # pair 6 and its flipped copy
    assert folds["8"] == folds["27"]  # one prompt, two pairs


def test_assign_folds_keeps_linked_pairs_together():
    def ex(i: int, prompt: str, chosen: str, rejected: str) -> Example:
        return Example(i, f"f:{i}", [{"role": "user", "content": prompt}], [1], [2], [3],
                       texts={"chosen": chosen, "rejected": rejected})

    examples = [ex(i, f"p{i}", f"c{i}", f"r{i}") for i in range(10)]
    examples += [ex(10, "p0", "c0", "r0"), ex(11, "p1-reworded", "r1", "c1"), ex(12, "p2", "c2", "other")]
    folds = au.assign_folds(examples, 3, seed=0)
    assert folds[10] == folds[0] and folds[11] == folds[1] and folds[12] == folds[2]
    sizes = [folds.count(k) for k in range(3)]
    assert min(sizes) >= 3 and sum(sizes) == 13
    assert au.assign_folds(examples, 3, seed=0) == folds
    with pytest.raises(ValueError, match="fewer than --folds"):
        au.assign_folds(examples[:2], 3, seed=0)


def test_differing_spans():
    assert au.differing([1, 2, 3, 9, 5], [1, 2, 4, 5]) == ((2, 4), (2, 3))
    assert au.differing([1, 2], [1, 2, 3]) == ((2, 2), (2, 3))  # one response extends the other


def test_write_round_trips_the_data_format(audited, tiny_model, data_dir, tmp_path):
    out, cleaned, _ = audited
    records = _records(out)
    cfg = build_config({"model": str(tiny_model)})
    tok = load_tokenizer(Path(tiny_model))
    dropped = {json.loads(line)["source"] for line in (cleaned / "changes.jsonl").read_text().splitlines()}
    assert dropped == {r["source"] for r in records if r["rank"] <= 7}  # round(0.25 * 27)
    kept = load_dataset(str(cleaned), tok, cfg)
    assert len(kept.train) == 20 and len(kept.valid) == 8
    original = load_dataset(str(data_dir), tok, cfg)

    def content(examples):
        return [(e.messages, e.chosen, e.rejected) for e in examples]

    assert content(kept.train) == content([e for e in original.train if e.source not in dropped])

    flipped_dir = tmp_path / "flipped"
    counts = au.write_cleaned(out, flipped_dir, "flip", None, 0.0, plain=False)
    negative = {r["source"] for r in records if r["score"] < 0.0}
    assert counts == {"train_pairs": 27, "changed": len(negative)}
    flipped = load_dataset(str(flipped_dir), tok, cfg)
    for before, after in zip(original.train, flipped.train):
        swapped = (after.chosen, after.rejected) == (before.rejected, before.chosen)
        assert swapped == (before.source in negative)
        assert after.messages == before.messages
    with pytest.raises(ValueError, match="exists"):
        au.write_cleaned(out, flipped_dir, "flip", None, 0.0, plain=False)


def test_cleaned_rows_keep_their_other_fields_and_a_flip_swaps_the_per_response_ones():
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
             {"role": "assistant", "content": "Let me think."}, {"role": "user", "content": "Just the number."}]
    row = {"chosen": turns + [{"role": "assistant", "content": "4"}],
           "rejected": turns + [{"role": "assistant", "content": "5"}],
           "score_chosen": 9.0, "score_rejected": 2.0, "chosen-model": "a", "rejected-model": "b", "id": 17}
    kept = au.explicit_row("f.jsonl:1", row, plain=False)
    assert kept == {"prompt": turns, "chosen": "4", "rejected": "5", "score_chosen": 9.0, "score_rejected": 2.0,
                    "chosen-model": "a", "rejected-model": "b", "id": 17}
    flipped = au.explicit_row("f.jsonl:1", row, plain=False, flip=True)
    assert flipped == {"prompt": turns, "chosen": "5", "rejected": "4", "score_chosen": 2.0, "score_rejected": 9.0,
                       "chosen-model": "b", "rejected-model": "a", "id": 17}
    with_system = au.explicit_row("f.jsonl:2", {"system": "S", "prompt": "Q", "chosen": "A", "rejected": "B"}, False)
    assert with_system == {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
                           "chosen": "A", "rejected": "B"}


def test_reference_only_and_tidpo_audit(tiny_model, data_dir, tmp_path):
    ref = tmp_path / "ref"
    _invoke(["audit", "--data", str(data_dir), "--model", str(tiny_model), "--folds", "0", "--top", "2",
             "--out", str(ref), *TINY])
    for r in _records(ref):
        assert r["fold"] == -1 and r["scores"]["reward_margin"] == 0.0
        assert r["score"] == r["scores"]["ref_margin"] == pytest.approx(r["scores"]["logp_margin"])
    ti = tmp_path / "tidpo"
    text = _invoke(["audit", "--data", str(data_dir), "--model", str(tiny_model), "-c", "quickstart", "--iters", "1",
                    "--top", "2", "--out", str(ti), *TINY])
    assert "fold 1: trained" in text
    assert (ti / "folds" / "fold-1" / "adapters" / "adapters.safetensors").exists()
    assert any(r["scores"]["reward_margin"] != 0.0 for r in _records(ti))


def test_refuses_existing_folders_before_work(tiny_model, data_dir, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    base = ["audit", "--data", str(data_dir), "--model", str(tiny_model)]
    result = CliRunner().invoke(main, [*base, "--out", str(busy)])
    assert result.exit_code == 1 and "not empty" in result.output
    result = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "new"), "--write", str(busy)])
    assert result.exit_code == 1 and "exists" in result.output and not (tmp_path / "new").exists()
    result = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "new"), "--share", "0.1"])
    assert result.exit_code != 0 and "--write" in result.output
