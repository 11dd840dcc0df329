"""Multi-turn chat preference pairs of a chosen length, for the benchmarks (no download).

    python benchmarks/chat_data.py OUT --tokens 512 [--shape chat|real] [--pairs 400] [--seed 0]

Writes ``OUT/train.jsonl`` and ``OUT/valid.jsonl`` in TRL's conversational
explicit-prompt form (``prompt`` a message list of earlier user/assistant
turns ending with a user turn, ``chosen``/``rejected`` one assistant message
each) whose templated sequences are spread around ``--tokens`` tokens
(+-30 %). Two shapes:

- ``chat``: about a quarter of a sequence is the answer, chosen and rejected
  of similar length (0.6-1.1), the rest earlier turns.
- ``real``: shaped like public chat preference sets (HH-RLHF in TRL's form):
  the prompt holds most of the sequence, each response is 10-200 tokens
  (log-uniform), and chosen / rejected length ratios spread log-uniformly over
  0.25-4 (:data:`REAL`).
 The words are common English words, so with the
built-in SmolLM2 tokenizer a word is about one token. The helpers also make the
Anthropic-HH-like transcripts of ``encode_speed.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from dataclasses import dataclass
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


@dataclass(frozen=True)
class RealShape:
    """Distributions of the ``real`` preset: response lengths and the chosen / rejected length ratio."""

    response_min: int = 10
    response_max: int = 200
    ratio_min: float = 0.25
    ratio_max: float = 4.0


REAL = RealShape()


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
    prompt = _turns(rng, total - answer)
    chosen = text(rng, answer - TEMPLATE_TOKENS)
    rejected = text(rng, max(2, int((answer - TEMPLATE_TOKENS) * rng.uniform(0.6, 1.1))))
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def _log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def _turns(rng: random.Random, prompt_words: int) -> list[dict[str, str]]:
    """Earlier user/assistant turns ending with a user turn, about ``prompt_words`` tokens in all."""
    prompt: list[dict[str, str]] = []
    while True:
        user = min(prompt_words, rng.randint(12, 60))
        prompt_words -= user + TEMPLATE_TOKENS
        if prompt_words < 24:
            prompt.append({"role": "user", "content": text(rng, user + max(0, prompt_words))})
            return prompt
        reply = min(prompt_words, rng.randint(20, 160))
        prompt += [{"role": "user", "content": text(rng, user)}, {"role": "assistant", "content": text(rng, reply)}]
        prompt_words -= reply + TEMPLATE_TOKENS


def real_row(rng: random.Random, tokens: int, shape: RealShape = REAL) -> dict[str, Any]:
    """One pair of the ``real`` shape: a long multi-turn prompt, two short responses of unequal length.

    The chosen response's length is log-uniform over the shape's range, the rejected one's is the chosen
    one's divided by a log-uniform ratio (clipped to the range); the prompt fills the rest of a sequence
    of about ``tokens`` (+-30 %) tokens.
    """
    total = max(48, int(tokens * rng.uniform(0.7, 1.3)))
    chosen = int(_log_uniform(rng, shape.response_min, shape.response_max))
    ratio = _log_uniform(rng, shape.ratio_min, shape.ratio_max)
    rejected = int(min(max(chosen / ratio, shape.response_min), shape.response_max))
    prompt = _turns(rng, max(24, total - (chosen + rejected) // 2))
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": text(rng, chosen - TEMPLATE_TOKENS)}],
            "rejected": [{"role": "assistant", "content": text(rng, rejected - TEMPLATE_TOKENS)}]}


def hh_row(rng: random.Random) -> dict[str, Any]:
    """One Anthropic-HH-like pair (implicit prompt): 0-2 earlier exchanges, a last human turn, two answers."""
    turns: list[tuple[str, str]] = []
    for _ in range(rng.choice((0, 0, 1, 1, 2))):
        turns += [("Human", sentence(rng, 6, 30)), ("Assistant", sentence(rng, 10, 50))]
    turns.append(("Human", sentence(rng, 6, 36)))

    def transcript(last: str) -> str:
        return "".join(f"\n\n{who}: {said}" for who, said in turns + [("Assistant", last)])

    return {"chosen": transcript(sentence(rng, 12, 100)), "rejected": transcript(sentence(rng, 8, 80))}


SHAPES = {"chat": chat_row, "real": real_row}
"""The presets, by name."""


def chat_rows(n: int, tokens: int, seed: int = 0, shape: str = "chat") -> list[dict[str, Any]]:
    """``n`` conversational pairs of about ``tokens`` tokens per templated sequence, of the named shape."""
    rng = random.Random(seed)
    return [SHAPES[shape](rng, tokens) for _ in range(n)]


def write_chat_data(folder: Path, tokens: int, pairs: int = 400, seed: int = 0, shape: str = "chat") -> None:
    """``train.jsonl`` of ``pairs`` chat pairs and ``valid.jsonl`` of 8 more."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = chat_rows(pairs + 8, tokens, seed, shape)
    for name, part in (("train", rows[:pairs]), ("valid", rows[pairs:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokens", type=int, required=True, help="target tokens per templated sequence")
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="chat", help="the preset (module docstring)")
    args = parser.parse_args()
    write_chat_data(args.out, args.tokens, args.pairs, args.seed, args.shape)
    print(f"wrote {args.pairs} + 8 {args.shape} pairs of about {args.tokens} tokens to {args.out}")


if __name__ == "__main__":
    main()
