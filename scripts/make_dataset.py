#!/usr/bin/env python3
"""Generate the bundled ``arith`` preference dataset (``tidpo_mlx/datasets/arith``).

Six families of short arithmetic / unit / calendar problems. In every pair the
chosen and the rejected response share their wording and differ in a few
decisive tokens: the chosen one is correct (checked below by an independent
computation), the rejected one makes the family's one systematic mistake:

  carry    two-digit addition written out by column; rejected drops the carry
  change   price x quantity, then change from a note; rejected drops the borrow
  units    unit conversion stating the factor; rejected uses a fixed wrong factor
  weekday  weekday N days ahead; rejected is off by one (counts today as day 1)
  month    date N days after a date near a month's end; rejected swaps the
           month's length (30 <-> 31 days)
  clock    clock time after a duration; rejected drops the carry from minutes
           into hours

Each line is TRL's standard preference form plus a TI-DPO triplet anchor:
``{"prompt", "chosen", "rejected", "anchor"}``; ``anchor`` is one response
sampled from the base model (the built-in SmolLM2-135M-Instruct) with the
released TI-DPO sampler (temperature 0.8, top-p 0.95, top-k 50, at most 64 new
tokens), seeded. The script then prints the base model's policy preference
accuracy per family (summed log-prob of the chosen response tokens after the
chat template strictly above the rejected one's).

    python scripts/make_dataset.py                    # everything (~26 min, shared 2-core CPU)
    python scripts/make_dataset.py --anchors keep     # reuse existing anchors
    python scripts/make_dataset.py --anchors skip --score-splits valid
"""

from __future__ import annotations

import argparse
import calendar
import datetime as dt
import json
import random
import re
import sys
import time
from fractions import Fraction
from pathlib import Path

import tidpo_mlx

tidpo_mlx.setup()  # before mlx is imported: the fast BLAS takes effect only then

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tidpo_mlx" / "datasets" / "arith"
SPLITS = {"train": 100, "valid": 25, "test": 25}  # pairs per family and split
SAMPLER = {"temp": 0.8, "top_p": 0.95, "top_k": 50}
MAX_ANCHOR_TOKENS = 64

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = list(calendar.month_name)[1:]

# --------------------------------------------------------------------------- #
# Independent checks
# --------------------------------------------------------------------------- #

_EQ = re.compile(r"(\d+(?: [+\-×] \d+)+) = (\d+)(?!:)")


def check_equations(text: str) -> int:
    """Every ``a op b [op c] = d`` in ``text`` holds; returns how many there were."""
    n = 0
    for lhs, rhs in _EQ.findall(text):
        tok = lhs.split(" ")
        val = int(tok[0])
        for op, x in zip(tok[1::2], tok[2::2]):
            val = {"+": val + int(x), "-": val - int(x), "×": val * int(x)}[op]
        assert val == int(rhs), (text, lhs, rhs)
        n += 1
    return n


# SI magnitude of each unit (independent of the conversion table below).
_SI = {
    "km": Fraction(1000),
    "m": Fraction(1),
    "cm": Fraction(1, 100),
    "mm": Fraction(1, 1000),
    "kg": Fraction(1000),
    "g": Fraction(1),
    "liters": Fraction(1),
    "mL": Fraction(1, 1000),
    "weeks": Fraction(604800),
    "days": Fraction(86400),
    "hours": Fraction(3600),
    "minutes": Fraction(60),
    "seconds": Fraction(1),
    "feet": Fraction(3048, 10000),
    "inches": Fraction(254, 10000),
    "yards": Fraction(9144, 10000),
    "miles": Fraction(1609344, 1000),
    "pounds": Fraction(45359237, 100000000),
    "ounces": Fraction(45359237, 1600000000),
    "gallons": Fraction(3785411784, 1000000000),
    "quarts": Fraction(946352946, 1000000000),
}

# --------------------------------------------------------------------------- #
# Families: each returns (key, prompt, chosen, rejected); key identifies the
# underlying problem, so no problem appears twice across the splits.
# --------------------------------------------------------------------------- #


def fam_carry(r: random.Random):
    while True:
        a, b = r.randint(11, 88), r.randint(11, 88)
        if a % 10 + b % 10 >= 10 and a + b < 100:
            break
    ones, tens = a % 10 + b % 10, a // 10 + b // 10
    res = f"{ones - 10 + (tens + 1) * 10}"
    wrong = f"{ones - 10 + tens * 10}"
    head = f"{a % 10} + {b % 10} = {ones}, carry 1; "
    chosen = head + f"{a // 10} + {b // 10} + 1 = {tens + 1}, so {res}."
    rejected = head + f"{a // 10} + {b // 10} = {tens}, so {wrong}."
    assert check_equations(chosen) == 2 and int(res) == a + b and int(wrong) != a + b
    return (min(a, b), max(a, b)), f"What is {a} + {b}?", chosen, rejected


