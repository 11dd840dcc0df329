"""Generation evaluation: answers, diversity, ``eval --generate`` and ``samples.jsonl`` (docs/generation.md)."""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner

from conftest import arith_folder, write_jsonl
from tidpo_mlx.answers import AnswerKey, AnswerRule, answer_key, answer_rule, answer_scores
from tidpo_mlx.cli import main
from tidpo_mlx.config import load_config
from tidpo_mlx.diversity import bleu2, distinct_n, diversity_scores, self_bleu2
from tidpo_mlx.errors import ConfigError
from tidpo_mlx.gen_eval import empty_notes
from tidpo_mlx.gen_scores import mean_se, summarize
from tidpo_mlx.models import adapter_config, attach_lora, load_base, lora_layers, save_adapters
from tidpo_mlx.samples import keep_samples, log_samples

BUNDLED_TEST = Path(__file__).parent.parent / "tidpo_mlx" / "datasets" / "arith" / "test.jsonl"


# ---------------------------------------------------------------- answers

@pytest.mark.parametrize("text, answer", [
    ("8:47 + 2:43 = 11:30.", "11:30"),
    ("8:20 + 1:48 = 09:08", "9:08"),
    ("July has 31 days, so it is August 11.", "August 11"),
    ("so it is the 3rd of Sept.", "September 3"),
    ("it is aug 2", "August 2"),
    ("46 days is 6 weeks and 4 days. Tuesday + 4 = Saturday.", "Saturday"),
    ("It will be monday.", "Monday"),
    ("1 km = 1000 m, so 28 km = 28000 m.", "28000"),
    ("5 × 7 = 35, and 100 - 35 = 65.", "65"),
    ("The total is 1,250.50 dollars, i.e. 1,250.5", "1250.5"),
    ("It is 72.0", "72"),
    ("It is -5 degrees", "-5"),
    ("no answer here", None),
    ("", None),
])
def test_default_rule_takes_the_last_answer_like_span(text, answer):
    assert AnswerRule().extract(text) == answer


def test_answer_pattern_takes_the_first_group_of_the_last_match():
    rule = answer_rule(r"#### (-?[\d,.]+)")
    assert rule.extract("3 + 4 = 7, 7 * 2 = 14\n#### 1,014") == "1014"
    assert rule.extract("#### 3\nthen again #### 5") == "5"
    assert rule.extract("no marker, 42") is None
    assert answer_rule(None) == AnswerRule()
    assert answer_rule("none") is None


@pytest.mark.parametrize("pattern, message", [
    ("(", "not a valid regular expression"),
    ("#### \\d+", "has no group"),
])
def test_bad_answer_patterns_are_one_line_errors(pattern, message):
    with pytest.raises(ConfigError, match=message) as err:
        answer_rule(pattern)
    assert "\n" not in str(err.value)


def test_answer_scores_by_hand():
    key = AnswerKey("46", "47")
    scores = answer_scores(["46", "47", None, "5"], key)
    assert scores == {"answer/correct": 0.25, "answer/rejected": 0.25, "answer/none": 0.25}
    assert answer_scores(["46"], key) == {"answer/correct": 1.0, "answer/rejected": 0.0, "answer/none": 0.0}
    rule = AnswerRule()
    assert answer_key(rule, "so 72.", "so 62.").skip_reason is None
    assert answer_key(rule, "so 72.", "it is 72").skip_reason == "equal"
    assert answer_key(rule, "so 72.", "no idea").skip_reason == "absent"
    assert answer_key(rule, "yes", "no").skip_reason == "absent"


def test_every_bundled_test_pair_has_different_chosen_and_rejected_answers():
    rows = [json.loads(line) for line in BUNDLED_TEST.read_text().splitlines()]
    assert len(rows) == 150
    rule = AnswerRule()
    keys = [answer_key(rule, r["chosen"], r["rejected"]) for r in rows]
    assert [k for k in keys if k.skip_reason is not None] == []


# ---------------------------------------------------------------- diversity and statistics

def test_distinct_n_by_hand():
    samples = [[1, 2, 3], [1, 2, 4]]
    assert distinct_n(samples, 1) == pytest.approx(4 / 6)  # 1, 2, 3, 4 of six unigrams
    assert distinct_n(samples, 2) == pytest.approx(3 / 4)  # (1,2) twice, (2,3), (2,4)
    assert distinct_n([[7, 7, 7, 7]], 1) == 0.25
    assert distinct_n([[1], [2]], 2) is None


