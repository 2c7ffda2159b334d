"""Small server-rendered SVG charts: no JavaScript, readable by screen readers (role=img, title,
and the same numbers in a table beside each chart)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

INK, ACCENT, MUTED, GRID = "#1a1a1a", "#1f5fa8", "#6b6b6b", "#d0d0d0"
PALETTE = ("#1f5fa8", "#b8500f", "#2d7d3a", "#7a3f99", "#8a6d00", "#555555")


def _svg(width: int, height: int, label: str, body: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{escape(label)}" '
            f'viewBox="0 0 {width} {height}" width="100%" style="max-width:{width}px">'
            f"<title>{escape(label)}</title>{''.join(body)}</svg>")


def _text(x: float, y: float, text: str, *, anchor: str = "start", size: int = 12, fill: str = INK) -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{fill}" '
            f'font-family="system-ui, sans-serif">{escape(text)}</text>')


def bars(label: str, values: Sequence[tuple[str, float]], *, fmt: str = "{:.0f}", maximum: float | None = None,
         width: int = 640, height: int = 220) -> str:
    """Vertical bars, one per (category, value)."""
    left, bottom, top = 44, 34, 16
    top_value = maximum if maximum is not None else max((v for _, v in values), default=0) or 1
    plot_h = height - bottom - top
    slot = (width - left - 8) / max(len(values), 1)
    body = [f'<line x1="{left}" y1="{height - bottom}" x2="{width - 8}" y2="{height - bottom}" stroke="{INK}"/>']
    for tick in (0, 0.5, 1):
        y = height - bottom - plot_h * tick
        body.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - 8}" y2="{y:.1f}" stroke="{GRID}"/>')
        body.append(_text(left - 6, y + 4, fmt.format(top_value * tick), anchor="end", size=11, fill=MUTED))
    for i, (name, value) in enumerate(values):
        h = plot_h * (value / top_value if top_value else 0)
        x = left + i * slot + slot * 0.15
        body.append(f'<rect x="{x:.1f}" y="{height - bottom - h:.1f}" width="{slot * 0.7:.1f}" height="{h:.1f}" '
                    f'fill="{ACCENT}"><title>{escape(name)}: {escape(fmt.format(value))}</title></rect>')
        body.append(_text(x + slot * 0.35, height - bottom - h - 4, fmt.format(value), anchor="middle", size=11))
        if len(values) <= 16 or i % max(1, len(values) // 12) == 0:
            body.append(_text(x + slot * 0.35, height - bottom + 16, name, anchor="middle", size=11))
    return _svg(width, height, label, body)


@dataclass(frozen=True)
class Interval:
    row: str  # the label on the left
    series: str  # the legend entry (colour)
    estimate: float | None
    low: float | None
    high: float | None


def intervals(label: str, items: Sequence[Interval], *, log_scale: bool = False, reference: float | None = None,
              axis: str = "", fmt: str = "{:.2f}", width: int = 720) -> str:
    """Points with error bars, one row each: a forest plot (log scale, reference line at 1) or rates with CIs."""
    shown = [i for i in items if i.estimate is not None and i.low is not None and i.high is not None
             and (not log_scale or min(i.estimate, i.low, i.high) > 0)]
    row_h, right, top = 24, 80, 12
    left = min(320, 16 + 7 * max((len(i.row) for i in items), default=10))  # room for the longest label
    height = top + row_h * max(len(items), 1) + 40
    values = [v for i in shown for v in (i.low, i.high, i.estimate) if v is not None]
    if reference is not None:
        values.append(reference)
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)

    def scale(v: float) -> float:
        a, b, x = (math.log(lo), math.log(hi), math.log(v)) if log_scale else (lo, hi, v)
        return left + (width - left - right) * ((x - a) / (b - a) if b > a else 0.5)

    body: list[str] = []
    if reference is not None and values:
        x = scale(reference)
        body.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{height - 34}" stroke="{MUTED}" '
                    f'stroke-dasharray="4 3"/>')
    series = list(dict.fromkeys(i.series for i in items))
    for n, item in enumerate(items):
        y = top + row_h * n + row_h / 2
        body.append(_text(left - 8, y + 4, item.row, anchor="end", size=12))
        if item not in shown:
            body.append(_text(left + 4, y + 4, "not estimable", size=11, fill=MUTED))
            continue
        assert item.estimate is not None and item.low is not None and item.high is not None
        colour = PALETTE[series.index(item.series) % len(PALETTE)]
        body.append(f'<line x1="{scale(item.low):.1f}" y1="{y:.1f}" x2="{scale(item.high):.1f}" y2="{y:.1f}" '
                    f'stroke="{colour}" stroke-width="2"/>')
        body.append(f'<circle cx="{scale(item.estimate):.1f}" cy="{y:.1f}" r="4" fill="{colour}">'
                    f"<title>{escape(item.row)}: {fmt.format(item.estimate)} ({fmt.format(item.low)} to "
                    f"{fmt.format(item.high)})</title></circle>")
        body.append(_text(width - right + 6, y + 4, fmt.format(item.estimate), size=11))
    base = height - 34
    body.append(f'<line x1="{left}" y1="{base}" x2="{width - right}" y2="{base}" stroke="{INK}"/>')
    if values:
        for v in (lo, reference, hi):
            if v is not None:
                body.append(_text(scale(v), base + 14, fmt.format(v), anchor="middle", size=11, fill=MUTED))
    body.append(_text((left + width - right) / 2, base + 30, axis, anchor="middle", size=11))
    if len(series) > 1:
        for k, name in enumerate(series):
            body.append(f'<rect x="{8}" y="{height - 14 - 14 * (len(series) - 1 - k)}" width="10" height="10" '
                        f'fill="{PALETTE[k % len(PALETTE)]}"/>')
            body.append(_text(22, height - 5 - 14 * (len(series) - 1 - k), name, size=11))
    return _svg(width, height, label, body)