_ITEMS = ["books", "pens", "cups", "hats", "maps", "mugs", "kites", "socks"]


def fam_change(r: random.Random):
    while True:
        n, k, pay = r.randint(2, 9), r.randint(3, 29), r.choice([20, 50, 100])
        cost = n * k
        if cost < pay and cost % 10 != 0:
            break
    items = r.choice(_ITEMS)
    # pay is a multiple of 10 and cost is not: the ones column always borrows;
    # the mistake keeps the tens digit as if nothing had been borrowed.
    ch_ones = 10 - cost % 10
    ch = ((pay // 10) - 1 - (cost // 10)) * 10 + ch_ones
    wrong = ch + 10
    prompt = f"{n} {items} cost ${k} each. What is the change from ${pay}?"
    chosen = f"{n} × {k} = {cost}, and {pay} - {cost} = {ch}."
    rejected = f"{n} × {k} = {cost}, and {pay} - {cost} = {wrong}."
    assert (
        check_equations(chosen) == 2 and Fraction(pay) - n * Fraction(k) == ch != wrong
    )
    return (n, k, pay), prompt, chosen, rejected


# (from, to, factor, systematic wrong factor)
_UNITS = [
    ("km", "m", 1000, 100),
    ("m", "cm", 100, 10),
    ("cm", "mm", 10, 100),
    ("kg", "g", 1000, 100),
    ("liters", "mL", 1000, 100),
    ("weeks", "days", 7, 5),
    ("days", "hours", 24, 12),
    ("hours", "minutes", 60, 100),
    ("minutes", "seconds", 60, 100),
    ("feet", "inches", 12, 10),
    ("yards", "feet", 3, 10),
    ("pounds", "ounces", 16, 10),
    ("gallons", "quarts", 4, 10),
]
_SINGULAR = {
    "weeks": "week",
    "days": "day",
    "hours": "hour",
    "minutes": "minute",
    "feet": "foot",
    "yards": "yard",
    "pounds": "pound",
    "gallons": "gallon",
    "liters": "liter",
}


def fam_units(r: random.Random):
    src, dst, f, wf = r.choice(_UNITS)
    x = r.randint(2, 39)
    one = _SINGULAR.get(src, src)
    prompt = f"Convert {x} {src} to {dst}."
    chosen = f"1 {one} = {f} {dst}, so {x} {src} = {x * f} {dst}."
    rejected = f"1 {one} = {wf} {dst}, so {x} {src} = {x * wf} {dst}."
    assert _SI[src] / _SI[dst] == f and x * _SI[src] / _SI[dst] == x * f != x * wf
    return (src, dst, x), prompt, chosen, rejected


def fam_weekday(r: random.Random):
    while True:
        d, n = r.randrange(7), r.randint(8, 60)
        if n % 7 >= 2:  # a remainder of 1 would make the rejected day today
            break
    w, q = divmod(n, 7)
    right, wrong = DAYS[(d + q) % 7], DAYS[(d + q - 1) % 7]
    prompt = f"Today is {DAYS[d]}. What day is it in {n} days?"
    weeks = f"{w} week{'s' if w > 1 else ''}"
    head = f"{n} days is {weeks} and {q} day{'s' if q > 1 else ''}. {DAYS[d]} + {q} = "
    # independent: 2024-01-01 was a Monday
    ref = dt.date(2024, 1, 1) + dt.timedelta(days=d)
    assert ref.strftime("%A") == DAYS[d]
    assert (ref + dt.timedelta(days=n)).strftime("%A") == right != wrong
    return (d, n), prompt, head + f"{right}.", head + f"{wrong}."


def fam_month(r: random.Random):
    while True:
        mo = r.randrange(12)  # not February: its length depends on the year
        mlen = 30 if MONTHS[mo] in ("April", "June", "September", "November") else 31
        day = r.randint(mlen - 8, mlen)
        n = r.randint(mlen - day + 1, mlen - day + 12)
        if mo != 1 and day + n - (61 - mlen) >= 1:
            break
    nxt = MONTHS[(mo + 1) % 12]
    right, wrong_len = day + n - mlen, 61 - mlen
    wrong = day + n - wrong_len
    prompt = f"What date is {n} days after {MONTHS[mo]} {day}?"
    chosen = f"{MONTHS[mo]} has {mlen} days, so it is {nxt} {right}."
    rejected = f"{MONTHS[mo]} has {wrong_len} days, so it is {nxt} {wrong}."
    ref = dt.date(2023, mo + 1, day) + dt.timedelta(days=n)  # any non-leap year
    assert calendar.monthrange(2023, mo + 1)[1] == mlen
    assert (
        (ref.strftime("%B"), ref.day) == (nxt, right) and wrong != right and wrong >= 1
    )
    return (mo, day, n), prompt, chosen, rejected


def fam_clock(r: random.Random):
    while True:
        h, m, dh, dm = (
            r.randint(1, 9),
            r.randint(10, 59),
            r.randint(1, 2),
            r.randint(10, 59),
        )
        if m + dm >= 60 and h + dh + 1 <= 12:
            break
    em, eh = m + dm - 60, h + dh + 1
    prompt = f"What time is it {dh} h {dm} min after {h}:{m:02d}?"
    head = f"{h}:{m:02d} + {dh}:{dm:02d} = "
    chosen = head + f"{eh}:{em:02d}."
    rejected = head + f"{eh - 1}:{em:02d}."
    t = dt.datetime(2024, 1, 1, h, m) + dt.timedelta(hours=dh, minutes=dm)
    assert (t.hour, t.minute) == (eh, em) and t.day == 1
    return (h, m, dh, dm), prompt, chosen, rejected


FAMILIES = {
    "carry": fam_carry,
    "change": fam_change,
    "units": fam_units,
    "weekday": fam_weekday,
    "month": fam_month,
    "clock": fam_clock,
}


def build(seed: int) -> dict[str, list[dict]]:
    """Pairs per split, each with its family; deterministic in ``seed``."""
    per_fam = sum(SPLITS.values())
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    prompts: set[str] = set()
    for fname, fn in FAMILIES.items():
        r = random.Random(f"arith-{seed}-{fname}")
        keys, rows = set(), []
        tries = 0
        while len(rows) < per_fam:
            tries += 1
            assert tries < 100 * per_fam, f"family {fname}: too few distinct problems"
            key, prompt, chosen, rejected = fn(r)
            if key in keys or prompt in prompts:
                continue
            assert chosen != rejected
            keys.add(key)
            prompts.add(prompt)
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "family": fname,
                }
            )
        i = 0
        for split, n in SPLITS.items():
            out[split] += rows[i : i + n]
            i += n
    for split, rows in out.items():
        random.Random(f"arith-{seed}-order-{split}").shuffle(rows)
    return out


