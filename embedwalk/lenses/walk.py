"""The walk lens: the encoding walk of a position, from its token embedding to the composite vector.

At each block the residual at a position takes two steps: an *aggregation* step (the attention
output, data-dependent mixing across positions; ``resid_pre -> resid_mid``) and a *filtering*
step (the MLP output, position-wise; ``resid_mid -> resid_post``). Anything else the block adds
is reported as ``rest`` (zero, up to float error, for standard pre-norm blocks).

A *parallel* block (GPT-NeoX/Pythia, GPT-J, Phi-1/2, Falcon, Cohere) runs attention and MLP
side by side on the same ``resid_pre`` and adds both outputs. The walk keeps the same two
steps there: the aggregation step is the attention output and the filtering step the MLP
output, both computed from ``resid_pre``; its midpoint ``"l.mid"`` is ``resid_pre +
attn_out``, a point on the walk that the model itself never holds (it has no
``resid_mid``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from embedwalk import progress as _progress
from embedwalk._summary import summary_repr
from embedwalk.adapter import ModelAdapter, ReadoutPoint
from embedwalk.casting import cast_finite
from embedwalk.errors import EmbedwalkError
from embedwalk.inputs import Inputs
from embedwalk.lenses.projection import directions, pca_2d, select_positions
from embedwalk.run import Context, Reader, run

__all__ = ["WalkResult", "WalkReader", "walk_lens", "nearest_tokens"]

# Readout rows per chunk: bounds the [rows, vocab] logits block (~64 MB in float32).
_CHUNK_ELEMENTS = 1 << 24


def nearest_tokens(
    adapter: ModelAdapter, states: Float[Tensor, "m d_model"], k: int
) -> tuple[Int[Tensor, "m k"], Float[Tensor, "m k"], Int[Tensor, "m k"], Float[Tensor, "m k"]]:
    """Top-k tokens of each state under the unembedding (probabilities of the final-norm readout)
    and under the embedding matrix (cosine to the rows of W_E), computed in vocabulary chunks of rows.

    ``states`` are cast to the model's dtype for its readout; a state a 16-bit model cannot hold
    (e.g. a parallel block's midpoint, a sum the model never forms) raises :class:`EmbedwalkError`."""
    W_E = adapter.W_E
    e_norm = W_E.float().norm(dim=-1).clamp_min(1e-12)
    rows = max(1, _CHUNK_ELEMENTS // adapter.d_vocab)
    out = ([], [], [], [])
    for i in range(0, states.shape[0], rows):
        x = cast_finite(
            states[i : i + rows].to(adapter.device), adapter.dtype, what="a walk state to read out",
            locate=lambda idx, i=i: f"state {i + idx[0]}, dimension {idx[1]}",
            fix="Load the model in float32 or bfloat16 to read states beyond float16's range",
        )
        logp = adapter.readout(x).float().log_softmax(-1)
        p, ids = logp.topk(k, dim=-1)
        out[0].append(ids.cpu())
        out[1].append(p.exp().cpu())
        cos = (x @ W_E.T).float() / (e_norm * x.float().norm(dim=-1, keepdim=True).clamp_min(1e-12))
        c, eids = cos.topk(k, dim=-1)
        out[2].append(eids.cpu())
        out[3].append(c.cpu())
        _progress.advance(i + x.shape[0], states.shape[0])
    return tuple(torch.cat(o) for o in out)  # type: ignore[return-value]


def _cos(a: Tensor, b: Tensor) -> Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).float()


@summary_repr
@dataclass
class WalkResult:
    """The encoding walk of each requested (prompt, position).

    ``states[i, j]`` is the residual of entry ``i`` at walk point ``labels[j]``: ``embed``
    (``resid_pre`` of block 0), then for each block ``l`` its midpoint ``"l.mid"`` (after the
    aggregation step) and its output ``"l"`` (after the filtering step). The last state is the
    composite context vector of that position.
    """

    prompt: Int[Tensor, "n"]
    pos: Int[Tensor, "n"]
    token: Int[Tensor, "n"]
    labels: list[str]
    states: Float[Tensor, "n point d_model"]
    attn_out: Float[Tensor, "n layer d_model"]
    mlp_out: Float[Tensor, "n layer d_model"]
    cos_final: Float[Tensor, "n point"]
    cos_embed: Float[Tensor, "n point"]
    unembed_ids: Int[Tensor, "n point k"]
    unembed_probs: Float[Tensor, "n point k"]
    embed_ids: Int[Tensor, "n point k"]
    embed_cos: Float[Tensor, "n point k"]
    token_strs: dict[int, str] = field(default_factory=dict)
    token_vectors: dict[int, Tensor] = field(default_factory=dict, repr=False)

    # ---------------------------------------------------------------- derived
    def _headline(self) -> list[str]:
        from embedwalk._summary import table_lines

        n, P, d = self.states.shape
        cols = ["prompt", "pos", "token", "path_length", "displacement", "straightness", "final_top1"]
        return [f"{n} walks x {P} points (embed, then l.mid / l per block), d_model {d}"] + table_lines(self.summary()[cols], max_rows=8)

    @property
    def n_layers(self) -> int:
        return self.attn_out.shape[1]

    @property
    def step(self) -> Float[Tensor, "n layer d_model"]:
        """Each block's whole move: ``resid_post[l] - resid_pre[l]``."""
        pre = self.states[:, 0:-1:2]
        return self.states[:, 2::2] - pre

    @property
    def rest(self) -> Float[Tensor, "n layer d_model"]:
        """What a block adds besides its attention and MLP outputs (~0 for standard blocks)."""
        return self.step - self.attn_out - self.mlp_out

    @property
    def step_norm(self) -> Float[Tensor, "n layer"]:
        return self.step.norm(dim=-1)

    @property
    def attn_norm(self) -> Float[Tensor, "n layer"]:
        return self.attn_out.norm(dim=-1)

    @property
    def mlp_norm(self) -> Float[Tensor, "n layer"]:
        return self.mlp_out.norm(dim=-1)

    @property
    def rest_norm(self) -> Float[Tensor, "n layer"]:
        return self.rest.norm(dim=-1)

    @property
    def path_length(self) -> Float[Tensor, "n"]:
        """Length of the walk over all its points (aggregation and filtering half-steps)."""
        return (self.states[:, 1:].double() - self.states[:, :-1].double()).norm(dim=-1).sum(-1).float()

    @property
    def displacement(self) -> Float[Tensor, "n"]:
        return (self.states[:, -1].double() - self.states[:, 0].double()).norm(dim=-1).float()

    @property
    def straightness(self) -> Float[Tensor, "n"]:
        """Net displacement / path length: 1 for a straight walk, near 0 for a winding one."""
        return self.displacement / self.path_length.clamp_min(1e-12)

    def _s(self, i: int) -> str:
        return self.token_strs.get(int(i), f"<{int(i)}>")

    # ---------------------------------------------------------------- tables
    def to_dataframe(self):
        """One row per (prompt, pos, walk point).

        ``stage`` is ``embed``, ``aggregation`` (the point after a block's attention) or
        ``filtering`` (after its MLP); ``step_norm`` is the length of the move into the point and
        ``part_norm`` the norm of the attention or MLP output that made it; ``rest_norm`` (on
        filtering rows) is the norm of whatever else the block added.
        """
        import pandas as pd

        rows = []
        moves = torch.cat([torch.zeros_like(self.states[:, :1, 0]), (self.states[:, 1:] - self.states[:, :-1]).norm(dim=-1)], 1)
        attn_n, mlp_n, rest_n = self.attn_norm, self.mlp_norm, self.rest_norm
        norms = self.states.norm(dim=-1)
        for i in range(self.states.shape[0]):
            for j, label in enumerate(self.labels):
                layer = (j - 1) // 2 if j else -1
                stage = "embed" if j == 0 else ("aggregation" if j % 2 else "filtering")
                part = float("nan") if j == 0 else float((attn_n if j % 2 else mlp_n)[i, layer])
                rows.append(
                    dict(
                        prompt=int(self.prompt[i]), pos=int(self.pos[i]), token=self._s(self.token[i]),
                        point=label, layer=layer, stage=stage, norm=float(norms[i, j]),
                        step_norm=float(moves[i, j]), part_norm=part,
                        rest_norm=float(rest_n[i, layer]) if stage == "filtering" else float("nan"),
                        cos_final=float(self.cos_final[i, j]), cos_embed=float(self.cos_embed[i, j]),
                        unembed_top1=self._s(self.unembed_ids[i, j, 0]),
                        unembed_top1_prob=float(self.unembed_probs[i, j, 0]),
                        embed_top1=self._s(self.embed_ids[i, j, 0]),
                        embed_top1_cos=float(self.embed_cos[i, j, 0]),
                    )
                )
        return pd.DataFrame(rows)

    def summary(self):
        """One row per (prompt, pos): path length, net displacement, straightness, and where it ends."""
        import pandas as pd

        return pd.DataFrame(
            dict(
                prompt=self.prompt.tolist(), pos=self.pos.tolist(),
                token=[self._s(t) for t in self.token],
                path_length=self.path_length.tolist(), displacement=self.displacement.tolist(),
                straightness=self.straightness.tolist(),
                attn_total=self.attn_norm.sum(-1).tolist(), mlp_total=self.mlp_norm.sum(-1).tolist(),
                rest_max=self.rest_norm.amax(-1).tolist(),
                final_top1=[self._s(t) for t in self.unembed_ids[:, -1, 0]],
            )
        )

    # ---------------------------------------------------------------- figure
    def plot(self, index: int = -1, *, ax=None, label_every: int = 1, interactive: bool = False):
        """The walk of entry ``index`` projected to 2-D.

        The PCA is fitted on the *directions* (unit vectors) of the walk's states together with
        the unembedding vectors of their nearest tokens, because the readout depends on direction
        only. Points are coloured by depth (colour bar: block); labels (``point: nearest token``)
        are placed without overlap, the embedding, the final state and every change of the
        nearest token first (``label_every`` > 1 thins them further). ``interactive=True``
        returns a plotly figure whose hover shows every point's top tokens, cosines and norms
        (needs ``pip install 'embedwalk[interactive]'``).
        """
        n = self.states.shape[0]
        if not -n <= index < n:
            raise EmbedwalkError(f"index {index} is out of range: this walk has {n} entries")
        index %= n
        if interactive:
            return self._interactive(index)
        import matplotlib.pyplot as plt
        from matplotlib.colors import Normalize

        from embedwalk.figures import place_labels, visible_token

        top1 = [int(t) for t in self.unembed_ids[index, :, 0]]
        uniq = list(dict.fromkeys(top1))
        walk_xy, tok_xy, ratio = self._projection(index, uniq)
        own = ax is None
        if own:
            fig, ax = plt.subplots(figsize=(7.5, 5.8))
        else:
            fig = ax.figure
        depth = torch.tensor([_depth(lab) for lab in self.labels]).numpy()
        norm = Normalize(vmin=-1, vmax=max(0.0, float(depth.max())))
        ax.plot(walk_xy[:, 0], walk_xy[:, 1], "-", color="0.65", lw=1, zorder=1)
        sc = ax.scatter(walk_xy[:, 0], walk_xy[:, 1], c=depth, cmap="viridis", norm=norm, s=26, zorder=2,
                        edgecolors="k", linewidths=0.3)
        fig.colorbar(sc, ax=ax, label="depth: block l (-1 = embedding)", pad=0.02)
        if tok_xy is not None:
            ax.scatter(tok_xy[:, 0], tok_xy[:, 1], marker="*", s=110, color="tab:red", zorder=3,
                       edgecolors="k", linewidths=0.3, label="nearest tokens' unembedding vectors")
            ax.legend(loc="best", fontsize=8)
        ax.set_xlabel(f"PC1 ({100 * ratio[0]:.0f}% of variance)")
        ax.set_ylabel(f"PC2 ({100 * ratio[1]:.0f}% of variance)")
        ax.set_title(
            f"encoding walk, prompt {int(self.prompt[index])}, position {int(self.pos[index])} "
            f"({visible_token(self._s(self.token[index]), 14)}): straightness {float(self.straightness[index]):.2f}",
            fontsize=9,
        )
        if own:
            fig.tight_layout()
        P = len(self.labels)
        texts = [f"{self.labels[j]}: {visible_token(self._s(top1[j]), 10)}"
                 if (j % label_every == 0 or j in (0, P - 1)) else "" for j in range(P)]
        prio = [3 if j in (0, P - 1) else 2 if top1[j] != top1[j - 1] else 1 - j / (2 * P) for j in range(P)]
        if tok_xy is not None:
            place_labels(ax, tok_xy, [visible_token(self._s(t), 12) for t in uniq], priority=[5] * len(uniq),
                         fontsize=8, color="tab:red", offset=(4, -10))
        place_labels(ax, walk_xy, texts, priority=prio, fontsize=7)
        return fig

    def _projection(self, index: int, uniq: list[int]):
        tok_vecs = torch.stack([self.token_vectors[t] for t in uniq]) if uniq and all(t in self.token_vectors for t in uniq) else None
        pts = directions(self.states[index])
        allv = pts if tok_vecs is None else torch.cat([pts, directions(tok_vecs)])
        xy, ratio = pca_2d(allv)
        return xy[: len(pts)], (None if tok_vecs is None else xy[len(pts):]), ratio

    def _interactive(self, index: int):
        from embedwalk.figures import require_plotly, visible_token

        go = require_plotly()
        top1 = [int(t) for t in self.unembed_ids[index, :, 0]]
        uniq = list(dict.fromkeys(top1))
        walk_xy, tok_xy, ratio = self._projection(index, uniq)
        k = self.unembed_ids.shape[-1]
        norms = self.states[index].norm(dim=-1)
        hover = []
        for j, lab in enumerate(self.labels):
            tops = "<br>".join(f"{visible_token(self._s(int(self.unembed_ids[index, j, i])))} "
                               f"{float(self.unembed_probs[index, j, i]):.3f}" for i in range(k))
            hover.append(f"point {lab}<br>|h| {float(norms[j]):.4g}<br>cos to final {float(self.cos_final[index, j]):.3f}, "
                         f"cos to embed {float(self.cos_embed[index, j]):.3f}<br>top-{k} (unembed):<br>{tops}")
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=walk_xy[:, 0].tolist(), y=walk_xy[:, 1].tolist(), mode="lines+markers", name="walk",
                                 text=hover, hovertemplate="%{text}<extra></extra>",
                                 marker=dict(color=[_depth(lab) for lab in self.labels], colorscale="Viridis",
                                             colorbar=dict(title="block"))))
        if tok_xy is not None:
            fig.add_trace(go.Scatter(x=tok_xy[:, 0].tolist(), y=tok_xy[:, 1].tolist(), mode="markers+text", name="token vectors",
                                     text=[visible_token(self._s(t)) for t in uniq], textposition="bottom right",
                                     marker=dict(symbol="star", size=12, color="red")))
        fig.update_layout(title=f"encoding walk, prompt {int(self.prompt[index])}, position {int(self.pos[index])}",
                          xaxis_title=f"PC1 ({100 * ratio[0]:.0f}% var)", yaxis_title=f"PC2 ({100 * ratio[1]:.0f}% var)")
        return fig


