"""The encoded-dataset cache (``data_cache.py``): hits, misses on what changes encoding, corrupt entries;
and batched encoding giving the per-row token ids."""

from __future__ import annotations

import dataclasses

import tidpo_mlx  # noqa: F401

import pytest
from mlx_lm.utils import load_tokenizer

from tidpo_mlx import data_cache
from tidpo_mlx.config import build_config
from tidpo_mlx.data.encoder import PairEncoder
from tidpo_mlx.data.load import load_dataset
from tidpo_mlx.data.workers import encode_rows
from tidpo_mlx.errors import DataError
from tidpo_mlx.sources import read_json_file

from conftest import write_jsonl


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(tiny_model)


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(data_cache.DISABLE, raising=False)
    return tmp_path / "cache"


def messy_rows(n: int) -> list[dict]:
    """Standard, conversational, multi-turn, HH and system rows, some long enough to be cut."""
    rows = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            rows.append({"prompt": f"What is {i} plus 30?", "chosen": f"{i + 30}", "rejected": f"{i + 31}"})
        elif kind == 1:
            turns = [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello there"},
                     {"role": "user", "content": "count " + "one two three " * (i % 7)}]
            rows.append({"prompt": turns, "chosen": [{"role": "assistant", "content": "one two three"}],
                         "rejected": [{"role": "assistant", "content": "four " * (1 + i % 40)}]})
        elif kind == 2:
            hist = "".join(f"\n\nHuman: question {j} of {i}\n\nAssistant: answer {j}" for j in range(i % 4))
            rows.append({"chosen": hist + f"\n\nHuman: last {i}?\n\nAssistant: yes " * 1 + "indeed",
                         "rejected": hist + f"\n\nHuman: last {i}?\n\nAssistant: no"})
        elif kind == 3:
            rows.append({"system": "Be brief.", "prompt": "word " * (5 + i % 60), "chosen": "ok " * (i % 50 + 1),
                         "rejected": "no"})
        else:
            rows.append({"prompt": f"Say {i}", "chosen": f"{i}", "rejected": f"{i}"})  # invalid: identical
    return rows


def cfg(**kw):
    return build_config({"model": "x", "skip_invalid": True, "max_length": 96, "max_prompt_length": 64, **kw})


def fields(dataset) -> list[list[dict]]:
    return [[dataclasses.asdict(e) for e in split] for split in (dataset.train, dataset.valid, dataset.test)]


def test_second_load_hits_the_cache_with_identical_examples(tmp_path, tok, cache_home):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", messy_rows(60))
    first = load_dataset(str(data), tok, cfg())
    assert any("cached in" in n for n in first.notes)
    assert len(list((cache_home / "tidpo-mlx" / "encoded").glob("*.bin"))) == 1
    second = load_dataset(str(data), tok, cfg())
    assert any("read from the cache" in n for n in second.notes)
    assert fields(second) == fields(first)
    assert second.summary() == first.summary()
    assert second.truncated_prompts > 0 and second.skipped == 12
    seeded = load_dataset(str(data), tok, cfg(seed=7))  # the held-out split is made after the cache
    assert any("read from the cache" in n for n in seeded.notes)


def test_stopping_on_invalid_rows_then_skipping_them_encodes_once(tmp_path, tok, cache_home):
    """The entry keeps the invalid rows: the report comes from the cache too, and the --skip-invalid rerun reads it."""
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", messy_rows(40))
    for _ in range(2):
        with pytest.raises(DataError, match=r"train.jsonl:5: .*; 8 invalid of 40 rows: .*--skip-invalid"):
            load_dataset(str(data), tok, cfg(skip_invalid=False))
    assert len(list((cache_home / "tidpo-mlx" / "encoded").glob("*.bin"))) == 1
    skipped = load_dataset(str(data), tok, cfg())
    assert any("read from the cache" in n for n in skipped.notes)
    assert skipped.invalid == {"'chosen' and 'rejected' are identical": 8}
    assert any(n.startswith("skip_invalid: left out") and "8 invalid of 40 rows" in n for n in skipped.notes)


@pytest.mark.parametrize("change", ["data_byte", "template", "max_length"])
def test_what_changes_encoding_misses(tmp_path, tok, change):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", messy_rows(30))
    load_dataset(str(data), tok, cfg())
    settings = {}
    if change == "data_byte":
        path = data / "train.jsonl"
        path.write_bytes(path.read_bytes().replace(b"plus 30", b"plus 31", 1))
    elif change == "template":
        template = tmp_path / "t.jinja"
        template.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
        settings = {"chat_template": str(template)}
    else:
        settings = {"max_length": 90}
    again = load_dataset(str(data), tok, cfg(**settings))
    assert not any("read from the cache" in n for n in again.notes)
    assert any("cached in" in n for n in again.notes)


def test_corrupt_entry_is_detected_and_rebuilt(tmp_path, tok, cache_home):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", messy_rows(30))
    first = load_dataset(str(data), tok, cfg())
    (entry,) = (cache_home / "tidpo-mlx" / "encoded").glob("*.bin")
    raw = bytearray(entry.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    entry.write_bytes(bytes(raw))
    rebuilt = load_dataset(str(data), tok, cfg())
    assert any("ignored the corrupt" in n for n in rebuilt.notes)
    assert fields(rebuilt) == fields(first)
    entry.write_bytes(entry.read_bytes()[:100])  # truncated
    assert any("ignored the corrupt" in n for n in load_dataset(str(data), tok, cfg()).notes)
    assert any("read from the cache" in n for n in load_dataset(str(data), tok, cfg()).notes)


def test_env_var_turns_the_cache_off(tmp_path, tok, cache_home, monkeypatch):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", messy_rows(20))
    monkeypatch.setenv(data_cache.DISABLE, "1")
    load_dataset(str(data), tok, cfg())
    assert not (cache_home / "tidpo-mlx" / "encoded").exists()


def test_batched_encoding_gives_the_per_row_ids(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", messy_rows(80))
    rows = read_json_file(path)
    encoder = PairEncoder(tok, cfg())
    batched, problems = encode_rows(encoder, rows)
    single, single_problems = [], []
    for where, row in rows.rows:
        try:
            single.append(encoder.encode_row(len(single), where, row))
        except Exception as err:
            single_problems.append((where, str(err)))
    assert [dataclasses.asdict(e) for e in batched] == [dataclasses.asdict(e) for e in single]
    assert [(p.where, f"{p.where}: {p.reason}") for p in problems] == single_problems
    assert any(e.prompt_truncated for e in batched) and any(e.responses_truncated for e in batched)
