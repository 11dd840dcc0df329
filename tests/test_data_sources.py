"""Where ``--data`` comes from: files (BOM, gzip, bad bytes), folders, single files, parquet,
``datasets.save_to_disk`` folders, and the Hub (a hand-built hub cache, offline)."""

from __future__ import annotations

import gzip
import json

import tidpo_mlx  # noqa: F401

import pytest
from mlx_lm.utils import load_tokenizer

from tidpo_mlx.config import build_config
from tidpo_mlx.data.load import load_dataset, load_split
from tidpo_mlx.errors import DataError
from tidpo_mlx.evaluation import load_pairs
from tidpo_mlx.sources import bundled_folder, read_json_file, read_jsonl

from conftest import write_jsonl


def pair(i: int, prompt: str | None = None) -> dict:
    return {"prompt": prompt or f"What is {i} plus 30?", "chosen": f"{i + 30}", "rejected": f"{i + 31}"}


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(tiny_model)


CFG = build_config({"model": "x"})


def test_bom_gzip_and_bad_bytes(tmp_path):
    line = json.dumps(pair(1)).encode()
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + line + b"\n")
    assert read_jsonl(tmp_path / "bom.jsonl")[0][1] == pair(1)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(line + b"\n" + line + b"\n"))
    assert [w for w, _ in read_jsonl(tmp_path / "a.jsonl.gz")] == [f"{tmp_path / 'a.jsonl.gz'}:1", f"{tmp_path / 'a.jsonl.gz'}:2"]
    (tmp_path / "zipped.jsonl").write_bytes(gzip.compress(line))
    with pytest.raises(DataError, match=r"zipped.jsonl: this is gzip-compressed data; name the file \*.gz"):
        read_jsonl(tmp_path / "zipped.jsonl")
    (tmp_path / "bad.jsonl").write_bytes(line + b"\n" + b'{"prompt": "caf\xe9"}\n' + b"\x00\x01\x02\x80\n")
    read = read_json_file(tmp_path / "bad.jsonl")
    assert [(p.where, p.reason) for p in read.problems] == [
        (f"{tmp_path / 'bad.jsonl'}:2", "not valid UTF-8 text"),
        (f"{tmp_path / 'bad.jsonl'}:3", "binary data (NUL bytes), not JSON text")]
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid UTF-8 text"):
        read_jsonl(tmp_path / "bad.jsonl")


def test_json_array_rows_carry_their_line(tmp_path):
    (tmp_path / "train.json").write_text("[\n" + ",\n".join(json.dumps(pair(i), indent=1) for i in range(3)) + "\n]\n")
    lines = [int(w.rsplit(":", 1)[1]) for w, _ in read_json_file(tmp_path / "train.json").rows]
    assert lines == [2, 7, 12]


