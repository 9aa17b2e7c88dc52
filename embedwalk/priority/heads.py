"""Bridge from token-priority graphs to real attention heads.

Read every causal prefix ``tokens[:t+1]`` of a corpus as a sample of the paper's
model: query token ``tokens[t]``, label ``tokens[t+1]``.  The graphs built from those
samples predict, for each query position, the *retrieval set*: the prefix tokens in the
highest-priority component(s) present (see :mod:`embedwalk.priority.graphs`).  A head
that implements the paper's mechanism

* hard-retrieves: puts more attention on the retrieval set than uniform causal
  aggregation would (``mass`` against ``uniform``; ``ratio`` > 1, ``difference`` > 0);
* soft-composes: splits that mass over several tokens rather than one (``spread``, the
  entropy of the per-token mass inside the set, normalised to [0, 1] by log(#tokens)).

Only *informative* query positions are scored: a nonempty retrieval set that leaves out
at least one valid key (otherwise any head scores exactly the uniform baseline). A query's
keys are those its layer reaches (:meth:`embedwalk.adapter.ModelAdapter.reach`: causal,
padding, sliding window) that the mask keeps; attention is renormalised over them, so
masking out BOS measures retrieval among content tokens rather than against an attention
sink, and the uniform baseline counts only keys the layer can attend to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int

from embedwalk._summary import summary_repr
from ..errors import EmbedwalkError
from .graphs import PriorityGraphs, build_priority_graphs

__all__ = ["graphs_from_tokens", "retrieval_mask", "retrieval_scores", "score_heads", "HeadPriorityResult"]


def _prepare(tokens, mask) -> tuple[np.ndarray, np.ndarray]:
    toks = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if toks.ndim != 2:
        raise EmbedwalkError(f"tokens must be [batch, pos], got shape {toks.shape}; add a batch dimension with [None].")
    if mask is None:
        m = np.ones(toks.shape, dtype=bool)
    else:
        m = (mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)).astype(bool)
    if m.shape != toks.shape:
        raise EmbedwalkError(f"mask shape {m.shape} must equal tokens shape {toks.shape} (1 = real token, 0 = padding).")
    return toks.astype(np.int64), m


def graphs_from_tokens(
    tokens: Int[torch.Tensor, "batch pos"],
    mask: Bool[torch.Tensor, "batch pos"] | None = None,
    require_label_in_context: bool = True,
    vocab_size: int | None = None,
) -> PriorityGraphs:
    """Priority graphs from every causal prefix: query ``tokens[t]``, label ``tokens[t+1]``.

    ``require_label_in_context`` (default) keeps only prefixes that contain their next
    token, as the paper's data does: a value-identity attention layer can only output
    tokens of its input, so a sample whose label is absent says nothing about priority.
    """
    toks, m = _prepare(tokens, mask)
    B, P = toks.shape
    if P < 2:
        raise EmbedwalkError("need sequences of at least 2 tokens (a query and its next token).")
    pos = np.arange(P)
    prefix = m[:, None, :] & (pos[None, None, :] <= pos[None, :, None])  # [B, t, s]: s valid and s <= t
    labels = toks[:, 1:]  # label of query position t is token t+1
    keep = m[:, :-1] & m[:, 1:]
    if require_label_in_context:
        keep &= (prefix[:, :-1] & (toks[:, None, :] == labels[:, :, None])).any(-1)
    if not keep.any():
        raise EmbedwalkError("no usable (prefix, next token) sample: sequences too short, all masked, or no label "
                         "occurs in its context (pass require_label_in_context=False to keep those).")
    b, t = np.nonzero(keep)
    return build_priority_graphs(toks[b], labels[b, t], mask=prefix[b, t], vocab_size=vocab_size)


def _valid_keys(m: np.ndarray, reach) -> torch.Tensor:
    """``[b, t, s]``: key s is one query t scores over: reached by the layer and kept by ``m``."""
    B, P = m.shape
    mt = torch.from_numpy(m)
    if reach is None:  # full causal attention
        return mt[:, None, :] & torch.ones(P, P, dtype=torch.bool).tril()
    if not isinstance(reach, torch.Tensor) or tuple(reach.shape) != (B, P, P):
        raise EmbedwalkError(
            f"reach must be a [batch, query, key] = [{B}, {P}, {P}] boolean tensor, got "
            f"{tuple(getattr(reach, 'shape', ())) or type(reach).__name__}; build it with "
            "adapt(model).reach(layer, padding_mask)")
    return reach.detach().cpu().bool() & mt[:, None, :]


def retrieval_mask(
    tokens: Int[torch.Tensor, "batch pos"], mask: Bool[torch.Tensor, "batch pos"] | None, graphs: PriorityGraphs,
    reach: Bool[torch.Tensor, "batch query key"] | None = None,
) -> tuple[Bool[torch.Tensor, "batch query key"], Bool[torch.Tensor, "batch query"]]:
    """``R[b, t, s]``: key s holds a token of query t's retrieval set; and which queries are scored.

    A query's candidate keys are those its layer reaches (``reach``, from
    :meth:`embedwalk.adapter.ModelAdapter.reach`; None: the whole causal prefix, right for a
    layer without a sliding window) that ``mask`` keeps; the retrieval set is the top-priority
    tokens among them, and a query is scored when it holds some but not all of them.
    """
    toks, m = _prepare(tokens, mask)
    B, P = toks.shape
    valid = _valid_keys(m, reach).numpy()
    R = np.zeros((B, P, P), dtype=bool)
    for b in range(B):
        for t in np.flatnonzero(m[b]):
            keys = np.flatnonzero(valid[b, t])
            if keys.size == 0:
                continue
            top = graphs.retrieval_set(toks[b, keys], last=toks[b, t])
            R[b, t, keys] = np.isin(toks[b, keys], top)
    n_valid = valid.sum(-1)  # keys query t scores over
    n_top = R.sum(-1)
    scored = m & (n_top > 0) & (n_top < n_valid)
    return torch.from_numpy(R), torch.from_numpy(scored)


def retrieval_scores(
    pattern: Float[torch.Tensor, "batch head query key"],
    tokens: Int[torch.Tensor, "batch pos"],
    mask: Bool[torch.Tensor, "batch pos"] | None,
    graphs: PriorityGraphs,
    retrieval: tuple[torch.Tensor, torch.Tensor] | None = None,
    reach: Bool[torch.Tensor, "batch query key"] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-head hard-retrieval and soft-composition scores of one layer's attention.

    ``reach``: the keys the layer reaches (:meth:`embedwalk.adapter.ModelAdapter.reach` of the
    layer and the padding mask; None: the whole causal prefix). Attention is renormalised over
    the reached keys ``mask`` keeps, and ``uniform`` is the share of those keys in the retrieval
    set, so a head attending uniformly over what its layer reaches scores ``ratio`` = 1
    exactly, sliding window or not.

    Returns ``mass``, ``uniform``, ``ratio`` (= mass / uniform, of the means),
    ``difference`` (= mass - uniform), ``spread`` (each ``[head]``, averaged over scored
    query positions; spread over those whose retrieval set has >= 2 distinct tokens, NaN
    when none has) and the counts ``n_positions``, ``n_spread_positions``.  Pass
    ``retrieval=retrieval_mask(...)`` to reuse it across layers.
    """
    toks, m = _prepare(tokens, mask)
    B, P = toks.shape
    if pattern.ndim != 4 or pattern.shape[0] != B or pattern.shape[-2:] != (P, P):
        raise EmbedwalkError(
            f"pattern must be [batch, head, query_pos, key_pos] = [{B}, H, {P}, {P}] to match tokens; "
            f"got {tuple(pattern.shape)} (TransformerLens: cache['pattern', layer])."
        )
    R, scored = retrieval if retrieval is not None else retrieval_mask(toks, m, graphs, reach)
    valid = _valid_keys(m, reach)  # [b, t, s]
    p = pattern.detach().to(torch.float64) * valid[:, None]
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)

    on_top = p * R[:, None]
    mass = on_top.sum(-1)  # [b, h, t]
    uniform = R.sum(-1).double() / valid.sum(-1).clamp_min(1).double()  # [b, t]

    # Soft composition is about tokens, not positions: pool repeats of a token onto its
    # first valid occurrence before taking the entropy.
    same = (toks[:, :, None] == toks[:, None, :]) & m[:, None, :]
    first = torch.from_numpy(same.argmax(-1))  # [b, s]
    per_token = torch.zeros_like(on_top).scatter_add_(-1, first[:, None, None, :].expand_as(on_top), on_top)
    q = per_token / mass.unsqueeze(-1).clamp_min(1e-300)
    entropy = -torch.special.xlogy(q, q).sum(-1)
    is_first = first == torch.arange(P)
    n_tokens = (R & is_first[:, None, :]).sum(-1)  # distinct tokens in the set, [b, t]
    spread = entropy / torch.log(n_tokens.clamp_min(2).to(torch.float64))[:, None]
    spread_ok = (scored & (n_tokens >= 2))[:, None] & (mass > 1e-12)
    spread = torch.where(spread_ok, spread, torch.nan)

    sel = scored[:, None].expand_as(mass)
    n = int(scored.sum())
    mean = lambda x: (x * sel).sum((0, 2)) / max(n, 1)
    mass_mean = mean(mass)
    uniform_mean = (uniform * scored).sum() / max(n, 1)
    H = pattern.shape[1]
    nan = torch.full((H,), torch.nan, dtype=torch.float64)
    return {
        "mass": mass_mean if n else nan,
        "uniform": uniform_mean.expand(H).clone() if n else nan,
        "ratio": mass_mean / uniform_mean if n else nan,
        "difference": mass_mean - uniform_mean if n else nan,
        "spread": torch.nanmean(spread.transpose(0, 1).reshape(H, -1), dim=-1),
        "n_positions": torch.full((H,), n),
        "n_spread_positions": spread_ok.sum((0, 2)),
    }


