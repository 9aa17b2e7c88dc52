"""Shared pieces of embedwalk's figures: visible tokens, colour scales with honest limits, saving.

Every ``.plot()`` of a result uses these so the figures agree: whitespace in tokens is drawn
visibly (``␣`` for a space, ``\\n`` for a newline), heavy-tailed metrics (KL, ranks) get a
log colour scale with a labelled colour bar (units included), ratios get a diverging map
centred on 1, and figures are saved with a tight bounding box so nothing is clipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np

__all__ = ["visible_token", "save_figure", "ratio_norm", "log_norm", "signed_norm", "integer_ticks", "mark_missing", "INTERACTIVE_EXTRA", "require_plotly"]

INTERACTIVE_EXTRA = "pip install 'embedwalk[interactive]'  (or: pip install plotly)"

_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\x00": "\\0"}


def visible_token(s: str, width: Optional[int] = None) -> str:
    """A token string with its whitespace visible: spaces as ``␣``, newlines/tabs escaped,
    an empty string as ``∅``; cut to ``width`` characters with ``…``."""
    if s == "":
        return "∅"
    out = "".join(_ESCAPES.get(c, c) for c in s).replace(" ", "␣")
    if width is not None and len(out) > width:
        out = out[: width - 1] + "…"
    return out


def save_figure(fig, path: Union[str, Path], *, dpi: int = 150) -> Path:
    """Save with a tight bounding box (titles, colour-bar labels and rotated ticks all kept)."""
    path = Path(path)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=0.05)
    return path


def log_norm(values: np.ndarray, *, floor: Optional[float] = None, vmax: Optional[float] = None):
    """A LogNorm spanning the finite positive values (``floor`` is the lowest value drawn
    distinctly; smaller values, e.g. an exact 0, take the lowest colour)."""
    from matplotlib.colors import LogNorm

    v = np.asarray(values, dtype=float)
    pos = v[np.isfinite(v) & (v > 0)]
    hi = vmax if vmax is not None else (float(pos.max()) if pos.size else 1.0)
    lo = floor if floor is not None else (float(pos.min()) if pos.size else hi / 10)
    lo = min(lo, hi / 10)
    return LogNorm(vmin=lo, vmax=hi, clip=True)


def plain_ticks(cbar) -> None:
    """Label a log-scaled colour bar with plain numbers (0.3, 1, 3) instead of 3 x 10^-1."""
    from matplotlib.ticker import FuncFormatter

    cbar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    def minor(v, _):
        lead = round(v / 10 ** np.floor(np.log10(v))) if v > 0 else 0
        return f"{v:g}" if lead in (2, 3, 5) else ""

    cbar.ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def ratio_norm(values: np.ndarray):
    """A diverging norm centred on 1 for ratios: log-symmetric limits (a ratio of 4 and of
    1/4 get equally strong colours), so 1 is always the neutral middle colour."""
    from matplotlib.colors import LogNorm, TwoSlopeNorm

    v = np.asarray(values, dtype=float)
    pos = v[np.isfinite(v) & (v > 0)]
    if pos.size == 0:
        return TwoSlopeNorm(vcenter=1.0, vmin=0.5, vmax=2.0)
    span = float(np.max(np.abs(np.log(pos))))
    span = max(span, np.log(1.05))
    return LogNorm(vmin=float(np.exp(-span)), vmax=float(np.exp(span)), clip=True)


def signed_norm(values: np.ndarray):
    """A norm centred on 0 with symmetric limits, for a diverging colour map ("RdBu_r") of a
    signed quantity: 0 is the neutral middle colour, +x and -x equally strong."""
    from matplotlib.colors import Normalize

    v = np.asarray(values, dtype=float)
    finite = v[np.isfinite(v)]
    span = float(np.abs(finite).max()) if finite.size else 1.0
    span = span if span > 0 else 1.0
    return Normalize(vmin=-span, vmax=span)


def integer_ticks(*axes) -> None:
    """Only whole-number ticks on these axes (layer and head indices: no 0.5 ticks)."""
    from matplotlib.ticker import MaxNLocator

    for axis in axes:
        axis.set_major_locator(MaxNLocator(integer=True))


def mark_missing(ax, missing: np.ndarray) -> int:
    """Hatch the cells of an ``imshow`` grid where ``missing`` is True, so a missing value never
    looks like a real one (say what hatching means in the colour-bar label). Returns the count."""
    from matplotlib.patches import Rectangle

    rows, cols = np.nonzero(missing)
    for r, c in zip(rows, cols):
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, facecolor="0.88", edgecolor="0.5", hatch="////", lw=0, zorder=2))
    return len(rows)


def require_plotly():
    """Import plotly or raise an error naming the optional extra that installs it."""
    try:
        import plotly.graph_objects as go
    except ImportError:
        from embedwalk.errors import EmbedwalkError

        raise EmbedwalkError(f"interactive figures need plotly, which is not installed: {INTERACTIVE_EXTRA}") from None
    return go


def place_labels(ax, xy, texts, *, priority=None, fontsize: float = 7, color="k", offset=(3, 3), **kwargs) -> list:
    """Annotate points without overlapping labels: labels are placed in ``priority`` order
    (highest first; default: the given order), each tried right-above, left-above, right-below
    and left-below its point; a label that fits nowhere inside the axes without overlapping one
    already placed is dropped. Returns the annotations kept. ``color`` may be one colour or
    one per label. Call after the figure's layout is final (e.g. after ``tight_layout``)."""
    fig = ax.figure
    n = len(texts)
    order = list(range(n)) if priority is None else sorted(range(n), key=lambda i: -priority[i])
    colors = list(color) if isinstance(color, (list, tuple)) and len(color) == n and isinstance(color[0], str) and n > 1 and not isinstance(color, str) else [color] * n
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    dx, dy = abs(offset[0]), offset[1]
    tries = [((dx, dy), "left", "bottom"), ((-dx, dy), "right", "bottom"), ((dx, -dy), "left", "top"), ((-dx, -dy), "right", "top")]
    placed, boxes = [], list(getattr(ax, "_embedwalk_label_boxes", []))
    legend = ax.get_legend()
    if legend is not None:  # never write over the legend
        boxes.append(legend.get_window_extent(renderer))
    for i in order:
        if not texts[i]:
            continue
        for off, ha, va in tries:
            ann = ax.annotate(texts[i], (float(xy[i][0]), float(xy[i][1])), fontsize=fontsize, color=colors[i],
                              xytext=off, textcoords="offset points", ha=ha, va=va, zorder=4, **kwargs)
            box = ann.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(b) for b in boxes):
                boxes.append(box)
                placed.append(ann)
                break
            ann.remove()
    ax._embedwalk_label_boxes = boxes
    return placed