# --------------------------------------------------------------------------- #
# Model: templating, scoring, anchors
# --------------------------------------------------------------------------- #


def load_model(path: str | None):
    """The built-in SmolLM2 (or a model folder / .gguf), dequantized to float32 on the CPU."""
    from tidpo_mlx.models import load_base, resolve_model

    model, tok, _ = load_base(resolve_model(path or "smollm2-135m-instruct"))
    model.eval()
    return model, tok


def prompt_ids(tok, prompt: str) -> list[int]:
    return list(
        tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True
        )
    )


def pair_ids(tok, prompt: str, response: str) -> tuple[list[int], int]:
    """(templated conversation, length of the templated prompt)."""
    p = prompt_ids(tok, prompt)
    full = list(
        tok.apply_chat_template(
            [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": response},
            ]
        )
    )
    if full[: len(p)] != p:
        raise ValueError(
            f"templated prompt is not a prefix of the conversation: {prompt!r}"
        )
    return full, len(p)


def response_logps(model, tok, items: list[tuple[str, str]], batch_size: int = 16):
    """Summed log-prob of the response tokens of each (prompt, response)."""
    import mlx.core as mx
    import numpy as np

    seqs = [pair_ids(tok, p, r) for p, r in items]
    order = np.argsort([len(s) for s, _ in seqs], kind="stable")
    out = np.zeros(len(seqs))
    for b in range(0, len(seqs), batch_size):
        idx = order[b : b + batch_size]
        width = max(len(seqs[i][0]) for i in idx)
        x = np.zeros((len(idx), width), np.int32)
        mask = np.zeros((len(idx), width), np.float32)
        for j, i in enumerate(idx):
            s, plen = seqs[i]
            x[j, : len(s)] = s
            mask[j, plen : len(s)] = (
                1.0  # right padding: causal attention never sees it
            )
        x = mx.array(x)
        logits = model(x[:, :-1]).astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tgt = mx.take_along_axis(logp, x[:, 1:, None], axis=-1)[..., 0]
        out[idx] = np.array((tgt * mx.array(mask[:, 1:])).sum(axis=-1))
    return out, seqs