def test_self_bleu2_by_hand():
    # each against the other: p1 = 2/3, p2 = 1/2, equal lengths (no brevity penalty)
    assert self_bleu2([[1, 2, 3], [1, 2, 4]]) == pytest.approx(math.sqrt(2 / 3 * 1 / 2))
    # [1,2] vs [1,2,3,4]: p1 = p2 = 1, brevity exp(1 - 4/2); [1,2,3,4] vs [1,2]: p1 = 2/4, p2 = 1/3
    assert bleu2([1, 2], [[1, 2, 3, 4]]) == pytest.approx(math.exp(-1))
    assert self_bleu2([[1, 2], [1, 2, 3, 4]]) == pytest.approx((math.exp(-1) + math.sqrt(1 / 6)) / 2)
    # clipped unigram counts: 5 occurs once in the reference, three times in the hypothesis
    assert bleu2([5, 5, 6], [[5, 6, 9]]) == pytest.approx(math.sqrt(2 / 3 * 1 / 2))
    assert bleu2([5, 5, 5], [[5, 7]]) == 0.0  # no bigram in common
    # the closest reference length (the shorter on a tie) sets the brevity penalty
    assert bleu2([1, 2, 3], [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6, 7]]) == pytest.approx(math.exp(1 - 5 / 3))
    assert self_bleu2([[1, 2, 3], [1, 2, 3]]) == pytest.approx(1.0)
    assert self_bleu2([[1, 2, 3]]) is None
    assert self_bleu2([[1], [1]]) is None


def test_diversity_scores_need_two_samples_and_length_is_always_there():
    assert diversity_scores([[1, 2, 3]]) == {"length": 3.0}
    scores = diversity_scores([[1, 2, 3], [1, 2, 4], []])
    assert scores["length"] == pytest.approx(2.0)
    assert scores["distinct-1"] == pytest.approx(4 / 6)
    assert set(scores) == {"length", "distinct-1", "distinct-2", "self-bleu-2"}


def test_mean_se_and_paired_difference():
    stat = mean_se([1.0, 0.0, 1.0, 0.0])
    assert stat.mean == 0.5 and stat.n == 4
    assert stat.se == pytest.approx(math.sqrt((4 * 0.25 / 3) / 4))
    assert math.isnan(mean_se([1.0]).se) and mean_se([]).n == 0
    rows = [{"scores": {"base": {"answer/correct": b, "length": 2.0}, "tuned": {"answer/correct": t, "length": 3.0}}}
            for b, t in [(0.0, 1.0), (0.0, 1.0), (1.0, 1.0), (0.0, 0.0)]]
    summary = summarize(rows, ["base", "tuned"])
    assert summary["answer/correct"]["base"].mean == 0.25
    assert summary["answer/correct"]["tuned"].mean == 0.75
    diff = summary["answer/correct"]["tuned - base"]
    assert diff.mean == 0.5 and diff.se == pytest.approx(mean_se([1.0, 1.0, 0.0, 0.0]).se)
    assert summary["length"]["tuned - base"].mean == 1.0
    assert "distinct-1" not in summary


def test_empty_generations_get_one_line_notes():
    rows = [{"lengths": {"base": [0, 3], "tuned": [2, 2]}}, {"lengths": {"base": [0, 0], "tuned": [1, 1]}}]
    notes = empty_notes(rows, ["base", "tuned"])
    assert len(notes) == 1 and "\n" not in notes[0]
    assert notes[0].startswith("note: base: 3 of 4 generations are empty")


# ---------------------------------------------------------------- generation on tiny models

def _adapters(base: Path, folder: Path, random_b: bool) -> Path:
    """LoRA adapters on every block of a tiny model: lora_b zero (a fresh adapter) or random."""
    cfg = load_config(None, {"model": str(base), "num_layers": 2, "dequantize": "false"})
    model, _, _ = load_base(base, cfg.dequantize)
    attach_lora(model, cfg)
    if random_b:
        mx.random.seed(3)
        for layer in lora_layers(model):
            layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.05
    save_adapters(model, folder, adapter_config(cfg, base))
    return folder


def _generate(args: list[str]) -> tuple[str, list[dict]]:
    result = CliRunner().invoke(main, ["eval", "--generate", "--quiet", *args])
    assert result.exit_code == 0, result.output
    out = args[args.index("--output") + 1] if "--output" in args else None
    rows = [json.loads(line) for line in Path(out).read_text().splitlines()] if out else []
    return result.output, rows


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return arith_folder(tmp_path_factory.mktemp("gen-pairs"), 4, 5)


