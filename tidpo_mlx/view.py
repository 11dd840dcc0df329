"""Token weights made visible: a terminal heat map (ANSI 256 colours) and self-contained HTML pages.

Both colour each response token by the weight the loss multiplies it with,
on a square-root scale from the lowest to the highest weight of the shown tokens of that
response. Attribution peaks on the end-of-turn token (closest to the target
position), which would wash out every other token: ``hide_template`` hides
the chat-template tokens (``<|im_end|>``, the trailing newline) and takes the
scale over the response text only, and the terminal view lists each
response's top weights so both the template peak and the next peaks show.
One page builder (:func:`page`, :func:`pair_section`, :func:`response_column`)
draws the importance view (:func:`html_page`) and the audit's report.
"""

from __future__ import annotations

import html
from typing import Any, Sequence

# light -> dark: white, yellows, oranges, reds (xterm 256-colour cube)
PALETTE = [231, 230, 229, 228, 227, 226, 220, 214, 208, 202, 196, 160]  # 12 steps
RESET = "\x1b[0m"


def visible(piece: str) -> str:
    """A token's text with newlines and tabs drawn as glyphs (one line per response)."""
    return piece.replace("\r", "").replace("\n", "↵").replace("\t", "⇥")


def scaled(values: Sequence[float], shown: Sequence[bool]) -> list[float]:
    """Values mapped to [0, 1]: ``sqrt((v - min) / (max - min))`` over the shown tokens (0.5 when all
    equal). The square root spreads the many small weights so the peaks after the first show."""
    pool = [v for v, s in zip(values, shown) if s] or list(values)
    lo, hi = min(pool), max(pool)
    if hi - lo <= 1e-12 * max(abs(hi), 1.0):
        return [0.5] * len(values)
    return [min(max((v - lo) / (hi - lo), 0.0), 1.0) ** 0.5 for v in values]


def _shown(resp: dict[str, Any], hide_template: bool) -> list[bool]:
    template = resp.get("template") or [False] * len(resp["tokens"])
    if hide_template and not all(template):
        return [not t for t in template]
    return [True] * len(template)


def ansi_tokens(resp: dict[str, Any], hide_template: bool = False) -> str:
    """One response as a line of tokens with a background colour by weight."""
    shown = _shown(resp, hide_template)
    levels = scaled(resp["weights"], shown)
    parts = []
    for piece, level, show in zip(resp["tokens"], levels, shown):
        if not show:
            continue
        k = min(int(level * len(PALETTE)), len(PALETTE) - 1)
        fg = 16 if k < 9 else 231
        parts.append(f"\x1b[48;5;{PALETTE[k]}m\x1b[38;5;{fg}m{visible(piece)}{RESET}")
    return "".join(parts)


def peaks(resp: dict[str, Any], hide_template: bool = False, top: int = 3) -> str:
    """The highest template weight (unless hidden) and the ``top`` highest weights of the text tokens."""
    shown = _shown(resp, hide_template)
    template = resp.get("template") or [False] * len(shown)
    w = resp["weights"]

    def item(i: int) -> str:
        return f"{visible(resp['tokens'][i])!r} {w[i]:.4g}"

    text = [i for i, s in enumerate(shown) if s and not template[i]] or [i for i, s in enumerate(shown) if s]
    parts = ["top " + ", ".join(item(i) for i in sorted(text, key=lambda i: -w[i])[:top])]
    tpl = [i for i, s in enumerate(shown) if s and template[i]]
    if tpl and len(tpl) < len(shown):
        parts.insert(0, "template " + item(max(tpl, key=lambda i: w[i])))
    return "; ".join(parts)


def legend_bar() -> str:
    """The colour scale, low to high."""
    return "low " + "".join(f"\x1b[48;5;{c}m  {RESET}" for c in PALETTE) + " high"


def terminal_view(records: Sequence[dict[str, Any]], label: str, hide_template: bool = False) -> list[str]:
    """Lines of the terminal heat map for every pair."""
    scope = "response text (template tokens hidden)" if hide_template else "all response tokens"
    lines = [f"weights: {label}",
             f"colour: weight, per response, min to max (square-root scale) over {scope}: {legend_bar()}"]
    for rec in records:
        prompt = " ".join(rec["prompt"].split())
        lines.append("")
        lines.append(f"[{rec['index']}] {prompt[:100]}{'...' if len(prompt) > 100 else ''}")
        for key in ("chosen", "rejected"):
            resp = rec[key]
            lines.append(f"  {key:<9}{ansi_tokens(resp, hide_template)}")
            lines.append(f"  {'':<9}peaks: {peaks(resp, hide_template)}; sum {sum(resp['weights']):.4g}")
    return lines


