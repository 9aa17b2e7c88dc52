"""Vectors from a model for concept experiments.

* :func:`token_vectors` -- a word's token embedding (row of ``W_E``) or unembedding
  (column of ``W_U``); a word of several tokens is the mean of its tokens' vectors.
* :class:`PointsReader` / :func:`context_vectors` -- the residual at one chosen token of each
  prompt at *every* readout point (the token embedding, then each block's output) in one pass.
* :class:`SegmentReader` / :func:`segment_vectors` -- each prompt reduced to one concept vector
  per readout point: ``mean``, ``weighted`` (position-weighted mean) or ``last`` token.

Readout point 0 is ``hook_embed`` (the token embedding alone, no learned position vector),
so it lives in the same space as ``W_E`` rows and can be fed back as an input embedding;
point ``l + 1`` is ``blocks.{l}.hook_resid_post``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from embedwalk._summary import summary_repr
from embedwalk.adapter import ModelAdapter, adapt
from embedwalk.errors import EmbedwalkError
from embedwalk.inputs import refuse_unknown
from embedwalk.run import Context, Reader, run

__all__ = [
    "REDUCTIONS",
    "TokenVectors",
    "LayerVectors",
    "PointsReader",
    "SegmentReader",
    "token_vectors",
    "context_vectors",
    "segment_vectors",
    "reduce_positions",
    "point_hooks",
    "point_labels",
]

REDUCTIONS = ("mean", "weighted", "last")


def point_hooks(adapter: ModelAdapter) -> list[str]:
    return ["hook_embed"] + [adapter.hook("resid_post", l) for l in range(adapter.n_layers)]


def point_labels(adapter: ModelAdapter) -> list[str]:
    return ["embed"] + [str(l) for l in range(adapter.n_layers)]


def _bos_id(adapter: ModelAdapter) -> Optional[int]:
    tok = adapter.tokenizer
    return None if tok is None or tok.bos_token_id is None else int(tok.bos_token_id)


# --------------------------------------------------------------------------- token vectors


@summary_repr
@dataclass
class TokenVectors:
    """One vector per word: ``vectors[i]`` is the mean over ``token_ids[i]``."""

    words: list[str]
    kind: str
    vectors: Float[Tensor, "n d_model"]
    token_ids: list[list[int]]

    @property
    def n_tokens(self) -> list[int]:
        return [len(t) for t in self.token_ids]

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame({
            "word": self.words, "kind": self.kind, "n_tokens": self.n_tokens,
            "norm": self.vectors.norm(dim=-1).cpu().numpy(),
        })

    def plot(self):
        import matplotlib.pyplot as plt

        from embedwalk.figures import place_labels, visible_token

        norms = self.vectors.norm(dim=-1).cpu().double().numpy()
        fig, ax = plt.subplots(figsize=(5.5, 3.2), constrained_layout=True)
        ax.hist(norms, bins=min(30, max(5, len(norms))), color="tab:blue", alpha=0.8)
        what = "W_E row" if self.kind == "embed" else "W_U column"
        ax.set_xlabel(f"‖{self.kind} vector‖ (L2 norm of the {what}, model units)")
        ax.set_ylabel("words")
        from matplotlib.ticker import MaxNLocator

        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{len(norms)} words, {self.kind} vectors (a word of several tokens: their mean)", fontsize=9)
        # name the extreme words: those are the ones a reader asks about
        order = np.argsort(norms)
        pick = list(dict.fromkeys([int(order[0]), int(order[-1])]))
        fig.canvas.draw()
        ymax = ax.get_ylim()[1]
        place_labels(ax, [(norms[i], 0.04 * ymax) for i in pick], [visible_token(self.words[i], 16) for i in pick])
        return fig


def token_vectors(
    model, words: Sequence[str], kind: str = "embed", *, leading_space: bool = True
) -> TokenVectors:
    """Embedding (``kind="embed"``, rows of W_E) or unembedding (``"unembed"``, columns of
    W_U) vectors of ``words``; ``leading_space`` tokenizes `` word`` as it appears mid-text."""
    a = adapt(model)
    if kind not in ("embed", "unembed"):
        raise EmbedwalkError(f"kind must be 'embed' or 'unembed', got {kind!r}")
    if isinstance(words, str) or not len(words):
        raise EmbedwalkError("words must be a non-empty list of strings")
    ids = []
    for w in words:
        text = (" " + w) if leading_space else w
        t = a.to_tokens(text, prepend_bos=False)
        if not t.numel():
            raise EmbedwalkError(f"word {w!r} tokenized to nothing; drop it")
        refuse_unknown(a, text, t, what="word")
        ids.append(t.tolist())
    table = a.W_E.detach() if kind == "embed" else a.W_U.detach().T
    vecs = torch.stack([table[torch.tensor(t, device=table.device)].float().mean(0) for t in ids])
    return TokenVectors(list(words), kind, vecs, ids)


# --------------------------------------------------------------------------- reductions


def reduce_positions(
    x: Float[Tensor, "batch pos d"], mask: Bool[Tensor, "batch pos"], how: str
) -> Float[Tensor, "batch d"]:
    """Mean, position-weighted mean or last of each row's positions where ``mask`` is True.

    ``weighted`` gives the k-th kept token (1-based) the weight k / Σk: later tokens have
    seen more of the segment (SGPT-style position-weighted mean pooling).
    """
    if how not in REDUCTIONS:
        raise EmbedwalkError(f"reduction must be one of {REDUCTIONS}, got {how!r}")
    m = mask.to(torch.float32)
    if how == "last":
        pos = torch.arange(mask.shape[1], device=mask.device)
        last = torch.where(mask, pos, -1).amax(-1)
        return x[torch.arange(x.shape[0], device=x.device), last].float()
    w = m if how == "mean" else m.cumsum(-1) * m
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    return torch.einsum("bp,bpd->bd", w, x.float())


# --------------------------------------------------------------------------- readers


@summary_repr
@dataclass
class LayerVectors:
    """``vectors[i, k]``: prompt i at readout point k (``points[k]``: 'embed', '0', '1', ...)."""

    vectors: Float[Tensor, "n points d_model"]
    points: list[str]
    what: str

    def at(self, point: Union[int, str]) -> Float[Tensor, "n d_model"]:
        k = self.points.index(point) if isinstance(point, str) else point
        return self.vectors[:, k]

    def to_dataframe(self) -> pd.DataFrame:
        norms = self.vectors.norm(dim=-1).cpu().numpy()
        rows = [{"prompt": i, "point": p, "norm": float(norms[i, k])}
                for i in range(norms.shape[0]) for k, p in enumerate(self.points)]
        return pd.DataFrame(rows)

    def plot(self):
        import matplotlib.pyplot as plt

        norms = self.vectors.norm(dim=-1).cpu().double().numpy()  # [n, points]
        x = np.arange(len(self.points))
        fig, ax = plt.subplots(figsize=(max(4.5, 0.18 * len(x) + 2.5), 3.2), constrained_layout=True)
        if norms.shape[0] > 1:
            ax.fill_between(x, norms.min(0), norms.max(0), color="tab:blue", alpha=0.2, lw=0, label="range over prompts")
        ax.plot(x, norms.mean(0), marker=".", color="tab:blue", label=f"mean over {norms.shape[0]} prompts")
        ax.set_xticks(x, self.points, rotation=90 if len(x) > 12 else 0, fontsize=7)
        ax.set_xlabel("readout point (embed = token embedding, l = after block l)")
        ax.set_ylabel(f"‖{self.what}‖ (L2 norm)")
        ax.set_title(f"norm of the {self.what}s per readout point", fontsize=9)
        ax.legend(fontsize=7)
        return fig


class PointsReader(Reader):
    """The residual at one position per prompt at every readout point, in float32.

    ``positions[i]`` counts real tokens of prompt i from its first (BOS included when the
    model adds one; negative counts from the end); ``None`` means the last real token.
    """

    def __init__(self, positions: Optional[Sequence[int]] = None):
        self.positions = None if positions is None else torch.as_tensor(list(positions)).long()
        self.rows: dict[str, list[Tensor]] = {}

    def hook_points(self, adapter):
        self.names = point_hooks(adapter)
        return self.names

    def _index(self, ctx: Context) -> Int[Tensor, "batch"]:
        mask = ctx.batch.mask
        if self.positions is None:
            return ctx.batch.last
        first = mask.long().argmax(-1)
        want = self.positions[ctx.batch.prompt].to(mask.device)
        n = mask.sum(-1)
        want = torch.where(want < 0, want + n, want)
        if bool(((want < 0) | (want >= n)).any()):
            raise EmbedwalkError("a position lies outside its prompt's real tokens; check positions")
        return first + want

    def read(self, name, value, ctx):
        if "idx" not in ctx.state:
            ctx.state["idx"] = self._index(ctx)
        rows = torch.arange(value.shape[0], device=value.device)
        self.rows.setdefault(name, []).append(value[rows, ctx.state["idx"]].float().cpu())

    def result(self) -> Float[Tensor, "n points d_model"]:
        return torch.stack([torch.cat(self.rows[n]) for n in self.names], 1)


class SegmentReader(Reader):
    """Each prompt reduced to one vector per readout point and per reduction.

    ``skip_bos`` leaves a leading BOS out of the reduction: it carries no content of the
    segment and its residual (an attention sink) is often far larger than the rest.
    """

    def __init__(self, reductions: Sequence[str] = REDUCTIONS, *, skip_bos: bool = True,
                 points: Optional[Sequence[int]] = None):
        bad = [r for r in reductions if r not in REDUCTIONS]
        if bad:
            raise EmbedwalkError(f"unknown reductions {bad}; choose from {REDUCTIONS}")
        self.reductions = list(reductions)
        self.skip_bos = skip_bos
        self.points = None if points is None else list(points)
        self.rows: dict[tuple[str, str], list[Tensor]] = {}

    def hook_points(self, adapter):
        hooks = point_hooks(adapter)
        self.names = hooks if self.points is None else [hooks[k] for k in self.points]
        self.bos = _bos_id(adapter) if self.skip_bos else None
        return self.names

    def _mask(self, ctx: Context) -> Tensor:
        mask = ctx.batch.mask
        if self.bos is None:
            return mask
        first = mask.long().argmax(-1)
        rows = torch.arange(mask.shape[0], device=mask.device)
        is_bos = ctx.batch.tokens[rows, first] == self.bos
        keep = mask.clone()
        # A segment that is only a BOS keeps it rather than reducing nothing.
        drop = is_bos & (mask.sum(-1) > 1)
        keep[rows[drop], first[drop]] = False
        return keep

    def read(self, name, value, ctx):
        if "seg_mask" not in ctx.state:
            ctx.state["seg_mask"] = self._mask(ctx)
        for how in self.reductions:
            self.rows.setdefault((name, how), []).append(
                reduce_positions(value, ctx.state["seg_mask"], how).cpu())

    def result(self) -> dict[str, Float[Tensor, "n points d_model"]]:
        return {how: torch.stack([torch.cat(self.rows[(n, how)]) for n in self.names], 1)
                for how in self.reductions}


def context_vectors(
    model, texts, *, positions: Optional[Sequence[int]] = None, batch_size: int = 16,
    prepend_bos: Optional[bool] = None, progress: Optional[bool] = None,
) -> LayerVectors:
    """The residual at one token of each prompt (default: its last) at every readout point."""
    a = adapt(model)
    (vecs,) = run(a, texts, readers=[PointsReader(positions)], batch_size=batch_size,
                  prepend_bos=prepend_bos, progress=progress)
    return LayerVectors(vecs, point_labels(a), "context vector")


def segment_vectors(
    model, texts, reduce: str = "mean", *, batch_size: int = 16, skip_bos: bool = True,
    prepend_bos: Optional[bool] = None, progress: Optional[bool] = None,
) -> LayerVectors:
    """Each text reduced to one concept vector (``mean`` / ``weighted`` / ``last``) at every point."""
    a = adapt(model)
    (out,) = run(a, texts, readers=[SegmentReader([reduce], skip_bos=skip_bos)],
                 batch_size=batch_size, prepend_bos=prepend_bos, progress=progress)
    return LayerVectors(out[reduce], point_labels(a), f"{reduce} segment vector")