def sample_anchors(model, tok, prompts: list[str], seed: int, batch_size: int = 128):
    import mlx.core as mx
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    mx.random.seed(seed)
    sampler = make_sampler(**SAMPLER)
    eot = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>",)] + list(
        tok.eos_token_ids
    )
    out = []
    for b in range(0, len(prompts), batch_size):
        chunk = prompts[b : b + batch_size]
        res = batch_generate(
            model,
            tok,
            [prompt_ids(tok, p) for p in chunk],
            max_tokens=MAX_ANCHOR_TOKENS,
            sampler=sampler,
            return_token_ids=True,
            completion_batch_size=batch_size,
            prefill_batch_size=batch_size,
        )
        for ids in res.token_ids:
            while ids and ids[-1] in eot:
                ids = ids[:-1]
            out.append(tok.decode(ids).replace("<|im_end|>", "").strip())
        print(f"  anchors {len(out)}/{len(prompts)}", file=sys.stderr, flush=True)
    return out


# --------------------------------------------------------------------------- #


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--model",
        default=None,
        help="MLX model folder (default: the built-in SmolLM2-135M-Instruct)",
    )
    ap.add_argument(
        "--anchors",
        choices=["sample", "keep", "skip"],
        default="sample",
        help="sample anchors anew (default), keep those already in --out "
        "(sampling only missing ones), or skip (no anchor field)",
    )
    ap.add_argument(
        "--score-splits",
        default="valid,test",
        help="splits whose base preference accuracy is printed ('' for none)",
    )
    ap.add_argument("--batch-size", type=int, default=16, help="scoring batch size")
    args = ap.parse_args(argv)
    t_start = time.time()

    data = build(args.seed)
    for split, rows in data.items():
        print(f"{split}: {len(rows)} pairs")

    score_splits = [s for s in args.score_splits.split(",") if s]
    need_model = bool(score_splits) or args.anchors != "skip"
    model = tok = None
    if need_model:
        t0 = time.time()
        model, tok = load_model(args.model)
        print(f"model loaded in {time.time() - t0:.1f}s")

    if args.anchors != "skip":
        old = {}
        if args.anchors == "keep":
            for split in data:
                f = args.out / f"{split}.jsonl"
                if f.exists():
                    for line in f.read_text().splitlines():
                        row = json.loads(line)
                        if "anchor" in row:
                            old[row["prompt"]] = row["anchor"]
        todo = [
            row["prompt"]
            for split in SPLITS
            for row in data[split]
            if row["prompt"] not in old
        ]
        if todo:
            t0 = time.time()
            new = sample_anchors(model, tok, todo, args.seed)
            print(f"sampled {len(todo)} anchors in {time.time() - t0:.1f}s")
            old.update(zip(todo, new))
        for rows in data.values():
            for row in rows:
                row["anchor"] = old[row["prompt"]]

    args.out.mkdir(parents=True, exist_ok=True)
    keys = ["prompt", "chosen", "rejected"] + (
        ["anchor"] if args.anchors != "skip" else []
    )
    for split, rows in data.items():
        with open(args.out / f"{split}.jsonl", "w") as fh:
            for row in rows:
                fh.write(
                    json.dumps({k: row[k] for k in keys}, ensure_ascii=False) + "\n"
                )
    print(f"wrote {args.out}")

    if tok is not None:
        import numpy as np

        lens = [
            len(pair_ids(tok, row["prompt"], row[k])[0])
            for rows in data.values()
            for row in rows
            for k in ("chosen", "rejected")
        ]
        rlens = [
            len(pair_ids(tok, row["prompt"], row[k])[0])
            - len(prompt_ids(tok, row["prompt"]))
            for rows in data.values()
            for row in rows
            for k in ("chosen", "rejected")
        ]
        print(
            f"templated length: mean {np.mean(lens):.1f} max {max(lens)} | "
            f"response tokens: mean {np.mean(rlens):.1f} max {max(rlens)} | "
            f"total tokens (chosen+rejected, all splits) {sum(lens)}"
        )
        if args.anchors != "skip":
            alens = [
                len(tok.encode(row["anchor"])) for rows in data.values() for row in rows
            ]
            print(f"anchor tokens: mean {np.mean(alens):.1f} max {max(alens)}")

    for split in score_splits:
        import numpy as np

        rows = data[split]
        t0 = time.time()
        lp, _ = response_logps(
            model,
            tok,
            [(r["prompt"], r["chosen"]) for r in rows]
            + [(r["prompt"], r["rejected"]) for r in rows],
            args.batch_size,
        )
        win = lp[: len(rows)] > lp[len(rows) :]
        margin = lp[: len(rows)] - lp[len(rows) :]
        print(f"base policy preference accuracy on {split} ({time.time() - t0:.0f}s):")
        for fname in FAMILIES:
            sel = np.array([r["family"] == fname for r in rows])
            print(
                f"  {fname:8s} {win[sel].mean():6.1%}  (n={sel.sum()}, "
                f"mean margin {margin[sel].mean():+.2f})"
            )
        print(
            f"  {'overall':8s} {win.mean():6.1%}  (n={len(rows)}, mean margin {margin.mean():+.2f})"
        )
    print(f"total runtime {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
