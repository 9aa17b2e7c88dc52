"""What attention adds over uniform aggregation: per-head distances, self bias, downstream effects.

- ``association_bias``: one pass; per layer and head, how far the head's output ``z`` is from
  the uniform output (the mean of its values over the keys the layer reaches,
  :meth:`ModelAdapter.reach`), ‖z − z_uniform‖/‖z − c‖, and the attention each query pays to
  its own position against the uniform expectation ``1/m``; queries that reach a single key
  are uniform by construction and left out.
- ``downstream``: an original and a swapped pass (two forwards); next-token loss change,
  KL(original || swapped), top-1 agreement and the cosine of the composite vectors.
- ``sweep``: ``downstream`` one layer at a time and one head at a time, reusing the original
  pass's statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from embedwalk._summary import summary_repr
from embedwalk.adapter import adapt
from embedwalk.errors import EmbedwalkError
from embedwalk.inputs import Inputs, tokenize
from embedwalk.run import Context, Reader, Writer, run
from embedwalk.association.prefix import Resume
from embedwalk.association.probes import value_offset
from embedwalk.association.swap import Targets, UniformSwap, _heads_view, resolve_targets, uniform_z
from embedwalk.reduce import rowdot

__all__ = [
    "AssociationReader", "AssociationBias", "association_bias", "SwapEffect", "downstream",
    "SweepResult", "sweep",
]


# --------------------------------------------------------------------------- one pass
class AssociationReader(Reader):
    """Per head: mean over counted queries of ‖z − z_uniform‖/‖z − c‖, cos(z − c, z_uniform − c),
    and the attention to the query's own position next to the uniform expectation 1/m.

    ``c`` is the head's value offset (:func:`embedwalk.association.probes.value_offset`): the
    constant part of its values, which TransformerLens weight processing (``fold_ln``,
    ``fold_value_biases``) moves into ``b_O``. Any stochastic pattern passes it through
    unchanged, so ``z − c`` and ``z_uniform − c`` are the same on a raw and a processed model,
    and so are the measures. ``keys``: as for :class:`UniformSwap` (``"reachable"``: the
    uniform mean and ``m`` count the keys :meth:`ModelAdapter.reach` gives the layer, its
    sliding window included; ``"prefix"``: every earlier real key).

    Counted queries: real positions whose layer reaches at least two keys
    (:meth:`ModelAdapter.reach`). A query that reaches a single key (the first real token of
    each prompt) attends to it with weight 1 whatever the head does, so it is uniform by
    construction; such queries are left out of every mean and counted apart
    (``n_single_key``).
    """

    def __init__(self, *, exclude_self: bool = False, keys: str = "reachable"):
        self.swap = UniformSwap(exclude_self=exclude_self, keys=keys)  # validates; owns the reach
        self.exclude_self = exclude_self

    def hook_points(self, adapter):
        return [adapter.hook(k, l) for l in range(adapter.n_layers) for k in ("v", "z", "pattern")]

    def start(self, adapter):
        L, H = adapter.n_layers, adapter.n_heads
        zeros = lambda: torch.zeros(L, H, dtype=torch.float64, device=adapter.device)  # noqa: E731
        self.dist, self.cos, self.self_attn = zeros(), zeros(), zeros()
        self.self_uniform = torch.zeros(L, dtype=torch.float64, device=adapter.device)
        self.n_queries = torch.zeros(L, dtype=torch.int64)
        self.n_single = torch.zeros(L, dtype=torch.int64)
        self.adapter = adapter
        for l in range(L):  # an architecture whose keys cannot be known is refused before any forward
            adapter.reach(l, torch.ones(1, 1, dtype=torch.bool))
        offset = value_offset(adapter).to(adapter.device)  # [layer, kv_heads, d_head]
        self.offset = offset.repeat_interleave(H // adapter.n_kv_heads, dim=1)  # [layer, heads, d_head]

    def _counted(self, ctx: Context, layer: int, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(uniform reach [batch, q, k], counted queries [batch, q]) of ``layer`` for this batch."""
        key = (id(self), "reach", layer)
        if key not in ctx.state:
            a = ctx.adapter
            model_keys = a.reach(layer, mask).sum(-1)  # what the model's own attention reaches
            counted = mask & (model_keys > 1)
            ctx.state[key] = (self.swap.reach(a, layer, mask), counted)
            self.n_queries[layer] += int(counted.sum())
            self.n_single[layer] += int((mask & (model_keys == 1)).sum())
        return ctx.state[key]

    def read(self, name, value, ctx: Context):
        a, layer = ctx.adapter, int(name.split(".")[1])
        mask = ctx.batch.mask.to(value.device)
        reach, counted = self._counted(ctx, layer, mask)
        if name.endswith("hook_v"):
            ctx.state[(id(self), layer)] = value
        elif name.endswith("hook_z"):
            v = ctx.state.pop((id(self), layer))
            zu = uniform_z(v, reach, a.n_heads, a.n_kv_heads, exclude_self=self.exclude_self)
            z = _heads_view(value, a.n_heads).to(torch.float32)
            c = self.offset[layer].to(z.device)
            z0, zu0 = z - c, zu - c
            dist = (z - zu).norm(dim=-1) / z0.norm(dim=-1).clamp_min(1e-12)
            cos = F.cosine_similarity(z0, zu0, dim=-1, eps=1e-12)
            self.dist[layer] += dist[counted].sum(0).double()
            self.cos[layer] += cos[counted].sum(0).double()
        else:  # pattern [batch, head, q, k]
            diag = value.diagonal(dim1=-2, dim2=-1).to(torch.float32)  # [batch, head, pos]
            self.self_attn[layer] += diag.permute(0, 2, 1)[counted].sum(0).double()
            m = reach.sum(-1).to(torch.float64)  # [batch, q]: the keys uniform aggregation averages over
            self.self_uniform[layer] += (1.0 / m[counted]).sum()

    def result(self) -> "AssociationBias":
        if int(self.n_queries.min()) == 0:
            layer = int(self.n_queries.argmin())
            raise EmbedwalkError(
                f"no query position of layer {layer} reaches more than one key ({int(self.n_single[layer])} "
                "reach exactly one, where every head is uniform by construction), so every measure would be "
                "0/0: pass prompts of at least two tokens")
        n = self.n_queries.to(self.dist.device, torch.float64)
        return AssociationBias(
            distance=(self.dist / n[:, None]).float().cpu(),
            cosine=(self.cos / n[:, None]).float().cpu(),
            self_attention=(self.self_attn / n[:, None]).float().cpu(),
            self_uniform=(self.self_uniform / n).float().cpu(),
            n_queries=self.n_queries.clone(),
            n_single_key=self.n_single.clone(),
        )