def _rgb(level: float) -> str:
    """White -> yellow -> red for level 0 -> 0.5 -> 1."""
    if level < 0.5:
        t = level / 0.5
        r, g, b = 255, 255 - 25 * t, 255 - 155 * t
    else:
        t = (level - 0.5) / 0.5
        r, g, b = 255 - 45 * t, 230 - 190 * t, 100 - 70 * t
    return f"rgb({r:.0f},{g:.0f},{b:.0f})"


def token_spans(resp: dict[str, Any], hide_template: bool) -> str:
    """A response's tokens as HTML spans coloured by weight, the token's numbers in the hover text."""
    shown = _shown(resp, hide_template)
    levels = scaled(resp["weights"], shown)
    template = resp.get("template") or [False] * len(shown)
    spans = []
    for i, piece in enumerate(resp["tokens"]):
        if not shown[i]:
            continue
        tip = (
            f"token {piece!r} (id {resp['token_ids'][i]}{', template' if template[i] else ''})\n"
            f"attribution {resp['attribution'][i]:.6g}\nprior {resp['prior'][i]:.6g}\nweight {resp['weights'][i]:.6g}"
        )
        cls = "t tpl" if template[i] else "t"
        fg = "#fff" if levels[i] > 0.8 else "#000"
        text = html.escape(piece.replace("\n", "↵")) or "&#8203;"
        spans.append(
            f'<span class="{cls}" style="background:{_rgb(levels[i])};color:{fg}" '
            f'title="{html.escape(tip, quote=True)}">{text}</span>'
        )
    return "".join(spans)


SCALE_BAR = '<span class="bar"></span>'
"""The colour scale, low to high, as drawn in a page's legend."""


def response_column(key: str, note: str, resp: dict[str, Any], hide_template: bool = False, extra: str = "") -> str:
    """One response of a pair: its name, a note, the coloured tokens, then ``extra`` (HTML)."""
    return (f'<div class="col"><h3>{html.escape(key)} <small>{html.escape(note)}</small></h3>'
            f'<p class="tokens">{token_spans(resp, hide_template)}</p>{extra}</div>')


def pair_section(heading: str, note: str, prompt: str, columns: Sequence[str]) -> str:
    """One pair: a heading with a note, the prompt, the response columns side by side."""
    return (f'<section><h2>{html.escape(heading)} <small>{html.escape(note)}</small></h2>'
            f'<p class="prompt">{html.escape(prompt)}</p><div class="cols">{"".join(columns)}</div></section>')


def page(title: str, legend: str, sections: Sequence[str]) -> str:
    """A self-contained HTML page (no external resources): the title, the ``legend`` box and the
    :func:`pair_section` s; ``legend`` is HTML and may draw :data:`SCALE_BAR`."""
    gradient = ", ".join(_rgb(i / 10) for i in range(11))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 90em; }}
.legend {{ background: #f6f6f6; padding: .8em 1em; border-radius: 6px; }}
.bar {{ display: inline-block; width: 16em; height: 1em; vertical-align: middle;
       background: linear-gradient(to right, {gradient}); border: 1px solid #ccc; }}
section {{ border-top: 1px solid #ddd; margin-top: 1.2em; }}
.prompt {{ color: #555; white-space: pre-wrap; }}
.cols {{ display: grid; grid-template-columns: 1fr 1fr; gap: 1.5em; }}
.tokens {{ font-family: ui-monospace, monospace; line-height: 1.9; white-space: pre-wrap; }}
.t {{ padding: 2px 0; border-radius: 2px; }}
.t:hover {{ outline: 2px solid #333; }}
.tpl {{ font-style: italic; }}
.chip {{ font-family: ui-monospace, monospace; padding: 1px 4px; border-radius: 3px; }}
small {{ font-weight: normal; color: #666; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<div class="legend">{legend}</div>
{"".join(sections)}
</body></html>
"""


def html_page(records: Sequence[dict[str, Any]], label: str, title: str, hide_template: bool = False) -> str:
    """The importance view: per pair, chosen and rejected side by side, tokens coloured by weight, the
    numbers on hover, a legend naming the weighting (:func:`page`)."""
    scope = "the response text (template tokens hidden)" if hide_template else "all response tokens"
    sections = [
        pair_section(f"#{rec['index']}", rec.get("source", ""), rec["prompt"], [
            response_column(key, f"{len(rec[key]['tokens'])} tokens, sum of weights {sum(rec[key]['weights']):.4g}",
                            rec[key], hide_template)
            for key in ("chosen", "rejected")])
        for rec in records
    ]
    legend = (f"<p><b>Weights</b>: {html.escape(label)}.</p>\n"
              "<p>Colour: the weight the loss multiplies each response token's log-ratio by, per response from its\n"
              f"lowest to its highest weight over {scope} (square-root scale): low {SCALE_BAR} high.\n"
              "Template tokens are in italics. Hover a token for its id, raw attribution, prior and weight.</p>")
    return page(title, legend, sections)
