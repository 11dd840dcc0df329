"""Tokenisation, response masks, truncation and data errors with a real chat template."""

from __future__ import annotations

import json

import tidpo_mlx  # noqa: F401

import pytest
from mlx_lm.utils import load_tokenizer

from tidpo_mlx.config import build_config
from tidpo_mlx.batching import batch_order, collate
from tidpo_mlx.data.encoder import PairEncoder
from tidpo_mlx.data.load import load_dataset
from tidpo_mlx.errors import DataError
from tidpo_mlx.sources import read_jsonl

from conftest import write_jsonl

PAIR = {"prompt": "What is 12 plus 30?", "chosen": "The answer is 42.", "rejected": "The answer is 43."}


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(tiny_model)


def encoder(tok, **kw):
    return PairEncoder(tok, build_config({"model": "x", **kw}))


def test_response_tokens_are_text_plus_template_closing(tok):
    ex = encoder(tok).encode_row(0, "t:1", PAIR)
    prompt_text = tok.decode(ex.prompt)
    assert prompt_text.endswith("<|im_start|>assistant\n")
    assert "You are a tiny test model." in prompt_text
    assert tok.decode(ex.chosen) == "The answer is 42.<|im_end|>\n"
    full = tok.apply_chat_template(
        [{"role": "user", "content": PAIR["prompt"]}, {"role": "assistant", "content": PAIR["chosen"]}],
        tokenize=False,
    )
    assert ex.prompt + ex.chosen == tok.encode(full, add_special_tokens=False)


def test_conversational_form_and_system(tok):
    row = {
        "system": "Be exact.",
        "prompt": [{"role": "user", "content": "What is 12 plus 30?"}],
        "chosen": [{"role": "assistant", "content": "42"}],
        "rejected": [{"role": "assistant", "content": "43"}],
    }
    ex = encoder(tok).encode_row(0, "t:1", row)
    assert tok.decode(ex.prompt).startswith("<|im_start|>system\nBe exact.<|im_end|>")
    assert tok.decode(ex.rejected) == "43<|im_end|>\n"


def test_collate_masks(tok):
    ex = [encoder(tok).encode_row(i, f"t:{i}", PAIR) for i in range(2)]
    b = collate(ex, pad_id=0, anchors=[ex[0].chosen, ex[1].rejected]).arrays
    assert b["tokens"].shape[0] == 6 and b["tokens"].shape[1] % 8 == 0
    for i in range(6):
        n = int(b["resp_mask"][i].sum())
        p = len(ex[0].prompt)
        assert list(b["resp_pos"][i, :n]) == list(range(p, p + n))
        assert b["resp_span"][i].sum() == n and b["seq_mask"][i].sum() == p + n
        assert b["last"][i] == p + n - 1
        assert b["tokens"][i, p + n:].sum() == 0


def test_truncation_keeps_template_tokens(tok):
    long_prompt = "word " * 200 + "What is 12 plus 30?"
    long_answer = "The answer is " + "very " * 200 + "42."
    enc = encoder(tok, max_prompt_length=64, max_length=90)
    ex = enc.encode_row(0, "t:1", {"prompt": long_prompt, "chosen": long_answer, "rejected": "43"})
    assert ex.prompt_truncated and ex.responses_truncated == 1
    assert len(ex.prompt) == 64 and len(ex.prompt) + len(ex.chosen) == 90
    text = tok.decode(ex.prompt)
    assert text.startswith("<|im_start|>system\nYou are a tiny test model.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("What is 12 plus 30?<|im_end|>\n<|im_start|>assistant\n")
    chosen = tok.decode(ex.chosen)
    assert chosen.startswith("The answer is") and chosen.endswith("<|im_end|>\n")
    assert tok.decode(ex.rejected) == "43<|im_end|>\n"


def test_response_empty_after_truncation_is_an_error(tok):
    enc = encoder(tok, max_prompt_length=60, max_length=62)
    with pytest.raises(DataError, match=r"t:7: 'chosen' is empty after truncation"):
        enc.encode_row(0, "t:7", {"prompt": "What is 12 plus 30? " * 5, "chosen": "The answer is 42.", "rejected": "43"})
    with pytest.raises(DataError, match=r"t:8: the prompt's template tokens alone exceed max_prompt_length"):
        encoder(tok, max_prompt_length=30).encode_row(0, "t:8", PAIR)


def test_chat_template_none(tok):
    ex = encoder(tok, chat_template="none").encode_row(0, "t:1", PAIR)
    assert tok.decode(ex.prompt) == PAIR["prompt"]
    assert ex.chosen[-1] == tok.eos_token_id
    assert tok.decode(ex.chosen[:-1]) == PAIR["chosen"]


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "a", "chosen": "b"', "malformed JSON"),
    ('{"prompt": "a", "chosen": "b"}', "missing field 'rejected'"),
    ('{"chosen": "b", "rejected": "c"}', "missing field 'prompt'"),
    ('{"prompt": " ", "chosen": "b", "rejected": "c"}', "'prompt' is empty"),
    ('{"prompt": "a", "chosen": "", "rejected": "c"}', "'chosen' is empty"),
    ('{"prompt": "a", "chosen": "same", "rejected": "same"}', "identical"),
    ('{"prompt": "a", "chosen": 3, "rejected": "c"}', "'chosen' must be a string"),
    ('[1, 2]', "must be a JSON object"),
])
def test_bad_rows_name_file_and_line(tmp_path, tok, line, message):
    good = json.dumps(PAIR)
    write_jsonl(tmp_path / "valid.jsonl", [PAIR])
    (tmp_path / "train.jsonl").write_text(good + "\n\n" + line + "\n")
    with pytest.raises(DataError) as err:
        load_dataset(str(tmp_path), tok, build_config({"model": "x"}))
    assert str(err.value).startswith(f"{tmp_path / 'train.jsonl'}:3: ")
    assert message in str(err.value)


