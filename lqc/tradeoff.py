"""The recipe trade-off page: size against quality against speed, one static HTML file.

Each measured recipe (and each baseline, ``"kind": "baseline"``) is one JSON results file with at
least ``model``, ``recipe``, ``weight_bytes``, ``ppl_delta_pct`` and ``decode_tokens_per_s``
(optionally ``fp32_weight_bytes``, ``ppl``, ``windows``, ``baseline``,
``baseline_decode_tokens_per_s``, ``kv_bytes_per_token``, ``measured_at``, ``command``).
``load_results(folder)`` reads them; ``write_tradeoff_page(rows, out)`` draws weight MB against
perplexity change, coloured by decode tokens/s, with the same rows as a table below. The page has
no scripts and needs no network: inline CSS and SVG only.

    python -m lqc.tradeoff benchmarks/results/recipes lqc-tradeoff.html
"""

from __future__ import annotations

import argparse
import json
import math
from html import escape
from numbers import Real
from pathlib import Path
from typing import Any

REQUIRED = ("model", "recipe", "weight_bytes", "ppl_delta_pct", "decode_tokens_per_s")
NUMERIC = ("weight_bytes", "ppl_delta_pct", "decode_tokens_per_s")
WIDTH, HEIGHT = 900, 520
LEFT, RIGHT, TOP, BOTTOM = 80, 210, 30, 60  # margins around the plot area
SLOW, MID, FAST = (215, 48, 39), (254, 224, 139), (26, 152, 80)  # decode tok/s colour scale

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
svg { background: #fff; border: 1px solid #ddd; }
.axis line, .axis path { stroke: #888; } .grid { stroke: #eee; } .zero { stroke: #bbb; stroke-dasharray: 4 3; }
.tick, .label { font-size: 12px; fill: #333; } .axis-title { font-size: 13px; fill: #222; }
.point .marker { stroke: #222; stroke-width: 1; } .baseline .marker { stroke-width: 2; }
table { border-collapse: collapse; margin-top: 20px; } th, td { padding: 4px 10px; border-bottom: 1px solid #ddd; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } th { text-align: left; background: #f6f6f6; }
code { background: #f3f3f3; padding: 1px 4px; }
"""


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def load_results(folder: str | Path) -> list[dict]:
    """Every ``*.json`` in ``folder`` holding a dict with the required keys (numbers where numbers are
    needed); anything else is skipped silently. For each (model, recipe) only the newest is kept:
    latest ``measured_at`` (ISO 8601), then latest file modification time."""
    newest: dict[tuple[str, str], tuple[tuple[str, float], dict]] = {}
    for path in sorted(Path(folder).glob("*.json")):
        try:
            row = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if not isinstance(row, dict) or any(k not in row for k in REQUIRED):
            continue
        if not all(_is_number(row[k]) for k in NUMERIC):
            continue
        key = (str(row["model"]), str(row["recipe"]))
        age = (str(row.get("measured_at") or ""), path.stat().st_mtime)
        if key not in newest or age > newest[key][0]:
            newest[key] = (age, row)
    rows = [row for _, row in newest.values()]
    return sorted(rows, key=lambda r: (str(r["model"]), -r["weight_bytes"], str(r["recipe"])))


def _ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    step = 10 ** math.floor(math.log10((hi - lo) / count))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= count)
    first = math.ceil(lo / step)
    return [round(i * step, 10) for i in range(first, math.floor(hi / step) + 1)]


def _colour(t: float) -> str:
    a, b, t = (SLOW, MID, t * 2) if t < 0.5 else (MID, FAST, t * 2 - 1)
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(a, b))


def _fmt(value: Any, spec: str = "", suffix: str = "") -> str:
    return f"{value:{spec}}{suffix}" if _is_number(value) else ("–" if value is None else str(value))


def _ratio(num: Any, den: Any) -> float | None:
    return num / den if _is_number(num) and _is_number(den) and den else None


def _chart(rows: list[dict]) -> str:
    mb = [r["weight_bytes"] / 1e6 for r in rows]
    delta = [r["ppl_delta_pct"] for r in rows]
    speed = [r["decode_tokens_per_s"] for r in rows]
    x_hi = max(mb) * 1.1 or 1.0
    y_lo, y_hi = min(0.0, *delta), max(0.0, *delta)
    pad = (y_hi - y_lo) * 0.1 or 1.0
    y_lo, y_hi = y_lo - pad, y_hi + pad
    s_lo, s_hi = min(speed), max(speed)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    px = lambda v: LEFT + v / x_hi * plot_w  # noqa: E731
    py = lambda v: TOP + (y_hi - v) / (y_hi - y_lo) * plot_h  # noqa: E731
    out = [f'<svg id="chart" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}">']
    for v in _ticks(0.0, x_hi):
        out.append(f'<line class="grid" x1="{px(v):.1f}" x2="{px(v):.1f}" y1="{TOP}" y2="{TOP + plot_h}"/>'
                   f'<text class="tick" x="{px(v):.1f}" y="{TOP + plot_h + 18}" text-anchor="middle">{v:g}</text>')
    for v in _ticks(y_lo, y_hi):
        out.append(f'<line class="grid" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{py(v):.1f}" y2="{py(v):.1f}"/>'
                   f'<text class="tick" x="{LEFT - 8}" y="{py(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    out.append(f'<line class="zero" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{py(0):.1f}" y2="{py(0):.1f}"/>'
               f'<g class="axis"><line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{TOP + plot_h}"/>'
               f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{TOP + plot_h}" y2="{TOP + plot_h}"/></g>'
               f'<text class="axis-title" x="{LEFT + plot_w / 2}" y="{HEIGHT - 16}" text-anchor="middle">weights as stored (MB)</text>'
               f'<text class="axis-title" transform="translate(20 {TOP + plot_h / 2}) rotate(-90)" text-anchor="middle">'
               f'perplexity change vs float32 (%), lower is better</text>')
    placed: list[tuple[float, float]] = []  # labels drawn so far: a label that would overlap one moves down
    for row, x, y, s in zip(rows, mb, delta, speed):
        baseline = row.get("kind") == "baseline"
        fill = _colour((s - s_lo) / (s_hi - s_lo) if s_hi > s_lo else 0.5)
        cx, cy = px(x), py(y)
        lx, ly = cx + 10, cy - 8
        while any(abs(lx - ox) < 110 and abs(ly - oy) < 14 for ox, oy in placed):
            ly += 14
        placed.append((lx, ly))
        marker = (f'<rect class="marker" x="{cx - 6:.1f}" y="{cy - 6:.1f}" width="12" height="12" fill="{fill}"/>' if baseline
                  else f'<circle class="marker" cx="{cx:.1f}" cy="{cy:.1f}" r="7" fill="{fill}"/>')
        tip = (f"{row['recipe']} ({row['model']}{', baseline' if baseline else ''}): {x:.1f} MB, "
               f"perplexity {y:+.2f}%, {s:.1f} decode tok/s")
        out.append(f'<g class="point {"baseline" if baseline else "recipe"}" data-recipe="{escape(str(row["recipe"]))}" '
                   f'data-model="{escape(str(row["model"]))}" data-weight-mb="{x:.3f}" data-ppl-delta="{y:g}" data-decode="{s:g}">'
                   f'<title>{escape(tip)}</title>{marker}'
                   f'<text class="label" x="{lx:.1f}" y="{ly:.1f}">{escape(str(row["recipe"]))}</text></g>')
    lx, ly = WIDTH - RIGHT + 30, TOP + 10  # legend: colour scale, then the two markers
    out.append(f'<g class="legend"><defs><linearGradient id="speed" x1="0" x2="0" y1="1" y2="0">'
               + "".join(f'<stop offset="{t}" stop-color="{_colour(t)}"/>' for t in (0, 0.5, 1))
               + f'</linearGradient></defs><text class="axis-title" x="{lx}" y="{ly}">decode tokens/s</text>'
               f'<rect x="{lx}" y="{ly + 10}" width="16" height="120" fill="url(#speed)" stroke="#888"/>'
               f'<text class="tick" x="{lx + 22}" y="{ly + 20}">{s_hi:.1f}</text>'
               f'<text class="tick" x="{lx + 22}" y="{ly + 130}">{s_lo:.1f}</text>'
               f'<circle cx="{lx + 8}" cy="{ly + 160}" r="7" fill="#ccc" stroke="#222"/>'
               f'<text class="tick" x="{lx + 22}" y="{ly + 164}">recipe</text>'
               f'<rect x="{lx + 2}" y="{ly + 179}" width="12" height="12" fill="#ccc" stroke="#222" stroke-width="2"/>'
               f'<text class="tick" x="{lx + 22}" y="{ly + 189}">baseline</text></g></svg>')
    return "\n".join(out)


def _table(rows: list[dict]) -> str:
    head = ("model", "recipe", "weight MB", "× of float32", "ppl Δ %", "decode tok/s", "× vs baseline",
            "windows", "KV bytes/token", "measured_at")
    lines = ["<table id=\"results\"><thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in rows:
        of_fp32 = _ratio(r["weight_bytes"], r.get("fp32_weight_bytes"))
        speedup = _ratio(r["decode_tokens_per_s"], r.get("baseline_decode_tokens_per_s"))
        vs = "–" if speedup is None else f"{speedup:.2f}× {r.get('baseline') or ''}".strip()
        cells = (r["model"], str(r["recipe"]) + (" (baseline)" if r.get("kind") == "baseline" else ""),
                 _fmt(r["weight_bytes"] / 1e6, ".1f"), _fmt(of_fp32, ".3f", "×"), _fmt(r["ppl_delta_pct"], "+.2f"),
                 _fmt(r["decode_tokens_per_s"], ".1f"), vs, _fmt(r.get("windows")),
                 _fmt(r.get("kv_bytes_per_token"), ",.0f"), _fmt(r.get("measured_at")))
        lines.append("<tr>" + "".join(f'<td class="{"num" if i in (2, 3, 4, 5, 7, 8) else "text"}">{escape(str(c))}</td>'
                                      for i, c in enumerate(cells)) + "</tr>")
    return "\n".join(lines + ["</tbody></table>"])


def write_tradeoff_page(rows: list[dict], out_path: str | Path, title: str = "lqc: recipe trade-off") -> Path:
    """Write the trade-off page for ``rows`` (as ``load_results`` returns them) to ``out_path``."""
    if rows:
        body = (f"<p>Each point is one measured recipe (circle) or baseline (square): weights as stored against "
                f"perplexity change vs float32, coloured by decode tokens/s. Hover a point for its numbers.</p>\n"
                f"{_chart(rows)}\n{_table(rows)}")
    else:
        body = ('<p id="empty">No results yet. Run <code>make demo</code> (or a recipe benchmark) to measure recipes; '
                "each writes one JSON file, then <code>python -m lqc.tradeoff RESULTS_DIR OUT.html</code> "
                "draws them here.</p>")
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head>\n<body><h1>{escape(title)}</h1>\n{body}\n</body></html>\n")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lqc.tradeoff", description="Write the recipe trade-off page.")
    parser.add_argument("results_dir", help="folder of JSON results files, one per measured recipe or baseline")
    parser.add_argument("out", help="the HTML file to write")
    parser.add_argument("--title", default="lqc: recipe trade-off")
    args = parser.parse_args(argv)
    print(write_tradeoff_page(load_results(args.results_dir), args.out, args.title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
