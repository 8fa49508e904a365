"""Server-rendered SVG bar charts: readable without JavaScript, no chart library.

One chart = one series of (label, value) bars with the values written beside them, so the
numbers are there for screen readers and for copying, not only as bar lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape


@dataclass(frozen=True)
class Bar:
    label: str
    value: float


def bar_chart(title: str, bars: Sequence[Bar], *, unit: str = "", decimals: int = 0) -> str:
    """A horizontal bar chart as inline SVG (role=img, with a <title> naming it)."""
    row_h, label_w, bar_w, value_w = 26, 160, 360, 110
    height = max(1, len(bars)) * row_h + 10
    width = label_w + bar_w + value_w
    top = max((b.value for b in bars), default=0.0) or 1.0
    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
    ]
    if not bars:
        parts.append('<text x="4" y="18">No usage in this range.</text>')
    for i, bar in enumerate(bars):
        y = 5 + i * row_h
        length = max(1.0, bar.value / top * bar_w) if bar.value > 0 else 0.0
        text = f"{bar.value:,.{decimals}f}{(' ' + unit) if unit else ''}"
        parts.append(
            f'<text class="label" x="{label_w - 8}" y="{y + 17}" text-anchor="end">'
            f"{escape(bar.label)}</text>"
            f'<rect class="bar" x="{label_w}" y="{y + 4}" width="{length:.1f}" '
            f'height="{row_h - 8}">'
            f"<title>{escape(bar.label)}: {escape(text)}</title></rect>"
            f'<text class="value" x="{label_w + length + 6:.1f}" y="{y + 17}">{escape(text)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
