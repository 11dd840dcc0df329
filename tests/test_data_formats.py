"""TRL's preference formats, roles, custom templates, long conversations and invalid-row reports."""

from __future__ import annotations

import json

import tidpo_mlx  # noqa: F401

import pytest
from mlx_lm.utils import load_tokenizer

from tidpo_mlx.config import build_config
from tidpo_mlx.data.encoder import PairEncoder
from tidpo_mlx.data.formats import parse_hh
from tidpo_mlx.data.load import load_dataset
from tidpo_mlx.errors import DataError

from conftest import write_jsonl

USER = {"role": "user", "content": "What is 12 plus 30?"}
HH_CHOSEN = "\n\nHuman: What is 12 plus 30?\n\nAssistant: 42.\n\nHuman: And plus 1?\n\nAssistant: 43."
HH_REJECTED = "\n\nHuman: What is 12 plus 30?\n\nAssistant: 42.\n\nHuman: And plus 1?\n\nAssistant: 44."


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(tiny_model)


def encoder(tok, **kw):
    return PairEncoder(tok, build_config({"model": "x", **kw}))


def reference(tok, messages, completion):
    """Prompt and response tokens computed directly with the tokenizer's template."""
    head = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(messages + completion, tokenize=False)
    ids = tok.encode(full, add_special_tokens=False)
    n = len(tok.encode(head, add_special_tokens=False))
    return ids[:n], ids[n:]


def test_implicit_prompt_is_the_common_message_prefix(tok):
    conv = [USER, {"role": "assistant", "content": "42."}, {"role": "user", "content": "And plus 1?"}]
    row = {"chosen": conv + [{"role": "assistant", "content": "43."}],
           "rejected": conv + [{"role": "assistant", "content": "44."}], "score_chosen": 9.0, "id": "x"}
    ex = encoder(tok).encode_row(0, "t:1", row)
    assert ex.messages == conv
    prompt, chosen = reference(tok, conv, [{"role": "assistant", "content": "43."}])
    assert ex.prompt == prompt and ex.chosen == chosen
    assert tok.decode(ex.rejected) == "44.<|im_end|>\n"


def test_hh_transcripts_become_messages_under_the_model_template(tok):
    assert parse_hh(HH_CHOSEN)[:2] == [USER, {"role": "assistant", "content": "42."}]
    ex = encoder(tok).encode_row(0, "t:1", {"chosen": HH_CHOSEN, "rejected": HH_REJECTED})
    assert [m["role"] for m in ex.messages] == ["user", "assistant", "user"]
    assert tok.decode(ex.prompt).endswith("<|im_start|>user\nAnd plus 1?<|im_end|>\n<|im_start|>assistant\n")
    assert "Human:" not in tok.decode(ex.prompt)
    assert tok.decode(ex.chosen) == "43.<|im_end|>\n"


def test_implicit_strings_split_only_without_a_template(tok):
    row = {"chosen": "Q: 12 plus 30? A: 42", "rejected": "Q: 12 plus 30? A: 43"}
    with pytest.raises(DataError, match="chat_template: none.*moves a shared start of both answers"):
        encoder(tok).encode_row(0, "t:2", row)
    ex = encoder(tok, chat_template="none").encode_row(0, "t:2", row)
    assert tok.decode(ex.prompt) == "Q: 12 plus 30? A: 4"
    assert tok.decode(ex.chosen[:-1]) == "2"


@pytest.mark.parametrize("row,message", [
    ({"chosen": [USER, {"role": "assistant", "content": "42"}], "rejected": [USER, {"role": "assistant", "content": "42"}]},
     "identical"),
    ({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]},
     "share no leading messages"),
    ({"chosen": HH_CHOSEN, "rejected": HH_CHOSEN[: -len("43.")]}, "'rejected' is empty"),
    ({"prompt": [{"role": "narrator", "content": "hi"}], "chosen": "a", "rejected": "b"},
     "unknown role 'narrator' (allowed: system, user, assistant, tool)"),
    ({"prompt": "hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "'chosen' must start with an assistant message"),
])
def test_invalid_forms(tok, row, message):
    with pytest.raises(DataError, match=r"^t:3: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        encoder(tok).encode_row(0, "t:3", row)


def test_completion_of_several_messages(tok):
    completion = [{"role": "assistant", "content": "calling calc"}, {"role": "tool", "content": "42"},
                  {"role": "assistant", "content": "It is 42."}]
    row = {"prompt": [USER], "chosen": completion, "rejected": [{"role": "assistant", "content": "43"}]}
    ex = encoder(tok).encode_row(0, "t:1", row)
    prompt, chosen = reference(tok, [USER], completion)
    assert ex.prompt == prompt and ex.chosen == chosen
    assert "<|im_start|>tool\n42<|im_end|>" in tok.decode(ex.chosen)


def test_custom_template_refusing_system_and_tool(tmp_path, tok):
    gemma_like = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}"
    )
    path = tmp_path / "gemma.jinja"
    path.write_text(gemma_like)
    enc = encoder(tok, chat_template=str(path))
    assert enc.chat.roles == ("system", "user", "assistant") and not enc.chat.system_ok
    assert any("system text is merged into the first user turn" in n for n in enc.notes)
    ex = enc.encode_row(0, "t:1", {"system": "Be exact.", "prompt": "What is 12 plus 30?", "chosen": "42", "rejected": "43"})
    assert tok.decode(ex.prompt) == "<start_of_turn>user\nBe exact.\n\nWhat is 12 plus 30?<end_of_turn>\n<start_of_turn>assistant\n"
    with pytest.raises(DataError, match="unknown role 'tool' \\(allowed: system, user, assistant\\)"):
        enc.encode_row(0, "t:2", {"prompt": "q", "chosen": [{"role": "assistant", "content": "a"},
                                                           {"role": "tool", "content": "b"}], "rejected": "c"})
    with pytest.raises(Exception, match="chat_template"):
        build_config({"chat_template": str(tmp_path / "missing.jinja")})


