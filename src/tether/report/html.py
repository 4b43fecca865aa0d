"""Building blocks for self-contained HTML pages: figures inlined as base64 PNG, tables, one page wrapper.

Nothing here loads anything from outside the page (no CDN, no script), so a report can be mailed or archived
as one file and still open the same way years later.
"""

from __future__ import annotations

import base64
import html
import io
import math
import numbers
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       padding: 0 1rem; color: #1d2430; line-height: 1.45; }
h1 { font-size: 1.6rem; border-bottom: 2px solid #d8dee8; padding-bottom: .3rem; }
h2 { font-size: 1.25rem; margin-top: 2rem; }
h3 { font-size: 1.05rem; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e7ee; }
table { border-collapse: collapse; font-size: .9rem; margin: .8rem 0; }
table { display: block; overflow-x: auto; max-width: 100%; }  /* wide tables scroll, not the page */
th, td { border: 1px solid #d8dee8; padding: .25rem .6rem; text-align: left; }
th { background: #f2f4f8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
p.note { color: #5a6473; font-size: .9rem; }
p.warning { background: #fff3e0; border-left: 4px solid #d0703c; padding: .4rem .7rem; }
"""


def figure_tag(fig: Figure, alt: str) -> str:
    """A matplotlib Figure as an inline PNG `<figure>`; the figure is closed so callers never leak it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return _img(buf.getvalue(), alt)


def png_tag(path: Path, alt: str) -> str:
    """A PNG file already written (a run's curves, the benchmark's plot) as an inline `<figure>`."""
    return _img(path.read_bytes(), alt)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"></figure>'


def _format(value: Any) -> tuple[str, bool]:
    """(text, is_number): floats to 4 significant digits, None as an empty cell, everything else as str."""
    if value is None:
        return "", False
    if isinstance(value, bool):
        return str(value), False
    if isinstance(value, numbers.Integral):  # numbers.*: numpy and torch scalars from callers count too
        return str(int(value)), True
    if isinstance(value, numbers.Real):
        value = float(value)
        return (f"{value:.4g}" if math.isfinite(value) else str(value)), True
    return str(value), False


def table_tag(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """An HTML table with one row per dict; a missing key is an empty cell, every value is escaped."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            text, is_number = _format(row.get(c))
            cls = ' class="num"' if is_number else ""
            cells.append(f"<td{cls}>{html.escape(text)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def page(title: str, sections: list[tuple[str, str]]) -> str:
    """A complete HTML document: the title as <h1>, each (heading, body html) as an <h2> section."""
    parts = [f"<section><h2>{html.escape(h)}</h2>\n{body}\n</section>" for h, body in sections]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        f"<body>\n<h1>{html.escape(title)}</h1>\n" + "\n".join(parts) + "\n</body>\n</html>\n"
    )
