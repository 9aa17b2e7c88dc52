"""Short reprs for result objects: what a result holds, its shapes and its headline numbers.

One helper for every result class (``@summary_repr`` on the dataclass): the repr is a header
line, the class's own headline lines (``_headline()``, optional) and one compact line per
field, so ``print(result)`` fits on a screen however large the tensors or tables are. A
class's ``_headline`` returns short strings (a few lines, or a small table whose columns are
all shown: pandas' ``...`` never hides the numbers a reader came for).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Optional

__all__ = ["summary_repr", "describe", "result_repr", "table_lines", "MAX_LINES"]

MAX_LINES = 40  # a repr never exceeds this many lines
_WIDTH = 100


def _num(x: float) -> str:
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if x != x:
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.4g}"


def describe(value: Any) -> str:
    """One short phrase for a value: scalars in full, tensors/arrays/tables by shape."""
    try:
        import torch

        if isinstance(value, torch.Tensor):
            shape = "x".join(map(str, value.shape)) or "scalar"
            dtype = str(value.dtype).replace("torch.", "")
            if value.numel() == 1:
                return f"{_num(value.item())} ({dtype})"
            if value.ndim == 1 and value.numel() <= 6 and not value.dtype.is_complex:
                return "[" + ", ".join(_num(v) for v in value.tolist()) + f"] ({dtype})"
            return f"tensor[{shape}] {dtype}"
    except ImportError:  # pragma: no cover
        pass
    try:
        import numpy as np

        if isinstance(value, np.ndarray):
            if value.size <= 6 and value.ndim <= 1 and value.dtype.kind in "fiub":
                return "[" + ", ".join(_num(v) for v in value.tolist()) + f"] ({value.dtype})"
            return f"array[{'x'.join(map(str, value.shape))}] {value.dtype}"
        if isinstance(value, np.generic):
            return _num(value.item())
    except ImportError:  # pragma: no cover
        pass
    if type(value).__name__ == "DataFrame":
        cols = list(value.columns)
        shown = ", ".join(map(str, cols[:8])) + (", ..." if len(cols) > 8 else "")
        return f"DataFrame[{value.shape[0]} rows x {value.shape[1]} cols: {shown}]"
    if value is None or isinstance(value, (bool, int, float)):
        return _num(value) if isinstance(value, (int, float)) else str(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, dict):
        keys = list(value)
        shown = ", ".join(repr(k) if isinstance(k, str) else str(k) for k in keys[:6])
        return f"dict[{len(keys)}: {shown}{', ...' if len(keys) > 6 else ''}]"
    if isinstance(value, (list, tuple)):
        kind = type(value).__name__
        if value and all(isinstance(v, (str, int, float)) for v in value) and len(value) <= 6:
            inner = ", ".join(repr(v) if isinstance(v, str) else _num(v) for v in value)
            out = f"{kind}[{inner}]"
            if len(out) <= 60:
                return out
        if value and all(isinstance(v, str) for v in value):
            return f"{kind}[{len(value)}: {value[0]!r} ... {value[-1]!r}]"
        return f"{kind}[{len(value)}]"
    if dataclasses.is_dataclass(value) or hasattr(value, "__dict__"):
        return f"<{type(value).__name__}>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def table_lines(df, *, max_rows: int = 12, float_format: str = "{:.3f}") -> list[str]:
    """A small DataFrame as text lines, every column shown (rows cut to ``max_rows``)."""
    import pandas as pd

    with pd.option_context("display.max_columns", None, "display.width", 10_000, "display.max_colwidth", 24):
        text = df.head(max_rows).to_string(index=False, float_format=lambda v: float_format.format(v))
    lines = text.splitlines()
    if len(df) > max_rows:
        lines.append(f"... {len(df) - max_rows} more rows (to_dataframe() has them all)")
    return lines


def _wrap(items: Iterable[str], indent: str) -> list[str]:
    lines, cur = [], indent
    for item in items:
        piece = item if cur == indent else "  " + item
        if len(cur) + len(piece) > _WIDTH and cur != indent:
            lines.append(cur)
            cur = indent + item
        else:
            cur += piece
    if cur != indent:
        lines.append(cur)
    return lines


def result_repr(obj, headline: Optional[list[str]] = None, *, skip: Iterable[str] = ()) -> str:
    """``ClassName`` header, headline lines, then ``field=description`` for each dataclass field."""
    name = type(obj).__name__
    skip = set(skip)
    lines = [f"{name}:"]
    if headline is None and hasattr(obj, "_headline"):
        try:
            headline = list(obj._headline())
        except Exception as e:  # a repr must never raise: say why the headline is missing
            headline = [f"(headline unavailable: {type(e).__name__}: {e})"]
    for h in headline or []:
        lines.append("  " + h)
    if dataclasses.is_dataclass(obj):
        items = [
            f"{f.name}={describe(getattr(obj, f.name, None))}"
            for f in dataclasses.fields(obj)
            if f.name not in skip and not f.name.startswith("_")
        ]
        if items:
            lines.append("  fields:")
            lines += _wrap(items, "    ")
    if len(lines) > MAX_LINES:
        lines = lines[: MAX_LINES - 1] + [f"  ... ({len(lines) - MAX_LINES + 1} more lines)"]
    return "\n".join(lines)


def summary_repr(cls):
    """Class decorator: the class's repr becomes :func:`result_repr` (put it above ``@dataclass``).
    Fields named in the class attribute ``_repr_skip`` (its headline already says them) are left out."""
    cls.__repr__ = lambda self: result_repr(self, skip=getattr(self, "_repr_skip", ()))
    return cls