def test_long_conversation_drops_earliest_turns_then_cuts(tok):
    turns = []
    for i in range(8):
        turns += [{"role": "user", "content": f"Question {i}: what is {i} plus 30?"},
                  {"role": "assistant", "content": f"The answer is {i + 30}."}]
    prompt = [{"role": "system", "content": "Be exact."}] + turns + [{"role": "user", "content": "Last: 1 plus 1?"}]
    enc = encoder(tok, max_prompt_length=80, max_length=120)
    ex = enc.encode_row(0, "t:1", {"prompt": prompt, "chosen": "2", "rejected": "3"})
    assert ex.dropped_turns > 0 and ex.dropped_turns % 2 == 0 and len(ex.prompt) <= 80
    assert ex.messages[0]["role"] == "system" and ex.messages[1]["role"] == "user"
    assert ex.messages[-1]["content"] == "Last: 1 plus 1?"
    assert ex.messages[1:] == prompt[1 + ex.dropped_turns:]
    full, chosen = reference(tok, ex.messages, [{"role": "assistant", "content": "2"}])
    assert ex.prompt == full and ex.chosen == chosen
    # a last user turn too long even alone: its content is cut from the left, the system message stays
    long_last = [{"role": "system", "content": "Be exact."}] + turns[:2] + [{"role": "user", "content": "word " * 100 + "end?"}]
    ex = enc.encode_row(0, "t:2", {"prompt": long_last, "chosen": "2", "rejected": "3"})
    assert ex.dropped_turns == 2 and ex.prompt_truncated and len(ex.prompt) == 80
    text = tok.decode(ex.prompt)
    assert "Be exact." in text and text.endswith("end?<|im_end|>\n<|im_start|>assistant\n")


def test_every_invalid_row_is_reported_then_skipped_on_request(tmp_path, tok):
    good = {"prompt": "What is 12 plus 30?", "chosen": "42", "rejected": "43"}
    rows = [good, dict(good, chosen=""), good, dict(good, chosen=" "), {"chosen": "a"}, dict(good, rejected="42")]
    write_jsonl(tmp_path / "train.jsonl", rows * 2)
    (tmp_path / "train.jsonl").write_text((tmp_path / "train.jsonl").read_text() + "{not json\n")
    write_jsonl(tmp_path / "valid.jsonl", [good])
    train = tmp_path / "train.jsonl"
    with pytest.raises(DataError) as err:
        load_dataset(str(tmp_path), tok, build_config({"model": "x"}))
    text = str(err.value)
    assert text.startswith(f"{train}:2: 'chosen' is empty; 9 invalid of 14 rows: ")
    assert f"4 x 'chosen' is empty ({train}:2, {train}:4, {train}:8, ...)" in text
    assert f"2 x missing field 'rejected' ({train}:5, {train}:11)" in text
    assert f"1 x malformed JSON" in text and "--skip-invalid" in text and "the 5 valid rows" in text
    data = load_dataset(str(tmp_path), tok, build_config({"model": "x", "skip_invalid": True}))
    assert len(data.train) == 4 and len(data.valid) == 1 and data.skipped == 9
    assert data.invalid == {"'chosen' is empty": 4, "missing field 'rejected'": 2,
                            "'chosen' and 'rejected' are identical": 2,
                            "malformed JSON (Expecting property name enclosed in double quotes)": 1}
    assert data.summary()["skipped_invalid"] == 9
    assert any(n.startswith("skip_invalid: left out") for n in data.notes)
    assert [e.index for e in data.train] == [0, 1, 2, 3]


def test_defaults_fit_chat_data():
    cfg = build_config({})
    assert (cfg.max_length, cfg.max_prompt_length, cfg.skip_invalid, cfg.valid_fraction) == (1024, 512, False, 0.05)
    assert json.loads(json.dumps(cfg.to_dict()))["hf_dataset"] is None
