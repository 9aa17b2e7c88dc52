"""The logit lens: read every residual readout through the model's own final norm and unembed.

One streaming pass. A reader gathers the residual at the requested positions at each readout
hook (``[readouts, positions, d_model]``, small), and at the end of each batch reads them out.

The unembedding GEMM is the cost, so everything else is arranged around it:

- up to ``chunk_size`` (readout, position) rows (default 1024) share one GEMM, which runs
  at full speed only with that many rows;
- the logits are formed one vocabulary block at a time (:func:`vocab_block`: 2048 entries on
  CPU) and reduced while the block is still in cache (:class:`embedwalk.reduce.VocabAccumulator`:
  running maximum, log-normaliser, entropy, target rank, the KL's cross term, top-k, merged
  in float64 like a streaming softmax), so the full ``[rows, vocab]`` logits never exist;
- KL(final || layer) = sum p_f log p_f - sum p_f z + log Z * sum p_f needs only the cross term
  sum p_f z per block; the final distribution p_f is formed once per position chunk
  (:func:`final_rows` positions) and shared by every readout.

The final readout goes through the model's own modules (:meth:`ModelAdapter.readout`), so its
log-probabilities are the model's own; the other readouts use the same norm, ``W_U``, ``b_U``
and output transform a block at a time (:meth:`ModelAdapter.readout_parts`, verified against
the model's readout once per adapter). Entropies and KLs are summed in float32 over blocks of
2048 entries and in float64 across blocks: ~1e-5 nats on a 49k vocabulary where one float32
dot product loses ~5e-4, and ~1e-5 relative on KLs of tens of nats (the float32 rounding of
the logits themselves; 1.8e-3 on SmolLM2's 126-nat KL between its embedding and its output). ``fused=True`` reduces each block with one ``torch.compile`` kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from embedwalk import progress as _progress
from embedwalk._summary import summary_repr
from embedwalk.adapter import ModelAdapter, ReadoutPoint, adapt
from embedwalk.errors import EmbedwalkError
from embedwalk.inputs import Inputs, require_device, tokenize, warn_if_spaced_likelier
from embedwalk.reduce import VocabAccumulator, _blocksum, fused_available
from embedwalk.run import Context, Reader, run

__all__ = ["LogitLensResult", "LogitLensReader", "logit_lens", "default_chunk_size", "METRICS", "refuse_layers"]

Positions = Union[None, str, int, Sequence[int]]
Targets = Union[None, int, str, Sequence, Tensor]
Translator = Callable[[Tensor, ReadoutPoint], Tensor]

METRICS = ("kl_to_final", "entropy", "target_logprob", "target_rank", "top1_prob")


def default_chunk_size(device: torch.device) -> int:
    """(readout, position) rows per unembedding GEMM: 1024, enough rows for the GEMM to run
    at full speed on a CPU or a GPU. Memory stays small whatever it is: the logits are formed
    a vocabulary block at a time (:func:`vocab_block`)."""
    return 1024


# ---------------------------------------------------------------------------- result
@summary_repr
@dataclass
class LogitLensResult:
    """Per (readout, row) metrics; a row is one (prompt, position) pair.

    ``target_rank`` counts vocabulary entries with a strictly higher logit (0 = top-1).
    Positions without a target (the last token under next-token targets) hold NaN / -1.
    ``pos`` counts real tokens of the prompt (padding never counts).
    """

    labels: list[str]
    prompt: Int[Tensor, "row"]
    pos: Int[Tensor, "row"]
    token: Int[Tensor, "row"]
    target: Int[Tensor, "row"]
    top_ids: Int[Tensor, "readout row k"]
    top_probs: Float[Tensor, "readout row k"]
    target_logprob: Float[Tensor, "readout row"]
    target_rank: Int[Tensor, "readout row"]
    entropy: Float[Tensor, "readout row"]
    kl_to_final: Float[Tensor, "readout row"]
    top1_agrees: Bool[Tensor, "readout row"]
    token_strs: dict = field(default_factory=dict, repr=False)
    translated: bool = False

    def _headline(self) -> list[str]:
        R, N, k = self.top_ids.shape
        kind = "tuned" if self.translated else "logit"
        out = [f"{kind} lens: {R} readouts ({self.labels[0]} .. {self.labels[-1]}) x {N} rows "
               f"({len(set(self.prompt.tolist()))} prompts), top-{k}"]
        kl = self.layer_means("kl_to_final").tolist()
        picks = sorted(set([0, R // 4, R // 2, 3 * R // 4, R - 1]))
        out.append("mean KL(final || readout), nats: " + "  ".join(f"{self.labels[i]}: {kl[i]:.3g}" for i in picks))
        agree = self.top1_agrees.float().mean(1).tolist()
        out.append("top-1 agrees with final: " + "  ".join(f"{self.labels[i]}: {agree[i]:.0%}" for i in picks))
        return out

    def _str(self, i: int) -> str:
        return self.token_strs.get(int(i), f"<{int(i)}>") if i >= 0 else ""

    def metric(self, name: str) -> Tensor:
        """A [readout, row] tensor of one metric (``top1_prob`` included)."""
        if name == "top1_prob":
            return self.top_probs[..., 0]
        if name not in METRICS:
            raise EmbedwalkError(f"unknown metric {name!r}; choose one of {list(METRICS)}")
        return getattr(self, name)

    def layer_means(self, name: str = "kl_to_final") -> Float[Tensor, "readout"]:
        """Mean of a metric over rows per readout (rows without a target skipped)."""
        m = self.metric(name).double()
        ok = torch.isfinite(m) & (m >= 0 if name == "target_rank" else torch.ones_like(m, dtype=torch.bool))
        return (torch.where(ok, m, 0).sum(1) / ok.sum(1).clamp(min=1)).float()

    def to_dataframe(self):
        """One row per (prompt, pos, layer) with the metrics and the top-k tokens."""
        import pandas as pd

        R, N, k = self.top_ids.shape
        rep = lambda t: t.repeat(R).numpy()  # noqa: E731  rows vary fastest within a readout
        ids = self.top_ids.reshape(R * N, k)
        cols = {
            "prompt": rep(self.prompt),
            "pos": rep(self.pos),
            "layer": [lab for lab in self.labels for _ in range(N)],
            "layer_index": torch.arange(R).repeat_interleave(N).numpy(),
            "token": [self._str(i) for i in self.token.repeat(R).tolist()],
            "target": [self._str(i) for i in self.target.repeat(R).tolist()],
            "target_logprob": self.target_logprob.reshape(-1).numpy(),
            "target_rank": self.target_rank.reshape(-1).numpy(),
            "entropy": self.entropy.reshape(-1).numpy(),
            "kl_to_final": self.kl_to_final.reshape(-1).numpy(),
            "top1_agrees": self.top1_agrees.reshape(-1).numpy(),
            "top1_token": [self._str(i) for i in ids[:, 0].tolist()],
            "top1_prob": self.top_probs[..., 0].reshape(-1).numpy(),
        }
        for j in range(1, k):
            cols[f"top{j + 1}_token"] = [self._str(i) for i in ids[:, j].tolist()]
            cols[f"top{j + 1}_prob"] = self.top_probs[..., j].reshape(-1).numpy()
        return pd.DataFrame(cols)

    def format_table(self, *, prompt: int = 0, pos: Optional[int] = None) -> str:
        """A readable per-layer table for one (prompt, position): the top tokens with their
        probabilities, entropy and KL to the final distribution. Default: the last position."""
        rows = (self.prompt == prompt).nonzero().flatten()
        if rows.numel() == 0:
            raise EmbedwalkError(f"prompt {prompt} is not in this result (prompts: {sorted(set(self.prompt.tolist()))})")
        if pos is None:
            row = int(rows[self.pos[rows].argmax()])
        else:
            match = rows[self.pos[rows] == pos]
            if match.numel() == 0:
                raise EmbedwalkError(f"position {pos} of prompt {prompt} is not in this result")
            row = int(match[0])
        width = max(len(label) for label in self.labels)
        lines = [f"{'layer':>{width}}  {'KL':>6}  {'entropy':>7}  top tokens (probability)"]
        for r, label in enumerate(self.labels):
            tops = "  ".join(
                f"{self._str(int(i))!r} {float(p):.2f}" for i, p in zip(self.top_ids[r, row], self.top_probs[r, row])
            )
            lines.append(f"{label:>{width}}  {float(self.kl_to_final[r, row]):6.2f}  {float(self.entropy[r, row]):7.2f}  {tops}")
        return "\n".join(lines)

    def _prompt_rows(self, prompt: int) -> Tensor:
        rows = (self.prompt == prompt).nonzero().flatten()
        if rows.numel() == 0:
            raise EmbedwalkError(f"prompt {prompt} is not in this result (prompts: {sorted(set(self.prompt.tolist()))})")
        return rows[self.pos[rows].argsort()]

    def plot(self, metric: str = "kl_to_final", *, prompt: int = 0, kind: str = "heatmap", annotate: Optional[bool] = None,
             ax=None, interactive: bool = False):
        """``kind="heatmap"``: readout x position of ``metric`` for one prompt, cells labelled
        with the readout's top-1 token (the classic logit-lens figure). ``kind="lines"``: mean
        KL to the final distribution and mean entropy per readout, over all rows.

        Colour scales: KL and target rank are heavy-tailed (the embedding row's KL is often
        100x the rest), so they use a log scale; the target rank is drawn as ``1 + rank``
        (1 = top-1) and cells without a target (the last position under next-token targets) are
        hatched grey, never coloured as a rank. Whitespace in tokens is drawn visibly (``␣``,
        ``\\n``). ``interactive=True`` returns a plotly figure whose hover shows each cell's top
        tokens and metrics (needs ``pip install 'embedwalk[interactive]'``).
        """
        if interactive:
            if kind != "heatmap":
                raise EmbedwalkError("interactive=True draws the heatmap; use kind='heatmap'")
            return self._interactive(metric, prompt)
        import matplotlib.pyplot as plt

        from embedwalk.figures import log_norm, mark_missing, visible_token

        name = "tuned" if self.translated else "logit"
        if kind == "lines":
            fig, ax1 = plt.subplots(figsize=(7, 3.5)) if ax is None else (ax.figure, ax)
            x = range(len(self.labels))
            ax1.plot(x, self.layer_means("kl_to_final"), "o-", color="C0", ms=3, label="KL(final ‖ readout)")
            ax1.set_yscale("log")
            ax1.set_ylabel("mean KL(final ‖ readout) [nats, log]", color="C0")
            ax2 = ax1.twinx()
            ax2.plot(x, self.layer_means("entropy"), "s--", color="C1", ms=3, label="entropy")
            ax2.set_ylabel("mean entropy [nats]", color="C1")
            step = max(1, -(-len(self.labels) // 16))
            ax1.set_xticks(list(x)[::step], self.labels[::step], fontsize=8)
            ax1.set_xlabel("readout (embed, then the output of block l)")
            ax1.set_title(f"{name} lens: per-readout means over {self.top_ids.shape[1]} positions")
            fig.tight_layout()
            return fig
        if kind != "heatmap":
            raise EmbedwalkError(f"kind must be 'heatmap' or 'lines', got {kind!r}")
        rows = self._prompt_rows(prompt)
        values = self.metric(metric)[:, rows].double().numpy()
        R, P = values.shape
        missing = (values < 0) if metric == "target_rank" else ~np.isfinite(values)
        own = ax is None
        if own:
            fig, ax = plt.subplots(figsize=(min(3.0 + 0.62 * P, 20), min(1.6 + 0.26 * R, 16)))
        else:
            fig = ax.figure
        label, scale = _METRIC_AXES[metric]
        cmap = plt.get_cmap("viridis_r" if metric in ("kl_to_final", "entropy", "target_rank") else "viridis").copy()
        shown = np.where(missing, np.nan, values)
        if metric == "target_rank":
            shown = shown + 1  # log scale: 1 = top-1
            norm = log_norm(shown, floor=1.0, vmax=max(10.0, float(np.nanmax(shown)) if np.isfinite(shown).any() else 10.0))
        elif scale == "log":
            fin = shown[np.isfinite(shown) & (shown > 0)]
            hi = float(fin.max()) if fin.size else 1.0
            norm = log_norm(shown, floor=max(float(fin.min()) if fin.size else hi / 1e3, hi * 1e-4), vmax=hi)
        else:
            norm = None
        im = ax.imshow(np.ma.masked_invalid(shown), aspect="auto", origin="lower", cmap=cmap, norm=norm)
        n_missing = mark_missing(ax, missing)
        cbar_label = label + (" (log scale)" if scale == "log" else "")
        if n_missing:
            cbar_label += "\nhatched: " + ("no target" if metric in ("target_rank", "target_logprob") else "no value")
        fig.colorbar(im, ax=ax, label=cbar_label, pad=0.02)
        if annotate if annotate is not None else P * R <= 1200:
            top = self.top_ids[:, rows, 0]
            for r in range(R):
                for c in range(P):
                    if np.isfinite(shown[r, c]):
                        rgba = im.cmap(im.norm(shown[r, c]))
                        light = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] > 0.5  # readable on any cell
                    else:
                        light = True
                    ax.text(c, r, visible_token(self._str(int(top[r, c])), 8), ha="center", va="center", fontsize=6,
                            color="k" if light else "w", zorder=3)
        step = max(1, -(-R // 40))  # at most ~40 readout labels, so they never overlap
        ax.set_yticks(range(0, R, step), self.labels[::step], fontsize=7)
        ax.set_xticks(range(P), [visible_token(self._str(int(t)), 12) for t in self.token[rows]], rotation=60,
                      ha="right", rotation_mode="anchor", fontsize=7)
        ax.set_xlabel("input token")
        ax.set_ylabel("readout (embed, block output)")
        ax.set_title(f"{name} lens, prompt {prompt}: {_METRIC_TITLES[metric]} (cells: top-1 token)", fontsize=9)
        if own:
            fig.tight_layout()
        return fig

    def _interactive(self, metric: str, prompt: int):
        from embedwalk.figures import require_plotly, visible_token

        go = require_plotly()
        self.metric(metric)  # unknown metric: the same error as the static figure
        rows = self._prompt_rows(prompt)
        values = self.metric(metric)[:, rows].double().numpy()
        missing = (values < 0) if metric == "target_rank" else ~np.isfinite(values)
        z = np.where(missing, np.nan, values)
        label, scale = _METRIC_AXES[metric]
        if metric == "target_rank":
            z = np.log10(z + 1)
        elif scale == "log":
            z = np.log10(np.clip(z, 1e-6, None))
        k = self.top_ids.shape[-1]
        hover = []
        for r, lab in enumerate(self.labels):
            line = []
            for c, row in enumerate(rows.tolist()):
                tops = "<br>".join(
                    f"{visible_token(self._str(int(self.top_ids[r, row, j])))} {float(self.top_probs[r, row, j]):.3f}" for j in range(k)
                )
                rank = int(self.target_rank[r, row])
                line.append(
                    f"readout {lab}, pos {int(self.pos[row])} ({visible_token(self._str(int(self.token[row])))})<br>"
                    f"KL {float(self.kl_to_final[r, row]):.4g} nats, entropy {float(self.entropy[r, row]):.4g} nats<br>"
                    f"target {visible_token(self._str(int(self.target[row])))}: "
                    + (f"rank {rank}, log p {float(self.target_logprob[r, row]):.4g}" if rank >= 0 else "none")
                    + f"<br>top-{k}:<br>{tops}"
                )
            hover.append(line)
        title = label + (" (log10)" if scale == "log" else "")
        fig = go.Figure(go.Heatmap(
            z=z, x=[f"{int(self.pos[r])}:{visible_token(self._str(int(self.token[r])))}" for r in rows.tolist()],
            y=self.labels, text=hover, hoverinfo="text", hovertemplate="%{text}<extra></extra>",
            colorscale="Viridis", reversescale=metric in ("kl_to_final", "entropy", "target_rank"),
            colorbar=dict(title=title),
        ))
        fig.update_layout(title=f"{'tuned' if self.translated else 'logit'} lens, prompt {prompt}: {_METRIC_TITLES[metric]}",
                          xaxis_title="input token", yaxis_title="readout")
        return fig


_METRIC_AXES = {
    "kl_to_final": ("KL(final ‖ readout) [nats]", "log"),
    "entropy": ("entropy [nats]", "linear"),
    "target_logprob": ("log p(target) [nats]", "linear"),
    "target_rank": ("1 + rank of the target (1 = top-1)", "log"),
    "top1_prob": ("top-1 probability", "linear"),
}
_METRIC_TITLES = {
    "kl_to_final": "KL to the final distribution", "entropy": "entropy", "target_logprob": "target log-probability",
    "target_rank": "rank of the target", "top1_prob": "top-1 probability",
}


# ---------------------------------------------------------------------------- reader
class LogitLensReader(Reader):
    """Streams the logit lens; ``result()`` gives a :class:`LogitLensResult`.

    ``target_table`` maps a prompt index to a LongTensor of targets per real position (or
    None for next-token targets); ``positions`` follows :func:`logit_lens`.
    """

    # The readout's GEMMs over the vocabulary, not the forward pass, are the time of a call
    # (README, "How long calls take": 1.35x the GEMMs alone).
    end_batch_share = 0.9

    def __init__(
        self,
        *,
        positions: Positions = None,
        target_table: Optional[Callable[[int, int], Tensor]] = None,
        top_k: int = 5,
        mid: bool = False,
        readouts: Optional[Sequence[Union[int, str]]] = None,
        translator: Optional[Translator] = None,
        chunk_size: Optional[int] = None,
        fused: Optional[bool] = None,
        layers=None,
    ):
        refuse_layers("LogitLensReader", layers)
        if fused is not None and not isinstance(fused, bool):
            raise EmbedwalkError(f"fused must be None (automatic), True or False, got {fused!r}")
        if not isinstance(top_k, int) or top_k < 1:
            raise EmbedwalkError(f"top_k must be a positive int, got {top_k!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise EmbedwalkError(f"chunk_size must be a positive int (rows per chunk), got {chunk_size!r}")
        self.positions = _check_positions(positions)
        self.target_table = target_table
        self.top_k = top_k
        self.mid = mid
        self.readouts = readouts
        self.translator = translator
        self.chunk_size = chunk_size
        self.fused = fused

    # -- setup
    def start(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        points = adapter.readout_points(mid=self.mid)
        self.final = points[-1]
        self.points = _select_points(points, self.readouts)
        self.hooks = sorted({p.hook for p in self.points} | {self.final.hook})
        if self.translator is not None and hasattr(self.translator, "check_model"):
            self.translator.check_model(adapter)
        if self.top_k > adapter.d_vocab:
            raise EmbedwalkError(f"top_k={self.top_k} exceeds the vocabulary size {adapter.d_vocab}")
        self.chunk = self.chunk_size or default_chunk_size(adapter.device)
        self._out: dict[str, list] = {k: [] for k in ("prompt", "pos", "token", "target", "ids", "probs", "lp", "rank", "ent", "kl", "agree")}
        self._resid: dict[str, Tensor] = {}
        self._sel = None
        self._use_fused = None

    def hook_points(self, adapter: ModelAdapter) -> Sequence[str]:
        return self.hooks

    # -- per batch
    def _select(self, ctx: Context):
        """Flat (row*width + col) indices of the requested real positions, and their metadata."""
        mask = ctx.batch.mask
        B, T = mask.shape
        lengths = mask.sum(1)
        flat, meta_pos, meta_prompt, meta_target = [], [], [], []
        for b in range(B):
            cols = mask[b].nonzero().flatten()
            n = int(lengths[b])
            prompt = int(ctx.batch.prompt[b])
            want = _positions_for(self.positions, n, prompt)
            chosen = cols[want.to(cols.device)]
            flat.append(b * T + chosen)
            meta_pos.append(want)
            meta_prompt.append(torch.full((len(want),), prompt))
            toks = ctx.batch.tokens[b, cols].cpu()
            if self.target_table is None:  # next real token; none after the last
                nxt = torch.cat([toks[1:], torch.tensor([-1])])
                meta_target.append(nxt[want])
            else:
                meta_target.append(self.target_table(prompt, n)[want])
        flat = torch.cat(flat)
        self._sel = (ctx, flat)
        self._out["prompt"].append(torch.cat(meta_prompt))
        self._out["pos"].append(torch.cat(meta_pos))
        self._out["token"].append(ctx.batch.tokens.reshape(-1)[flat].cpu())
        self._out["target"].append(torch.cat(meta_target).long())

    def read(self, name: str, value: Tensor, ctx: Context) -> None:
        if self._sel is None or self._sel[0] is not ctx:
            self._select(ctx)
        flat = self._sel[1]
        self._resid[name] = value.detach().reshape(-1, value.shape[-1])[flat]

    def end_batch(self, ctx: Context) -> None:
        if self._sel is None or self._sel[0] is not ctx:
            return
        target = self._out["target"][-1].to(self.adapter.device)
        if self._use_fused is None:
            self._use_fused = _want_fused(self.fused, self.adapter)
        res = _read_out(
            self.adapter, self.points, self.final, self._resid, target,
            top_k=self.top_k, chunk=self.chunk, translator=self.translator, fused=self._use_fused,
        )
        for key, value in res.items():
            self._out[key].append(value.cpu())
        self._resid = {}
        self._sel = None

    def result(self) -> LogitLensResult:
        o = self._out
        if not o["prompt"]:
            raise EmbedwalkError("the logit lens saw no positions; check inputs and positions")
        cat = lambda k, d=0: torch.cat(o[k], dim=d)  # noqa: E731
        res = LogitLensResult(
            labels=[p.label for p in self.points],
            prompt=cat("prompt"), pos=cat("pos"), token=cat("token"), target=cat("target"),
            top_ids=cat("ids", 1), top_probs=cat("probs", 1), target_logprob=cat("lp", 1),
            target_rank=cat("rank", 1), entropy=cat("ent", 1), kl_to_final=cat("kl", 1),
            top1_agrees=cat("agree", 1), translated=self.translator is not None,
        )
        ids = torch.cat([res.top_ids.flatten(), res.token, res.target]).unique()
        ids = ids[ids >= 0].tolist()
        res.token_strs = dict(zip(ids, self.adapter.to_str_tokens(ids)))
        return res


# ---------------------------------------------------------------------------- arithmetic
def _logits(adapter: ModelAdapter, x: Tensor) -> Tensor:
    """float32 (or float64) logits of residual rows through the model's own readout."""
    z = adapter.readout(x)
    return z if z.dtype in (torch.float32, torch.float64) else z.float()


