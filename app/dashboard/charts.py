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


# Text sizes in the drawing's units. A chart is drawn at its own width on a desktop (one user unit
# is one CSS pixel), and not below LABEL on any screen; on a phone it scrolls rather than shrink.
LABEL, SMALL = 15, 14


def _text(x: float, y: float, text: str, *, anchor: str = "start", size: int = LABEL, fill: str = INK) -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{fill}" '
            f'font-family="system-ui, sans-serif">{escape(text)}</text>')


def every_month(counts: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """Each calendar month ("YYYY-MM") from the first to the last, the months without any as 0:
    a quiet spell is a gap on the chart, not two distant months side by side."""
    if not counts:
        return []
    found = dict(counts)
    year, month = map(int, min(found).split("-"))
    last = tuple(map(int, max(found).split("-")))
    out: list[tuple[str, int]] = []
    while (year, month) <= last:
        key = f"{year:04d}-{month:02d}"
        out.append((key, found.get(key, 0)))
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return out


def bars(label: str, values: Sequence[tuple[str, float]], *, fmt: str = "{:.0f}", maximum: float | None = None,
         width: int = 640, height: int = 260) -> str:
    """Vertical bars, one per (category, value); with many categories every n-th is named."""
    left, right, bottom, top = 56, 32, 40, 24  # right: room for half the last name
    top_value = maximum if maximum is not None else max((v for _, v in values), default=0) or 1
    plot_h = height - bottom - top
    slot = (width - left - right) / max(len(values), 1)
    # with many bars every n-th is named (a character is about 8.5 px at LABEL), and the values
    # above the bars (about 8 px a digit at SMALL) are thinned the same way only if they do not fit
    names_every = _every(slot, 8.5 * max((len(name) for name, _ in values), default=1) + 6)
    values_every = _every(slot, 8 * max((len(fmt.format(v)) for _, v in values), default=1) + 2)
    base = height - bottom
    body = [f'<line x1="{left}" y1="{base}" x2="{width - right}" y2="{base}" stroke="{INK}"/>']
    for tick in (0, 0.5, 1):
        y = base - plot_h * tick
        body.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="{GRID}"/>')
        body.append(_text(left - 6, y + 5, fmt.format(top_value * tick), anchor="end", size=SMALL, fill=MUTED))
    for i, (name, value) in enumerate(values):
        h = plot_h * (value / top_value if top_value else 0)
        x = left + i * slot + slot * 0.15
        body.append(f'<rect x="{x:.1f}" y="{base - h:.1f}" width="{slot * 0.7:.1f}" height="{h:.1f}" '
                    f'fill="{ACCENT}"><title>{escape(name)}: {escape(fmt.format(value))}</title></rect>')
        if i % values_every == 0:
            body.append(_text(x + slot * 0.35, base - h - 5, fmt.format(value), anchor="middle", size=SMALL))
        if i % names_every == 0:
            body.append(_text(x + slot * 0.35, base + 20, name, anchor="middle"))
    return _svg(width, height, label, body)


def _every(slot: float, text_width: float) -> int:
    return max(1, math.ceil(text_width / slot))


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
    row_h, right, top = 28, 80, 12
    # room for the longest label: about 9 units a character at LABEL size in a proportional font
    left = min(400, 20 + 9 * max((len(i.row) for i in items), default=10))
    height = top + row_h * max(len(items), 1) + 48
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
        body.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{height - 42}" stroke="{MUTED}" '
                    f'stroke-dasharray="4 3"/>')
    series = list(dict.fromkeys(i.series for i in items))
    for n, item in enumerate(items):
        y = top + row_h * n + row_h / 2
        body.append(_text(left - 8, y + 5, item.row, anchor="end"))
        if item not in shown:
            body.append(_text(left + 4, y + 5, "not estimable", size=SMALL, fill=MUTED))
            continue
        assert item.estimate is not None and item.low is not None and item.high is not None
        colour = PALETTE[series.index(item.series) % len(PALETTE)]
        body.append(f'<line x1="{scale(item.low):.1f}" y1="{y:.1f}" x2="{scale(item.high):.1f}" y2="{y:.1f}" '
                    f'stroke="{colour}" stroke-width="2"/>')
        body.append(f'<circle cx="{scale(item.estimate):.1f}" cy="{y:.1f}" r="4" fill="{colour}">'
                    f"<title>{escape(item.row)}: {fmt.format(item.estimate)} ({fmt.format(item.low)} to "
                    f"{fmt.format(item.high)})</title></circle>")
        body.append(_text(width - right + 6, y + 5, fmt.format(item.estimate), size=SMALL))
    base = height - 42
    body.append(f'<line x1="{left}" y1="{base}" x2="{width - right}" y2="{base}" stroke="{INK}"/>')
    if values:
        for v in (lo, reference, hi):
            if v is not None:
                body.append(_text(scale(v), base + 17, fmt.format(v), anchor="middle", size=SMALL, fill=MUTED))
    body.append(_text((left + width - right) / 2, base + 36, axis, anchor="middle", size=SMALL))
    if len(series) > 1:
        for k, name in enumerate(series):
            body.append(f'<rect x="{8}" y="{height - 16 - 17 * (len(series) - 1 - k)}" width="12" height="12" '
                        f'fill="{PALETTE[k % len(PALETTE)]}"/>')
            body.append(_text(26, height - 5 - 17 * (len(series) - 1 - k), name, size=SMALL))
    return _svg(width, height, label, body)
