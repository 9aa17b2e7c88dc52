"""Reading a store: memory-mapped shards, random access by row, batches, filters, data frames."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from embedwalk.errors import EmbedwalkError
from embedwalk.store import manifest as mf

__all__ = ["ActivationStore", "StoreBatch", "open_store"]

Where = Union[None, dict, Callable]


@dataclass
class StoreBatch:
    """Rows of a store: one ``[n, d_model]`` tensor per hook, their indices and per-row metadata.

    ``vectors`` are zero-copy views of the memory-mapped shard when the rows are contiguous in
    one shard (copy-on-write: writing to them never touches the file).
    """

    vectors: dict[str, Float[Tensor, "n d_model"]]
    row: Int[Tensor, "n"]
    prompt: Int[Tensor, "n"]
    position: Int[Tensor, "n"]
    tokens: Int[Tensor, "n"]
    meta: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.row.shape[0])

    def __getitem__(self, hook: str) -> Tensor:
        return self.vectors[hook]

    def stack(self, hooks: Optional[Sequence[str]] = None) -> Float[Tensor, "n hooks d_model"]:
        return torch.stack([self.vectors[h] for h in (hooks or list(self.vectors))], 1)

    def to_dataframe(self, *, wide: bool = False):
        """Tidy long form: one row per (stored row, hook) with metadata and the vector."""
        import pandas as pd

        frames = []
        for hook, v in self.vectors.items():
            df = pd.DataFrame({"row": self.row.numpy(), "prompt": self.prompt.numpy(), "position": self.position.numpy(), "token": self.tokens.numpy(), "hook": hook})
            for k, col in self.meta.items():
                df[k] = col
            arr = v.float().numpy()
            if wide:
                df = pd.concat([df, pd.DataFrame(arr, columns=[f"v{i}" for i in range(arr.shape[1])])], axis=1)
            else:
                df["vector"] = list(arr)
            frames.append(df)
        return pd.concat(frames, ignore_index=True)


class _Shard:
    def __init__(self, path: Path, info: dict):
        self.path, self.info = path, info
        self._tensors = None
        self._meta = None

    @property
    def tensors(self) -> dict:
        if self._tensors is None:
            self._tensors, self._meta = mf.map_shard(self.path)
        return self._tensors

    @property
    def meta(self) -> dict:
        if self._meta is None:
            header, _ = mf.read_header(self.path)
            self._meta = header.get("__metadata__", {}) or {}
        try:
            return json.loads(self._meta.get("embedwalk", "{}"))
        except (AttributeError, TypeError, json.JSONDecodeError) as e:
            raise mf.damaged(self.path, f"has damaged embedwalk metadata ({e})") from e


class ActivationStore:
    """A store on disk, read through memory maps. ``len(store)`` is its number of rows."""

    def __init__(self, path: Union[str, Path], *, verify: bool = False, allow_partial: bool = False):
        self.path = Path(path)
        m = mf.read_manifest(self.path)
        if m is None:
            ranks = sorted(self.path.glob("rank-*-of-*"))
            hint = (f" It holds {len(ranks)} rank folders: run embedwalk.store.merge({str(self.path)!r}) first." if ranks else "")
            raise EmbedwalkError(f"no activation store at {self.path} (no manifest.json).{hint}")
        if not m["complete"] and not allow_partial:
            raise EmbedwalkError(
                f"the store at {self.path} is incomplete ({m['prompts']} prompts in {len(m['shards'])} shards); rerun the "
                "same cache command to resume it, or open it with allow_partial=True"
            )
        self.manifest = m
        self.hooks: list[str] = [h["name"] for h in m["hooks"]]
        self.hook_info = {h["name"]: h for h in m["hooks"]}
        self._alias = {a: h["name"] for h in m["hooks"] for a in [h["name"], *h["aliases"]]}
        self.d_model: int = m["d_model"]
        self.dtype: torch.dtype = mf.DTYPES[m["dtype"]]
        self.shards = [_Shard(self.path / s["file"], s) for s in m["shards"]]
        for sh in self.shards:
            size = sh.path.stat().st_size if sh.path.exists() else None
            if size is None:
                raise mf.damaged(sh.path, "is missing")
            if size != sh.info["bytes"]:
                raise mf.damaged(sh.path, f"is truncated or altered ({size} bytes, the manifest says {sh.info['bytes']})")
        self.offsets = np.cumsum([0] + [s.info["rows"] for s in self.shards])
        self._prompts = None
        if verify:
            self.verify()

    # ------------------------------------------------------------------ identity
    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_prompts(self) -> int:
        return int(self.manifest["prompts"])

    @property
    def model_verified(self) -> bool:
        """Whether the manifest records the fingerprint of the model that wrote the store
        (:mod:`embedwalk.fingerprint`); stores written before fingerprints do not."""
        return mf.identity_verified(self.manifest.get("config", {}).get("model"))

    def __repr__(self) -> str:
        from embedwalk.fingerprint import UNVERIFIED

        return (f"ActivationStore({str(self.path)!r}, rows={len(self)}, prompts={self.n_prompts}, hooks={self.hooks}, "
                f"dtype={self.manifest['dtype']}" + ("" if self.model_verified else f", {UNVERIFIED}") + ")")

    def verify(self) -> None:
        """Recompute every shard's checksum; raise naming the first corrupt shard."""
        for sh in self.shards:
            if mf.file_sha256(sh.path) != sh.info["sha256"]:
                raise mf.damaged(sh.path, "is corrupt (sha256 differs from the manifest)")

    def resolve(self, hooks: Union[None, str, Sequence[str]] = None, layers: Optional[Sequence[int]] = None) -> list[str]:
        """Stored hook names for ``hooks`` (names, aliases such as 'final' or 'resid_pre.4') and/or ``layers``."""
        if isinstance(hooks, str):
            hooks = [hooks]
        names = self.hooks if hooks is None else []
        for h in hooks or []:
            if h not in self._alias:
                raise EmbedwalkError(f"hook {h!r} is not in this store; it holds {self.hooks} (aliases: {sorted(set(self._alias) - set(self.hooks))})")
            names.append(self._alias[h])
        if layers is not None:
            names = [n for n in names if self.hook_info[n]["layer"] in set(layers)]
            if not names:
                raise EmbedwalkError(f"no stored hook at layers {list(layers)}; stored layers: {[self.hook_info[h]['layer'] for h in self.hooks]}")
        return list(dict.fromkeys(names))

    # ------------------------------------------------------------------ metadata
    @property
    def prompts(self):
        """One row per prompt: prompt index, shard, first row, number of rows, then metadata columns."""
        if self._prompts is None:
            import pandas as pd

            recs = []
            for k, sh in enumerate(self.shards):
                info = sh.meta
                start = int(self.offsets[k])
                metas = info.get("meta") or [None] * len(info["prompts"])
                for p, n, meta in zip(info["prompts"], info["rows"], metas):
                    recs.append({"prompt": p, "shard": k, "row_start": start, "n_rows": n, **(meta or {})})
                    start += n
            self._prompts = pd.DataFrame.from_records(recs, columns=None if recs else ["prompt", "shard", "row_start", "n_rows"]).sort_values("prompt", kind="stable").reset_index(drop=True)
        return self._prompts

    def write_metadata_table(self) -> Path:
        """Write the prompt table as Parquet (JSONL when pyarrow is missing), beside the manifest."""
        df = self.prompts
        try:
            import pyarrow  # noqa: F401

            path = self.path / "metadata.parquet"
            tmp = self.path / ".metadata.parquet.tmp"
            try:
                df.to_parquet(tmp, index=False)
            except (TypeError, ValueError, ImportError):  # mixed-type metadata columns: fall back to JSONL
                tmp.unlink(missing_ok=True)
                raise ImportError
        except ImportError:
            path = self.path / "metadata.jsonl"
            tmp = self.path / ".metadata.jsonl.tmp"
            df.to_json(tmp, orient="records", lines=True)
        tmp.replace(path)
        return path

    def _meta_for(self, prompt: np.ndarray) -> dict[str, list]:
        df = self.prompts
        cols = [c for c in df.columns if c not in ("prompt", "shard", "row_start", "n_rows")]
        if not cols:
            return {}
        where = np.searchsorted(df["prompt"].to_numpy(), prompt)
        return {c: df[c].to_numpy()[where].tolist() for c in cols}

    # ------------------------------------------------------------------ rows
    def _norm_rows(self, rows) -> np.ndarray:
        n = len(self)
        if isinstance(rows, slice):
            return np.arange(n)[rows]
        idx = np.asarray(rows.cpu() if isinstance(rows, Tensor) else rows, dtype=np.int64).reshape(-1)
        idx = np.where(idx < 0, idx + n, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise EmbedwalkError(f"row index out of range: the store has {n} rows")
        return idx

    def get(self, rows, hooks: Union[None, str, Sequence[str]] = None, *, layers=None) -> StoreBatch:
        """Rows by index (int, slice, array) for ``hooks`` (default all stored hooks)."""
        names = self.resolve(hooks, layers)
        idx = self._norm_rows(rows)
        shard_of = np.searchsorted(self.offsets, idx, side="right") - 1
        parts = {k: [] for k in ["tokens", "prompt", "position", *names]}
        order = []
        for k in np.unique(shard_of):
            pick = np.nonzero(shard_of == k)[0]
            local = idx[pick] - self.offsets[k]
            t = self.shards[k].tensors
            if local.size and local[-1] - local[0] + 1 == local.size and np.all(np.diff(local) == 1):
                sel = slice(int(local[0]), int(local[-1]) + 1)  # contiguous: a view, no copy
            else:
                sel = torch.from_numpy(local)
            for key in ("tokens", "prompt", "position"):
                parts[key].append(t[key][sel])
            for h in names:
                parts[h].append(t[f"act.{h}"][sel])
            order.append(pick)
        cat = lambda xs, empty: xs[0] if len(xs) == 1 else (torch.cat(xs) if xs else empty)  # noqa: E731
        order = np.concatenate(order) if order else np.zeros(0, dtype=np.int64)
        inverse = None
        if order.size and np.any(order != np.arange(order.size)):  # restore the caller's order
            inverse = torch.from_numpy(np.argsort(order))
        def fix(x):
            return x if inverse is None else x[inverse]
        prompt = fix(cat(parts["prompt"], torch.zeros(0, dtype=torch.int64)))
        return StoreBatch(
            vectors={h: fix(cat(parts[h], torch.zeros(0, self.d_model, dtype=self.dtype))) for h in names},
            row=torch.from_numpy(idx),
            prompt=prompt,
            position=fix(cat(parts["position"], torch.zeros(0, dtype=torch.int32))),
            tokens=fix(cat(parts["tokens"], torch.zeros(0, dtype=torch.int32))),
            meta=self._meta_for(prompt.numpy()),
        )

    __getitem__ = get

    def select(self, where: Where = None) -> np.ndarray:
        """Row indices whose prompt's metadata matches ``where``.

        ``where`` is a dict ``{column: value or list of values}`` or a function of the prompt table
        (a pandas DataFrame, see :attr:`prompts`) returning a boolean mask.
        """
        if where is None:
            return np.arange(len(self))
        df = self.prompts
        if callable(where):
            keep = np.asarray(where(df), dtype=bool)
        elif isinstance(where, dict):
            keep = np.ones(len(df), dtype=bool)
            for col, want in where.items():
                if col not in df.columns:
                    raise EmbedwalkError(f"no metadata column {col!r}; the store has {list(df.columns)}")
                want = list(want) if isinstance(want, (list, tuple, set)) else [want]
                keep &= df[col].isin(want).to_numpy()
        else:
            raise EmbedwalkError("where must be a dict {column: value(s)} or a function of the prompt table")
        sub = df[keep]
        spans = [np.arange(s, s + n) for s, n in zip(sub["row_start"].to_numpy(), sub["n_rows"].to_numpy())]
        return np.sort(np.concatenate(spans)) if spans else np.zeros(0, dtype=np.int64)

    def _index_stream(self, rows: Optional[np.ndarray], shuffle: bool, buffer: int, rng) -> Iterator[np.ndarray]:
        order = rng.permutation(len(self.shards)) if shuffle else range(len(self.shards))
        chunk = max(buffer // 4, 1024)
        pending = np.zeros(0, dtype=np.int64)
        for k in order:
            lo, hi = int(self.offsets[k]), int(self.offsets[k + 1])
            mine = np.arange(lo, hi) if rows is None else rows[(rows >= lo) & (rows < hi)]
            for i in range(0, mine.size, chunk):
                piece = mine[i : i + chunk]
                if not shuffle:
                    yield piece
                    continue
                # A streaming shuffle buffer: every row passes through it exactly once.
                pending = np.concatenate([pending, piece])
                if pending.size > buffer:
                    rng.shuffle(pending)
                    yield pending[: pending.size - buffer]
                    pending = pending[pending.size - buffer :].copy()
        if shuffle and pending.size:
            rng.shuffle(pending)
            yield pending

    def batches(
        self,
        hooks: Union[None, str, Sequence[str]] = None,
        *,
        batch_size: int = 1024,
        layers: Optional[Sequence[int]] = None,
        where: Where = None,
        shuffle: bool = False,
        shuffle_buffer: int = 65536,
        seed: int = 0,
        drop_last: bool = False,
    ) -> Iterator[StoreBatch]:
        """Iterate over the (filtered) rows in batches, optionally through a shuffle buffer.

        Without shuffling, rows come in store order and each batch lies in as few shards as
        possible (zero-copy when it lies in one). With ``shuffle=True`` the shards are visited in
        random order and rows pass a buffer of ``shuffle_buffer`` rows; each row appears exactly
        once per pass.
        """
        if batch_size < 1:
            raise EmbedwalkError(f"batch_size must be at least 1, got {batch_size}")
        names = self.resolve(hooks, layers)
        rows = None if where is None else self.select(where)
        rng = np.random.default_rng(seed)
        carry = np.zeros(0, dtype=np.int64)
        for piece in self._index_stream(rows, shuffle, shuffle_buffer, rng):
            carry = np.concatenate([carry, piece]) if carry.size else piece
            while carry.size >= batch_size:
                yield self.get(carry[:batch_size], names)
                carry = carry[batch_size:]
        if carry.size and not drop_last:
            yield self.get(carry, names)

    def to_dataframe(self, rows=slice(0, 1000), hooks=None, *, layers=None, wide: bool = False):
        """A slice of rows (default the first 1000) as a tidy frame: metadata, hook, vector."""
        return self.get(rows, hooks, layers=layers).to_dataframe(wide=wide)

    def plot(self, rows=slice(0, 4096), hooks=None):
        """Mean vector norm per stored hook over a slice of rows, a quick look at the residual's growth."""
        import matplotlib.pyplot as plt

        b = self.get(rows, hooks)
        names = list(b.vectors)
        norms = [float(b.vectors[h].float().norm(dim=-1).mean()) for h in names]
        resid = [self.hook_info[h]["kind"] == "resid_post" for h in names]
        ticks = [str(self.hook_info[h]["layer"]) if r else h for h, r in zip(names, resid)]
        fig, ax = plt.subplots(figsize=(max(4.5, 0.3 * len(names) + 2.5), 3.2), constrained_layout=True)
        ax.bar(range(len(names)), norms, color="tab:blue")
        ax.set_xticks(range(len(names)), ticks, rotation=90 if max(map(len, ticks)) > 3 or len(ticks) > 16 else 0, fontsize=7)
        ax.set_xlabel("layer (blocks.l.hook_resid_post)" if all(resid) else "hook (a number: that layer's resid_post)")
        ax.set_ylabel("mean ‖x‖ (L2 norm, as stored)")
        name = self.path.name if len(self.path.name) <= 28 else self.path.name[:27] + "…"
        ax.set_title(f"{len(b)} rows of {name}", fontsize=9)
        return fig


def open_store(path: Union[str, Path], *, verify: bool = False, allow_partial: bool = False) -> ActivationStore:
    """Open a store written by :func:`cache_activations` (or merged by :func:`merge`)."""
    return ActivationStore(path, verify=verify, allow_partial=allow_partial)