def _count(t: Tensor) -> str:
    lo, hi = int(t.min()), int(t.max())
    return str(lo) if lo == hi else f"{lo}-{hi} (by layer)"


@summary_repr
@dataclass
class AssociationBias:
    """Per layer and head, averaged over the counted query positions of each layer.

    Counted: real positions whose layer reaches at least two keys (:meth:`ModelAdapter.reach`);
    a query that reaches one key only (each prompt's first real token) gives it weight 1 under
    any head, uniform by construction, and is excluded from every mean (``n_single_key``).

    ``distance``: ‖z − z_uniform‖/‖z − c‖; ``cosine``: cos(z − c, z_uniform − c), where ``c``
    is the head's value offset (its values at a zero block input: value bias plus norm bias
    through ``W_V``), so that both are the same with and without TransformerLens weight
    processing; for a model without biases ``c = 0``. ``z_uniform`` averages the values over
    the keys the layer reaches (its sliding window included, unless ``keys="prefix"``).
    ``self_attention``: the weight a query gives its own position; ``self_uniform``
    ``[layer]``: its uniform expectation, the mean of 1/m over the counted queries (m = the
    keys the query reaches at that layer). ``self_bias = self_attention − self_uniform``:
    negative means heads avoid their own position more than uniform aggregation would.
    ``n_queries`` / ``n_single_key`` ``[layer]``: the counted queries each mean is taken over,
    and the excluded single-key ones.
    """

    distance: Float[Tensor, "layer head"]
    cosine: Float[Tensor, "layer head"]
    self_attention: Float[Tensor, "layer head"]
    self_uniform: Float[Tensor, "layer"]
    n_queries: Int[Tensor, "layer"]
    n_single_key: Int[Tensor, "layer"]

    def _headline(self) -> list[str]:
        L, Hh = self.distance.shape
        return [f"{L} layers x {Hh} heads over {_count(self.n_queries)} query positions ({_count(self.n_single_key)} "
                "more reach a single key, uniform by construction, and are excluded): "
                f"‖z − z_uniform‖/‖z − c‖ mean {float(self.distance.mean()):.3f}, cosine mean "
                f"{float(self.cosine.mean()):.3f}, self-attention mean {float(self.self_attention.mean()):.3f} "
                f"(uniform {float(self.self_uniform.mean()):.3f})"]

    @property
    def self_uniform_by_layer(self) -> Float[Tensor, "layer"]:
        """The former name of :attr:`self_uniform` (per layer since it counts each layer's keys)."""
        return self.self_uniform

    @property
    def self_bias(self) -> Float[Tensor, "layer head"]:
        return self.self_attention - self.self_uniform[:, None]

    def to_dataframe(self):
        import pandas as pd

        rows = []
        L, H = self.distance.shape
        for name, t in (("distance", self.distance), ("cosine", self.cosine),
                        ("self_attention", self.self_attention), ("self_bias", self.self_bias)):
            for l in range(L):
                for h in range(H):
                    rows.append({"layer": l, "head": h, "metric": name, "value": float(t[l, h])})
        return pd.DataFrame(rows)

    def plot(self):
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), constrained_layout=True)
        from embedwalk.figures import log_norm, plain_ticks

        d = self.distance.double().numpy()
        im = axes[0].imshow(d, aspect="auto", cmap="viridis", norm=log_norm(d))  # a few heads reach 10x the rest
        axes[0].set(title="‖z − z_uniform‖ / ‖z − c‖  (c: value offset)", xlabel="head", ylabel="layer")
        plain_ticks(fig.colorbar(im, ax=axes[0], label="relative distance to uniform aggregation (log scale)"))
        lim = float(self.self_bias.abs().max()) or 1.0
        im = axes[1].imshow(self.self_bias.numpy(), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
        axes[1].set(title="self bias (attention to self − uniform 1/m of its layer)", xlabel="head", ylabel="layer")
        fig.colorbar(im, ax=axes[1], label="attention weight on own position − uniform (< 0: avoids self)")
        return fig


def association_bias(
    model,
    inputs: Inputs,
    *,
    attention_mask: Optional[Tensor] = None,
    exclude_self: bool = False,
    keys: str = "reachable",
    batch_size: int = 8,
    **run_kwargs,
) -> AssociationBias:
    """How far each head's output is from uniform aggregation, and its self bias, on ``inputs``.

    Per layer and head: ``distance`` = mean ‖z − z_uniform‖/‖z − c‖ and ``cosine`` = mean
    cos(z − c, z_uniform − c) (``c``: the head's value offset), ``self_attention`` against
    ``self_uniform`` = mean 1/m. The means are over query positions that reach at least two
    keys (:meth:`ModelAdapter.reach`); those that reach one key (each prompt's first real
    token) are uniform by construction, excluded, and counted in ``n_single_key``. See
    :class:`AssociationReader` and :class:`AssociationBias` for the definitions: the measures
    are invariant to TransformerLens weight processing (raw bridge, compatibility mode and a
    processed HookedTransformer give the same numbers), and ``keys`` chooses between the keys
    each layer reaches (default) and the whole causal prefix.

    Raises EmbedwalkError when no query reaches two keys (one-token prompts), and
    ArchitectureError where the model's reachable keys are unknown (chunked attention,
    attention sinks).
    """
    (res,) = run(model, inputs, readers=[AssociationReader(exclude_self=exclude_self, keys=keys)],
                 attention_mask=attention_mask, batch_size=batch_size, **run_kwargs)
    return res


# --------------------------------------------------------------------------- downstream
class _Residuals(Reader):
    """Keeps the current batch's final residual (the composite vector, float32, valid positions)
    and, optionally, the residual entering chosen layers (for resuming a pass there)."""

    def __init__(self, layers: Sequence[int] = ()):
        self.layers = list(layers)
        self.final: Optional[Tensor] = None
        self.pre: dict[int, Tensor] = {}

    def hook_points(self, adapter):
        return [adapter.hook("resid_pre", l) for l in self.layers] + [adapter.final_resid_hook]

    def read(self, name, value, ctx):
        if name == ctx.adapter.final_resid_hook:
            self.final = value.to(torch.float32)
        else:
            self.pre[int(name.split(".")[1])] = value.detach().clone()


@dataclass
class _Reference:
    """The original pass over one batch of prompts, reduced to what a comparison needs."""

    mask: Tensor  # [batch, pos] bool
    logp: Tensor  # [n_valid, vocab] float32
    top1: Tensor  # [n_valid]
    final: Tensor  # [n_valid, d_model] float32
    nll: Tensor  # [n_pred] float64
    pre: dict  # layer -> residual entering it [batch, pos, d_model]
    p: Optional[Tensor] = None  # exp(logp), formed once for every swap compared with it


@dataclass
class _Sums:
    """Per-swap running sums over batches: peak memory does not grow with the number of tokens."""

    nll_o: float = 0.0
    nll_s: float = 0.0
    n_pred: int = 0
    kl: float = 0.0
    agree: float = 0.0
    cos: float = 0.0
    n: int = 0


def _next_token_nll(logp: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    """-log p(next token) at positions whose next token is real, float64."""
    has_next = mask[:, :-1] & mask[:, 1:]
    nll = -logp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    return nll[has_next].double()


def _reference(adapter, tokens, mask, layers=(), progress: Optional[bool] = False) -> _Reference:
    res = _Residuals(layers)
    keep: list = []

    def on_logits(logits, ctx):
        logp = logits.to(torch.float32).log_softmax(-1)
        m = mask.to(logp.device)
        keep.append((logp[m], _next_token_nll(logp, tokens.to(logp.device), m)))

    run(adapter.model, tokens, attention_mask=mask, readers=[res], batch_size=len(tokens),
        progress=progress, on_logits=on_logits)
    (logp, nll), = keep
    final = res.final[mask.to(res.final.device)]
    return _Reference(mask, logp, logp.argmax(-1), final, nll, res.pre)


def _accumulate(sums: _Sums, ref: _Reference, logits: Tensor, final: Tensor, tokens: Tensor) -> None:
    """Add one swapped batch's loss, KL(original || swapped), top-1 agreement and cosine."""
    m = ref.mask.to(logits.device)
    logp = logits.to(torch.float32).log_softmax(-1)
    nll = _next_token_nll(logp, tokens.to(logp.device), m)
    lp = logp[m]
    del logp
    # KL = sum p_o (log p_o - log p_s), one product over the vocabulary summed in float64 blocks
    diff = ref.logp - lp
    if ref.p is None:
        ref.p = ref.logp.exp()
    sums.kl += float(rowdot(ref.p, diff, out=diff).sum())
    sums.agree += float((ref.top1 == lp.argmax(-1)).sum())
    sums.cos += float(F.cosine_similarity(ref.final, final[m.to(final.device)], dim=-1).double().sum())
    sums.nll_o += float(ref.nll.sum())
    sums.nll_s += float(nll.sum())
    sums.n_pred += int(nll.numel())
    sums.n += int(lp.shape[0])


def _effect(targets, sums: _Sums) -> "SwapEffect":
    if sums.n_pred == 0:
        raise EmbedwalkError("the text has no next-token pairs: pass prompts of at least two tokens")
    return SwapEffect(targets, sums.nll_o / sums.n_pred, sums.nll_s / sums.n_pred, sums.kl / sums.n,
                      sums.agree / sums.n, sums.cos / sums.n, n_predicted=sums.n_pred, n_positions=sums.n)


def _swapped_pass(adapter, tokens, mask, writers, refs: list, sums: list, progress: Optional[bool] = False) -> None:
    """One forward of ``len(refs)`` row groups (copies of one prompt batch, each with its own
    swap) under ``writers``; adds row group ``g``'s comparison with ``refs[g]`` to ``sums[g]``."""
    res = _Residuals()

    def on_logits(logits, ctx):
        rows = logits.shape[0] // len(refs)
        for g, (ref, acc) in enumerate(zip(refs, sums)):
            part = slice(g * rows, (g + 1) * rows)
            _accumulate(acc, ref, logits[part], res.final[part], tokens[part])

    run(adapter.model, tokens, attention_mask=mask, readers=[res], writers=writers,
        batch_size=len(tokens), progress=progress, on_logits=on_logits)


class _RowSwap(Writer):
    """Uniform swap of a different set of heads of one layer in each group of rows: row group
    ``g`` (rows ``g*group_rows .. (g+1)*group_rows - 1``) has ``heads[g]`` swapped. Lets the
    swaps of several heads of one layer share a forward."""

    def __init__(self, layer: int, heads: list, group_rows: int, *, exclude_self: bool):
        self.layer, self.heads, self.group_rows, self.exclude_self = layer, heads, group_rows, exclude_self

    def hook_points(self, adapter):
        return [adapter.hook("v", self.layer), adapter.hook("z", self.layer)]

    def write(self, name, value, ctx):
        a = ctx.adapter
        if name.endswith("hook_v"):
            ctx.state[(id(self), "v")] = value
            return value
        v = ctx.state.pop((id(self), "v"))
        # the keys this layer's own attention reaches (its sliding window too), as UniformSwap's default
        reach = a.reach(self.layer, ctx.batch.mask.to(v.device))
        new = uniform_z(v, reach, a.n_heads, a.n_kv_heads, exclude_self=self.exclude_self)
        chosen = torch.zeros(len(self.heads), a.n_heads, dtype=torch.bool)
        for g, hs in enumerate(self.heads):
            chosen[g, hs] = True
        chosen = chosen.repeat_interleave(self.group_rows, 0).to(value.device)[:, None, :, None]
        z = _heads_view(value, a.n_heads)
        return torch.where(chosen, new.to(z.dtype), z).reshape(value.shape)


def _packs(by_layer: dict[int, list[int]], per: int) -> list[list[tuple[int, int]]]:
    """The swaps (layer, job) in layer order, cut into packs of at most ``per`` row groups."""
    flat = [(layer, j) for layer in sorted(by_layer) for j in by_layer[layer]]
    return [flat[i : i + per] for i in range(0, len(flat), per)]


def _prompt_batches(tokens: Tensor, mask: Tensor, batch_size: int):
    if batch_size < 1:
        raise EmbedwalkError(f"batch_size must be at least 1, got {batch_size}")
    for i in range(0, tokens.shape[0], batch_size):
        tok, m = tokens[i : i + batch_size], mask[i : i + batch_size]
        keep = m.any(0)  # as run() trims them: columns that are padding in every row
        yield tok[:, keep], m[:, keep]


@summary_repr
@dataclass
class SwapEffect:
    """What swapping ``targets`` for uniform aggregation did to the model's predictions.

    Two counts, one per kind of mean: ``loss_original``/``loss_swapped`` (next-token loss,
    nats/token) are means over the ``n_predicted`` positions that have a next real token to
    predict (a prompt of n real tokens has n − 1); ``kl`` (KL(original ‖ swapped), nats),
    ``top1_agreement`` and ``composite_cosine`` (cosine of the final residuals) are means over
    all ``n_positions`` real token positions.
    """

    targets: object
    loss_original: float
    loss_swapped: float
    kl: float
    top1_agreement: float
    composite_cosine: float
    n_predicted: int
    n_positions: int

    @property
    def delta_loss(self) -> float:
        return self.loss_swapped - self.loss_original

    def _headline(self) -> list[str]:
        return [
            f"uniform swap of {self.targets}: delta loss {self.delta_loss:+.4g} nats/token "
            f"({self.loss_original:.4g} -> {self.loss_swapped:.4g}) over {self.n_predicted} predicted positions",
            f"KL(original || swapped) {self.kl:.4g} nats, top-1 agreement {self.top1_agreement:.1%}, "
            f"final-residual cosine {self.composite_cosine:.4f} over {self.n_positions} token positions",
        ]

    def as_row(self) -> dict:
        return {"loss_original": self.loss_original, "loss_swapped": self.loss_swapped,
                "delta_loss": self.delta_loss, "kl": self.kl, "top1_agreement": self.top1_agreement,
                "composite_cosine": self.composite_cosine, "n_predicted": self.n_predicted,
                "n_positions": self.n_positions}

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame([{"targets": str(self.targets), "metric": k, "value": v} for k, v in self.as_row().items()])

    def plot(self):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3), constrained_layout=True)
        row = self.as_row()
        keys = ["delta_loss", "kl", "top1_agreement", "composite_cosine"]
        ax.bar(keys, [row[k] for k in keys])
        ax.set_title(f"uniform swap of {self.targets}")
        return fig