def test_single_file_gets_a_held_out_split_grouped_by_prompt(tmp_path, tok):
    rows = [pair(i % 40) for i in range(200)]  # 40 prompts, 5 pairs each
    for r, i in zip(rows, range(200)):
        r["chosen"] += "!" * (i // 40 + 1)
    path = write_jsonl(tmp_path / "all.jsonl", rows)
    data = load_dataset(str(path), tok, build_config({"model": "x", "valid_fraction": 0.1, "seed": 3}))
    assert len(data.valid) == 20 and len(data.train) == 180
    prompts = lambda exs: {e.messages[-1]["content"] for e in exs}  # noqa: E731
    assert not prompts(data.train) & prompts(data.valid)
    assert any(n.startswith("no valid split: held out 20 of 200 pairs") for n in data.notes)
    again = load_dataset(str(path), tok, build_config({"model": "x", "valid_fraction": 0.1, "seed": 3}))
    assert [e.source for e in again.valid] == [e.source for e in data.valid]
    other = load_dataset(str(path), tok, build_config({"model": "x", "valid_fraction": 0.1, "seed": 4}))
    assert [e.source for e in other.valid] != [e.source for e in data.valid]
    # eval reads the same held-out split from the file's folder ... and a whole file when given one
    assert [e.source for e in load_pairs(str(path), tok, CFG).examples] == [w for w, _ in read_jsonl(path)]


ARITH_HELD_OUT = [17, 46, 58, 76, 114, 154, 158, 174, 202, 209, 216, 254, 279, 292, 294, 309, 327, 362, 365, 441,
                  447, 452, 456, 487, 489, 516, 517, 566, 581, 600]
"""Lines of the bundled ``arith/train.jsonl`` that the held-out split made from it holds (valid_fraction 0.05,
seed 0): the split every earlier version made."""


def test_held_out_split_of_the_bundled_file_is_unchanged(tok):
    data = load_dataset(str(bundled_folder("arith") / "train.jsonl"), tok, CFG)
    assert [int(e.source.rsplit(":", 1)[1]) for e in data.valid] == ARITH_HELD_OUT
    assert len(data.train) == 570 and [e.index for e in data.valid] == list(range(30))


def test_one_split_loads_as_training_loads_it(tmp_path, tok):
    """load_split (eval, importance, audit) gives training's examples, tokens and indices, with each row as read."""
    from dataclasses import asdict

    folder = bundled_folder("arith")
    data = load_dataset("arith", tok, CFG)
    for split in ("train", "valid", "test"):
        got = load_split("arith", tok, CFG, split)
        assert [asdict(e) for e in got.examples] == [asdict(e) for e in getattr(data, split)]
        assert got.rows == [row for _, row in read_jsonl(folder / f"{split}.jsonl")]
        assert got.name == f"{folder} ({split} split)"
    write_jsonl(tmp_path / "only" / "train.jsonl", [row for _, row in read_jsonl(folder / "train.jsonl")])
    only = str(tmp_path / "only")
    data = load_dataset(only, tok, CFG)
    held = load_split(only, tok, CFG)
    assert held.name == f"{only} (held-out split made from train)"
    assert [asdict(e) for e in held.examples] == [asdict(e) for e in data.valid]
    assert [asdict(e) for e in load_split(only, tok, CFG, limit=5).examples] == [asdict(e) for e in data.valid[:5]]
    every = load_split(only, tok, CFG, "train")  # the audit's: the pairs training holds out included
    assert [e.index for e in every.examples] == list(range(600))
    assert sorted(e.source for e in every.examples) == sorted(e.source for e in data.train + data.valid)
    with pytest.raises(DataError, match="no test split"):
        load_split(only, tok, CFG, "test")


def test_folder_of_mixed_files(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([pair(i) for i in range(6)]), tmp_path / "train.parquet")
    (tmp_path / "validation.jsonl.gz").write_bytes(gzip.compress(b"".join(json.dumps(pair(i)).encode() + b"\n" for i in range(3))))
    pq.write_table(pa.Table.from_pylist([pair(1), {"prompt": "x", "chosen": "", "rejected": "y"}]), tmp_path / "test.parquet")
    with pytest.raises(DataError, match=r"test:row 1: 'chosen' is empty"):
        load_dataset(str(tmp_path), tok, CFG)
    data = load_dataset(str(tmp_path), tok, build_config({"model": "x", "skip_invalid": True}))
    assert (len(data.train), len(data.valid), len(data.test)) == (6, 3, 1)
    assert data.train[2].source == f"{tmp_path}:train:row 2"
    assert data.valid[0].source == f"{tmp_path / 'validation.jsonl.gz'}:1"
    pairs = load_pairs(str(tmp_path), tok, CFG)
    assert len(pairs.examples) == 3 and pairs.rows[0] == pair(0)


def test_save_to_disk_folder(tmp_path, tok):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([pair(i) for i in range(5)]),
                               "validation": datasets.Dataset.from_list([pair(9)])})
    dd.save_to_disk(str(tmp_path / "saved"))
    data = load_dataset(str(tmp_path / "saved"), tok, CFG)
    assert (len(data.train), len(data.valid)) == (5, 1)
    assert data.valid[0].source == f"{tmp_path / 'saved'}:validation:row 0"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A hand-built hub cache holding dataset ``org/prefs`` (parquet train, jsonl validation), offline."""
    import huggingface_hub.constants as constants
    import pyarrow as pa
    import pyarrow.parquet as pq

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "datasets--org--prefs"
    snap = repo / "snapshots" / commit
    (snap / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    pq.write_table(pa.Table.from_pylist([pair(i) for i in range(12)]), snap / "data" / "train-00000-of-00001.parquet")
    write_jsonl(snap / "data" / "validation.jsonl", [pair(50), pair(51)])
    write_jsonl(snap / "data" / "test.jsonl", [pair(60)])
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snap


def test_hub_dataset_from_the_cache_offline(hub_cache, tok):
    data = load_dataset("org/prefs", tok, CFG)
    assert (len(data.train), len(data.valid), len(data.test)) == (12, 2, 1)
    assert data.train[0].source == "org/prefs:train:row 0"
    assert data.valid[1].source == f"{hub_cache / 'data' / 'validation.jsonl'}:2"
    assert data.source == "org/prefs (hub)"
    # mlx-lm's hf_dataset keys: a sliced train split, the test split as held-out
    cfg = build_config({"model": "x", "hf_dataset": {"path": "org/prefs", "train_split": "train[:5]", "valid_split": "test"}})
    data = load_dataset("ignored", tok, cfg)
    assert (len(data.train), len(data.valid), len(data.test)) == (5, 1, 0)
    assert len(load_pairs("org/prefs", tok, CFG).examples) == 2
    with pytest.raises(DataError, match="org/absent: not in the Hugging Face cache"):
        load_dataset("org/absent", tok, CFG)
    with pytest.raises(DataError, match="no such data file or folder, bundled dataset or Hub dataset id"):
        load_dataset("./nowhere", tok, CFG)


def test_experiment_reads_data_as_train_does(tmp_path, tok):
    """``experiment`` takes any --data source: HH transcripts in .jsonl.gz with a .json valid split here;
    its noisy copy flips exactly the planned pairs and trains through the same loader."""
    from tidpo_mlx import experiment as ex

    folder = tmp_path / "hh"
    folder.mkdir()
    rows = [{"chosen": f"\n\nHuman: What is {i} plus 30?\n\nAssistant: {i + 30}",
             "rejected": f"\n\nHuman: What is {i} plus 30?\n\nAssistant: {i + 31}", "score": i} for i in range(40)]
    (folder / "train.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\r\n" for r in rows).encode()))
    (folder / "valid.json").write_text(json.dumps(rows[:6]), encoding="utf-8")
    plan = ex.make_plan(tmp_path / "out", quick=True, data=str(folder))
    source = ex.source_data(plan)
    counts = ex.noisy_folder(source, tmp_path / "noisy", 0.25, 3, -1)
    assert counts == {"train_pairs": 40, "flipped": 10, "val_pairs": 6}
    flipped = [r for (_, r), orig in zip(read_jsonl(tmp_path / "noisy" / "train.jsonl"), rows) if r != orig]
    assert len(flipped) == 10 and all(r["chosen"].endswith(str(r["score"] + 31)) for r in flipped)
    data = load_dataset(str(tmp_path / "noisy"), tok, CFG)
    assert (len(data.train), len(data.valid)) == (40, 6)

    single = tmp_path / "one.jsonl"
    write_jsonl(single, [pair(i) for i in range(20)])
    with pytest.raises(DataError, match="needs a held-out split"):
        ex.source_data(ex.make_plan(tmp_path / "out2", quick=True, data=str(single)))


def test_hub_dataset_card_configs(hub_cache, tok):
    """A card's ``configs:`` header maps splits as ``datasets`` does (UltraFeedback-binarized style split names):
    without it, ``train_prefs`` and ``train_sft`` would both be taken as train by their file names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, n in (("train_prefs", 7), ("train_sft", 5), ("test_prefs", 3)):
        pq.write_table(pa.Table.from_pylist([pair(100 + i) for i in range(n)]), hub_cache / "data" / f"{name}-00000-of-00001.parquet")
    card = ("---\r\nlicense: mit\r\nconfigs:\r\n- config_name: default\r\n  data_files:\r\n"
            "  - split: train_prefs\r\n    path: data/train_prefs-*\r\n  - split: train_sft\r\n    path: data/train_sft-*\r\n"
            "  - split: test_prefs\r\n    path: data/test_prefs-*\r\n- config_name: small\r\n  data_files: data/validation.jsonl\r\n"
            "---\r\n# Prefs\r\n")
    (hub_cache / "README.md").write_bytes(b"\xef\xbb\xbf" + card.encode())
    with pytest.raises(DataError, match=r"org/prefs: its README's splits are train_prefs, train_sft, test_prefs; "
                                        r"name the one to train on with hf_dataset.train_split"):
        load_dataset("org/prefs", tok, CFG)
    cfg = build_config({"model": "x", "hf_dataset": {"path": "org/prefs", "train_split": "train_prefs", "valid_split": "test_prefs"}})
    data = load_dataset("ignored", tok, cfg)
    assert (len(data.train), len(data.valid)) == (7, 3)
    assert data.valid[0].source == "org/prefs:valid:row 0"
    cfg = build_config({"model": "x", "hf_dataset": {"path": "org/prefs", "config": "small"}})
    data = load_dataset("ignored", tok, cfg)
    assert len(data.train) + len(data.valid) == 2  # one file as train; the held-out split is made from it
    for spec, message in (({"config": "large"}, "no config 'large' in its README \\(has default, small"),
                          ({"train_split": "train_gen"}, "no split 'train_gen' \\(hf_dataset.train_split; it has train_prefs")):
        with pytest.raises(DataError, match=message):
            load_dataset("ignored", tok, build_config({"model": "x", "hf_dataset": {"path": "org/prefs", **spec}}))
    (hub_cache / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files: nothing/*.parquet\n---\n")
    with pytest.raises(DataError, match="split 'train': no file matches nothing/\\*.parquet"):
        load_dataset("org/prefs", tok, CFG)