def test_zero_adapters_give_the_base_greedy_text(tiny_model, pairs, tmp_path):
    adapters = _adapters(tiny_model, tmp_path / "zero", random_b=False)
    out = tmp_path / "gen.jsonl"
    _generate(["--model", str(tiny_model), "--adapter-path", str(adapters), "--data", str(pairs),
               "--max-tokens", "10", "--output", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5
    for row in rows:
        assert row["generations"]["tuned"] == row["generations"]["base"]
        assert row["lengths"]["base"][0] > 0


def test_seeded_sampling_repeats_and_does_not_depend_on_the_batch(tiny_model, pairs, tmp_path):
    adapters = _adapters(tiny_model, tmp_path / "rand", random_b=True)
    common = ["--model", str(tiny_model), "--adapter-path", str(adapters), "--data", str(pairs),
              "--max-tokens", "8", "--temperature", "1.0", "--num-samples", "3"]
    _, first = _generate(common + ["--output", str(tmp_path / "a.jsonl")])
    _, again = _generate(common + ["--output", str(tmp_path / "b.jsonl"), "--batch-size", "2"])
    _, other = _generate(common + ["--output", str(tmp_path / "c.jsonl"), "--seed", "1"])
    assert [r["generations"] for r in first] == [r["generations"] for r in again]
    assert [r["generations"] for r in first] != [r["generations"] for r in other]
    samples = first[0]["generations"]["tuned"]
    assert len(samples) == 3 and len(set(samples)) > 1
    assert {"distinct-1", "distinct-2", "self-bleu-2", "length"} <= set(first[0]["scores"]["tuned"])


def _mlx_lm_generate(model: Path, adapters: Path, prompt: str, max_tokens: int) -> str:
    """What the real ``mlx_lm.generate`` prints (``--verbose False``: the text and a newline)."""
    result = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "generate", "--model", str(model), "--adapter-path", str(adapters),
         "--prompt", prompt, "--max-tokens", str(max_tokens), "--temp", "0", "--verbose", "False"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    assert result.stdout.endswith("\n")
    return result.stdout[:-1]


@pytest.mark.parametrize("which", ["tiny_model", "tiny_quantized_model"])
def test_greedy_text_equals_mlx_lm_generate(which, request, pairs, tmp_path):
    model = request.getfixturevalue(which)
    adapters = _adapters(model, tmp_path / "rand", random_b=True)
    out = tmp_path / "gen.jsonl"
    text, rows = _generate(["--model", str(model), "--adapter-path", str(adapters), "--data", str(pairs),
                            "--max-tokens", "12", "--dequantize", "false", "--output", str(out)])
    assert "weights as mlx_lm.generate loads them" in text
    assert f"mlx_lm.generate --model {model} --adapter-path {adapters}" in text
    for row in rows[:2]:
        prompt = row["prompt"][-1]["content"]
        assert row["generations"]["tuned"][0] == _mlx_lm_generate(model, adapters, prompt, 12)
        assert row["generations"]["tuned"] != row["generations"]["base"]


def test_resume_skips_finished_pairs_and_refuses_other_settings(tiny_model, pairs, tmp_path):
    adapters = _adapters(tiny_model, tmp_path / "rand", random_b=True)
    out = tmp_path / "gen.jsonl"
    common = ["--model", str(tiny_model), "--adapter-path", str(adapters), "--data", str(pairs),
              "--max-tokens", "6", "--output", str(out)]
    _generate(common + ["--limit", "2"])
    whole = out.read_text()
    with open(out, "a") as f:
        f.write('{"index": 2, "torn')  # a run killed mid-write
    text, rows = _generate(common)
    assert "2 pairs already generated there, 3 to go" in text
    assert "torn last line dropped" in text
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4]
    assert out.read_text().startswith(whole)
    result = CliRunner().invoke(main, ["eval", "--generate", "--quiet", *common, "--max-tokens", "7"])
    assert result.exit_code == 1
    assert "generations made with other settings (max_tokens 6 there, 7 now)" in result.output


def test_generation_flags_without_generate_and_bad_values_are_one_line_errors(pairs):
    for args, message in [
        (["--temperature", "0.7"], "--temperature goes with --generate"),
        (["--generate", "--answer-pattern", "("], "not a valid regular expression"),
        (["--generate", "--answer-pattern", "x+"], "has no group"),
        (["--generate", "--num-samples", "2"], "greedy samples are all the same"),
        (["--generate", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--generate", "--no-base"], "--no-base goes with --adapter-path"),
    ]:
        result = CliRunner().invoke(main, ["eval", "--data", str(pairs), *args])
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output
        assert result.output.count("\n") == 1


def test_multi_turn_chat_file_gets_samples_lengths_and_diversity_only(tiny_model, tmp_path):
    rows = []
    for i, name in enumerate(["red", "blue", "green"]):
        rows.append({
            "prompt": [{"role": "user", "content": "Please answer briefly."},
                       {"role": "assistant", "content": "Sure."},
                       {"role": "user", "content": f"Which colour is the {name} fox?"}],
            "chosen": [{"role": "assistant", "content": f"The fox is {name}."}],
            "rejected": [{"role": "assistant", "content": "The fox is brown."}],
        })
    data = tmp_path / "chat.jsonl.gz"
    data.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    out = tmp_path / "gen.jsonl"
    html = tmp_path / "view.html"
    text, got = _generate(["--model", str(tiny_model), "--data", str(data), "--max-tokens", "8", "--temperature",
                           "1.0", "--num-samples", "2", "--output", str(out), "--html", str(html)])
    assert "answer scores: none: no pair's chosen and rejected answers differ" in text
    assert "3 without an answer in chosen or rejected" in text
    assert "samples, lengths and diversity only" in text
    assert "answer/correct" not in text and "distinct-2" in text
    assert "pair #" not in text  # multi-turn prompts: no mlx_lm.generate command reproduces them
    assert len(got) == 3 and list(got[0]["generations"]) == ["base"]
    assert got[0]["prompt"][1] == {"role": "assistant", "content": "Sure."}
    assert got[0]["answer_skipped"] == "absent"
    assert "The fox is red." in html.read_text()


def test_gsm8k_style_answers_with_a_pattern(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "gsm.jsonl", [
        {"prompt": "Tom has 3 apples and buys 4. How many?", "chosen": "3 + 4 = 7\n#### 7",
         "rejected": "3 + 4 = 8\n#### 8"},
        {"prompt": "Ann has 10 pens and loses 2. How many?", "chosen": "10 - 2 = 8\n#### 8",
         "rejected": "10 minus 2 is 8\n#### 8"},
    ])
    out = tmp_path / "gen.jsonl"
    text, rows = _generate(["--model", str(tiny_model), "--data", str(data), "--max-tokens", "6",
                            "--answer-pattern", r"#### (-?[\d,.]+)", "--output", str(out)])
    assert r"answer scores over 1 of 2 pairs (#### (-?[\d,.]+)); left out: 0 without an answer" in text
    assert "1 with equal answers" in text
    assert rows[0]["answers"]["chosen"] == "7" and rows[0]["answers"]["rejected"] == "8"
    assert rows[1]["answer_skipped"] == "equal"
    assert "answer/correct" in rows[0]["scores"]["base"] and "answer/correct" not in rows[1]["scores"]["base"]


@pytest.mark.slow
def test_eval_generate_on_the_bundled_test_split(tmp_path):
    out = tmp_path / "gen.jsonl"
    text, rows = _generate(["--data", "arith", "--split", "test", "--limit", "3", "--max-tokens", "24",
                            "--output", str(out)])
    assert "3 pairs of" in text and "(test split)" in text
    assert "answer scores over 3 of 3 pairs" in text
    assert "mlx_lm.generate --model" in text
    assert rows[0]["prompt"] == [{"role": "user", "content": "Convert 3 gallons to quarts."}]
    assert rows[0]["answers"]["chosen"] == "12" and rows[0]["answers"]["rejected"] == "30"
    assert set(rows[0]["scores"]["base"]) == {"answer/correct", "answer/rejected", "answer/none", "length"}


# ---------------------------------------------------------------- samples.jsonl

def test_log_samples_appends_greedy_answers_and_resume_cuts_them(tiny_model, pairs, tmp_path):
    from tidpo_mlx.data import load_split
    from tidpo_mlx.models import load_tokenizer

    cfg = load_config(None, {"model": str(tiny_model), "dequantize": "false"})
    model, tokenizer, _ = load_base(tiny_model, cfg.dequantize)
    examples = load_split(str(pairs), load_tokenizer(tiny_model), cfg).examples[:2]
    path = tmp_path / "samples.jsonl"
    keep_samples(path, None)
    for step in (0, 5, 10):
        records = log_samples(model, tokenizer, examples, cfg, step, path, max_tokens=6)
    assert [r["step"] for r in records] == [10, 10]
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 0, 5, 5, 10, 10]
    first = lines[0]
    assert first["length"] == 6 and first["chosen_answer"] != first["rejected_answer"]
    assert {"answer", "answer/correct", "answer/rejected", "answer/none", "text"} <= set(first)
    assert lines[0]["text"] == lines[2]["text"]  # the same weights: the same greedy text
    with open(path, "a") as f:
        f.write('{"step": 15, "tor')
    notes = []
    keep_samples(path, 5, notes.append)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 0, 5, 5]
    assert notes and "torn last line dropped" in notes[0]


def test_answer_accuracy_of_adapters_on_held_out_prompts(tiny_model, pairs, tmp_path):
    from tidpo_mlx.gen_eval import answer_accuracy

    adapters = _adapters(tiny_model, tmp_path / "zero", random_b=False)
    cfg = load_config(None, {"model": str(tiny_model), "dequantize": "false"})
    tuned = answer_accuracy(cfg, str(adapters), str(pairs), max_tokens=6)
    base = answer_accuracy(cfg, None, str(pairs), max_tokens=6)
    assert tuned == base  # lora_b = 0: the adapters change nothing
    assert tuned["answer_pairs"] == 5
    assert 0 <= tuned["answer/correct"] <= 1 and "answer/correct_se" in tuned