def _prepare(model, inputs, attention_mask, prepend_bos, padding_side):
    adapter = adapt(model)
    tokens, mask = tokenize(adapter, inputs, attention_mask, prepend_bos=prepend_bos, padding_side=padding_side)
    return adapter, tokens, mask


def downstream(
    model,
    inputs: Inputs,
    targets: Targets = "all",
    *,
    attention_mask: Optional[Tensor] = None,
    exclude_self: bool = False,
    method: str = "fast",
    batch_size: int = 8,
    prepend_bos: Optional[bool] = None,
    padding_side: Optional[str] = None,
    progress: Optional[bool] = None,
) -> SwapEffect:
    """Swap ``targets`` (all / layers / (layer, head) pairs) and compare with the original model.

    Per batch of ``batch_size`` prompts: the original forward, then the swapped one, reduced
    at once to sums of the loss, KL(original || swapped) (float64-accumulated), top-1
    agreement and the cosine of the final residuals; the peak extra memory is that of one
    batch's log-probs and does not grow with the number of prompts. The loss is a mean over the
    ``n_predicted`` positions that have a next real token, KL, top-1 and cosine over all
    ``n_positions`` real tokens (both reported on the :class:`SwapEffect`).

    ``progress``: one bar over both passes of every prompt, with an ETA, shown once the call
    has run 5 s (:func:`embedwalk.progress.show_after`); True shows it at once, False never.
    """
    adapter, tokens, mask = _prepare(model, inputs, attention_mask, prepend_bos, padding_side)
    swap = UniformSwap(targets, exclude_self=exclude_self, method=method)
    swap.heads(adapter)  # validate before spending a forward pass
    sums = _Sums()
    from embedwalk.progress import progress_scope

    # Both passes of a batch advance the one bar (inside it, within each forward pass too).
    with progress_scope(2 * tokens.shape[0], "downstream (2 passes)", unit="prompt-pass", progress=progress):
        for tok, m in _prompt_batches(tokens, mask, batch_size):
            ref = _reference(adapter, tok, m, progress=None)
            _swapped_pass(adapter, tok, m, [swap], [ref], [sums], progress=None)
    return _effect(targets, sums)