def _depth(label: str) -> float:
    """Block index of a walk point: -1 for the embedding, l - 0.5 for block l's midpoint."""
    if label == "embed":
        return -1.0
    try:
        return int(label[:-4]) - 0.5 if label.endswith(".mid") else float(int(label))
    except ValueError:  # a point label of another form: no depth to show
        return float("nan")


class WalkReader(Reader):
    """Keeps only the requested positions' residual states, attention and MLP outputs.

    Never holds a cache: per batch it gathers ``[n, d_model]`` rows at each hook, then reduces
    them to nearest tokens and cosines in ``end_batch``.
    """

    def __init__(self, positions: Union[str, None, int, Sequence[int]] = "last", nearest_k: int = 5):
        if not isinstance(nearest_k, int) or nearest_k < 1:
            raise EmbedwalkError(f"nearest_k must be a positive int, got {nearest_k!r}")
        self.positions = positions
        self.k = nearest_k
        self._parts: list[dict] = []

    def start(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        self.k = min(self.k, adapter.d_vocab)
        self.points = _walk_points(adapter)
        self._slot: dict[str, tuple[str, int]] = {p.hook: ("state", p.index) for p in self.points if p.hook}
        for layer in range(adapter.n_layers):
            self._slot[adapter.hook("attn_out", layer)] = ("attn", layer)
            self._slot[adapter.hook("mlp_out", layer)] = ("mlp", layer)

    def hook_points(self, adapter: ModelAdapter) -> Sequence[str]:
        names = [p.hook for p in _walk_points(adapter) if p.hook]
        for layer in range(adapter.n_layers):
            names += [adapter.hook("attn_out", layer), adapter.hook("mlp_out", layer)]
        return names

    def read(self, name: str, value: Tensor, ctx: Context) -> None:
        cur = ctx.state.setdefault(id(self), {})
        if "rows" not in cur:
            cur["rows"], cur["cols"], cur["pos"] = select_positions(ctx.batch.mask, self.positions)
            cur["state"], cur["attn"], cur["mlp"] = {}, {}, {}
        kind, idx = self._slot[name]
        cur[kind][idx] = value[cur["rows"].to(value.device), cur["cols"].to(value.device)].float().cpu()

    # nearest_tokens over the vocabulary: about 0.3 of a call on SmolLM2 (0.4 s of 1.3 s).
    end_batch_share = 0.3

    def end_batch(self, ctx: Context) -> None:
        cur = ctx.state.pop(id(self))
        a = self.adapter
        L = a.n_layers
        for p in self.points:
            if p.hook is None:  # a parallel block's midpoint: resid_pre + its attention output
                layer = (p.index - 1) // 2
                cur["state"][p.index] = cur["state"][p.index - 1] + cur["attn"][layer]
        states = torch.stack([cur["state"][i] for i in range(len(self.points))], 1)
        tokens = ctx.batch.tokens[cur["rows"].to(ctx.batch.tokens.device), cur["cols"].to(ctx.batch.tokens.device)].cpu()
        n, P, d = states.shape
        u_ids, u_p, e_ids, e_cos = nearest_tokens(a, states.reshape(n * P, d), self.k)
        emb = a.W_E[tokens.to(a.device)].detach().float().cpu()
        self._parts.append(
            dict(
                prompt=ctx.batch.prompt[cur["rows"]], pos=cur["pos"], token=tokens, states=states,
                attn=torch.stack([cur["attn"][i] for i in range(L)], 1),
                mlp=torch.stack([cur["mlp"][i] for i in range(L)], 1),
                cos_final=_cos(states, states[:, -1:]), cos_embed=_cos(states, emb[:, None]),
                u_ids=u_ids.reshape(n, P, -1), u_p=u_p.reshape(n, P, -1),
                e_ids=e_ids.reshape(n, P, -1), e_cos=e_cos.reshape(n, P, -1),
            )
        )

    def result(self) -> WalkResult:
        cat = lambda key: torch.cat([p[key] for p in self._parts])  # noqa: E731
        a = self.adapter
        res = WalkResult(
            prompt=cat("prompt"), pos=cat("pos"), token=cat("token"), labels=[p.label for p in self.points],
            states=cat("states"), attn_out=cat("attn"), mlp_out=cat("mlp"),
            cos_final=cat("cos_final"), cos_embed=cat("cos_embed"),
            unembed_ids=cat("u_ids"), unembed_probs=cat("u_p"), embed_ids=cat("e_ids"), embed_cos=cat("e_cos"),
        )
        ids = torch.unique(torch.cat([res.token, res.unembed_ids.flatten(), res.embed_ids.flatten()])).tolist()
        res.token_strs = dict(zip(ids, a.to_str_tokens(ids)))
        top1 = torch.unique(res.unembed_ids[..., 0]).tolist()
        W_U = a.W_U
        res.token_vectors = {t: W_U[:, t].detach().float().cpu() for t in top1}
        return res


def _walk_points(adapter: ModelAdapter) -> list[ReadoutPoint]:
    """The embedding, then per block its midpoint and output; a parallel block's midpoint has
    no hook (``hook=None``: it is resid_pre + attn_out, see the module docstring)."""
    points = [ReadoutPoint(0, adapter.hook("resid_pre", 0), "embed")]
    for b in adapter.blocks:
        mid = None if b.layout == "parallel" else adapter.require("resid_mid", b.layer, "walk_lens")
        points.append(ReadoutPoint(len(points), mid, f"{b.layer}.mid"))
        points.append(ReadoutPoint(len(points), adapter.hook("resid_post", b.layer), str(b.layer)))
    return points


def walk_lens(
    model,
    inputs: Inputs,
    *,
    positions: Union[str, None, int, Sequence[int]] = "last",
    nearest_k: int = 5,
    attention_mask: Optional[Tensor] = None,
    batch_size: int = 8,
    prepend_bos: Optional[bool] = None,
    padding_side: Optional[str] = None,
    progress: Optional[bool] = None,
) -> WalkResult:
    """The encoding walk of each requested position, in one forward pass per batch.

    ``positions``: ``"last"`` (each prompt's last real token, the default), ``None`` (every
    real token) or ints counted over each prompt's real tokens (negative from the end).
    For every walk point (embedding, then each block's midpoint and output) the result holds the
    residual state, its cosine to the final composite vector and to the position's own token
    embedding, and its ``nearest_k`` nearest tokens under the unembedding (the model's own final
    norm and unembed, as the logit lens reads it) and under the embedding matrix (cosine).
    Per block: the aggregation step (attention output), the filtering step (MLP output) and
    the ``rest`` (the block's step minus both, ~0 for standard blocks). On parallel blocks
    both steps start from ``resid_pre`` and the midpoint is ``resid_pre + attn_out`` (see the
    module docstring).
    """
    (result,) = run(
        model, inputs, readers=[WalkReader(positions, nearest_k)], attention_mask=attention_mask,
        batch_size=batch_size, prepend_bos=prepend_bos, padding_side=padding_side, progress=progress,
    )
    return result