def test_missing_split_and_folder(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", [PAIR])
    with pytest.raises(DataError, match="too few distinct prompts"):
        load_dataset(str(tmp_path), tok, build_config({"model": "x"}))
    with pytest.raises(DataError, match="no such data file or folder"):
        load_dataset(str(tmp_path / "nope"), tok, build_config({"model": "x"}))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no pairs"):
        read_jsonl(tmp_path / "empty.jsonl")


def test_prefix_mismatch_is_an_error(tmp_path, tok):
    # a template that renders the generation prompt differently from the conversation
    original = tok._tokenizer.chat_template
    tok._tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant said:\n{% endif %}"
    )
    try:
        with pytest.raises(DataError, match="not a token prefix"):
            encoder(tok).encode_row(0, "t:4", PAIR)
    finally:
        tok._tokenizer.chat_template = original


def test_length_bucketed_batches_are_deterministic(tok):
    enc = encoder(tok)
    rows = [dict(PAIR, chosen="x " * (i % 7 + 1) + "42") for i in range(20)]
    ex = [enc.encode_row(i, f"t:{i}", r) for i, r in enumerate(rows)]
    a = batch_order(ex, 4, seed=1, epoch=0)
    assert a == batch_order(ex, 4, seed=1, epoch=0)
    assert a != batch_order(ex, 4, seed=1, epoch=1)
    for batch in a:
        lengths = [ex[i].length for i in batch]
        assert max(lengths) - min(lengths) <= 2


def test_eval_subset_spreads_over_the_split():
    from tidpo_mlx.batching import eval_batches
    from tidpo_mlx.data.example import Example

    examples = [Example(index=i, source=f"v:{i}", messages=[], prompt=[1] * (i % 7 + 1), chosen=[2], rejected=[3, 3])
                for i in range(40)]
    assert sum(len(b) for b in eval_batches(examples, 4)) == 40
    subset = eval_batches(examples, 4, limit=3)
    picked = sorted(e.index for b in subset for e in b)
    assert len(picked) == 12 and picked[0] == 0 and picked[-1] == 39
    assert all(b - a in (3, 4) for a, b in zip(picked, picked[1:]))
    lengths = [e.length for b in subset for e in b]
    assert lengths == sorted(lengths)


def _messy_rows(n: int) -> list[dict]:
    """Multi-turn rows with edge whitespace, CRLF and long prompts (some cut by max_prompt_length)."""
    rows = []
    for i in range(n):
        turns = []
        for t in range(i % 4):
            turns += [{"role": "user", "content": f"turn {t} of row {i}:" + " words" * (i % 9)},
                      {"role": "assistant", "content": "ok  \r\n" if t % 2 else " sure"}]
        prompt = turns + [{"role": "user", "content": "\nlast question " * (1 + i % 30) + ("  " if i % 5 else "")}]
        rows.append({"prompt": prompt,
                     "chosen": [{"role": "assistant", "content": f"\n\nanswer {i}" + " yes" * (i % 13)}],
                     "rejected": [{"role": "assistant", "content": f" no {i}\r\n" * (1 + i % 3)}]})
    return rows


def test_batched_encoding_equals_the_tokenizers_own_calls(tmp_path, tok):
    """encode_rows (batched, prompts read off the conversations' tokens, worker processes) gives the ids
    that transformers' apply_chat_template + tokenizer give text by text, and the same in 1 or 2 processes."""
    from tidpo_mlx.data.workers import encode_rows, processes
    from tidpo_mlx.sources import SplitRows

    rows = SplitRows([(f"f.jsonl:{i + 1}", r) for i, r in enumerate(_messy_rows(1100))], [])
    one, bad = encode_rows(encoder(tok, max_prompt_length=320, max_length=480, dataset_num_proc=1), rows)
    enc = encoder(tok, max_prompt_length=320, max_length=480, dataset_num_proc=2)
    with processes(enc, len(rows.rows)) as pool:
        assert pool is not None
        two, bad2 = encode_rows(enc, rows, pool)
    assert [(e.prompt, e.chosen, e.rejected, e.source) for e in one] == \
        [(e.prompt, e.chosen, e.rejected, e.source) for e in two]
    assert bad == bad2
    assert len(one) + len(bad) == 1100
    kept = [e for e in one if not e.prompt_truncated and not e.dropped_turns and not e.responses_truncated]
    assert 100 < len(kept) < len(one), "the fixture exercises both whole and cut pairs"
    hf = tok._tokenizer
    for ex in kept[::7]:
        row = rows.rows[int(ex.source.rsplit(":", 1)[1]) - 1][1]
        prompt = hf.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        assert ex.prompt == hf(prompt, add_special_tokens=False)["input_ids"]
        for key in ("chosen", "rejected"):
            full = hf.apply_chat_template(row["prompt"] + row[key], tokenize=False)
            assert ex.prompt + getattr(ex, key) == hf(full, add_special_tokens=False)["input_ids"]