@summary_repr
@dataclass
class SweepResult:
    """One row per swap: ``unit`` is 'all', 'layer' or 'head'."""

    effects: list[SwapEffect] = field(default_factory=list)
    units: list[str] = field(default_factory=list)
    n_layers: int = 0
    n_heads: int = 0

    def _headline(self) -> list[str]:
        from embedwalk._summary import table_lines

        if not self.effects:
            return ["no swaps"]
        df = self.table
        counts = df.unit.value_counts().to_dict()
        return [f"{len(df)} swaps ({', '.join(f'{v} {k}' for k, v in counts.items())}) on {self.n_layers} layers x {self.n_heads} heads; "
                "largest KL first:"] + table_lines(df.sort_values("kl", ascending=False), max_rows=8)

    @property
    def table(self):
        import pandas as pd

        rows = []
        for unit, e in zip(self.units, self.effects):
            layer = head = None
            if unit == "layer":
                layer = e.targets[0]
            elif unit == "head":
                layer, head = e.targets[0]
            rows.append({"unit": unit, "layer": layer, "head": head, **e.as_row()})
        df = pd.DataFrame(rows)
        # nullable integers: a layer is 3, not 3.0, and "no head" is <NA>, not NaN
        for col in ("layer", "head"):
            if col in df:
                df[col] = pd.array([None if pd.isna(v) else int(v) for v in df[col]], dtype="Int64")
        return df

    def head_matrix(self, metric: str = "delta_loss") -> Float[Tensor, "layer head"]:
        out = torch.full((self.n_layers, self.n_heads), float("nan"))
        for unit, e in zip(self.units, self.effects):
            if unit == "head":
                l, h = e.targets[0]
                out[l, h] = e.as_row()[metric]
        return out

    def to_dataframe(self):
        return self.table.melt(id_vars=["unit", "layer", "head"], var_name="metric", value_name="value")

    def plot(self, metric: str = "delta_loss"):
        import matplotlib.pyplot as plt

        t = self.table
        layers = t[t.unit == "layer"]
        heads = self.head_matrix(metric)
        has_heads = not torch.isnan(heads).all()
        fig, axes = plt.subplots(1, 1 + has_heads, figsize=(5 + 5 * has_heads, 4.5), constrained_layout=True, squeeze=False)
        from embedwalk.figures import integer_ticks, signed_norm

        ax = axes[0, 0]
        ax.bar(layers.layer.to_numpy(dtype=int), layers[metric].to_numpy(dtype=float))
        ax.set(title=f"{metric}: one layer swapped", xlabel="layer", ylabel=_SWEEP_UNITS.get(metric, metric))
        integer_ticks(ax.xaxis)
        if has_heads:
            values = heads.numpy()
            # a signed metric diverges around 0 (blue: the swap helped, red: it hurt)
            style = dict(cmap="RdBu_r", norm=signed_norm(values)) if metric in _SIGNED else dict(cmap="magma")
            im = axes[0, 1].imshow(values, aspect="auto", **style)
            axes[0, 1].set(title=f"{metric}: one head swapped", xlabel="head", ylabel="layer")
            integer_ticks(axes[0, 1].xaxis, axes[0, 1].yaxis)
            fig.colorbar(im, ax=axes[0, 1], label=_SWEEP_UNITS.get(metric, metric))
        return fig


