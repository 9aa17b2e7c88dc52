"""Text collections as one stream of (payload, metadata) items, never held in memory at once.

Accepted: a list of strings; a list of dicts (``text_field`` is the text, the other keys are
metadata); a path to a text file (one prompt per line) or a JSONL file (one object per line);
a Hugging Face ``datasets.Dataset`` (other columns become metadata); any iterable of strings or
dicts; or a token tensor ``[n, pos]`` with an optional attention mask.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor

from embedwalk.errors import EmbedwalkError
from embedwalk.store.manifest import dumps

__all__ = ["iter_items", "item_digest"]


def _from_row(row: Any, text_field: str, where: str):
    if isinstance(row, str):
        return row, None
    if isinstance(row, dict):
        if text_field not in row:
            raise EmbedwalkError(f"{where} has no {text_field!r} field (keys: {sorted(row)[:8]}); pass text_field=...")
        text = row[text_field]
        if not isinstance(text, str):
            raise EmbedwalkError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
        meta = {k: v for k, v in row.items() if k != text_field}
        return text, (meta or None)
    raise EmbedwalkError(f"{where} is a {type(row).__name__}; items must be strings or dicts with a {text_field!r} field")


def _lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n").rstrip("\r")
            if line:
                yield line


def iter_items(
    data,
    *,
    text_field: str = "text",
    attention_mask: Optional[Tensor] = None,
    metadata: Optional[Sequence[dict]] = None,
) -> Iterator[tuple[Any, Optional[dict]]]:
    """Yield ``(text or token row, metadata dict or None)`` in collection order."""
    items = _iter_raw(data, text_field, attention_mask)
    if metadata is None:
        yield from items
        return
    extra = iter(metadata)
    for i, (payload, meta) in enumerate(items):
        try:
            more = next(extra)
        except StopIteration:
            raise EmbedwalkError(f"metadata has fewer entries than the data ({i}); give one dict (or label) per prompt") from None
        more = more if isinstance(more, dict) else {"label": more}
        yield payload, {**(meta or {}), **more}


def _iter_raw(data, text_field, attention_mask):
    if isinstance(data, Tensor):
        tokens = data if data.ndim == 2 else data[None]
        mask = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if mask.shape != tokens.shape:
            raise EmbedwalkError(f"attention_mask has shape {tuple(mask.shape)} but tokens have {tuple(tokens.shape)}; they must match")
        for row, m in zip(tokens, mask):
            yield row[m].long(), None
        return
    if attention_mask is not None:
        raise EmbedwalkError("attention_mask goes with token ids; for text, embedwalk builds the mask")
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.exists():
            raise EmbedwalkError(f"no such data file: {path}. Pass a list of strings, a .txt/.jsonl file, or a datasets.Dataset")
        if path.suffix in (".jsonl", ".ndjson"):
            for n, line in enumerate(_lines(path)):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EmbedwalkError(f"{path} line {n + 1} is not JSON ({e})") from e
                yield _from_row(row, text_field, f"{path} line {n + 1}")
        else:
            for line in _lines(path):
                yield line, None
        return
    if type(data).__name__ in ("Dataset", "IterableDataset") and hasattr(data, "column_names"):
        if text_field not in (data.column_names or [text_field]):
            raise EmbedwalkError(f"the dataset has no column {text_field!r} (columns: {data.column_names}); pass text_field=...")
    if not hasattr(data, "__iter__"):
        raise EmbedwalkError(f"data must be strings, a file path, a datasets.Dataset, an iterable or token ids; got {type(data).__name__}")
    for n, row in enumerate(data):
        yield _from_row(row, text_field, f"item {n}")


def item_digest(payload, meta) -> bytes:
    """A fingerprint of one prompt, so a resumed run can prove it reads the same collection."""
    h = hashlib.sha256()
    if isinstance(payload, Tensor):
        h.update(b"T" + payload.to(torch.int64).numpy().tobytes())
    else:
        h.update(b"S" + payload.encode("utf-8"))
    h.update(dumps(meta).encode())
    return h.digest()
