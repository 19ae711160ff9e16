"""A line chart as inline SVG, drawn on the server: no script, no remote asset.

Pure function of the series; every text it writes is escaped. Presentation is given
by SVG attributes only (the page's CSP forbids inline style attributes) with class
names the stylesheet may refine.
"""

from __future__ import annotations

from html import escape

from markupsafe import Markup

W, H = 720, 200
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 12, 28
COLOURS = ("#1f5fa8", "#1f7a44", "#8a5a00", "#b3261e")


def _nice_max(v: float) -> float:
    """The smallest 1/2/5 × 10^k at or above v (at least 1)."""
    if v <= 1:
        return 1.0
    step = 1.0
    while step * 10 <= v:
        step *= 10
    for m in (1, 2, 5, 10):
        if m * step >= v:
            return m * step
    return 10 * step


def _fmt(v: float) -> str:
    return f"{v:g}" if v < 10_000 else f"{v / 1000:g}k"


def line_chart(series: list[tuple[str, list[float]]], *, seconds_per_point: int,
               title: str, unit: str = "/s") -> Markup:
    """Lines for each (label, values) series, values oldest first, one per point; the x
    axis is labelled in minutes before now."""
    n = max((len(v) for _, v in series), default=0)
    top = _nice_max(max((max(v) for _, v in series if v), default=0.0))
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def x(i: int) -> float:
        return LEFT + (pw * i / (n - 1) if n > 1 else 0)

    def y(v: float) -> float:
        return TOP + ph - ph * (v / top)

    out = [f'<svg class="chart" role="img" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
           f'xmlns="http://www.w3.org/2000/svg" aria-label="{escape(title)}">',
           f"<title>{escape(title)}</title>"]
    for k in range(5):  # grid and y labels
        v = top * k / 4
        yy = y(v)
        out.append(f'<line x1="{LEFT}" y1="{yy:.1f}" x2="{W - RIGHT}" y2="{yy:.1f}" '
                   'stroke="#d9dee3" stroke-width="1"/>')
        out.append(f'<text x="{LEFT - 6}" y="{yy + 4:.1f}" text-anchor="end" font-size="11" '
                   f'fill="#5f6b76">{escape(_fmt(v))}</text>')
    if n > 1:
        span_min = (n - 1) * seconds_per_point / 60
        for k in range(4):  # x labels: minutes ago
            i = round((n - 1) * k / 3)
            ago = span_min * (1 - k / 3)
            label = ("now" if k == 3 else f"−{ago:.0f} min" if span_min >= 2
                     else f"−{ago * 60:.0f} s")
            out.append(f'<text x="{x(i):.1f}" y="{H - 8}" text-anchor="middle" '
                       f'font-size="11" fill="#5f6b76">{escape(label)}</text>')
    for idx, (label, values) in enumerate(series):
        colour = COLOURS[idx % len(COLOURS)]
        if values:
            pts = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values))
            out.append(f'<polyline class="series" points="{pts}" fill="none" '
                       f'stroke="{colour}" stroke-width="2"><title>{escape(label)}</title>'
                       "</polyline>")
        lx = LEFT + 8 + idx * 170
        out.append(f'<rect x="{lx}" y="{TOP + 2}" width="12" height="3" fill="{colour}"/>')
        last = values[-1] if values else 0
        out.append(f'<text x="{lx + 16}" y="{TOP + 8}" font-size="11" fill="#1d232a">'
                   f'{escape(label)} ({escape(_fmt(round(last, 1)))}{escape(unit)})</text>')
    out.append("</svg>")
    return Markup("".join(out))
