"""Generations made visible: the terminal's score table and first pairs, and a side-by-side HTML page."""

from __future__ import annotations

import html
from typing import Any, Sequence

from tidpo_mlx.gen_scores import Stat

SHOWN_PAIRS = 3
"""Pairs the terminal shows after the score table."""
WIDTH = 90


def _one_line(text: str, width: int = WIDTH) -> str:
    """``text`` on one line (newlines drawn as ↵), cut to ``width`` characters."""
    text = text.replace("\r", "").replace("\n", "↵")
    return text if len(text) <= width else text[:width - 3] + "..."


def prompt_text(messages: Sequence[dict[str, Any]]) -> str:
    """A prompt's messages as one text: the last user turn, earlier turns before it with their roles."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"[{m['role']}] {m['content']}" for m in messages)


def score_table(summary: dict[str, dict[str, Stat]], columns: Sequence[str]) -> list[str]:
    """One line per score: mean ± standard error over prompts per arm, and ``tuned - base``."""
    head = f"{'score':<17}" + "".join(f"{c:>20}" for c in columns)
    lines = [head]
    for name, stats in summary.items():
        cells = "".join(f"{stats[c].show(signed=c == 'tuned - base') if c in stats else '':>20}" for c in columns)
        lines.append(f"{name:<17}{cells}")
    return lines


def first_pairs(rows: Sequence[dict[str, Any]], arms: Sequence[str]) -> list[str]:
    """The first :data:`SHOWN_PAIRS` pairs: prompt, each arm's first generation, chosen and rejected."""
    lines = []
    for row in rows[:SHOWN_PAIRS]:
        lines.append(f"#{row['index']} {_one_line(prompt_text(row['prompt']))}")
        for arm in arms:
            lines.append(f"  {arm:<9}{_one_line(row['generations'][arm][0], WIDTH - 11)}")
        for key in ("chosen", "rejected"):
            lines.append(f"  {key:<9}{_one_line(row[key], WIDTH - 11)}")
    return lines


def _mark(answer: str | None, row: dict[str, Any]) -> str:
    key = row.get("answers")
    if key is None or "answer_skipped" in row:
        return ""
    if answer is None:
        return '<span class="none">no answer</span>'
    if answer == key["chosen"]:
        return f'<span class="ok">{html.escape(answer)} = chosen</span>'
    if answer == key["rejected"]:
        return f'<span class="bad">{html.escape(answer)} = rejected</span>'
    return f'<span class="other">{html.escape(answer)}</span>'


def html_page(rows: Sequence[dict[str, Any]], arms: Sequence[str], title: str, notes: Sequence[str],
              table: Sequence[str]) -> str:
    """A self-contained page: per pair its prompt, then each arm's generations, chosen and rejected side by side."""
    columns = list(arms) + ["chosen", "rejected"]
    sections = []
    for row in rows:
        cells = []
        for col in columns:
            if col in arms:
                answers = (row.get("answers") or {}).get(col) or [None] * len(row["generations"][col])
                body = "".join(f'<div class="gen"><pre>{html.escape(text)}</pre>{_mark(a, row)}</div>'
                               for text, a in zip(row["generations"][col], answers))
            else:
                body = f'<div class="gen"><pre>{html.escape(row[col])}</pre></div>'
            cells.append(f'<div class="col"><h3>{col}</h3>{body}</div>')
        skipped = (f' <small>answer scores: left out ({row["answer_skipped"]})</small>'
                   if "answer_skipped" in row else "")
        sections.append(
            f'<section><h2>#{row["index"]} <small>{html.escape(row.get("source", ""))}</small>{skipped}</h2>'
            f'<pre class="prompt">{html.escape(prompt_text(row["prompt"]))}</pre>'
            f'<div class="cols" style="grid-template-columns: repeat({len(columns)}, 1fr)">{"".join(cells)}</div>'
            "</section>"
        )
    note_html = "".join(f"<p>{html.escape(n)}</p>" for n in notes)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
.legend {{ background: #f6f6f6; padding: .8em 1em; border-radius: 6px; }}
section {{ border-top: 1px solid #ddd; margin-top: 1.2em; }}
.prompt {{ color: #555; }}
pre {{ white-space: pre-wrap; font-family: ui-monospace, monospace; margin: .2em 0; }}
.cols {{ display: grid; gap: 1.2em; }}
.gen {{ border-left: 3px solid #eee; padding-left: .5em; margin-bottom: .6em; }}
.ok {{ color: #0a7a2f; }} .bad {{ color: #b3261e; }} .none, .other {{ color: #777; }}
h2 small, h3 small {{ font-weight: normal; color: #777; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<div class="legend">{note_html}<pre>{html.escape(chr(10).join(table))}</pre></div>
{"".join(sections)}
</body></html>
"""
