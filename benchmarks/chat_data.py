"""Multi-turn chat preference pairs of a chosen length, for the benchmarks (no download).

    python benchmarks/chat_data.py OUT --tokens 512 [--pairs 400] [--seed 0]

Writes ``OUT/train.jsonl`` and ``OUT/valid.jsonl`` in TRL's conversational
explicit-prompt form (``prompt`` a message list of earlier user/assistant
turns ending with a user turn, ``chosen``/``rejected`` one assistant message
each) whose templated sequences are spread around ``--tokens`` tokens
(+-30 %): about a quarter of a sequence is the answer, the rest earlier turns,
as in long public chat sets. The words are common English words, so with the
built-in SmolLM2 tokenizer a word is about one token. The helpers also make the
Anthropic-HH-like transcripts of ``encode_speed.py``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this from "
         "or had by hot word but what some we can out other were all there when up use your how said an "
         "each she which do their time if will way about many then them write would like so these her long "
         "make thing see him two has look more day could go come did number sound no most people my over "
         "know water than call first who may down side been now find any new work part take get place made "
         "live where after back little only round man year came show every good me give our under name very "
         "through just form sentence great think say help low line differ turn cause much mean before move "
         "right boy old too same tell does set three want air well also play small end put home read hand").split()

TEMPLATE_TOKENS = 5
"""Template tokens per message (role header and end marker), roughly, for ChatML-style templates."""


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    """A random sentence of ``lo``..``hi`` words."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    return " ".join(words).capitalize() + rng.choice((".", "?", "!", "."))


def text(rng: random.Random, words: int) -> str:
    """Sentences of about ``words`` words in all."""
    out: list[str] = []
    while words > 0:
        n = min(words, rng.randint(6, 24))
        out.append(sentence(rng, n, n))
        words -= n
    return " ".join(out)


def chat_row(rng: random.Random, tokens: int) -> dict[str, Any]:
    """One conversational pair whose templated sequences are about ``tokens`` (+-30 %) tokens long."""
    total = max(16, int(tokens * rng.uniform(0.7, 1.3)))
    answer = max(4, total // 4)
    prompt_words = total - answer
    prompt: list[dict[str, str]] = []
    while True:
        user = min(prompt_words, rng.randint(12, 60))
        prompt_words -= user + TEMPLATE_TOKENS
        if prompt_words < 24:
            prompt.append({"role": "user", "content": text(rng, user + max(0, prompt_words))})
            break
        reply = min(prompt_words, rng.randint(20, 160))
        prompt += [{"role": "user", "content": text(rng, user)}, {"role": "assistant", "content": text(rng, reply)}]
        prompt_words -= reply + TEMPLATE_TOKENS
    chosen = text(rng, answer - TEMPLATE_TOKENS)
    rejected = text(rng, max(2, int((answer - TEMPLATE_TOKENS) * rng.uniform(0.6, 1.1))))
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def hh_row(rng: random.Random) -> dict[str, Any]:
    """One Anthropic-HH-like pair (implicit prompt): 0-2 earlier exchanges, a last human turn, two answers."""
    turns: list[tuple[str, str]] = []
    for _ in range(rng.choice((0, 0, 1, 1, 2))):
        turns += [("Human", sentence(rng, 6, 30)), ("Assistant", sentence(rng, 10, 50))]
    turns.append(("Human", sentence(rng, 6, 36)))

    def transcript(last: str) -> str:
        return "".join(f"\n\n{who}: {said}" for who, said in turns + [("Assistant", last)])

    return {"chosen": transcript(sentence(rng, 12, 100)), "rejected": transcript(sentence(rng, 8, 80))}


def chat_rows(n: int, tokens: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` conversational pairs of about ``tokens`` tokens per templated sequence."""
    rng = random.Random(seed)
    return [chat_row(rng, tokens) for _ in range(n)]


def write_chat_data(folder: Path, tokens: int, pairs: int = 400, seed: int = 0) -> None:
    """``train.jsonl`` of ``pairs`` chat pairs and ``valid.jsonl`` of 8 more."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = chat_rows(pairs + 8, tokens, seed)
    for name, part in (("train", rows[:pairs]), ("valid", rows[pairs:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokens", type=int, required=True, help="target tokens per templated sequence")
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_chat_data(args.out, args.tokens, args.pairs, args.seed)
    print(f"wrote {args.pairs} + 8 pairs of about {args.tokens} tokens to {args.out}")


if __name__ == "__main__":
    main()