def vocab_block(device: torch.device) -> int:
    """Vocabulary entries per logit block: on CPU a ``[1024, 2048]`` float32 block (8 MB)
    stays in cache for the passes that follow its GEMM; a GPU wants bigger kernels."""
    return 16384 if torch.device(device).type == "cuda" else 2048


def final_rows(device: torch.device) -> int:
    """Positions per chunk: the final distribution ``[positions, vocab]`` is kept whole while
    every readout of those positions is read (25 MB per 50k vocabulary at 128 on CPU)."""
    return 1024 if torch.device(device).type == "cuda" else 128


@torch.no_grad()
def _read_out(adapter, points, final, resid, target, *, top_k, chunk, translator, fused=False):
    n_rows = resid[final.hook].shape[0]
    R = len(points)
    dev = adapter.device
    V = adapter.d_vocab
    out = {
        "ids": torch.empty((R, n_rows, top_k), dtype=torch.long, device=dev),
        "probs": torch.empty((R, n_rows, top_k), dtype=torch.float32, device=dev),
        "lp": torch.full((R, n_rows), float("nan"), device=dev),
        "rank": torch.full((R, n_rows), -1, dtype=torch.long, device=dev),
        "ent": torch.empty((R, n_rows), device=dev),
        "kl": torch.empty((R, n_rows), device=dev),
        "agree": torch.empty((R, n_rows), dtype=torch.bool, device=dev),
    }
    finals = [i for i, p in enumerate(points) if p.hook == final.hook]
    others = [i for i, p in enumerate(points) if p.hook != final.hook]
    parts = adapter.readout_parts() if others else None
    vb = vocab_block(dev)
    P = min(n_rows, chunk, final_rows(dev))  # positions per chunk
    G = max(1, chunk // P)  # readouts sharing one GEMM of G * P rows
    bufs = _Buffers()
    # Progress inside the batch: one unit per GEMM group (the final readout counts as one),
    # so even a call of one long batch advances its bar.
    units, done = -(-n_rows // P) * (1 + -(-len(others) // G)), 0

    for p0 in range(0, n_rows, P):
        sl = slice(p0, min(n_rows, p0 + P))
        n = sl.stop - sl.start
        tgt = target[sl]
        has_t = tgt >= 0
        tgt_c = tgt.clamp(min=0)
        # The final readout through the model's own modules, whole: its log-probs are the
        # model's own, and its distribution is every readout's KL reference.
        zf = _logits(adapter, resid[final.hook][sl])
        pf = torch.softmax(zf, -1)
        sum_pf = _blocksum(pf)
        acc = VocabAccumulator(top_k, fused=fused, scratch=bufs)
        zt_f = zf.gather(1, tgt_c[:, None])[:, 0]
        for j0 in range(0, V, vb):
            acc.update(zf[:, j0 : j0 + vb], j0, zt_f, pf[:, j0 : j0 + vb], 1)
        st_f, vals_f, ids_f = acc.result()
        _require_finite(st_f, final, p0)
        negh_f = st_f.cross - st_f.log_norm * sum_pf  # sum p_f log p_f, in the terms of every KL below
        zf_max = vals_f[:, 0]  # agreement is tie-aware: the layer's top-1 is a final argmax

        def write(idx, st, vals, ids, zt):
            m = len(idx)
            rs = torch.tensor(idx, device=dev)
            shape = (m, n)
            log_norm = st.log_norm.reshape(-1)
            kl = negh_f - (st.cross.reshape(shape) - st.log_norm.reshape(shape) * sum_pf)
            out["ids"][rs, sl] = ids.reshape(*shape, top_k)
            out["probs"][rs, sl] = (vals.double() - log_norm[:, None]).exp().reshape(*shape, top_k).float()
            out["lp"][rs, sl] = torch.where(has_t, (zt.double() - log_norm).reshape(shape), float("nan")).float()
            out["rank"][rs, sl] = torch.where(has_t, st.above.reshape(shape), -1)
            out["ent"][rs, sl] = st.entropy.reshape(shape).float()
            out["kl"][rs, sl] = kl.clamp(min=0).float()
            out["agree"][rs, sl] = zf.gather(1, ids[:, 0].reshape(shape).T).T == zf_max

        for i in finals:  # the final readout (never translated), read above
            write([i], st_f, vals_f, ids_f, zt_f)
        done += 1
        _progress.advance(done, units)
        for g0 in range(0, len(others), G):
            idx = others[g0 : g0 + G]
            m = len(idx)
            xs = []
            for i in idx:
                h = resid[points[i].hook][sl]
                if translator is not None:
                    h = translator(h, points[i])
                xs.append(h)
            u = parts.normed(torch.cat(xs))  # [m * n, d_model], readout-major
            t = tgt_c.repeat(m)
            zt = parts.entries(u, t)
            acc = VocabAccumulator(top_k, fused=fused, scratch=bufs)
            for j0 in range(0, V, vb):
                j1 = min(V, j0 + vb)
                z = parts.block(u, j0, j1, out=bufs.get("z", (m * n, j1 - j0), u.dtype, dev))
                acc.update(z, j0, zt, pf[:, j0:j1], m)
                hit = ((t >= j0) & (t < j1)).nonzero()[:, 0]
                if len(hit):
                    # The target's logit as this block's GEMM rounded it: the rank counted
                    # against the up-front dot product must not count the target itself.
                    exact = z[hit, t[hit] - j0]
                    acc.above[hit] -= (exact > zt[hit]).long()
                    zt[hit] = exact
            st, vals, ids = acc.result()
            for k, i in enumerate(idx):
                _require_finite(st, points[i], p0, rows=slice(k * n, (k + 1) * n))
            write(idx, st, vals, ids, zt)
            done += 1
            _progress.advance(done, units)
        del zf, pf
    return out


def _require_finite(st, point: ReadoutPoint, p0: int, rows: slice = slice(None)) -> None:
    """NaN or infinite logits would read as rank 0 and agreement: refuse them by name."""
    bad = (~torch.isfinite(st.log_norm.reshape(-1)[rows])).nonzero()
    if len(bad):
        raise EmbedwalkError(
            f"the logits read at readout {point.label!r} are not finite (NaN or inf) at the batch's "
            f"requested position {p0 + int(bad[0])} (counting the batch's selected positions in order); "
            "the model's own forward produced them there (check the model's dtype, e.g. float16 "
            "overflow, and its attention mask), so no lens metric is defined"
        )


def _want_fused(fused: Optional[bool], adapter: ModelAdapter) -> bool:
    """``fused=None``: the compiled kernel on CUDA, where it compiles; eager on CPU, where the
    logit blocks already stay in cache and the kernel saves ~3 % of a call, less than its
    compilation costs in most processes."""
    if fused is None:
        return adapter.device.type == "cuda" and fused_available(adapter.device)
    return fused and fused_available(adapter.device, require=True)


class _Buffers:
    """Scratch tensors for the logit blocks, reused across blocks and chunks: a fresh large CPU
    allocation is zero-filled page by page by the OS, which costs about as much as a pass over
    it."""

    def __init__(self):
        self._bufs: dict[str, Tensor] = {}

    def get(self, name: str, shape, dtype, device) -> Tensor:
        numel = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < numel:
            buf = self._bufs[name] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)


# ---------------------------------------------------------------------------- arguments
def _check_positions(positions: Positions):
    if positions is None or positions == "last":
        return positions
    if isinstance(positions, str):
        raise EmbedwalkError(f"positions must be None (all), 'last', an int or a list of ints; got {positions!r}")
    if isinstance(positions, int) and not isinstance(positions, bool):
        return [positions]
    if isinstance(positions, Tensor):
        positions = positions.tolist()
    try:
        out = [int(p) for p in positions]
    except (TypeError, ValueError):
        raise EmbedwalkError(f"positions must be None (all), 'last', an int or a list of ints; got {positions!r}") from None
    if not out:
        raise EmbedwalkError("positions is an empty list; pass None for all positions")
    return out


def _positions_for(positions, n: int, prompt: int) -> Tensor:
    if positions is None:
        return torch.arange(n)
    if positions == "last":
        return torch.tensor([n - 1])
    bad = [p for p in positions if not -n <= p < n]
    if bad:
        raise EmbedwalkError(
            f"position {bad[0]} is out of range for prompt {prompt}, which has {n} tokens "
            f"(valid: 0..{n - 1}, or negative from the end); positions count real tokens, not padding"
        )
    return torch.tensor([p % n for p in positions])


def refuse_layers(where: str, layers, *, old: str = "layers", new: str = "readouts") -> None:
    """Refuse the old ``layers=`` (or ``old``) spelling of a readout selection, naming ``new``.

    Everywhere else in embedwalk (and in TransformerLens) ``layers`` counts blocks; the lenses
    (and ``multiple_choice``'s ``layer``) used to count readouts under that name (0 = embedding),
    so ``layers=[30]`` on a 30-block model silently meant block 29. Readout selections are now
    spelled ``readouts=`` (one readout: ``readout=``).
    """
    if layers is None:
        return
    one = not new.endswith("s")
    raise EmbedwalkError(
        f"{where} selects {'a readout' if one else 'readouts'}, so `{old}=` was renamed `{new}=` (it "
        "counted readouts, not blocks: 0 = embedding, l + 1 = output of block l). Pass "
        f"{new}={'...' if one else '[...]'} with {'a readout index or label' if one else 'readout indices or labels'} "
        f"(e.g. {new}={repr('3') if one else repr(['embed', '3'])} or {new}={'l + 1' if one else '[l + 1]'} "
        "for block l's output)."
    )


def _select_points(points: list[ReadoutPoint], readouts) -> list[ReadoutPoint]:
    if readouts is None:
        return points
    by_label = {p.label: p for p in points}
    chosen = []
    for item in [readouts] if isinstance(readouts, (int, str)) else readouts:
        if isinstance(item, str):
            if item not in by_label:
                raise EmbedwalkError(f"no readout labelled {item!r}; this model's readouts are {list(by_label)}")
            chosen.append(by_label[item])
        elif isinstance(item, int) and not isinstance(item, bool):
            if not -len(points) <= item < len(points):
                raise EmbedwalkError(
                    f"readout {item} is out of range: there are {len(points)} readouts (0 = embedding, "
                    f"l+1 = output of block l; valid 0..{len(points) - 1} or negative from the end)"
                )
            chosen.append(points[item])
        else:
            raise EmbedwalkError(f"readouts must be readout indices or labels, got {item!r}")
    if not chosen:
        raise EmbedwalkError("readouts is an empty list; pass None for every readout")
    twice = [p.label for i, p in enumerate(chosen) if p in chosen[:i]]
    if twice:
        raise EmbedwalkError(
            f"readout {twice[0]!r} is selected twice in readouts={list(readouts) if not isinstance(readouts, (int, str)) else readouts!r}; "
            "each readout is read once (results are indexed in the order given), so list it once"
        )
    return chosen


def _target_table(adapter: ModelAdapter, inputs: Inputs, attention_mask, targets: Targets, prepend_bos, padding_side):
    """A function (prompt, n_real) -> LongTensor of targets per real position."""
    if targets is None:
        return None
    if isinstance(targets, (int, str)) and not isinstance(targets, bool):
        tid = adapter.token_id(targets)
        return lambda prompt, n: torch.full((n,), tid)
    if isinstance(targets, Tensor):
        require_device(adapter, targets, "targets")
    if isinstance(targets, Tensor) and targets.ndim == 2:
        tokens, mask = tokenize(adapter, inputs, attention_mask, prepend_bos=prepend_bos, padding_side=padding_side)
        if targets.shape != tokens.shape:
            raise EmbedwalkError(
                f"targets has shape {tuple(targets.shape)} but the tokenized inputs have "
                f"{tuple(tokens.shape)} [batch, pos]; pass one target per token, one per prompt, or one for all"
            )
        t = targets.long().cpu()
        if int(t.max()) >= adapter.d_vocab:
            raise EmbedwalkError(f"target ids must lie below the vocabulary size {adapter.d_vocab}")
        rows = [t[b][mask[b]] for b in range(t.shape[0])]
        return lambda prompt, n: rows[prompt]
    seq = targets.tolist() if isinstance(targets, Tensor) else list(targets)
    n_prompts = _n_prompts(inputs)
    if len(seq) != n_prompts:
        raise EmbedwalkError(
            f"targets has {len(seq)} entries but there are {n_prompts} prompts; pass one target per "
            "prompt, a single target for all, or a [batch, pos] tensor of ids"
        )
    ids = [adapter.token_id(int(t) if isinstance(t, int) else t) for t in seq]
    return lambda prompt, n: torch.full((n,), ids[prompt])


def _n_prompts(inputs: Inputs) -> int:
    if isinstance(inputs, str):
        return 1
    if isinstance(inputs, Tensor):
        return 1 if inputs.ndim == 1 else inputs.shape[0]
    return len(inputs)


# ---------------------------------------------------------------------------- public
def logit_lens(
    model,
    inputs: Inputs,
    *,
    positions: Positions = None,
    targets: Targets = None,
    top_k: int = 5,
    mid: bool = False,
    readouts: Optional[Sequence[Union[int, str]]] = None,
    translator: Optional[Translator] = None,
    chunk_size: Optional[int] = None,
    fused: Optional[bool] = None,
    batch_size: int = 8,
    attention_mask: Optional[Tensor] = None,
    prepend_bos: Optional[bool] = None,
    padding_side: Optional[str] = None,
    progress: Optional[bool] = None,
    layers=None,
) -> LogitLensResult:
    """Read every residual readout (embedding, each block's output; ``mid`` adds each block's
    midpoint) through the model's own final norm and unembed, in one pass.

    Args:
        positions: None (every real token), ``"last"``, an int or a list of ints (counting
            real tokens of each prompt; negative from the end).
        targets: None (the actual next token; none at the last position), one id or
            one-token string for all, one per prompt, or a ``[batch, pos]`` id tensor aligned
            with the token inputs.
        readouts: readout indices (0 = embedding, l+1 = output of block l) or labels
            (``"embed"``, ``"0"``, ...) to keep; the final readout is always used internally
            for the KL and agreement.
        layers: refused with an error naming ``readouts=``: this argument counted readouts,
            while ``layers`` counts blocks everywhere else in embedwalk and TransformerLens.
        translator: ``f(h, readout_point) -> h`` applied before the readout, e.g. a
            :class:`~embedwalk.lenses.TunedLens`; never applied to the final readout.
        chunk_size: (readout, position) rows per unembedding GEMM (default
            :func:`default_chunk_size`). The logits are formed one vocabulary block at a time
            (:func:`vocab_block` entries), so the peak extra memory is about
            ``chunk_size * vocab_block * 4`` bytes times three scratch buffers, plus the final
            distribution of :func:`final_rows` positions (``2 * final_rows * d_vocab * 4``
            bytes): ~75 MB for SmolLM2 on CPU.
        fused: reduce each logit block (log-normaliser, entropy, rank, KL terms) in one
            kernel compiled by ``torch.compile`` instead of eager passes; the same numbers to
            float32 rounding. None (default): on CUDA where it compiles, eager on CPU (there
            it saves ~3 % of a call and compiling costs ~3 s per process, ~18 s the first time
            on a machine). True: always; raises :class:`EmbedwalkError` where it cannot
            compile. False: never.
    """
    refuse_layers("logit_lens", layers)
    adapter = adapt(model)
    table = _target_table(adapter, inputs, attention_mask, targets, prepend_bos, padding_side)
    reader = LogitLensReader(
        positions=positions, target_table=table, top_k=top_k, mid=mid, readouts=readouts,
        translator=translator, chunk_size=chunk_size, fused=fused,
    )
    # A target word without its leading space ("Paris" for " Paris") reads the wrong token
    # everywhere: compare the two under the model's own logits, at the real positions.
    spaced = adapter.spaced_token_id(targets) if isinstance(targets, str) else None
    pairs: list[Tensor] = []

    def on_logits(logits, ctx):
        # Two logits per real position: their difference is that of the log-probs, and no
        # [rows, vocab] log-softmax is formed.
        two = logits[..., [adapter.token_id(targets), spaced]][ctx.batch.mask.to(logits.device)]
        pairs.append(two.float().cpu())

    (result,) = run(
        adapter, inputs, readers=[reader], attention_mask=attention_mask, batch_size=batch_size,
        prepend_bos=prepend_bos, padding_side=padding_side, progress=progress,
        on_logits=on_logits if spaced is not None else None,
    )
    if pairs:
        warn_if_spaced_likelier(adapter, targets, torch.cat(pairs), "targets")
    return result
