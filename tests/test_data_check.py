"""``tidpo-mlx data check`` loads only the tokenizer and reports what training would see."""

from __future__ import annotations

import tidpo_mlx  # noqa: F401

from click.testing import CliRunner

from tidpo_mlx.cli import main

from conftest import write_jsonl


def test_data_check_reports_counts_invalid_rows_and_a_marked_pair(tmp_path, tiny_model):
    good = {"prompt": "What is 12 plus 30?", "chosen": "The answer is 42.", "rejected": "43"}
    write_jsonl(tmp_path / "d" / "train.jsonl", [good, good, dict(good, chosen=""), dict(good, prompt="Hi")])
    write_jsonl(tmp_path / "d" / "valid.jsonl", [good])
    args = ["data", "check", "--data", str(tmp_path / "d"), "--model", str(tiny_model)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "train.jsonl:3: 'chosen' is empty" in out
    assert "3 train, 1 valid, 0 test pairs" in out
    assert "invalid rows: 1 (training stops on them unless --skip-invalid drops them)\n  1 x 'chosen' is empty" in out
    assert "exact duplicate pairs: 2" in out
    assert "tokens of prompt: median" in out
    assert "<|im_start|>assistant\n[[The answer is 42.<|im_end|>\n]]" in out


def test_train_dry_run_reports_and_writes_nothing(tmp_path, tiny_model):
    good = {"prompt": "What is 12 plus 30?", "chosen": "The answer is 42.", "rejected": "43"}
    write_jsonl(tmp_path / "d" / "train.jsonl", [good, dict(good, chosen="")] + [dict(good, prompt=f"What is {i} plus 30?") for i in range(40)])
    out = tmp_path / "run"
    args = ["train", "--dry-run", "--data", str(tmp_path / "d"), "--model", str(tiny_model), "--adapter-path", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "train.jsonl:2: 'chosen' is empty" in result.output
    assert "no valid split: held out" in result.output
    assert "dry run: no weights loaded, nothing written" in result.output
    assert not out.exists()
    bad = CliRunner().invoke(main, args + ["--beta", "-1"])
    assert bad.exit_code != 0 and "beta" in bad.output


def test_no_valid_pair_names_the_reasons(tmp_path, tiny_model):
    good = {"prompt": "What is 12 plus 30?", "chosen": "The answer is 42.", "rejected": "43"}
    write_jsonl(tmp_path / "d" / "train.jsonl", [dict(good, prompt=f"What is {i} plus 30?") for i in range(20)])
    args = ["train", "--dry-run", "--data", str(tmp_path / "d"), "--model", str(tiny_model), "--max-prompt-length", "4"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert "no valid training pairs (invalid: 20 x the prompt's template tokens alone exceed max_prompt_length (4)" \
        in result.output