_SIGNED = {"delta_loss"}  # metrics whose sign matters: drawn on a diverging map centred on 0


_SWEEP_UNITS = {
    "delta_loss": "Δ loss, swapped − original [nats/token]",
    "kl": "KL(original ‖ swapped) [nats]",
    "top1_agreement": "top-1 agreement with the original (fraction)",
    "composite_cosine": "cosine of final residuals (original, swapped)",
}


def sweep(
    model,
    inputs: Inputs,
    *,
    units: Sequence[str] = ("all", "layer", "head"),
    layers: Optional[Sequence[int]] = None,
    attention_mask: Optional[Tensor] = None,
    exclude_self: bool = False,
    method: str = "fast",
    batch_size: int = 8,
    rows_per_forward: Optional[int] = None,
    prepend_bos: Optional[bool] = None,
    padding_side: Optional[str] = None,
    progress: Optional[bool] = None,
) -> SweepResult:
    """Swap all heads, then each layer, then each head, one at a time; each row of the result
    equals :func:`downstream` of that swap (to float32 rounding, ~1e-6).

    Work is reused: per batch of ``batch_size`` prompts, one original pass keeps the residual
    entering each layer; every swap at layer ``l`` resumes there (blocks ``0..l-1`` are not
    recomputed), and the layer swap and the head swaps of one layer run as row groups of one
    forward of at most ``rows_per_forward`` rows (default: as many as fit 2048 tokens, at
    least ``batch_size``). Metrics are reduced per forward, so the peak extra memory is set by
    ``rows_per_forward``, never by the number of prompts. ``units="all"`` runs
    ``method`` (the fast path bypasses every attention's query-key path); layer and head swaps
    always overwrite ``hook_z`` with the mean of the values over the reachable keys, equal to the
    pattern method to float32 rounding. ``progress``: a bar over the swaps with an ETA, shown
    once the call has run 5 s (:func:`embedwalk.progress.show_after`); True shows it at once,
    False never.

    Each row (:class:`SwapEffect`) carries the counts its means are over: ``n_predicted``
    (positions with a next real token: the loss) and ``n_positions`` (all real tokens: KL,
    top-1 agreement, cosine).
    """
    bad = set(units) - {"all", "layer", "head"}
    if bad or not units:
        raise EmbedwalkError(f"units must be chosen from 'all', 'layer', 'head'; got {list(units)!r}")
    if rows_per_forward is not None and (not isinstance(rows_per_forward, int) or rows_per_forward < 1):
        raise EmbedwalkError(f"rows_per_forward must be a positive int, got {rows_per_forward!r}")
    adapter, tokens, mask = _prepare(model, inputs, attention_mask, prepend_bos, padding_side)
    UniformSwap("all", exclude_self=exclude_self, method=method)  # validates method
    chosen = sorted({adapter.check_layer(l) for l in (layers if layers is not None else range(adapter.n_layers))})
    jobs: list[tuple[str, object]] = []
    if "all" in units:
        jobs.append(("all", "all"))
    if "layer" in units:
        jobs += [("layer", [l]) for l in chosen]
    if "head" in units:
        jobs += [("head", [(l, h)]) for l in chosen for h in range(adapter.n_heads)]
    by_layer: dict[int, list[int]] = {}
    for j, (unit, targets) in enumerate(jobs):
        if unit != "all":
            by_layer.setdefault(next(iter(resolve_targets(adapter, targets))), []).append(j)
    sums = [_Sums() for _ in jobs]
    rows_cap = rows_per_forward or max(batch_size, 2048 // max(1, tokens.shape[1]))
    from embedwalk.progress import progress_bar

    bar = progress_bar(total=len(jobs) * tokens.shape[0], desc="swap sweep", unit="swap-prompt", progress=progress)
    try:
        for tok, m in _prompt_batches(tokens, mask, batch_size):
            ref = _reference(adapter, tok, m, layers=sorted(by_layer))
            B = tok.shape[0]
            if "all" in units:
                _swapped_pass(adapter, tok, m, [UniformSwap("all", exclude_self=exclude_self, method=method)], [ref], [sums[0]])
                bar.update(B)
            for pack in _packs(by_layer, max(1, rows_cap // B)):
                # One forward per pack of row groups, resumed at its first layer: a swap at a
                # later layer of the pack recomputes the few blocks in between (as the original
                # pass did) rather than paying a forward of its own.
                start, G = pack[0][0], len(pack)
                writers = [Resume(start, ref.pre[start].repeat(G, 1, 1))]
                for layer in sorted({l for l, _ in pack}):
                    heads = [resolve_targets(adapter, jobs[j][1])[layer] if l == layer else [] for l, j in pack]
                    writers.append(_RowSwap(layer, heads, B, exclude_self=exclude_self))
                group = [j for _, j in pack]
                _swapped_pass(adapter, tok.repeat(G, 1), m.repeat(G, 1), writers, [ref] * G, [sums[j] for j in group])
                bar.update(B * G)
            del ref
    finally:
        bar.close()
    result = SweepResult(n_layers=adapter.n_layers, n_heads=adapter.n_heads)
    for (unit, targets), acc in zip(jobs, sums):
        result.effects.append(_effect(targets, acc))
        result.units.append(unit)
    return result