@summary_repr
@dataclass(eq=False)
class HeadPriorityResult:
    """Scores per (layer, head); each metric tensor is ``[layer, head]``."""

    scores: dict[str, Float[torch.Tensor, "layer head"]]
    layers: list[int] = field(default_factory=list)

    def _headline(self) -> list[str]:
        if not self.scores:
            return ["no scores"]
        L, H = next(iter(self.scores.values())).shape
        out = [f"{L} layers x {H} heads; metrics: {', '.join(self.scores)}"]
        if "ratio" in self.scores:
            r = self.scores["ratio"].double()
            ok = torch.isfinite(r)
            if ok.any():
                flat = torch.where(ok, r, float("nan")).reshape(-1)
                i = int(torch.nan_to_num(flat, nan=-float("inf")).argmax())
                out.append(f"ratio (1 = uniform): median {float(r[ok].median()):.3g}, max {float(flat[i]):.3g} "
                           f"at layer {self.layers[i // H] if self.layers else i // H} head {i % H}")
            else:
                out.append("ratio: no finite values")
        return out

    def to_dataframe(self) -> pd.DataFrame:
        L, H = self.scores["mass"].shape
        df = pd.DataFrame({"layer": np.repeat(self.layers, H), "head": np.tile(np.arange(H), L)})
        for name, value in self.scores.items():
            df[name] = value.reshape(-1).numpy()
        return df

    def plot(self, metric: str = "ratio", ax=None):
        """Heatmap layer x head of ``metric``. ``ratio`` (attention mass on the predicted
        top-priority tokens / what uniform aggregation would give them) uses a diverging colour
        map centred on 1 with log-symmetric limits, so preference (> 1, red) and avoidance
        (< 1, blue) read alike; heads with no scored position are hatched."""
        import matplotlib.pyplot as plt

        from embedwalk.figures import mark_missing, plain_ticks, ratio_norm

        if metric not in self.scores:
            raise KeyError(f"unknown metric {metric!r}; choose from {sorted(self.scores)}")
        values = self.scores[metric].double().numpy()
        own = ax is None
        if own:
            _, ax = plt.subplots(figsize=(0.42 * values.shape[1] + 3.2, 0.24 * values.shape[0] + 1.8))
        missing = ~np.isfinite(values)
        if metric == "ratio":
            im = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap="RdBu_r", norm=ratio_norm(values))
        else:
            im = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap="viridis")
        hatched = mark_missing(ax, missing)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        step = max(1, -(-len(self.layers) // 32))
        ax.set_yticks(range(0, len(self.layers), step), self.layers[::step], fontsize=7)
        ax.set_xticks(range(values.shape[1]), range(values.shape[1]), fontsize=7)
        ax.set_title(f"token priority per head: {metric}", fontsize=9)
        label = _PRIORITY_LABELS.get(metric, metric) + ("\nhatched: no scored position" if hatched else "")
        cb = ax.figure.colorbar(im, ax=ax, pad=0.02)
        cb.set_label(label, fontsize=8)
        if metric == "ratio":
            plain_ticks(cb)
        if own:
            ax.figure.tight_layout()
        return ax.figure


_PRIORITY_LABELS = {
    "ratio": "mass on priority tokens / uniform\n(1 = no preference; log scale)",
    "mass": "attention mass on priority tokens",
    "uniform": "uniform-aggregation mass on them",
    "difference": "mass - uniform mass",
    "spread": "spread within priority tokens",
    "n_positions": "scored query positions",
}


def score_heads(
    patterns: Sequence[torch.Tensor] | Mapping[int, torch.Tensor] | Float[torch.Tensor, "layer batch head query key"],
    tokens: Int[torch.Tensor, "batch pos"],
    mask: Bool[torch.Tensor, "batch pos"] | None,
    graphs: PriorityGraphs,
    reach: Mapping[int, torch.Tensor] | None = None,
) -> HeadPriorityResult:
    """:func:`retrieval_scores` for every layer; ``patterns`` per layer (list, dict or stacked).

    ``reach``: per layer, the keys it reaches (``{layer: adapt(model).reach(layer, mask)}``);
    a layer missing from it, or ``reach=None``, scores over the whole causal prefix."""
    items = list(patterns.items()) if isinstance(patterns, Mapping) else list(enumerate(patterns))
    if not items:
        raise EmbedwalkError("no attention patterns given.")
    reach = dict(reach or {})
    retrievals: dict = {}
    per_layer = []
    for layer, p in items:
        r = reach.get(layer)
        if id(r) not in retrievals:
            retrievals[id(r)] = retrieval_mask(tokens, mask, graphs, r)
        per_layer.append(retrieval_scores(p, tokens, mask, graphs, retrieval=retrievals[id(r)], reach=r))
    scores = {k: torch.stack([s[k] for s in per_layer]) for k in per_layer[0]}
    return HeadPriorityResult(scores, [int(layer) for layer, _ in items])
