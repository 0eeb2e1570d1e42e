"""Line charts as inline SVG for the HTML report: no library, no script, no network.

One function, :func:`line_chart`: several named series of (x, y) points on shared axes, an optional horizontal
reference line (a budget), ticks with round numbers and a legend. The SVG carries a ``<title>`` and an
``aria-label`` so the chart has a text alternative.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22")
W, H = 640, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 150, 28, 44
MAX_LEGEND = 12


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    out, t = [], start
    while t <= hi + step * 1e-9:
        out.append(round(t, 10))
        t += step
    return out


def _fmt(v: float) -> str:
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.1e}"
    return f"{v:g}" if abs(v) >= 10 else f"{v:.3g}"


def line_chart(series: Mapping[str, Sequence[tuple[float, float | None]]], *, chart_id: str, title: str,
               x_label: str, y_label: str, hline: float | None = None, hline_label: str = "",
               y_from_zero: bool = True) -> str:
    """An SVG line chart (a string to inline into HTML)."""
    pts = {k: [(float(x), float(y)) for x, y in v if y is not None and math.isfinite(float(y))]
           for k, v in series.items()}
    xs = [x for v in pts.values() for x, _ in v]
    ys = [y for v in pts.values() for _, y in v] + ([hline] if hline is not None else [])
    label = escape(f"{title}: {y_label} by {x_label}")
    head = (f'<svg id="{escape(chart_id)}" class="chart" role="img" aria-label="{label}" viewBox="0 0 {W} {H}" '
            f'width="{W}" height="{H}" xmlns="http://www.w3.org/2000/svg"><title>{label}</title>')
    if not xs:
        return head + f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" class="muted">no data</text></svg>'
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    y0, y1 = (0.0 if y_from_zero else min(ys)), max(ys)
    if y1 <= y0:
        y1 = y0 + 1.0
    y1 += (y1 - y0) * 0.05
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return TOP + ph - (y - y0) / (y1 - y0) * ph

    parts = [head, f'<text x="{LEFT}" y="16" class="chart-title">{escape(title)}</text>']
    for t in _ticks(y0, y1):
        if y0 <= t <= y1:
            parts.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" class="grid"/>'
                         f'<text x="{LEFT - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" class="tick">{_fmt(t)}</text>')
    integer_x = all(float(x).is_integer() for x in xs)
    for t in _ticks(x0, x1, 6):
        if x0 <= t <= x1 and (not integer_x or float(t).is_integer()):
            parts.append(f'<text x="{sx(t):.1f}" y="{TOP + ph + 16}" text-anchor="middle" class="tick">'
                         f'{_fmt(t)}</text>')
    parts.append(f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" class="frame"/>')
    parts.append(f'<text x="{LEFT + pw / 2}" y="{H - 6}" text-anchor="middle" class="axis">{escape(x_label)}</text>')
    parts.append(f'<text transform="translate(14 {TOP + ph / 2}) rotate(-90)" text-anchor="middle" class="axis">'
                 f'{escape(y_label)}</text>')
    if hline is not None and math.isfinite(hline):
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{sy(hline):.1f}" y2="{sy(hline):.1f}" class="budget"/>'
                     f'<text x="{LEFT + pw - 4}" y="{sy(hline) - 5:.1f}" text-anchor="end" class="budget-label">'
                     f'{escape(hline_label)}</text>')
    for i, (name, v) in enumerate(pts.items()):
        color = PALETTE[i % len(PALETTE)]
        if v:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in v)
            parts.append(f'<polyline class="series" data-series="{escape(name)}" points="{path}" fill="none" '
                         f'stroke="{color}" stroke-width="2"/>')
            parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>' for x, y in v[:200]]
        if i < MAX_LEGEND:
            ly = TOP + 10 + i * 16
            parts.append(f'<rect x="{LEFT + pw + 12}" y="{ly - 8}" width="10" height="10" fill="{color}"/>'
                         f'<text x="{LEFT + pw + 26}" y="{ly + 1}" class="legend">{escape(name[:20])}</text>')
    if len(pts) > MAX_LEGEND:
        parts.append(f'<text x="{LEFT + pw + 12}" y="{TOP + 10 + MAX_LEGEND * 16}" class="legend">'
                     f'+{len(pts) - MAX_LEGEND} more</text>')
    return "".join(parts) + "</svg>"
