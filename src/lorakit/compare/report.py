"""The comparison report: ``report.md`` (a table), ``report.html`` (one self-contained page: the
table, the loss curves of every method on one chart, and bars for memory, time and size, drawn as
inline SVG, no scripts or downloads) from the ``results.json`` data."""

from __future__ import annotations

import html
from pathlib import Path

from lorakit._io import write_text_atomic

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
COLUMNS = ("method", "trainable params", "peak RSS", "s/step", "tokens/s", "size on disk", "eval loss before -> after",
           "exact match", "gen tokens/s", "lr")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _num(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def row_cells(row: dict) -> list[str]:
    """The table cells of one result row (a failed row says why in the second cell)."""
    if row["status"] != "ok":
        return [row["name"], f"failed: {row.get('error', '')}"] + [""] * (len(COLUMNS) - 2)
    share = 100.0 * row["trainable_params"] / max(row["total_params"], 1)
    exact = f"{row['exact_match']}/{row['questions']}" if row.get("questions") else "n/a"
    return [
        f"{row['name']}" + (f" ({row['method']})" if row["method"] != row["name"] else ""),
        f"{row['trainable_params']:,} ({share:.3g}%)",
        _size(row["peak_rss_bytes"]),
        _num(row["seconds_per_step"] if row["steps"] else None, ".2f"),
        _num(row["tokens_per_s"] if row["steps"] else None, ".0f"),
        _size(row["disk_bytes"]),
        f"{_num(row['eval_loss_before'], '.4f')} -> {_num(row['eval_loss_after'], '.4f')}",
        exact,
        _num(row.get("gen_tokens_per_s"), ".1f"),
        _num(row["lr"] if row["steps"] else None, ".0e"),
    ]


def markdown(results: dict) -> str:
    budget = ", ".join(f"{k} {v}" for k, v in results["budget"].items() if v is not None)
    lines = [f"# lorakit compare: {results['model']}", "",
             f"Data: train `{results['data']['train']}`, held out `{results['data']['eval']}`. Same budget for "
             f"every method: {budget}. Host: {results['host']}. lorakit {results['lorakit']}.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row_cells(row)) + " |" for row in results["methods"]]
    lines += ["", "Peak RSS: the method's whole process (load + train). Size on disk: what the method publishes "
              "(adapter files, the model directory's weights, or the prompt file). s/step and tokens/s: training "
              "steps only. Exact match: held-out questions answered greedily, the expected answer in the reply."]
    return "\n".join(lines) + "\n"


def _svg_lines(rows: list[dict], width: int = 640, height: int = 300) -> str:
    """Loss against step for every method with a curve, one colour each, axes with end labels."""
    curves = [(r["name"], r["loss_curve"]) for r in rows if r.get("loss_curve")]
    if not curves:
        return "<p>No training curves (no method trained).</p>"
    steps = [s for _, c in curves for s, _ in c]
    losses = [v for _, c in curves for _, v in c]
    x0, x1, y0, y1 = min(steps), max(steps), min(losses), max(losses)
    pad = 40

    def xy(step, loss):
        x = pad + (step - x0) / max(x1 - x0, 1e-9) * (width - 2 * pad)
        y = height - pad - (loss - y0) / max(y1 - y0, 1e-9) * (height - 2 * pad)
        return f"{x:.1f},{y:.1f}"

    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#444"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#444"/>',
             f'<text x="{pad}" y="{height - 10}" font-size="11">step {x0}</text>',
             f'<text x="{width - pad - 40}" y="{height - 10}" font-size="11">step {x1}</text>',
             f'<text x="2" y="{pad}" font-size="11">{y1:.2f}</text>',
             f'<text x="2" y="{height - pad}" font-size="11">{y0:.2f}</text>']
    for i, (name, curve) in enumerate(curves):
        color = COLORS[i % len(COLORS)]
        points = " ".join(xy(s, v) for s, v in curve)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{points}"/>')
        parts.append(f'<text x="{width - pad + 4 - 80}" y="{pad + 14 * i}" font-size="11" fill="{color}">'
                     f'{html.escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _svg_bars(rows: list[dict], key: str, label, width: int = 640) -> str:
    """One horizontal bar per method for ``key`` (linear scale), the value printed at its end."""
    items = [(r["name"], r[key]) for r in rows if r["status"] == "ok" and r.get(key)]
    if not items:
        return ""
    top, bar, gap, left = max(v for _, v in items), 16, 6, 90
    height = len(items) * (bar + gap) + gap
    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">']
    for i, (name, value) in enumerate(items):
        y = gap + i * (bar + gap)
        length = max(1.0, value / top * (width - left - 120))
        parts.append(f'<text x="0" y="{y + 12}" font-size="11">{html.escape(name)}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{length:.1f}" height="{bar}" fill="{COLORS[i % len(COLORS)]}"/>')
        parts.append(f'<text x="{left + length + 4:.1f}" y="{y + 12}" font-size="11">{html.escape(label(value))}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def html_page(results: dict) -> str:
    rows = results["methods"]
    header = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row_cells(r)) + "</tr>" for r in rows)
    intro = html.escape(markdown(results).splitlines()[2])
    charts = [("Training loss (per logged step)", _svg_lines(rows)),
              ("Peak memory (RSS, load + train)", _svg_bars(rows, "peak_rss_bytes", _size)),
              ("Seconds per training step", _svg_bars(rows, "seconds_per_step", lambda v: f"{v:.2f} s")),
              ("Size on disk of what the method saves", _svg_bars(rows, "disk_bytes", _size))]
    sections = "".join(f"<h2>{html.escape(title)}</h2>\n{svg}\n" for title, svg in charts if svg)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>lorakit compare: {html.escape(results['model'])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:right}}td:first-child{{text-align:left}}</style>
</head><body>
<h1>lorakit compare: {html.escape(results['model'])}</h1>
<p>{intro}</p>
<table><tr>{header}</tr>{body}</table>
{sections}</body></html>
"""


def write_reports(results: dict, output_dir: Path) -> None:
    write_text_atomic(Path(output_dir) / "report.md", markdown(results))
    write_text_atomic(Path(output_dir) / "report.html", html_page(results))
